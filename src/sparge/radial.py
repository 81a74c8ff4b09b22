"""RadialAttention: static "energy decay" block masks for video diffusion transformers, run on
sparge's block-sparse attention.

RadialAttention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
Long Video Generation", 2025) lets a token of frame ``i`` attend, in frame ``j``, the tokens within
a spatial window that halves each time the temporal distance ``|i - j|`` doubles; once the window
would be narrower than a block it stays one block wide and whole frame pairs are skipped instead
(only every ``split_factor``-th frame distance is kept: the "diagonal split" rule). Wan models also
attend the whole first frame (attention sink); text tokens after the video tokens are dense.

The mask reproduces, block for block, ``gen_log_mask_shrinked`` (with ``shrinkMaskStrict``,
``get_window_width`` and ``get_diagonal_split_mask``) and ``MaskMap.queryLogMask`` of
``radial_attn/attn_mask.py`` in github.com/mit-han-lab/radial-attention, commit a5c638b (the
version with ``sparge_mask_convert`` and ``use_sage_attention``; earlier versions also gave
HunyuanVideo the first-frame sink). Its ComfyUI port woct0rdho/ComfyUI-RadialAttn builds the same
mask except that it forces the first and last block of every frame pair on (upstream's
``block_mask[0:0] = True`` is an empty slice and changes nothing). Upstream's rules, per pair
of frames (i, j), with ``tpf = video_len // num_frames`` tokens per frame and ``d = |i - j|``:

- local token mask: all ones for ``j == 0`` on Wan (sink); otherwise
  ``|r - c| <= width(d)`` (frame-local row and column), and all zero unless ``split(d)``;
- ``width``: Wan: ``tpf`` for d = 0, ``tpf // 2`` for d = 1; HunyuanVideo: ``tpf`` for d <= 1;
  else ``max(2 ** bit_length(tpf) / 2 ** bit_length(d) * decay_factor, block_size)`` (compared
  in float32, as upstream's tensor comparison does);
- ``split``: with ``x = 2 ** bit_length(tpf) / 2 ** bit_length(d)``, true if ``x >= 128``, else
  ``d % (128 / x) == 0`` (128 is hard-coded upstream, whatever the block size);
- the local mask is placed at offset ``(i * tpf % b, j * tpf % b)`` in a grid of
  ``K = ceil(tpf / b)`` x ``K`` blocks (content past ``K * b`` rows or columns is cut off) and
  "shrunk": a block is kept iff more than 60 % of its columns with any allowed row have more than
  a third of their ``b`` rows allowed; the K x K result is OR-ed into the sequence's block mask at
  block ``(i * tpf // b, j * tpf // b)``;
- every block row and column from ``video_len // b`` on is dense (text and the partial block at
  the video/text border).

Where upstream raises (a frame pair's K x K blocks reaching past ``seq_len // b``), the blocks are
cut at the end of the mask. Block sizes are 64 or 128.

The token-level semantics of the mask, and of :func:`radial_attn`, is "a kept block -> all its
token pairs", over ``ceil(seq_len / b)`` blocks per axis (the last one partial, and dense).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .api import AttentionStats, block_sparse_attn
from .mask import SUPPORTED_BLOCK_SIZES, SparseMask, num_blocks
from .patterns import regrid

MODEL_TYPES = ("wan", "hunyuan")
SPLIT_THRESHOLD = 128  # upstream's hard-coded block size of the diagonal split rule


def _validate(seq_len: int, video_len: int, num_frames: int, block_size: int,
              decay_factor: float, model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if num_frames < 1 or video_len < num_frames:
        raise ValueError(f"need 1 <= num_frames <= video_len, got num_frames={num_frames}, "
                         f"video_len={video_len}")
    if seq_len < video_len:
        raise ValueError(f"seq_len ({seq_len}) must be >= video_len ({video_len})")
    if not (isinstance(decay_factor, (int, float)) and math.isfinite(decay_factor)
            and decay_factor > 0):
        raise ValueError(f"decay_factor must be a finite positive number, got {decay_factor!r}")


def _window(dist: int, tpf: int, block_size: int, decay_factor: float, model_type: str) -> int:
    """Largest allowed |row - col| inside a frame pair at temporal distance ``dist``."""
    if model_type == "wan":
        if dist == 0:
            return tpf
        if dist == 1:
            return tpf // 2
    elif dist <= 1:
        return tpf
    decay = 2 ** tpf.bit_length() / 2 ** dist.bit_length() * decay_factor
    if decay < block_size:
        return block_size
    # Upstream compares an int64 tensor with this Python float: both go to float32.
    return min(math.floor(torch.tensor(decay, dtype=torch.float32).item()), tpf)


def _split(dist: int, tpf: int) -> bool:
    """The diagonal split rule: whether frame pairs at distance ``dist`` are computed at all."""
    decay = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
    if decay >= SPLIT_THRESHOLD:
        return True
    return dist % int(SPLIT_THRESHOLD / decay) == 0


def _count_in(lo: torch.Tensor, hi: torch.Tensor, c_lo: torch.Tensor,
              c_hi: torch.Tensor) -> torch.Tensor:
    """Number of integers in [max(lo, c_lo), min(hi, c_hi)] (0 if empty)."""
    return torch.clamp(torch.minimum(hi, c_hi) - torch.maximum(lo, c_lo) + 1, min=0)


def _shrunk_pairs(tpf: int, b: int, num_frames: int, widths: torch.Tensor,
                  live: torch.Tensor) -> torch.Tensor:
    """Upstream's shrunk block masks of every frame pair: bool (F, F, K, K).

    ``widths`` (F, F) int64: window of the pair (i, j); ``live`` (F, F) bool: the pair is not
    removed by the split rule. Instead of materialising each tpf x tpf token mask, this counts in
    closed form. In row block R the frame-local rows are [lo, hi) (the padded rows
    [R b - rr, (R + 1) b - rr) clipped to the frame); a column c has
    count(c) = |[max(lo, c - w), min(hi - 1, c + w)]| allowed rows, and count(c) > t holds exactly
    for c in [lo - w + t, hi - 1 + w - t] when hi - lo > t and 2 w + 1 > t. Upstream keeps a block
    iff #{c: count(c) / b > 1/3} / #{c: count(c) > 0} > 0.6 in float32; with b a power of two and
    at most 128 columns that is ``5 * #{c: count(c) > b // 3} > 3 * #{c: count(c) > 0}``.
    """
    k = num_blocks(tpf, b)
    frame = torch.arange(num_frames)
    offset = (frame * tpf) % b  # where each frame starts inside its first block
    blk = torch.arange(k)
    start = blk[None, :] * b - offset[:, None]  # (F, K) frame-local first token of each block
    # Rows (F, 1, K, 1), half-open [lo, hi); columns (1, F, 1, K), inclusive [c_lo, c_hi].
    lo = torch.clamp(start, 0, tpf)[:, None, :, None]
    hi = torch.clamp(start + b, 0, tpf)[:, None, :, None]
    c_lo = torch.clamp(start, min=0)[None, :, None, :]
    c_hi = (torch.clamp(start + b, max=tpf) - 1)[None, :, None, :]
    w = widths[:, :, None, None]
    rows = hi - lo

    def columns_above(t: int) -> torch.Tensor:
        n = _count_in(lo - w + t, hi - 1 + w - t, c_lo, c_hi)
        return torch.where((rows > t) & (2 * w + 1 > t), n, 0)

    nonzero = columns_above(0)
    dense = columns_above(b // 3)
    return (5 * dense > 3 * nonzero) & live[:, :, None, None]


@functools.lru_cache(maxsize=64)
def _radial_blocks_cached(seq_len: int, video_len: int, num_frames: int, block_size: int,
                          decay_factor: float, model_type: str) -> torch.Tensor:
    b = block_size
    tpf = video_len // num_frames
    k = num_blocks(tpf, b)
    n_floor = seq_len // b  # upstream's mask covers seq_len // b blocks
    border = video_len // b
    dists = range(num_frames)
    width_of = torch.tensor([_window(d, tpf, b, decay_factor, model_type) for d in dists])
    live_of = torch.tensor([_split(d, tpf) for d in dists])
    frame = torch.arange(num_frames)
    dist = (frame[:, None] - frame[None, :]).abs()
    widths, live = width_of[dist], live_of[dist]
    if model_type == "wan":  # attention sink: the whole first frame, for every frame
        widths[:, 0], live[:, 0] = tpf, True
    pairs = _shrunk_pairs(tpf, b, num_frames, widths, live)  # (F, F, K, K)
    first = (frame * tpf) // b
    span = first[:, None] + torch.arange(k)[None, :]  # (F, K) sequence block of each local block
    rows, cols = torch.broadcast_tensors(span[:, None, :, None], span[None, :, None, :])
    work = torch.zeros(n_floor + k, n_floor + k, dtype=torch.bool)
    work[rows[pairs], cols[pairs]] = True
    n = num_blocks(seq_len, b)
    out = torch.ones(n, n, dtype=torch.bool)
    out[:border, :border] = work[:border, :border]
    return out


def radial_block_mask(seq_len: int, video_len: int, num_frames: int, block_size: int = 128,
                      decay_factor: float = 1.0, model_type: str = "wan",
                      device: torch.device | str | None = None) -> torch.Tensor:
    """RadialAttention's block mask (see the module docstring for the exact rules).

    Args:
        seq_len: total tokens S (video tokens first, then text tokens).
        video_len: number of video tokens (``MaskMap.video_token_num`` upstream).
        num_frames: number of latent frames (``MaskMap.num_frame``).
        block_size: 64 or 128 (upstream uses 128).
        decay_factor: scales the spatial window (upstream's ``decay_factor``; 1 by default).
        model_type: ``"wan"`` (with the first-frame attention sink) or ``"hunyuan"``.

    Returns:
        A new bool tensor (n, n), n = ceil(S / block_size), True where the query block attends
        the key block. ``[:S // b, :S // b]`` equals upstream's ``queryLogMask``; every block
        from ``video_len // block_size`` on is True. Computed once per shape (cached on the CPU);
        each call returns a copy that the caller may modify.
    """
    _validate(seq_len, video_len, num_frames, block_size, decay_factor, model_type)
    blocks = _radial_blocks_cached(int(seq_len), int(video_len), int(num_frames),
                                   int(block_size), float(decay_factor), model_type)
    return blocks.to(device=device, copy=True)


def radial_mask(seq_len: int, video_len: int, num_frames: int, *, block_size: int = 128,
                decay_factor: float = 1.0, model_type: str = "wan", block_q: int | None = None,
                block_k: int | None = None, kv_len: int | None = None,
                device: torch.device | str | None = None) -> SparseMask:
    """RadialAttention's mask as a :class:`SparseMask` (1, 1, nQ, nK).

    The mask is defined at ``block_size`` x ``block_size``; ``block_q`` and ``block_k`` (default
    ``block_size``) give the granularity the kernel runs at. From block size 128, any of 64x128,
    128x64, 128x128 and 64x64 is exact (each smaller block lies inside one radial block, so the
    same token pairs are computed); from 64, a 128 side covers (a kept 64-block keeps its whole
    128-block, as upstream's own 64 -> 128 conversion does).

    ``kv_len`` (video_len <= kv_len <= seq_len, default seq_len) drops the keys from ``kv_len`` on,
    as upstream does for HunyuanVideo's padded text tokens: the mask is then (S, kv_len).
    """
    blocks = radial_block_mask(seq_len, video_len, num_frames, block_size, decay_factor,
                               model_type, device)
    kv_len = seq_len if kv_len is None else kv_len
    if not video_len <= kv_len <= seq_len:
        raise ValueError(f"kv_len must be in [video_len, seq_len] = [{video_len}, {seq_len}], "
                         f"got {kv_len}")
    blocks = blocks[:, :num_blocks(kv_len, block_size)]
    mask = SparseMask(blocks[None, None], block_size, block_size, seq_len, kv_len)
    return regrid(mask, block_q or block_size, block_k or block_size)


@functools.lru_cache(maxsize=16)
def _device_mask(seq_len: int, video_len: int, num_frames: int, block_size: int,
                 decay_factor: float, model_type: str, block_q: int, block_k: int, kv_len: int,
                 dense: bool, device: torch.device) -> SparseMask:
    if dense:
        return SparseMask.full(1, 1, seq_len, kv_len, block_q, block_k, device=device)
    return radial_mask(seq_len, video_len, num_frames, block_size=block_size,
                       decay_factor=decay_factor, model_type=model_type, block_q=block_q,
                       block_k=block_k, kv_len=kv_len, device=device)


def radial_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, video_len: int,
                num_frames: int, block_size: int = 128, decay_factor: float = 1.0,
                model_type: str = "wan", kv_len: int | None = None, dense: bool = False,
                block_q: int | None = None, block_k: int | None = None, layout: str = "NHD",
                quant: str = "auto", pv_threshold: float | torch.Tensor = 50.0,
                scale: float | None = None, out_dtype: torch.dtype | None = None,
                backend: str = "auto", return_stats: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """RadialAttention on sparge's block-sparse kernel, video and text in one call.

    The sequence is ``video_len`` video tokens followed by text tokens. Video queries attend video
    keys through the radial mask; every query attends the text keys, and text queries attend every
    key (the blocks from ``video_len // block_size`` on are dense). Keys from ``kv_len`` on are
    ignored (padding), for every query.

    Args:
        q, k, v: (B, S, H, D) for layout "NHD" (default, as RadialAttention), (B, H, S, D) for
            "HND"; float16, bfloat16 or float32; k and v may have fewer heads (GQA).
        video_len, num_frames, block_size, decay_factor, model_type: the radial mask
            (:func:`radial_block_mask`).
        kv_len: number of valid keys (video_len <= kv_len <= S); default S.
        dense: compute every block (upstream's ``sparsity_type="dense"``), keeping ``kv_len``.
        block_q, block_k: kernel granularity; default 64 x ``block_size`` (exact, see
            :func:`radial_mask`).
        layout, quant, pv_threshold, scale, out_dtype, backend, return_stats: as in
            :func:`sparge.block_sparse_attn`.

    Returns:
        The output in q's layout and shape (all S query rows), or ``(output, stats)``.
    """
    if layout not in ("NHD", "HND"):
        raise ValueError(f"layout must be 'NHD' or 'HND', got {layout!r}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}")
    axis = 1 if layout == "NHD" else 2
    seq_len = q.shape[axis]
    if k.shape[axis] != seq_len:
        raise ValueError(f"q and k must have the same sequence length (self-attention), got "
                         f"{seq_len} and {k.shape[axis]}")
    kv_len = seq_len if kv_len is None else int(kv_len)
    _validate(seq_len, video_len, num_frames, block_size, decay_factor, model_type)
    if not video_len <= kv_len <= seq_len:
        raise ValueError(f"kv_len must be in [video_len, seq_len] = [{video_len}, {seq_len}], "
                         f"got {kv_len}")
    block_q = block_q or 64
    block_k = block_k or block_size
    mask = _device_mask(seq_len, int(video_len), int(num_frames), block_size,
                        float(decay_factor), model_type, block_q, block_k, kv_len, bool(dense),
                        q.device)
    if return_stats:  # the caller receives the mask: never hand out the cached tensor
        mask = SparseMask(mask.blocks.clone(), mask.block_q, mask.block_k, mask.q_len,
                          mask.k_len, mask.causal)
    if kv_len < seq_len:
        k, v = k.narrow(axis, 0, kv_len), v.narrow(axis, 0, kv_len)
    return block_sparse_attn(q, k, v, mask, layout=layout, quant=quant, pv_threshold=pv_threshold,
                             scale=scale, out_dtype=out_dtype, backend=backend,
                             return_stats=return_stats)


# ------------------------------------------------------------------ RadialAttention's own calls
@dataclass
class MaskMap:
    """Upstream's ``MaskMap``: number of video tokens and of latent frames."""

    video_token_num: int = 25440
    num_frame: int = 16


def RadialAttention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # noqa: N802
                    mask_map: MaskMap | None = None, sparsity_type: str = "radial",
                    block_size: int = 128, decay_factor: float = 1, model_type: str | None = None,
                    pre_defined_mask: torch.Tensor | None = None,
                    use_sage_attention: bool = False, *, quant: str | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """RadialAttention's ``RadialAttention(...)`` with its arguments, on sparge (no flashinfer).

    Args:
        query, key, value: (S, H, D), video tokens first (upstream flattens a batch of one).
        mask_map: the :class:`MaskMap` (video tokens, frames).
        sparsity_type: ``"radial"`` or ``"dense"``.
        block_size, decay_factor, model_type: the radial mask (``model_type`` "wan" or "hunyuan").
        pre_defined_mask: HunyuanVideo's (S, S) bool attention mask, a key-padding mask repeated
            on every row (upstream builds it as ``attention_mask[0, 0].expand(S, S)``): its first
            row's True entries must be a prefix, the valid keys. Every query then attends only
            those keys, text queries densely. Without it (Wan) only the first
            ``video_token_num`` tokens are used and returned, as upstream does.
        use_sage_attention: upstream's backend switch. False (flashinfer upstream, unquantized)
            maps to ``quant="none"``, True (SageAttention upstream) to ``quant="auto"``.
        quant: override the quantization mode chosen from ``use_sage_attention``.
        backend: sparge backend (``"auto"``, ``"triton"``, ``"reference"``).

    Returns:
        (S, H, D) with pre_defined_mask, else (video_token_num, H, D); query's dtype.
    """
    if mask_map is None:
        raise ValueError("RadialAttention needs a mask_map (MaskMap(video_token_num, num_frame))")
    if sparsity_type not in ("radial", "dense"):
        raise ValueError(f"sparsity_type must be 'radial' or 'dense', got {sparsity_type!r}")
    if query.dim() != 3:
        raise ValueError(f"query must be (S, H, D), got shape {tuple(query.shape)}")
    if model_type is None and sparsity_type == "radial":
        raise ValueError("model_type must be 'wan' or 'hunyuan'")
    video = int(mask_map.video_token_num)
    seq_len = query.shape[0]
    if pre_defined_mask is None:
        query, key, value = query[:video], key[:video], value[:video]
        seq_len = kv_len = video
    else:
        valid = pre_defined_mask[0].to(torch.bool)
        kv_len = int(valid.sum())
        if valid.shape[0] != seq_len or not bool(valid[:kv_len].all()):
            raise ValueError("pre_defined_mask must be a key-padding mask: its first row True on "
                             "a prefix of the S keys")
    mode = quant or ("auto" if use_sage_attention else "none")
    out = radial_attn(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                      video_len=video, num_frames=int(mask_map.num_frame), block_size=block_size,
                      decay_factor=float(decay_factor), model_type=model_type or "wan",
                      kv_len=kv_len, dense=sparsity_type == "dense", quant=mode,
                      backend=backend)
    return out[0]


__all__ = ["MaskMap", "RadialAttention", "radial_attn", "radial_block_mask", "radial_mask"]
