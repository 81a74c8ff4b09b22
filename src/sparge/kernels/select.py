"""The predictor and the lookup table on the GPU, without host synchronisation.

:func:`predict_mask_gpu` runs the Triton statistics pre-pass, then the selection of
:func:`sparge.predict.select_blocks` in one Triton program per query block
(:func:`select_blocks_gpu`), without host synchronisation; :func:`select_with_table` has the
same programs write the attention kernel's lookup table of the mask too. :func:`block_map_to_lut`
builds the upstream ``spas_sage_attn`` lookup table (:meth:`sparge.mask.SparseMask.to_lut`), or
the absolute-index table the attention kernel reads, with one Triton program per (batch, head,
query block).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..mask import SparseMask
from ..predict import BlockStats, Selection, per_head, pooled_products, select_blocks
from . import launcher
from .graphs import MASK as SLOT_MASK
from .graphs import caller_pointer
from .launcher import cdiv, next_pow2, wait_for_previous_kernel
from .prepass import block_stats_gpu


def predict_mask_gpu(q: torch.Tensor, k: torch.Tensor, selection: Selection, *, block_q: int,
                     block_k: int, causal: bool = False) -> SparseMask:
    """The whole predictor: statistics-only pre-pass of Q and of the smoothed K, then
    :func:`select_blocks_gpu`. q (B, Hq, Lq, D), k (B, Hk, Lk, D), layout HND, any strides."""
    q_stats = block_stats_gpu(q, block_q)
    k_stats = block_stats_gpu(k, block_k, smooth=True)
    return select_blocks_gpu(q_stats, k_stats, selection, q_len=q.shape[2], k_len=k.shape[2],
                             block_q=block_q, block_k=block_k, causal=causal)


# Longest key-block row the selection kernel holds in registers; longer rows use the PyTorch path.
_MAX_SORTED_BLOCKS = 4096


def _warps_per_row(nkp: int) -> int:
    """Warps of a program that handles one row of ``nkp`` (a power of two >= 16) key blocks,
    in the selection and in the lookup-table kernel: one up to 512 blocks, then 16 blocks a lane,
    8 warps at most. Of 1, 2, 4 and 8 warps, one was the fastest for both kernels at 32, 64, 256
    and (but for the causal selection, 3 % behind two warps) 512 blocks; four, the previous
    choice, took 1.05x to 2.3x its time (H200, B1 H24, L4096 to L65536,
    ``bench/results/select-warps-H200-2026-11-26-2.md``)."""
    return min(8, max(1, nkp // 512))


@triton.jit
def _store_table_row(kept, j, value, row, i, NK, lut_ptr, counts_ptr, n_full_ptr, full_blocks,
                     block_q, block_k, N_FULL: tl.constexpr, CAUSAL: tl.constexpr):
    """Row ``row`` (flat (b, h, i), i the query block) of a lookup table from the int32 flags
    ``kept`` of key blocks ``j`` (NKP,): each kept block's ``value`` at its position among the
    kept ones, zeros after the last, the row's count and, with N_FULL, ``n_full``: how many kept
    blocks need no element mask in the attention kernel, those below ``full_blocks`` (the whole
    key blocks) that, when CAUSAL, also end before the query block's first row."""
    slot = tl.cumsum(kept, 0) - 1
    count = tl.sum(kept, 0)
    out = lut_ptr + row.to(tl.int64) * NK
    tl.store(out + slot, value, mask=(kept != 0) & (j < NK))
    tl.store(out + j, tl.zeros_like(value), mask=(j >= count) & (j < NK))
    tl.store(counts_ptr + row, count)
    if N_FULL:
        limit = full_blocks
        if CAUSAL:
            limit = tl.minimum(limit, (i * block_q) // block_k)
        tl.store(n_full_ptr + row, tl.sum(tl.where(j < limit, kept, 0), 0))


@triton.jit
def _last_query(i, block_q, q_len):
    """The index of query block ``i``'s last row: key blocks starting after it are causally
    invalid for the whole block."""
    return tl.minimum((i + 1) * block_q, q_len) - 1


@triton.jit
def _any_not_finite(x):
    """Whether ``x`` holds a NaN or an infinity (the row then keeps every block, as the
    reference's does)."""
    return tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), 0) > 0


