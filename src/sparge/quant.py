"""Quantization of Q, K and V, in plain PyTorch: the specification the Triton pre-pass follows.

- Q and K: INT8, symmetric, one float32 scale per (batch, head, block of rows); K is smoothed first
  (its per-channel mean over all tokens subtracted, which leaves softmax unchanged).
- V: FP8 e4m3 with one float32 scale per (batch, head, channel), where the GPU has FP8 tensor cores;
  FP16 elsewhere.
- P (the softmax numerator, in [0, 1]) is multiplied by :data:`P_FP8_SCALE` before its FP8
  conversion; the factor cancels in the final division. The softmax denominator sums the rounded
  P (FP8 or FP16) that the P.V product uses, so the output is a weighted mean of V rows whose
  weights sum to one.

A value is divided by its scale as a product with the scale's IEEE reciprocal, computed once per
scale (:func:`reciprocal`), instead of a division per element; the product differs from the
quotient by about an ulp, which moves a quantized value only where the quotient lies that close
to a rounding point. INT8 values are the exact product rounded half-to-even (as ``torch.round``
rounds), FP8 values the float32 product converted. A block (a V channel) that holds a NaN or an
infinity gets a NaN scale, which carries it into every product the block takes part in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .mask import num_blocks
from .predict import smooth_k

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
P_FP8_SCALE = FP8_MAX
FP8_DTYPE = torch.float8_e4m3fn

PV_FP8 = "int8_fp8"
PV_FP16 = "int8_fp16"
EXACT = "none"
QUANT_MODES = (PV_FP8, PV_FP16, EXACT)


def _safe_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """amax / qmax, with 1 where the block is all zeros (any scale represents it exactly) and
    NaN where it holds a NaN or an infinity (amax NaN or inf), so that the non-finite value
    reaches every product the block takes part in instead of being rounded away.

    The divisor is a tensor so that every device rounds the quotient the same (IEEE) way; a
    Python-scalar divisor becomes a multiplication by its reciprocal on CUDA.
    """
    divisor = torch.tensor(qmax, dtype=amax.dtype, device=amax.device)
    scale = torch.where(amax < math.inf, amax / divisor, math.nan)
    return torch.where(amax == 0, torch.ones_like(amax), scale)


# Scales whose reciprocal multiplies (:func:`reciprocal`); outside this range the reciprocal
# could be subnormal or overflow, and values are divided instead.
RECIPROCAL_MIN = 2.0 ** -90
RECIPROCAL_MAX = 2.0 ** 90


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """RN(1 / scale) (IEEE, float32) for scales in [RECIPROCAL_MIN, RECIPROCAL_MAX], else 0 (NaN
    scales included): the quantizers then divide by the scale."""
    in_range = (scale >= RECIPROCAL_MIN) & (scale <= RECIPROCAL_MAX)
    return torch.where(in_range, torch.ones_like(scale) / scale, torch.zeros_like(scale))


def times_reciprocal(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as the FP8 quantizer computes it, float32: RN(x * :func:`reciprocal` (scale)),
    the IEEE quotient where the reciprocal is 0. ``scale`` broadcasts against x."""
    r = reciprocal(scale)
    return torch.where(r > 0, x * r, x / scale)


def int8_values(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) clamped to [-INT8_MAX, INT8_MAX], as float32 integers: the exact product
    of x and :func:`reciprocal` (scale) (float64 holds it) rounded half-to-even, which one FMA
    computes on the GPU; the rounded IEEE quotient where the reciprocal is 0. ``scale``
    broadcasts against x (float32)."""
    r = reciprocal(scale)
    exact = x.to(torch.float64, copy=True).mul_(r.double()).round_().float()
    return torch.where(r > 0, exact, torch.round(x / scale)).clamp(-INT8_MAX, INT8_MAX)


def quantize_int8_per_block(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 quantization of x (B, H, L, D) with one scale per block of ``block`` rows.

    Returns ``(values, scales)``: int8 (B, H, L, D) and float32 (B, H, ceil(L / block)), with
    x ~= values * scales of the row's block.
    """
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - length))
    xb = xf.view(batch, heads, n, block, dim)
    scales = _safe_scale(xb.abs().amax(dim=(3, 4)), INT8_MAX)
    values = int8_values(xb, scales[..., None, None])
    values = values.view(batch, heads, n * block, dim)[:, :, :length].to(torch.int8)
    return values, scales


def quantize_v_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 quantization of v (B, H, L, D) with one scale per (batch, head, channel).

    Returns ``(values, scales)``: float8_e4m3fn (B, H, L, D) and float32 (B, H, D).
    """
    vf = v.float()
    scales = _safe_scale(vf.abs().amax(dim=2), FP8_MAX)
    return times_reciprocal(vf, scales[:, :, None, :]).to(FP8_DTYPE), scales


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float8_e4m3fn value, returned as float32."""
    return x.to(FP8_DTYPE).float()


@dataclass(frozen=True)
class QuantizedQKV:
    """Q, K, V as the quantized kernel consumes them (layout HND, unpadded).

    Attributes:
        q: int8 (B, Hq, Lq, D); q_scale: float32 (B, Hq, nQ), one per query block.
        k: int8 (B, Hk, Lk, D) of the smoothed K; k_scale: float32 (B, Hk, nK).
        v: float8_e4m3fn (B, Hk, Lk, D) with v_scale float32 (B, Hk, D), or float16 with
            v_scale None (mode ``int8_fp16``). The GPU pre-pass
            (:func:`sparge.kernels.prepass.prepare_qkv`) holds the FP8 values in its attention
            kernel's layout instead: a (B, Hk, D, LP) buffer with the keys reordered.
        k_scale_max: float32 (B, Hk), the largest K scale of each head, where the quantizer
            computes it (the GPU pre-pass does; None otherwise).
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    k_scale_max: torch.Tensor | None = None


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_q: int,
                 block_k: int, mode: str) -> QuantizedQKV:
    """Quantize Q, smoothed K and V for ``mode`` ``int8_fp8`` or ``int8_fp16``."""
    if mode not in (PV_FP8, PV_FP16):
        raise ValueError(f"quantize_qkv mode must be {PV_FP8!r} or {PV_FP16!r}, got {mode!r}")
    q8, q_scale = quantize_int8_per_block(q, block_q)
    k8, k_scale = quantize_int8_per_block(smooth_k(k), block_k)
    if mode == PV_FP8:
        v_q, v_scale = quantize_v_fp8(v)
    else:
        v_q, v_scale = v.to(torch.float16), None
    return QuantizedQKV(q8, q_scale, k8, k_scale, v_q, v_scale)
