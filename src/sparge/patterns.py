"""Static attention patterns as :class:`~sparge.mask.SparseMask` objects, and conversion to and from
PyTorch FlexAttention's ``BlockMask``.

Token-level pattern and block-level mask
-----------------------------------------
Every builder here starts from a token-level pattern (a rule saying whether query token ``i`` may
attend key token ``j``) and returns the smallest block mask that covers it: **a block is kept iff
at least one token pair inside it is allowed by the pattern** (pairs past the sequence ends do not
count). The block-sparse kernels then compute *every* pair of a kept block, so the token-level
semantics of the result is "kept block -> all its token pairs" (:meth:`SparseMask.to_token_mask`).
That is a superset of the pattern, equal to it only where the pattern is block-aligned (for
example a sliding window whose edges fall on block boundaries). Causal masking is the exception:
a causal :class:`SparseMask` masks element by element inside its blocks, so ``causal=True`` is
always exact.

Blocks are contiguous runs of ``block_q`` query tokens and ``block_k`` key tokens, the last run of
each axis possibly shorter. All masks are returned with batch and head dimensions of size 1; they
broadcast against any (B, H) in :func:`sparge.block_sparse_attn` and in ``|`` / ``&`` with a
predicted mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .mask import SUPPORTED_BLOCK_SIZES, SparseMask, check_block_sizes, num_blocks

Device = torch.device | str | None


def _check_lengths(q_len: int, k_len: int) -> None:
    if q_len < 1 or k_len < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Lq={q_len}, Lk={k_len}")


def _block_ranges(length: int, block: int, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last token (inclusive) of every block: two int64 tensors (n,)."""
    first = torch.arange(num_blocks(length, block), device=device) * block
    last = torch.clamp(first + block, max=length) - 1
    return first, last


def _mask(blocks: torch.Tensor, block_q: int, block_k: int, q_len: int, k_len: int,
          causal: bool = False) -> SparseMask:
    """Wrap a bool (nQ, nK) or (B, H, nQ, nK) tensor."""
    while blocks.dim() < 4:
        blocks = blocks.unsqueeze(0)
    return SparseMask(blocks.contiguous(), block_q, block_k, q_len, k_len, causal)


# --------------------------------------------------------------------------------------- patterns
def causal_mask(q_len: int, k_len: int, *, block_q: int = 64, block_k: int = 128,
                device: Device = None) -> SparseMask:
    """Causal attention, top-left aligned like SDPA (query ``i`` sees keys ``j <= i``); exact.

    Returns a causal :class:`SparseMask` of shape (1, 1, nQ, nK).
    """
    _check_lengths(q_len, k_len)
    check_block_sizes(block_q, block_k)
    return SparseMask.full(1, 1, q_len, k_len, block_q, block_k, causal=True, device=device)


def sink_mask(q_len: int, k_len: int, sink_len: int, *, block_q: int = 64, block_k: int = 128,
              device: Device = None) -> SparseMask:
    """Attention sink: every query attends the first ``sink_len`` keys.

    Keeps the key blocks that hold at least one of those keys (exact when ``sink_len`` is a
    multiple of ``block_k`` or covers all keys). Returns a (1, 1, nQ, nK) :class:`SparseMask`.
    """
    _check_lengths(q_len, k_len)
    check_block_sizes(block_q, block_k)
    if sink_len < 0:
        raise ValueError(f"sink_len must be >= 0, got {sink_len}")
    first_k, _ = _block_ranges(k_len, block_k, device)
    n_q = num_blocks(q_len, block_q)
    blocks = (first_k < sink_len)[None, :].expand(n_q, -1)
    return _mask(blocks, block_q, block_k, q_len, k_len)


