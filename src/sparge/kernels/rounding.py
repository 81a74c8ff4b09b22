"""Rounding and quantization steps shared by the pre-pass and the attention kernel.

Each rounds exactly as :mod:`sparge.quant` (the specification) does: a value is divided by its
scale as a product with the scale's IEEE reciprocal (``div_rn`` once per scale; the IEEE quotient
for scales outside the reciprocal's range), INT8 values are the exact product rounded half-to-even
through the 1.5 * 2^23 trick in one FMA (exact for |x| < 2^22; under the interpreter too, see
:func:`fma`), and FP8 values come from the GPU's own conversion of the float32 product (round to
nearest even, as PyTorch's) or, in the Triton interpreter, whose float -> fp8 conversion rounds
some values wrongly, from :func:`round_to_e4m3` first, which makes the conversion exact.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import settings
from ..quant import FP8_MAX, INT8_MAX, RECIPROCAL_MAX, RECIPROCAL_MIN

RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (x + M) - M rounds x half-to-even
_INT8_MAX = tl.constexpr(INT8_MAX)
_FP8_MAX = tl.constexpr(FP8_MAX)
_RECIPROCAL_MIN = tl.constexpr(RECIPROCAL_MIN)
_RECIPROCAL_MAX = tl.constexpr(RECIPROCAL_MAX)
# Triton's interpreter before 3.9 computes tl.fma as a rounded product plus an addend; whether the
# kernels run under the interpreter is decided, like here, when the module is imported
_INTERPRETED = tl.constexpr(settings.INTERPRET.enabled())


@triton.jit
def _safe_scale(amax, QMAX: tl.constexpr):
    """amax / QMAX (IEEE), 1 where amax is 0, NaN where amax is NaN or infinite:
    ``sparge.quant._safe_scale``."""
    scale = tl.where(amax < float("inf"), tl.math.div_rn(amax, QMAX), float("nan"))
    return tl.where(amax == 0, 1.0, scale)


@triton.jit
def _maximum_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_keeping_nan(x, axis):
    """``tl.max(x, axis)``, but NaN where a reduced element is NaN, as ``torch.amax`` (the GPU's
    default maximum returns the other operand of a NaN: a block's NaN would vanish from its
    amax, and so from its scale)."""
    if _INTERPRETED:  # the interpreter would run the combine in Python, pair by pair (60x slower)
        return tl.where(tl.max((x != x).to(tl.int32), axis) > 0, float("nan"), tl.max(x, axis))
    return tl.reduce(x, axis, _maximum_keeping_nan)


@triton.jit
def int8_scale(amax):
    """The INT8 scale of a block whose largest magnitude is amax (float32 scalar)."""
    return _safe_scale(amax, _INT8_MAX)


@triton.jit
def fp8_scale(amax):
    """The FP8 e4m3 scale of a channel whose largest magnitude is amax (float32)."""
    return _safe_scale(amax, _FP8_MAX)


@triton.jit
def _fma_float64(a, b, c):
    """RN(a b + c) for float32 a, b, c, in float64 arithmetic: the product is exact (24 + 24
    bits), TwoSum gives the float64 sum s and its exact error e, and RN(s) to float32 is the
    answer unless s lies exactly halfway between two float32 values, where e's sign decides (a
    float64 s that is not a float32 midpoint is at least an ulp of s away from one, farther than
    e)."""
    p = a.to(tl.float64) * b.to(tl.float64)
    c64 = c.to(tl.float64)
    s = p + c64
    t = s - p
    err = (p - (s - t)) + (c64 - t)
    r = s.to(tl.float32)
    r64 = r.to(tl.float64)
    # r's float32 neighbour on s's side: one step of the magnitude bits, up or down
    away = (s > r64) == (r >= 0)  # s lies farther from zero than r
    bits = r.to(tl.int32, bitcast=True)
    other = tl.where(away, bits + 1, bits - 1).to(tl.float32, bitcast=True)
    midpoint = (s != r64) & (s == (r64 + other.to(tl.float64)) * 0.5)
    toward_other = (err > 0) == (other > r)
    return tl.where(midpoint & (err != 0) & toward_other, other, r)


@triton.jit
def fma(a, b, c):
    """a b + c rounded once (float32): the GPU's FMA, or under the interpreter
    :func:`_fma_float64`, which its own tl.fma is not in every Triton version."""
    if _INTERPRETED:
        return _fma_float64(a, b, c)
    return tl.fma(a, b, c)


@triton.jit
def reciprocal(scale):
    """RN(1 / scale) (IEEE), elementwise: :func:`sparge.quant.reciprocal`, 0 for scales outside
    [RECIPROCAL_MIN, RECIPROCAL_MAX] (and NaN ones), by which values are divided instead."""
    in_range = (scale >= _RECIPROCAL_MIN) & (scale <= _RECIPROCAL_MAX)
    return tl.where(in_range, tl.math.div_rn(1.0, scale), 0.0)


@triton.jit
def times_reciprocal(x, scale, r, in_range):
    """x / scale as :func:`sparge.quant.times_reciprocal` computes it, float32: RN(x r) with
    r = :func:`reciprocal` (scale), the IEEE quotient where r is 0. ``scale`` is a scalar or a
    vector broadcast along x's rows; ``in_range`` (scalar) is true when no r is 0, which keeps
    the divisions out of the compiled path."""
    if in_range:
        q = x * r
    else:
        # x / 1 * r where r > 0, x / scale * 1 elsewhere: one expression for both (a select
        # between the two products took more registers than V's launch has: spills at sm_90)
        in_reach = r > 0
        q = tl.math.div_rn(x, tl.where(in_reach, 1.0, scale)) * tl.where(in_reach, r, 1.0)
    return q


@triton.jit
def to_int8(x, scale, r):
    """float32 x quantized with the scalar ``scale`` = int8_scale(amax) of a block whose
    magnitudes are at most amax (r = :func:`reciprocal` (scale)), as
    :func:`sparge.quant.int8_values`: the exact product x r rounded half-to-even (for scales
    outside the reciprocal's range, the IEEE quotient rounded), clamped to [-127, 127], as int8.

    One FMA, t = RN(x r + 1.5 * 2^23), rounds the product and holds the integer n in its float
    bits (0x4B400000 + n), whose low byte is n as int8: the bits are truncated, with no
    float-to-integer conversion (a quarter-rate instruction on recent GPUs). Where r > 0 the
    clamp is left out: such a scale is a normal float within 2^-24 of amax / 127 and r within
    2^-24 of its inverse, so |x r| <= 127 (1 + 2^-22), which rounds to 127 at most.
    """
    if r > 0:
        t = fma(x, r, tl.full(x.shape, RINT_MAGIC, tl.float32))
    else:
        t = tl.math.div_rn(x, scale) + RINT_MAGIC
        t = tl.minimum(tl.maximum(t, RINT_MAGIC - _INT8_MAX), RINT_MAGIC + _INT8_MAX)
    return t.to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def round_to_e4m3(y):
    """float32 y (|y| <= 448) rounded half-to-even to the nearest float8_e4m3fn value, as float32.

    Normal e4m3 numbers have 3 mantissa bits and exponents from -6; below 2^-6 the grid step stays
    2^-9 (subnormals). Rounding to a multiple of the power of two u is (|y| + 1.5 u 2^23) - 1.5 u
    2^23. The sign is copied bit for bit, so -0 stays -0 like PyTorch's conversion.
    """
    bits = y.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(y), _FP8_MAX)
    exp = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exp = tl.maximum(exp, 127 - 6)
    magic = ((exp + 20) << 23) | 0x400000  # 1.5 * 2^(e + 23 - 3)
    magic_f = magic.to(tl.float32, bitcast=True)
    r = tl.minimum((a + magic_f) - magic_f, _FP8_MAX)
    r_bits = r.to(tl.int32, bitcast=True) | (bits & -2147483648)
    return r_bits.to(tl.float32, bitcast=True)


__all__ = ["RINT_MAGIC", "fp8_scale", "int8_scale", "max_keeping_nan", "reciprocal",
           "round_to_e4m3", "times_reciprocal", "to_int8"]