# float32 bits just above 1.0: no probability reaches them (see _kth_largest)
_ABOVE_ONE = tl.constexpr(0x3F800001)
# the top-k rule's cut by a sort in rows of up to this many blocks, by bisection in longer ones:
# the sort's cost grows as n log^2 n, the bisection's as 30 counts of n (bench/NOTES.md)
_SORT_TOPK_UP_TO = tl.constexpr(128)


@triton.jit
def _kth_largest(p, k):
    """The ``k``-th largest of the probabilities ``p`` (float32 in [0, 1]), or 0 where fewer than
    ``k`` are positive: a bisection over the bit patterns of float32 values (non-negative floats
    order as their bits), in 30 steps, each a count over the row (a vote per warp), for the
    largest t > 0 with at least ``k`` values >= t."""
    lo = tl.zeros((), tl.int32)
    hi = tl.full((), _ABOVE_ONE, tl.int32)
    for _ in range(30):  # 2 ** 30 > _ABOVE_ONE
        mid = (lo + hi) // 2
        holds = tl.sum((p >= mid.to(tl.float32, bitcast=True)).to(tl.int32), 0) >= k
        lo = tl.where(holds, mid, lo)
        hi = tl.where(holds, hi, mid)
    return lo.to(tl.float32, bitcast=True)