def sliding_window_mask(q_len: int, k_len: int, window: int | tuple[int, int], *,
                        causal: bool = False, block_q: int = 64, block_k: int = 128,
                        device: Device = None) -> SparseMask:
    """A 1-D sliding window: query ``i`` attends keys ``j`` with ``i - left <= j <= i + right``.

    Args:
        q_len, k_len: sequence lengths (positions are aligned top-left: token ``i`` of the queries
            and token ``i`` of the keys are at the same position).
        window: ``w`` for the symmetric window ``|i - j| <= w``, or ``(left, right)``, each >= 0.
        causal: also require ``j <= i`` (exact, element by element); the window is then
            ``[i - left, i]`` whatever ``right`` is.
        block_q, block_k: block sizes (64 or 128).

    Returns:
        A (1, 1, nQ, nK) :class:`SparseMask` keeping a block iff some pair inside it lies in the
        window. Its token-level mask equals the window only where the window edges are
        block-aligned; causal masking is always exact.
    """
    _check_lengths(q_len, k_len)
    check_block_sizes(block_q, block_k)
    left, right = (window, window) if isinstance(window, int) else tuple(window)
    if left < 0 or right < 0:
        raise ValueError(f"window sizes must be >= 0, got left={left}, right={right}")
    if causal:
        right = 0
    q_first, q_last = _block_ranges(q_len, block_q, device)
    k_first, k_last = _block_ranges(k_len, block_k, device)
    # Over a block rectangle, j - i ranges over [k_first - q_last, k_last - q_first]; the block is
    # kept iff that interval meets [-left, right].
    lowest = k_first[None, :] - q_last[:, None]
    highest = k_last[None, :] - q_first[:, None]
    blocks = (lowest <= right) & (highest >= -left)
    return _mask(blocks, block_q, block_k, q_len, k_len, causal)


