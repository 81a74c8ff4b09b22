"""The predictor and the lookup table on the GPU, without host synchronisation.

:func:`predict_mask_gpu` runs the Triton statistics pre-pass, then the selection of
:func:`sparge.predict.select_blocks`, whose fixed-shape tensor operations need no host
synchronisation. :func:`block_map_to_lut` builds the upstream ``spas_sage_attn`` lookup table
(:meth:`sparge.mask.SparseMask.to_lut`), or the absolute-index table the attention kernel reads,
with one Triton program per (batch, head, query block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mask import SparseMask
from ..predict import Selection, select_blocks
from .prepass import block_stats_gpu


def predict_mask_gpu(q: torch.Tensor, k: torch.Tensor, selection: Selection, *, block_q: int,
                     block_k: int, causal: bool = False) -> SparseMask:
    """The whole predictor: statistics-only pre-pass of Q and of the smoothed K, then
    :func:`sparge.predict.select_blocks`. q (B, Hq, Lq, D), k (B, Hk, Lk, D), layout HND, any
    strides."""
    q_stats = block_stats_gpu(q, block_q)
    k_stats = block_stats_gpu(k, block_k, smooth=True)
    return select_blocks(q_stats, k_stats, selection, q_len=q.shape[2], k_len=k.shape[2],
                         block_q=block_q, block_k=block_k, causal=causal)


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison the buffers to prove full coverage)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _lut_kernel(blocks_ptr, sbb, sbh, sbq, sbk,  # uint8 (B, H, nQ, nK), any strides
                lut_ptr, counts_ptr,  # int32 (B, H, nQ, nK) and (B, H, nQ), contiguous
                H, NQ, NK, NKP: tl.constexpr, DELTA: tl.constexpr):
    """One row of the table: kept key-block indices in ascending order, delta-encoded when DELTA
    (upstream's format) or absolute, zero after the last; and the row's count."""
    row = tl.program_id(0)  # flat (b, h, i)
    i = row % NQ
    bh = row // NQ
    b = bh // H
    h = bh % H
    base = blocks_ptr + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh + i.to(tl.int64) * sbq
    j = tl.arange(0, NKP)
    kept = (tl.load(base + j * sbk, mask=j < NK, other=0) != 0).to(tl.int32)
    # The previous block's flag, to find for each j the last kept block strictly before it.
    prev_kept = tl.load(base + (j - 1) * sbk, mask=(j >= 1) & (j - 1 < NK), other=0) != 0
    last_before = tl.associative_scan(tl.where(prev_kept, j - 1, -1), 0, _max_combine)
    delta = j - tl.maximum(last_before, 0)  # the first kept block stores its own index
    slot = tl.cumsum(kept, 0) - 1  # position of a kept block in its row
    count = tl.sum(kept, 0)
    out = lut_ptr + row.to(tl.int64) * NK
    value = delta if DELTA else j
    tl.store(out + slot, value, mask=(kept != 0) & (j < NK))
    tl.store(out + j, tl.zeros_like(delta), mask=(j >= count) & (j < NK))
    tl.store(counts_ptr + row, count)


def block_map_to_lut(blocks: torch.Tensor, *,
                     delta: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The upstream lookup table of a block map, as :meth:`SparseMask.to_lut` defines it.

    Args:
        blocks: (B, H, nQ, nK) bool or integer (non-zero = kept), any strides.
        delta: delta-encode the indices (upstream's format); False gives absolute indices, as
            :meth:`SparseMask.kv_indices` does.

    Returns:
        ``(lut, counts)``: int32 (B, H, nQ, nK), per row the kept key-block indices in ascending
        order, delta-encoded (the first the index itself) or absolute, zeros after the last;
        int32 (B, H, nQ), the number of kept blocks per row.
    """
    if blocks.dim() != 4:
        raise ValueError(f"blocks must be 4-D (B, H, nQ, nK), got shape {tuple(blocks.shape)}")
    if blocks.dtype == torch.bool:
        blocks = blocks.view(torch.uint8)
    batch, heads, n_q, n_k = blocks.shape
    lut = _alloc(batch, heads, n_q, n_k, dtype=torch.int32, device=blocks.device)
    counts = _alloc(batch, heads, n_q, dtype=torch.int32, device=blocks.device)
    rows = batch * heads * n_q
    if rows == 0 or n_k == 0:
        return lut.zero_(), counts.zero_()
    nkp = max(16, triton.next_power_of_2(n_k))
    _lut_kernel[(rows,)](blocks, *blocks.stride(), lut, counts, heads, n_q, n_k, NKP=nkp,
                         DELTA=delta, num_warps=4 if nkp <= 1024 else 8)
    return lut, counts


__all__ = ["predict_mask_gpu", "block_map_to_lut"]