@triton.jit
def _select_row(products_ptr, q_sim_ptr, k_sim_ptr, sim_thr_ptr, rule_ptr, out_ptr, lut_ptr,
                counts_ptr, n_full_ptr, sqrt_d, row, i, h, bk, NK, q_len, block_q, block_k,
                full_blocks, not_finite, NKP: tl.constexpr, WHOLE_ROW: tl.constexpr,
                TOPK: tl.constexpr, CAUSAL: tl.constexpr, SINK: tl.constexpr,
                TABLE: tl.constexpr):
    """Query block ``i`` (flat index ``row`` = (batch, query head, i)) of :func:`_select_kernel`
    over its first ``NKP`` key blocks: with WHOLE_ROW all of them, and the row's scores tested
    here for a NaN or an infinity; else (causal rows that end sooner) every block up to the
    diagonal, with ``not_finite`` the caller's test of the whole row (one test over the row is
    faster than one here and one over the rest in the caller:
    ``bench/results/select-split-nonfinite-ab-H200-2026-11-28.log``).

    The reference ranks blocks by a stable sort: by probability, equal probabilities by
    ascending index, and keeps the first ``keep``. Here the kept blocks are those above the
    ``keep``-th largest probability and, of the blocks equal to it, the first ones by index, as
    many as ``keep`` leaves. The CDF rule sorts the probabilities alone for their cumulative sum
    (which does not depend on the order of equal values); the top-k rule needs only the
    ``keep``-th largest: read from the sorted row in rows of up to ``_SORT_TOPK_UP_TO`` blocks,
    found by :func:`_kth_largest` without sorting in longer ones."""
    j = tl.arange(0, NKP)
    inb = j < NK
    thr = tl.load(sim_thr_ptr + h)
    k_similar = tl.load(k_sim_ptr + bk.to(tl.int64) * NK + j, mask=inb, other=0.0) > thr
    allowed = inb & k_similar
    if CAUSAL:
        last_q = _last_query(i, block_q, q_len)
        allowed = allowed & (j * block_k <= last_q)
    s = tl.math.div_rn(tl.load(products_ptr + row * NK + j, mask=inb, other=0.0), sqrt_d)
    if WHOLE_ROW:
        not_finite = _any_not_finite(s)
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, 0)
    e = tl.where(allowed, tl.exp(s - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    z = tl.sum(e, 0)
    p = tl.where(z > 0, tl.math.div_rn(e, tl.where(z > 0, z, 1.0)), 0.0)

    if TOPK:
        keep = tl.maximum(tl.floor(tl.load(rule_ptr + h) * NK).to(tl.int32), 1)
        if NKP <= _SORT_TOPK_UP_TO:
            cut = tl.sum(tl.where(j == keep - 1, tl.sort(p, 0, descending=True), 0.0), 0)
        else:
            cut = _kth_largest(p, keep)
    else:
        ranked = tl.sort(p, 0, descending=True)
        tau = tl.load(rule_ptr + h)
        tau = tl.where(tau >= 1.0, float("inf"), tau)  # as sparge.predict.cdf_rule: keep all
        keep = tl.maximum(tl.sum(((tl.cumsum(ranked, 0) <= tau) & inb).to(tl.int32), 0), 1)
        cut = tl.sum(tl.where(j == keep - 1, ranked, 0.0), 0)  # the keep-th largest
    above = p > cut
    tied = p == cut  # padding (p = 0, the largest indices) ranks last among zeros
    tie_rank = tl.cumsum(tied.to(tl.int32), 0)  # 1, 2, ... by ascending index
    ranked_in = above | (tied & (tie_rank <= keep - tl.sum(above.to(tl.int32), 0)))
    q_similar = (tl.load(q_sim_ptr + row) > thr).to(tl.int32)
    # dissimilar blocks are forced on
    chosen = ranked_in | ~k_similar | ((tl.zeros_like(j) + q_similar) == 0) | not_finite
    if SINK:
        chosen = chosen | (j == 0)
    if CAUSAL:
        chosen = chosen & (j * block_k <= last_q)
    tl.store(out_ptr + row * NK + j, chosen.to(tl.uint8), mask=inb)
    if TABLE:
        _store_table_row((chosen & inb).to(tl.int32), j, j, row, i, NK, lut_ptr, counts_ptr,
                         n_full_ptr, full_blocks, block_q, block_k, True, CAUSAL)


@triton.jit
def _select_kernel(products_ptr,  # float32 (B, Hq, nQ, nK) contiguous: pooled products
                   q_sim_ptr, k_sim_ptr,  # float32 (B, Hq, nQ), (B, Hk, nK) contiguous
                   sim_thr_ptr, rule_ptr,  # float32 (Hq,): similarity threshold, CDF / top-k
                   out_ptr,  # uint8 (B, Hq, nQ, nK) contiguous
                   lut_ptr, counts_ptr, n_full_ptr,  # the lookup table (if TABLE)
                   sqrt_d,  # float32 sqrt(D): the products over it are the pooled scores
                   HQ, GROUP, NQ, NK, q_len, block_q, block_k, full_blocks,
                   NKP: tl.constexpr, TOPK: tl.constexpr, CAUSAL: tl.constexpr,
                   SINK: tl.constexpr, TABLE: tl.constexpr, PDL: tl.constexpr):
    """The kept key blocks of one query block of one (batch, query head), program
    ``program_id(0)`` = (batch, query head) * NQ + query block (a one-dimensional grid, with no
    limit of 65535 on either count), as :func:`sparge.predict.select_blocks` chooses them; with
    TABLE also that row of the attention kernel's lookup table (as :func:`mask_table` builds it).
    See :func:`_select_row`.

    Under causal masking a row whose blocks up to the diagonal fit in a quarter or a half of
    ``NKP`` is selected over that many blocks (the work of a row grows with its length); the
    blocks after them are written here, never kept. PDL: see
    :func:`launcher.dependent_launch`."""
    wait_for_previous_kernel(PDL)
    bh = tl.program_id(0) // NQ
    i = tl.program_id(0) % NQ
    h = bh % HQ
    bk = (bh // HQ) * (HQ // GROUP) + h // GROUP  # the (batch, key head) index
    row = bh.to(tl.int64) * NQ + i
    if CAUSAL and NKP >= 64:
        j = tl.arange(0, NKP)
        inb = j < NK
        not_finite = _any_not_finite(tl.load(products_ptr + row * NK + j, mask=inb, other=0.0))
        valid = tl.minimum(_last_query(i, block_q, q_len) // block_k + 1, NK)
        width = tl.where(valid <= NKP // 4, NKP // 4, tl.where(valid <= NKP // 2, NKP // 2, NKP))
        for shift in tl.static_range(2, -1, -1):  # the row over NKP / 4, NKP / 2 or NKP blocks
            if width == NKP >> shift:
                _select_row(products_ptr, q_sim_ptr, k_sim_ptr, sim_thr_ptr, rule_ptr, out_ptr,
                            lut_ptr, counts_ptr, n_full_ptr, sqrt_d, row, i, h, bk, NK, q_len,
                            block_q, block_k, full_blocks, not_finite,
                            NKP >> shift, False, TOPK, CAUSAL, SINK, TABLE)
        tail = (j >= width) & inb  # past the diagonal: never kept
        tl.store(out_ptr + row * NK + j, tl.zeros_like(j).to(tl.uint8), mask=tail)
        if TABLE:
            tl.store(lut_ptr + row * NK + j, tl.zeros_like(j), mask=tail)
    else:
        _select_row(products_ptr, q_sim_ptr, k_sim_ptr, sim_thr_ptr, rule_ptr, out_ptr, lut_ptr,
                    counts_ptr, n_full_ptr, sqrt_d, row, i, h, bk, NK, q_len, block_q, block_k,
                    full_blocks, False, NKP, True, TOPK, CAUSAL, SINK, TABLE)


def select_blocks_gpu(q_stats: BlockStats, k_stats: BlockStats, selection: Selection, *,
                      q_len: int, k_len: int, block_q: int, block_k: int,
                      causal: bool = False) -> SparseMask:
    """:func:`sparge.predict.select_blocks` with one Triton program per query block after the
    pooled scores' matrix product: softmax, the rule's cut (the CDF rule's by a sort and a
    cumulative sum, the top-k rule's by a sort in short rows and a bisection in long ones) and
    forced blocks in registers.

    The pooled products are the reference's own (:func:`sparge.predict.pooled_products`), and
    the kernel divides them by sqrt(D) as the reference does; the softmax and the cumulative sum
    add in another order, so a block whose cumulative probability lies within float32 rounding
    of the CDF threshold may differ from the reference.
    Rows longer than 4096 key blocks take the reference's path. No host synchronisation.
    """
    return _select(q_stats, k_stats, selection, q_len, k_len, block_q, block_k, causal,
                   False)[0]


def select_with_table(q_stats: BlockStats, k_stats: BlockStats, selection: Selection, *,
                      q_len: int, k_len: int, block_q: int, block_k: int, causal: bool = False
                      ) -> tuple[SparseMask, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`select_blocks_gpu` and the attention kernel's lookup table of the mask, as
    :func:`mask_table` gives it, written by the selection's own programs (one launch for both;
    two where the rows are longer than the selection kernel holds)."""
    mask, table = _select(q_stats, k_stats, selection, q_len, k_len, block_q, block_k, causal,
                          True)
    return mask, table if table is not None else mask_table(mask)


def _select(q_stats: BlockStats, k_stats: BlockStats, selection: Selection, q_len: int,
            k_len: int, block_q: int, block_k: int, causal: bool, table: bool
            ) -> tuple[SparseMask, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The selection, and with ``table`` its lookup table ``(indices, counts, n_full)`` (None
    where the reference's path selected)."""
    batch, heads_q, n_q = q_stats.mean.shape[:3]
    heads_k, n_k = k_stats.mean.shape[1], k_stats.mean.shape[2]
    if n_k > _MAX_SORTED_BLOCKS or batch * heads_q * n_q == 0:
        return select_blocks(q_stats, k_stats, selection, q_len=q_len, k_len=k_len,
                             block_q=block_q, block_k=block_k, causal=causal), None
    device = q_stats.mean.device
    products = pooled_products_gpu(q_stats, k_stats)
    topk = selection.topk is not None
    # the kernel reads a CDF threshold of 1 or more as cdf_rule does: no tensor operation here,
    # so a threshold tensor costs no launch (nor a node in a replayed graph)
    rule = per_head(selection.topk if topk else selection.cdf_threshold, heads_q, device)
    sim_thr = per_head(selection.sim_threshold, heads_q, device)
    blocks = _alloc(batch, heads_q, n_q, n_k, dtype=torch.bool, device=device)
    lut = counts = n_full = blocks  # placeholders when no table is asked for
    if table:
        lut = _alloc(batch, heads_q, n_q, n_k, dtype=torch.int32, device=device)
        counts = _alloc(batch, heads_q, n_q, dtype=torch.int32, device=device)
        n_full = _alloc(batch, heads_q, n_q, dtype=torch.int32, device=device)
    nkp = max(16, next_pow2(n_k))
    launcher.run(
        _select_kernel, (batch * heads_q * n_q,),
        products, q_stats.similarity.contiguous(), k_stats.similarity.contiguous(), sim_thr,
        rule, blocks.view(torch.uint8), lut, counts, n_full,
        math.sqrt(q_stats.mean.shape[3]), heads_q, heads_q // heads_k, n_q, n_k,
        q_len, block_q, block_k, k_len // block_k,
        NKP=nkp, TOPK=topk, CAUSAL=causal, SINK=selection.attention_sink, TABLE=table,
        **launcher.dependent_launch(device), num_warps=_warps_per_row(nkp))
    # the programs drop causally invalid blocks themselves (the tests compare these very bits)
    mask = SparseMask._of_valid_blocks(blocks, block_q, block_k, q_len, k_len, causal)
    return mask, (lut, counts, n_full) if table else None


@triton.jit
def _products_kernel(q_mean_ptr, k_mean_ptr,  # float32 (B, Hq, nQ, D), (B, Hk, nK, D) contiguous
                     out_ptr,  # float32 (B, Hq, nQ, nK) contiguous
                     HQ, GROUP, NQ, NK, D,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     PRECISION: tl.constexpr, PDL: tl.constexpr):
    """A (BM, BN) tile of the pooled products of the (batch, query head) ``program_id(0)``:
    query blocks ``program_id(2)``, key blocks ``program_id(1)``, the key head h // GROUP; the
    dot products in float32 at ``PRECISION`` (Triton's ``input_precision``), D in steps of BD.
    PDL: see :func:`launcher.dependent_launch`."""
    wait_for_previous_kernel(PDL)
    bh = tl.program_id(0)
    bk = (bh // HQ) * (HQ // GROUP) + (bh % HQ) // GROUP  # the (batch, key head) index
    rows = (tl.program_id(2) * BM + tl.arange(0, BM))[:, None]
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    q_base = q_mean_ptr + bh.to(tl.int64) * NQ * D + rows * D
    k_base = k_mean_ptr + bk.to(tl.int64) * NK * D + cols[:, None] * D
    acc = tl.zeros((BM, BN), tl.float32)
    for d0 in range(0, D, BD):
        d = (d0 + tl.arange(0, BD))[None, :]
        q = tl.load(q_base + d, mask=(rows < NQ) & (d < D), other=0.0)
        k = tl.load(k_base + d, mask=(cols[:, None] < NK) & (d < D), other=0.0)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    out = out_ptr + bh.to(tl.int64) * NQ * NK + rows * NK + cols[None, :]
    tl.store(out, acc, mask=(rows < NQ) & (cols[None, :] < NK))


def pooled_products_gpu(q_stats: BlockStats, k_stats: BlockStats) -> torch.Tensor:
    """:func:`sparge.predict.pooled_products` (float32 (B, Hq, nQ, nK), contiguous), on a GPU
    by one Triton launch: the float32 dot products on the tensor cores as three TF32 products
    (``tf32x3``: each operand split into a TF32 value and its TF32 remainder), within a few
    float32 ulps of the reference's; on the CPU, the reference's own product.
    The query head h reads key head h // (Hq / Hk) in the kernel, without repeating K's means."""
    if q_stats.mean.device.type != "cuda":
        return pooled_products(q_stats, k_stats).contiguous()
    return _products_launch(q_stats.mean.contiguous(), k_stats.mean.contiguous(), "tf32x3")


def _products_launch(q_mean: torch.Tensor, k_mean: torch.Tensor, precision: str
                     ) -> torch.Tensor:
    """One launch of ``_products_kernel`` on contiguous float32 means q (B, Hq, nQ, D) and
    k (B, Hk, nK, D)."""
    batch, heads_q, n_q, dim = q_mean.shape
    heads_k, n_k = k_mean.shape[1:3]
    out = _alloc(batch, heads_q, n_q, n_k, dtype=torch.float32, device=q_mean.device)
    if out.numel() == 0:
        return out
    bm, bn = 64, 64
    launcher.run(_products_kernel, (batch * heads_q, cdiv(n_k, bn), cdiv(n_q, bm)),
                 q_mean, k_mean, out, heads_q, heads_q // heads_k, n_q, n_k, dim,
                 BM=bm, BN=bn, BD=min(64, max(16, next_pow2(dim))), PRECISION=precision,
                 **launcher.dependent_launch(q_mean.device), num_warps=4, num_stages=2)
    return out


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison the buffers to prove full coverage)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _lut_kernel(blocks_ptr, sbb, sbh, sbq, sbk,  # uint8 (B, H, nQ, nK), any strides
                lut_ptr, counts_ptr,  # int32 (B, H, nQ, nK) and (B, H, nQ), contiguous
                n_full_ptr,  # int32 (B, H, nQ), contiguous (if N_FULL)
                addresses,  # int64: the blocks' address in slot SLOT_MASK (if INDIRECT)
                H, NQ, NK, full_blocks, block_q, block_k,
                NKP: tl.constexpr, DELTA: tl.constexpr, N_FULL: tl.constexpr,
                CAUSAL: tl.constexpr, INDIRECT: tl.constexpr, PDL: tl.constexpr):
    """One row of the table: kept key-block indices in ascending order, delta-encoded when DELTA
    (upstream's format) or absolute, zero after the last; and the row's count. With N_FULL also
    how many kept blocks lie below ``full_blocks`` (the whole key blocks) and, when CAUSAL,
    wholly before the query block's first row. With INDIRECT, blocks_ptr gives only the type;
    the blocks are read at the address in ``addresses``. PDL: see
    :func:`launcher.dependent_launch`."""
    wait_for_previous_kernel(PDL)
    if INDIRECT:
        blocks_ptr = caller_pointer(addresses, SLOT_MASK, blocks_ptr)
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
    _store_table_row(kept, j, delta if DELTA else j, row, i, NK, lut_ptr, counts_ptr, n_full_ptr,
                     full_blocks, block_q, block_k, N_FULL, CAUSAL)


def _lookup_table(blocks: torch.Tensor, delta: bool, mask: SparseMask | None,
                  addresses: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One launch of ``_lut_kernel``: ``(lut, counts, n_full)``, n_full only for a ``mask``.
    With ``addresses`` (:mod:`sparge.kernels.graphs`) the blocks are read at the address in
    slot ``MASK``, ``blocks`` giving only their shape and strides."""
    if blocks.dim() != 4:
        raise ValueError(f"blocks must be 4-D (B, H, nQ, nK), got shape {tuple(blocks.shape)}")
    if blocks.dtype == torch.bool:
        blocks = blocks.view(torch.uint8)
    batch, heads, n_q, n_k = blocks.shape
    lut = _alloc(batch, heads, n_q, n_k, dtype=torch.int32, device=blocks.device)
    counts = _alloc(batch, heads, n_q, dtype=torch.int32, device=blocks.device)
    n_full = None if mask is None else _alloc(batch, heads, n_q, dtype=torch.int32,
                                              device=blocks.device)
    rows = batch * heads * n_q
    if rows == 0 or n_k == 0:
        return lut.zero_(), counts.zero_(), None if n_full is None else n_full.zero_()
    nkp = max(16, next_pow2(n_k))
    full_blocks, block_q, block_k = ((0, 1, 1) if mask is None else
                                     (mask.k_len // mask.block_k, mask.block_q, mask.block_k))
    launcher.run(_lut_kernel, (rows,), blocks, *blocks.stride(), lut, counts,
                 counts if n_full is None else n_full,
                 counts if addresses is None else addresses, heads, n_q, n_k, full_blocks,
                 block_q, block_k, NKP=nkp, DELTA=delta, N_FULL=mask is not None,
                 CAUSAL=mask is not None and mask.causal, INDIRECT=addresses is not None,
                 **launcher.dependent_launch(blocks.device), num_warps=_warps_per_row(nkp))
    return lut, counts, n_full


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
    lut, counts, _ = _lookup_table(blocks, delta, None)
    return lut, counts


def mask_table(mask: SparseMask, addresses: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention kernel's lookup table of ``mask``, in one launch: ``(indices, counts,
    n_full)``, the first two as :func:`block_map_to_lut` with absolute indices, and n_full int32
    (B, H, nQ) the number of kept blocks that need no element mask: whole key blocks (below
    ``k_len // block_k``) that, under causal masking, end before the query block's first row.
    With ``addresses``, the mask's blocks are read at the address in its slot ``MASK``."""
    return _lookup_table(mask.blocks, False, mask, addresses)


__all__ = ["block_map_to_lut", "mask_table", "predict_mask_gpu", "select_blocks_gpu",
           "select_with_table"]