def _dilate_grid(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """Max-dilate (N, T, H, W) float by a box of half-widths ``window`` (separably, exactly)."""
    x = x.unsqueeze(1)
    for axis, w in enumerate(window):
        size = x.shape[2 + axis]
        w = min(w, size - 1)
        if w == 0:
            continue
        kernel = [1, 1, 1]
        padding = [0, 0, 0]
        kernel[axis], padding[axis] = 2 * w + 1, w
        # -inf padding never wins the max, so the window is clipped at the grid edges.
        x = F.max_pool3d(x, kernel_size=kernel, stride=1, padding=padding)
    return x.squeeze(1)


def sliding_tile_mask(grid: tuple[int, int, int], window: tuple[int, int, int], *,
                      text_len: int = 0, block_q: int = 64, block_k: int = 128,
                      device: Device = None, chunk: int = 64) -> SparseMask:
    """A sliding window over a (T, H, W) token grid ("sliding tile" / 3-D neighbourhood attention).

    Video tokens are numbered in raster order, ``index = (t * H + h) * W + w``. Video token ``i``
    attends video token ``j`` iff ``|t_i - t_j| <= wt``, ``|h_i - h_j| <= wh`` and
    ``|w_i - w_j| <= ww``. ``text_len`` further tokens after the video tokens (text, as in video
    diffusion transformers) attend and are attended densely.

    Args:
        grid: (T, H, W), the token grid; T * H * W video tokens.
        window: (wt, wh, ww), half-widths of the window in tokens of each dimension (>= 0).
        text_len: number of dense tokens after the video tokens.
        block_q, block_k: block sizes (64 or 128).
        chunk: query blocks processed at once (memory ~ chunk * T * H * W floats).

    Returns:
        A (1, 1, nQ, nK) :class:`SparseMask` over L = T * H * W + text_len tokens keeping a block
        iff some pair inside it is allowed (computed exactly: the union of the windows of a
        block's queries is the block's query set dilated by the window box).
    """
    if len(grid) != 3 or len(window) != 3:
        raise ValueError(f"grid and window must have three entries (T, H, W), got {grid}, "
                         f"{window}")
    if min(grid) < 1 or min(window) < 0 or text_len < 0:
        raise ValueError(f"grid sizes must be >= 1, windows and text_len >= 0, got grid={grid}, "
                         f"window={window}, text_len={text_len}")
    check_block_sizes(block_q, block_k)
    t, h, w = grid
    video = t * h * w
    length = video + text_len
    n_q, n_k = num_blocks(length, block_q), num_blocks(length, block_k)
    blocks = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    video_rows = num_blocks(video, block_q)
    pad = n_k * block_k - video
    for start in range(0, video_rows, chunk):
        rows = torch.arange(start, min(start + chunk, video_rows), device=device)
        token = torch.arange(video, device=device)
        queries = (token[None, :] // block_q == rows[:, None]).float()  # (c, video)
        allowed = _dilate_grid(queries.view(-1, t, h, w), tuple(window)).reshape(-1, video) > 0
        # Keys past the video tokens are text, attended by every query; then block padding.
        allowed = F.pad(F.pad(allowed, (0, text_len), value=True), (0, pad - text_len))
        blocks[rows] = allowed.view(rows.numel(), n_k, block_k).any(-1)
    if text_len:  # a block holding a text query attends every key block
        blocks[video // block_q:] = True
    return _mask(blocks, block_q, block_k, length, length)


def from_token_mask(token_mask: torch.Tensor, *, block_q: int = 64, block_k: int = 128,
                    causal: bool = False) -> SparseMask:
    """The smallest block mask covering a token-level mask.

    Args:
        token_mask: bool (Lq, Lk) or (B, H, Lq, Lk), True = allowed.
        causal: mark the result causal (exact element-level causal masking inside blocks);
            pairs above the diagonal then do not count when deciding whether a block is kept.

    Returns:
        A :class:`SparseMask` (B, H, nQ, nK) (B = H = 1 for a 2-D input) keeping a block iff some
        allowed pair lies inside it.
    """
    if token_mask.dtype != torch.bool or token_mask.dim() not in (2, 4):
        raise ValueError(f"token_mask must be a 2-D or 4-D bool tensor, got {token_mask.dtype} "
                         f"with shape {tuple(token_mask.shape)}")
    check_block_sizes(block_q, block_k)
    while token_mask.dim() < 4:
        token_mask = token_mask.unsqueeze(0)
    b, h, q_len, k_len = token_mask.shape
    _check_lengths(q_len, k_len)
    if causal:
        token_mask = torch.tril(token_mask)
    n_q, n_k = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    padded = F.pad(token_mask, (0, n_k * block_k - k_len, 0, n_q * block_q - q_len))
    blocks = padded.view(b, h, n_q, block_q, n_k, block_k).any(dim=5).any(dim=3)
    return SparseMask(blocks, block_q, block_k, q_len, k_len, causal)


# --------------------------------------------------------------------------------------- algebra
def _incidence(length: int, old: int, new: int, device: torch.device) -> torch.Tensor:
    """Float (n_new, n_old): 1 where new block r and old block c share a token."""
    first, last = _block_ranges(length, new, device)
    old_idx = torch.arange(num_blocks(length, old), device=device)
    return ((old_idx[None, :] >= (first // old)[:, None])
            & (old_idx[None, :] <= (last // old)[:, None])).float()


def regrid(mask: SparseMask, block_q: int, block_k: int) -> SparseMask:
    """The same mask at another block granularity.

    A new block is kept iff it shares a token pair with a kept block of ``mask``. When the new
    sizes divide the old ones (128 -> 64) every new block lies inside one old block, so the result
    allows exactly the same token pairs (no loss). When coarsening (64 -> 128) the result is the
    smallest covering mask: a superset of ``mask``'s token pairs, equal to them only where the
    two 64-blocks merged into one are both kept or both dropped. The causal flag is kept.
    """
    check_block_sizes(block_q, block_k)
    if (block_q, block_k) == (mask.block_q, mask.block_k):
        return mask
    rows = _incidence(mask.q_len, mask.block_q, block_q, mask.device)
    cols = _incidence(mask.k_len, mask.block_k, block_k, mask.device)
    blocks = (rows @ mask.blocks.float() @ cols.T) > 0
    return SparseMask(blocks, block_q, block_k, mask.q_len, mask.k_len, mask.causal)


def _common(masks: Sequence[SparseMask], block_q: int | None,
            block_k: int | None) -> list[SparseMask]:
    if not masks:
        raise ValueError("need at least one mask")
    lengths = {(m.q_len, m.k_len) for m in masks}
    if len(lengths) != 1:
        raise ValueError(f"masks are for different sequence lengths (Lq, Lk): {sorted(lengths)}")
    block_q = block_q or min(m.block_q for m in masks)
    block_k = block_k or min(m.block_k for m in masks)
    return [regrid(m, block_q, block_k) for m in masks]


def union(*masks: SparseMask, block_q: int | None = None,
          block_k: int | None = None) -> SparseMask:
    """Union of masks of any granularity (for example a static pattern and a predicted mask).

    All masks are brought to (block_q, block_k), by default the finest sizes among them, where the
    conversion is exact (see :func:`regrid`); batch and head dimensions broadcast. The result is
    causal only if every mask is causal (a union with a non-causal mask computes whole blocks).
    """
    masks = _common(masks, block_q, block_k)
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def intersection(*masks: SparseMask, block_q: int | None = None,
                 block_k: int | None = None) -> SparseMask:
    """Intersection of masks of any granularity; causal if any of them is (exact).

    Granularity and broadcasting as in :func:`union`. At block level, the intersection of two
    covering masks may keep a block in which the two token patterns share no pair.
    """
    masks = _common(masks, block_q, block_k)
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


# --------------------------------------------------------------------------------- FlexAttention
def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 counts (..., nQ) and ascending kept indices (..., nQ, nK), zero-padded."""
    n_k = blocks.shape[-1]
    positions = torch.arange(n_k, device=blocks.device, dtype=torch.int32)
    key = torch.where(blocks, positions, positions + n_k)
    indices = torch.sort(key, dim=-1).values
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.where(positions < counts[..., None], indices, torch.zeros_like(indices))
    return counts.contiguous(), indices.to(torch.int32).contiguous()


def _lookup_mod(mask: SparseMask) -> Callable:
    """A FlexAttention mask_mod allowing exactly the token pairs of ``mask``."""
    table = mask.blocks
    n_b, n_h = table.shape[:2]
    bq, bk, causal = mask.block_q, mask.block_k, mask.causal

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        keep = table[b % n_b, h % n_h, q_idx // bq, kv_idx // bk]
        return keep & (q_idx >= kv_idx) if causal else keep

    return mask_mod


def to_flex_block_mask(mask: SparseMask):  # -> torch.nn.attention.flex_attention.BlockMask
    """A FlexAttention ``BlockMask`` that allows exactly the token pairs of ``mask``.

    ``BLOCK_SIZE`` is ``(mask.block_q, mask.block_k)`` and ``seq_lengths`` is ``(Lq, Lk)``. Kept
    blocks are FlexAttention *full* blocks (no ``mask_mod`` evaluated), except, for a causal mask,
    the kept blocks crossed by the diagonal, which are *partial*. FlexAttention defines its result
    by the ``mask_mod`` (eager ``flex_attention`` evaluates it on every pair and ignores the block
    lists; compiled ``flex_attention`` uses the lists to skip blocks), so the ``mask_mod`` encodes
    the whole mask too: a lookup of the kept-block table, and ``q_idx >= kv_idx`` when causal.
    Both paths then compute what :func:`sparge.block_sparse_attn` computes with ``mask``.

    Works with ``BlockMask.from_kv_blocks`` of torch 2.5 and newer (2.11 and 2.13 checked).
    """
    from torch.nn.attention.flex_attention import BlockMask

    blocks = mask.blocks
    if mask.causal:
        q_first, _ = _block_ranges(mask.q_len, mask.block_q, mask.device)
        _, k_last = _block_ranges(mask.k_len, mask.block_k, mask.device)
        below = k_last[None, :] <= q_first[:, None]  # every pair causal
        full, partial = blocks & below, blocks & ~below
    else:
        full, partial = blocks, torch.zeros_like(blocks)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                    BLOCK_SIZE=(mask.block_q, mask.block_k),
                                    mask_mod=_lookup_mod(mask),
                                    seq_lengths=(mask.q_len, mask.k_len))


def _ordered_to_dense(counts: torch.Tensor, indices: torch.Tensor, n_k: int) -> torch.Tensor:
    live = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    dense = torch.zeros(*indices.shape[:-1], n_k + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, torch.where(live, indices.long(), n_k), True)
    return dense[..., :n_k]


def _evaluate_partial(mask_mod: Callable, partial: torch.Tensor, bq: int, bk: int, q_len: int,
                      k_len: int, chunk: int = 256) -> torch.Tensor:
    """Drop the partial blocks in which ``mask_mod`` allows no in-range pair."""
    keep = partial.clone()
    where = partial.nonzero()  # (P, 4): b, h, I, J
    offs_q = torch.arange(bq, device=partial.device)
    offs_k = torch.arange(bk, device=partial.device)
    for start in range(0, where.shape[0], chunk):
        b, h, i, j = where[start:start + chunk].unbind(1)
        q_idx = (i * bq)[:, None, None] + offs_q[None, :, None]
        kv_idx = (j * bk)[:, None, None] + offs_k[None, None, :]
        allowed = mask_mod(b[:, None, None], h[:, None, None], q_idx, kv_idx)
        allowed = torch.as_tensor(allowed, device=partial.device).to(torch.bool)
        allowed = allowed & (q_idx < q_len) & (kv_idx < k_len)
        keep[b, h, i, j] = allowed.flatten(1).any(1)
    return keep


def from_flex_block_mask(block_mask, q_len: int, k_len: int, *, block_q: int | None = None,
                         block_k: int | None = None, causal: bool = False,
                         evaluate_mask_mod: bool = False) -> SparseMask:
    """A :class:`SparseMask` from a FlexAttention ``BlockMask``.

    Compiled FlexAttention computes, in a *full* block, every pair, and in a *partial* block, the
    pairs its ``mask_mod`` allows (eager FlexAttention evaluates the ``mask_mod`` everywhere; the
    two agree for a consistent BlockMask, such as ``create_block_mask`` builds). This reads the
    block lists. A :class:`SparseMask` has no ``mask_mod``: partial blocks become whole kept
    blocks (a superset), unless

    - ``causal=True``: the result is causal (exact when the ``mask_mod`` is the causal one,
      ``q_idx >= kv_idx``, as :func:`to_flex_block_mask` writes it);
    - ``evaluate_mask_mod=True``: the ``mask_mod`` is evaluated on every partial block's token
      pairs (broadcast tensor indices, as FlexAttention calls it) and partial blocks in which it
      allows no pair are dropped, so that a block is kept iff some pair in it is allowed.

    Args:
        block_mask: a ``torch.nn.attention.flex_attention.BlockMask`` covering at least (q_len,
            k_len) tokens; extra blocks past the lengths are ignored.
        q_len, k_len: the sequence lengths the mask is for.
        block_q, block_k: the granularity of the result; by default the BlockMask's
            ``BLOCK_SIZE``, which must then be 64 or 128 in each direction. Other sizes are
            converted with :func:`regrid` (exact when refining, covering when coarsening).

    Returns:
        A :class:`SparseMask` (B, H, nQ, nK) with the BlockMask's batch and head dimensions.
    """
    _check_lengths(q_len, k_len)
    bq, bk = block_mask.BLOCK_SIZE if isinstance(block_mask.BLOCK_SIZE, tuple) else (
        (block_mask.BLOCK_SIZE,) * 2)
    n_q, n_k = num_blocks(q_len, bq), num_blocks(k_len, bk)
    stored_q, stored_k = block_mask.kv_indices.shape[-2], block_mask.kv_indices.shape[-1]
    if stored_q < n_q or stored_k < n_k:
        raise ValueError(f"the BlockMask has {stored_q}x{stored_k} blocks of {bq}x{bk}, fewer "
                         f"than Lq={q_len}, Lk={k_len} need ({n_q}x{n_k})")
    partial = _ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, stored_k)
    if block_mask.full_kv_num_blocks is not None:
        full = _ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                 stored_k)
    else:
        full = torch.zeros_like(partial)
    partial, full = partial[..., :n_q, :n_k], full[..., :n_q, :n_k]
    if evaluate_mask_mod and partial.any():
        partial = _evaluate_partial(block_mask.mask_mod, partial, bq, bk, q_len, k_len)
    blocks = partial | full
    target = (block_q or bq, block_k or bk)
    if bq in SUPPORTED_BLOCK_SIZES and bk in SUPPORTED_BLOCK_SIZES:
        return regrid(SparseMask(blocks, bq, bk, q_len, k_len, causal), *target)
    if block_q is None or block_k is None:
        raise ValueError(f"the BlockMask's BLOCK_SIZE {(bq, bk)} is not supported by SparseMask "
                         f"{SUPPORTED_BLOCK_SIZES}: pass block_q and block_k to convert it")
    check_block_sizes(*target)
    rows = _incidence(q_len, bq, target[0], blocks.device)
    cols = _incidence(k_len, bk, target[1], blocks.device)
    converted = (rows @ blocks.float() @ cols.T) > 0
    return SparseMask(converted, target[0], target[1], q_len, k_len, causal)


__all__ = ["causal_mask", "sink_mask", "sliding_window_mask", "sliding_tile_mask",
           "from_token_mask", "regrid", "union", "intersection", "to_flex_block_mask",
           "from_flex_block_mask"]
