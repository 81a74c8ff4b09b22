"""The fused pre-pass: block statistics and quantization of Q, K and V in one pass over each.

What it computes is specified by :mod:`sparge.predict` (``block_stats``, ``smooth_k``) and
:mod:`sparge.quant` (``quantize_int8_per_block``, ``quantize_v_fp8``):

- Q, per block of ``block_q`` rows: INT8 values, the float32 scale (amax / 127, 1 for an all-zero
  block) and, on request, the pooled mean and the self-similarity.
- K: its per-channel mean over all tokens (one reduction), then per block of ``block_k`` rows of the
  smoothed K (k - mean): INT8 values, scale, pooled mean and self-similarity.
- V: FP8 e4m3 with one scale per (batch, head, channel), stored K-major (the FP8 dot of Hopper wants
  the second operand transposed), or FP16 for PV in FP16.

Every step is a fixed-size kernel launch or a fixed-size torch reduction: no host synchronisation,
no allocation that depends on data, so the pre-pass can be captured in a CUDA graph.

Rounding matches PyTorch exactly: divisions are IEEE (``div_rn``), rounding to integers is
half-to-even through the 1.5 * 2^23 trick (exact for |x| < 2^22), and values are rounded to the
e4m3 grid in float32 before the FP8 conversion, so the conversion itself is exact on every backend
(the Triton interpreter's own float -> fp8 rounding differs from PyTorch's on some values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import num_blocks
from ..predict import BlockStats
from ..quant import FP8_DTYPE, FP8_MAX, PV_FP8, PV_FP16, QuantizedQKV

# 1.5 * 2^23: (x + M) - M rounds x half-to-even for |x| < 2^22
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _rint(x):
    """Round float32 to the nearest integer, ties to even (exact for |x| < 2^22)."""
    return (x + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _round_to_e4m3(y):
    """float32 y (|y| <= 448) rounded half-to-even to the nearest float8_e4m3fn value, as float32.

    Normal e4m3 numbers have 3 mantissa bits and exponents from -6; below 2^-6 the grid step stays
    2^-9 (subnormals). Rounding to a multiple of the power of two u is (|y| + 1.5 u 2^23) - 1.5 u
    2^23. The sign is copied bit for bit, so -0 stays -0 like PyTorch's conversion.
    """
    bits = y.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(y), 448.0)
    exp = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exp = tl.maximum(exp, 127 - 6)
    magic = ((exp + 20) << 23) | 0x400000  # 1.5 * 2^(e + 23 - 3)
    magic_f = magic.to(tl.float32, bitcast=True)
    r = tl.minimum((a + magic_f) - magic_f, 448.0)
    r_bits = r.to(tl.int32, bitcast=True) | (bits & -2147483648)
    return r_bits.to(tl.float32, bitcast=True)


@triton.jit
def _block_prepass_kernel(
        x_ptr, sxb, sxh, sxl, sxd,  # input (B, H, L, D), any strides
        mu_ptr,  # float32 (B, H, D) contiguous per-channel mean to subtract (if SMOOTH)
        xq_ptr,  # int8 (B, H, L, D) contiguous output (if QUANT)
        scale_ptr,  # float32 (B, H, n) (if QUANT)
        mean_ptr,  # float32 (B, H, n, D) (if STATS)
        sim_ptr,  # float32 (B, H, n) (if STATS)
        H, L, D, n_blocks,
        BLOCK: tl.constexpr, DP: tl.constexpr, SMOOTH: tl.constexpr, QUANT: tl.constexpr,
        STATS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DP)
    rmask = rows < L
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]

    base = b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    offs = rows.to(tl.int64)[:, None] * sxl + cols[None, :].to(tl.int64) * sxd
    x = tl.load(x_ptr + base + offs, mask=m2, other=0.0).to(tl.float32)
    if SMOOTH:
        mu = tl.load(mu_ptr + pid_bh.to(tl.int64) * D + cols, mask=cmask, other=0.0)
        x = tl.where(m2, x - mu[None, :], 0.0)

    if STATS:
        count = tl.minimum(L - pid_n * BLOCK, BLOCK).to(tl.float32)
        mean = tl.math.div_rn(tl.sum(x, axis=0), count)
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        unit = tl.where(norm[:, None] > 0, x / tl.maximum(norm, 1.1754943508222875e-38)[:, None],
                        0.0)
        u = tl.sum(unit, axis=0) / count
        sim = tl.minimum(tl.maximum(tl.sum(u * u, axis=0), 0.0), 1.0)
        stat_row = pid_bh.to(tl.int64) * n_blocks + pid_n
        tl.store(mean_ptr + stat_row * D + cols, mean, mask=cmask)
        tl.store(sim_ptr + stat_row, sim)

    if QUANT:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
        y = _rint(tl.math.div_rn(x, scale))
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        out_offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(xq_ptr + pid_bh.to(tl.int64) * L * D + out_offs, y.to(tl.int8), mask=m2)
        tl.store(scale_ptr + pid_bh.to(tl.int64) * n_blocks + pid_n, scale)


@triton.jit
def _v_fp8_kernel(
        v_ptr, svb, svh, svl, svd,  # input (B, H, L, D), any strides
        vs_ptr,  # float32 (B, H, D) contiguous per-channel scales
        out_ptr,  # float8_e4m3fn (B, H, D, LP) contiguous, K-major
        H, L, LP, D,
        BL: tl.constexpr, DP: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_l * BL + tl.arange(0, BL)
    cols = tl.arange(0, DP)
    cmask = cols < D
    base = b.to(tl.int64) * svb + h.to(tl.int64) * svh
    offs = rows.to(tl.int64)[:, None] * svl + cols[None, :].to(tl.int64) * svd
    x = tl.load(v_ptr + base + offs, mask=(rows < L)[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    scale = tl.load(vs_ptr + pid_bh.to(tl.int64) * D + cols, mask=cmask, other=1.0)
    y = _round_to_e4m3(tl.math.div_rn(x, scale[None, :]))
    out_offs = cols[None, :].to(tl.int64) * LP + rows[:, None]
    # Rows in [L, LP) are padding: they get zeros, so a kernel may read them unmasked.
    tl.store(out_ptr + pid_bh.to(tl.int64) * D * LP + out_offs, y.to(tl.float8e4nv),
             mask=(rows < LP)[:, None] & cmask[None, :])


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison the buffers to prove full coverage)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _dim_pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _warps(rows: int, dim_pad: int) -> int:
    return max(4, min(16, rows * dim_pad // 2048))


def _block_pass(x: torch.Tensor, block: int, *, mean: torch.Tensor | None, quant: bool,
                stats: bool) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                      BlockStats | None]:
    """One pass over x (B, H, L, D): int8 values and scales (if ``quant``), block statistics (if
    ``stats``), on x - mean[:, :, None, :] when ``mean`` (float32 (B, H, D)) is given."""
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    dev = x.device
    values = _alloc(batch, heads, length, dim, dtype=torch.int8, device=dev) if quant else None
    scales = _alloc(batch, heads, n, dtype=torch.float32, device=dev) if quant else None
    pooled = _alloc(batch, heads, n, dim, dtype=torch.float32, device=dev) if stats else None
    sim = _alloc(batch, heads, n, dtype=torch.float32, device=dev) if stats else None
    dummy = x  # placeholder pointer for outputs a variant does not write
    dp = _dim_pad(dim)
    _block_prepass_kernel[(n, batch * heads)](
        x, *x.stride(),
        mean if mean is not None else dummy,
        values if quant else dummy, scales if quant else dummy,
        pooled if stats else dummy, sim if stats else dummy,
        heads, length, dim, n,
        BLOCK=block, DP=dp, SMOOTH=mean is not None, QUANT=quant, STATS=stats,
        num_warps=_warps(block, dp))
    return values, scales, (BlockStats(pooled, sim) if stats else None)


def channel_mean(k: torch.Tensor) -> torch.Tensor:
    """float32 (B, H, D): the mean of k (B, H, L, D) over its tokens (what smooth_k subtracts)."""
    return k.mean(dim=2, dtype=torch.float32).contiguous()


def quantize_v_fp8_kmajor(v: torch.Tensor, block_k: int = 128) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """FP8 e4m3 V with one float32 scale per (batch, head, channel), stored K-major.

    Returns ``(values, scales)``: values is a (B, H, L, D) view of a contiguous (B, H, D, LP)
    buffer, LP = L rounded up to a multiple of ``block_k`` (the padding rows hold zeros);
    scales float32 (B, H, D).
    """
    batch, heads, length, dim = v.shape
    amax = torch.linalg.vector_norm(v, float("inf"), dim=2, dtype=torch.float32)
    # Divide by a tensor: PyTorch on CUDA divides by a Python scalar through its reciprocal,
    # which is not the IEEE quotient the CPU (and the rest of this pre-pass) computes.
    scales = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), 1.0).contiguous()
    padded = num_blocks(length, block_k) * block_k
    buf = _alloc(batch, heads, dim, padded, dtype=FP8_DTYPE, device=v.device)
    dp = _dim_pad(dim)
    rows = 64 if dp <= 128 else 32
    _v_fp8_kernel[(triton.cdiv(padded, rows), batch * heads)](
        v, *v.stride(), scales, buf, heads, length, padded, dim, BL=rows, DP=dp,
        num_warps=4)
    return buf.transpose(2, 3)[:, :, :length], scales


def block_stats_gpu(x: torch.Tensor, block: int, *, smooth: bool = False) -> BlockStats:
    """Pooled mean and self-similarity per block, as :func:`sparge.predict.block_stats` computes
    them (of ``smooth_k(x)`` when ``smooth``), without quantizing."""
    mean = channel_mean(x) if smooth else None
    return _block_pass(x, block, mean=mean, quant=False, stats=True)[2]


def prepare_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_q: int, block_k: int,
                mode: str, with_stats: bool
                ) -> tuple[QuantizedQKV, BlockStats | None, BlockStats | None]:
    """Quantize Q, smoothed K and V for the attention kernel, with the predictor's statistics.

    Args:
        q: (B, Hq, Lq, D); k, v: (B, Hk, Lk, D); layout HND, any strides, float16, bfloat16 or
            float32, any lengths >= 1, D <= 256.
        block_q, block_k: rows per quantization (and statistics) block.
        mode: ``"int8_fp8"`` (V in FP8 e4m3, K-major) or ``"int8_fp16"`` (V in FP16).
        with_stats: also return the block statistics of Q and of the smoothed K.

    Returns:
        ``(quantized, q_stats, k_stats)``. ``quantized.q``/``.k`` are contiguous int8 (B, H, L, D)
        and the scales raw float32 amax / 127 (the softmax scale is not folded in). With
        ``int8_fp8``, ``quantized.v`` is a (B, Hk, Lk, D) view of a contiguous (B, Hk, D, LP)
        float8_e4m3fn buffer, LP a multiple of ``block_k``. The statistics are None unless
        ``with_stats``.
    """
    if mode not in (PV_FP8, PV_FP16):
        raise ValueError(f"prepare_qkv mode must be {PV_FP8!r} or {PV_FP16!r}, got {mode!r}")
    q8, q_scale, q_stats = _block_pass(q, block_q, mean=None, quant=True, stats=with_stats)
    k8, k_scale, k_stats = _block_pass(k, block_k, mean=channel_mean(k), quant=True,
                                       stats=with_stats)
    if mode == PV_FP8:
        v_q, v_scale = quantize_v_fp8_kmajor(v, block_k)
    else:
        v_q, v_scale = v.to(torch.float16), None
    return QuantizedQKV(q8, q_scale, k8, k_scale, v_q, v_scale), q_stats, k_stats


__all__ = ["prepare_qkv", "block_stats_gpu", "channel_mean", "quantize_v_fp8_kmajor"]
