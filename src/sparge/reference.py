"""Block-sparse attention with online softmax, in plain PyTorch.

This is the specification of the attention kernels and the execution path on the CPU (or any
device without Triton). It walks the kept key blocks of every query block in ascending order, as
the kernels do, with the same online softmax in base 2, the same PV-threshold rule and, when asked,
the same quantization (INT8 Q/K with per-block scales, FP8 or FP16 P and V), so that a kernel and
this function differ only by summation order.

It never materialises an Lq x Lk score matrix: memory is O(B H L D) plus one key block's scores.

The PV-threshold rule, applied per query row so that the result does not depend on a kernel's tile
size: in base-2 score units, a kept key block contributes nothing to a row (neither numerator nor
denominator) when the block's maximum score in that row is more than ``pv_threshold`` below the
row's running maximum. A row's first contributing block and, under causal masking, the block that
holds the row's own position are never skipped. With ``SPARGE_PV_TILE_SKIP=1`` a kernel also leaves
out the P.V product of a tile when all of its rows skip.
"""

from __future__ import annotations

import math

import torch

from .mask import SparseMask
from .quant import EXACT, P_FP8_SCALE, PV_FP8, PV_FP16, fp8_round, quantize_qkv

LOG2E = math.log2(math.e)


def _blocks_of(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B * H, n, block, D), zero-padded to whole blocks."""
    batch, heads, length, dim = x.shape
    n = -(-length // block)
    x = torch.nn.functional.pad(x, (0, 0, 0, n * block - length))
    return x.reshape(batch * heads, n, block, dim)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask, *,
                        scale: float, pv_threshold: torch.Tensor, mode: str = PV_FP8,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-sparse attention over the blocks ``mask`` keeps.

    Args:
        q: (B, Hq, Lq, D); k, v: (B, Hk, Lk, D), Hq a multiple of Hk (layout HND).
        mask: a :class:`SparseMask` with shape (B, Hq, nQ, nK); its ``causal`` flag turns on exact
            element-level causal masking (top-left aligned, like SDPA).
        scale: softmax scale (usually 1 / sqrt(D)).
        pv_threshold: float32 (Hq,), the PV threshold per head (see the module docstring).
        mode: ``"int8_fp8"``, ``"int8_fp16"`` or ``"none"`` (exact float32 arithmetic).
        out_dtype: output dtype; q's dtype when None.

    Returns:
        (B, Hq, Lq, D) in ``out_dtype``. Rows with no kept key are zero. A NaN or an infinity
        in the inputs gives NaN (or infinity) where it enters: a row's scores, or, in the
        quantized modes, the scale of its block (see :func:`sparge.quant.quantize_qkv`).
    """
    batch, heads_q, q_len, dim = q.shape
    heads_k, k_len = k.shape[1], k.shape[2]
    group = heads_q // heads_k
    bq, bk = mask.block_q, mask.block_k
    n_q, n_k = mask.shape[2], mask.shape[3]
    device = q.device

    if mode == EXACT:
        q_vals, k_vals, v_vals = q.float(), k.float(), v.float()
        q_scale = torch.ones(batch, heads_q, n_q, device=device)
        k_scale = torch.ones(batch, heads_k, n_k, device=device)
        v_scale = None
    elif mode in (PV_FP8, PV_FP16):
        quant = quantize_qkv(q, k, v, block_q=bq, block_k=bk, mode=mode)
        q_vals, k_vals, v_vals = quant.q.float(), quant.k.float(), quant.v.float()
        q_scale, k_scale, v_scale = quant.q_scale, quant.k_scale, quant.v_scale
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")

    q_blocks = _blocks_of(q_vals, bq).reshape(-1, bq, dim)  # (R, bq, D), R = B * Hq * nQ
    k_blocks = _blocks_of(k_vals, bk)  # (B * Hk, nK, bk, D)
    v_blocks = _blocks_of(v_vals, bk)
    # Fold the softmax scale and log2(e) into the per-block Q scale, as the kernels do.
    q_scale = (q_scale * (scale * LOG2E)).reshape(-1)
    k_scale = k_scale.reshape(batch * heads_k, n_k)

    rows = torch.arange(batch * heads_q * n_q, device=device)
    head_of_row = (rows // n_q) % heads_q
    kv_of_row = (rows // (heads_q * n_q)) * heads_k + head_of_row // group
    first_token = (rows % n_q) * bq
    lam = pv_threshold.to(device=device, dtype=torch.float32)[head_of_row]
    offs_q, offs_k = torch.arange(bq, device=device), torch.arange(bk, device=device)

    total = rows.numel()
    row_max = torch.full((total, bq), float("-inf"), device=device)
    row_sum = torch.zeros(total, bq, device=device)
    acc = torch.zeros(total, bq, dim, device=device)
    kept = mask.blocks.reshape(total, n_k)

    for j in range(n_k):
        idx = kept[:, j].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        kv = kv_of_row[idx]
        s = torch.bmm(q_blocks[idx], k_blocks[kv, j].transpose(1, 2))
        s = s * (q_scale[idx] * k_scale[kv, j])[:, None, None]
        token_q = first_token[idx][:, None] + offs_q  # (N, bq)
        token_k = j * bk + offs_k  # (bk,)
        valid = (token_k < k_len)[None, None, :]
        if mask.causal:
            valid = valid & (token_k[None, None, :] <= token_q[:, :, None])
        s = torch.where(valid, s, float("-inf"))

        m_old = row_max[idx]
        local = s.amax(dim=-1)
        m_new = torch.maximum(m_old, local)
        skip = (m_old > float("-inf")) & (local - m_old < -lam[idx][:, None])
        if mask.causal:
            skip &= ~((token_q >= j * bk) & (token_q < (j + 1) * bk))
        m_safe = torch.where(m_new > float("-inf"), m_new, 0.0)
        p = torch.exp2(s - m_safe[..., None]).masked_fill(skip[..., None], 0.0)
        alpha = torch.exp2(m_old - m_safe)

        # The quantized modes round P for the P.V product (FP8 P scaled by 448 into its range)
        # and normalise by the sum of those same rounded values: weights summing to one.
        if mode == PV_FP8:
            p = fp8_round(p * P_FP8_SCALE)
        elif mode == PV_FP16:
            p = p.half().float()
        pv = torch.bmm(p, v_blocks[kv, j])
        row_sum[idx] = row_sum[idx] * alpha + p.sum(dim=-1)
        acc[idx] = acc[idx] * alpha[..., None] + pv
        row_max[idx] = m_new

    denom = row_sum[..., None]
    if mode == PV_FP8:  # the factor 448 of P is in both acc and row_sum
        acc = acc * v_scale.reshape(batch * heads_k, 1, dim)[kv_of_row]
    # A row without a contributing key has a sum of exactly 0; a NaN sum (a non-finite input
    # reached the row) must stay NaN, so the test is != 0, not > 0.
    out = torch.where(denom != 0, acc / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    out = out.reshape(batch, heads_q, n_q * bq, dim)[:, :, :q_len]
    return out.to(out_dtype or q.dtype)
