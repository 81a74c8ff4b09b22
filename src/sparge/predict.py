"""Mask prediction: block statistics and block selection, in plain PyTorch.

This module is the specification of the predictor (the Triton pre-pass is tested against it) and
the execution path wherever Triton is not used. Every function works on any device.

Shapes use the "HND" layout: q (B, Hq, Lq, D), k (B, Hk, Lk, D), Hq a multiple of Hk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._constants import device_constant
from .mask import SparseMask, causal_block_mask, num_blocks


@dataclass(frozen=True)
class BlockStats:
    """Per-block statistics of one tensor.

    Attributes:
        mean: float32 (B, H, n, D), mean of the rows of each block (padding rows never count).
        similarity: float32 (B, H, n), mean pairwise cosine similarity of the rows of each block,
            diagonal included, in [0, 1]. Zero rows count as having no direction.
    """

    mean: torch.Tensor
    similarity: torch.Tensor


def block_stats(x: torch.Tensor, block: int) -> BlockStats:
    """Pooled mean and self-similarity of each block of ``block`` rows of x (B, H, L, D)."""
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - length))
    xb = xf.view(batch, heads, n, block, dim)
    counts = torch.clamp(length - torch.arange(n, device=x.device) * block, max=block).float()
    mean = xb.sum(dim=3) / counts[:, None]
    norms = xb.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, xb / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    similarity = (unit.sum(dim=3) / counts[:, None]).pow(2).sum(dim=-1)
    return BlockStats(mean, similarity.clamp(0.0, 1.0))


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """K minus its per-channel mean over all tokens (float32); softmax is unchanged by it."""
    kf = k.float()
    return kf - kf.mean(dim=2, keepdim=True)


def per_head(value: float | torch.Tensor, heads: int, device: torch.device) -> torch.Tensor:
    """A hyperparameter as float32 (heads,) on ``device``, from a float or a scalar or (heads,)
    tensor. A number becomes a fill, never a host-to-device copy, so a CUDA graph can capture it;
    on a GPU the filled tensor is kept for later calls (:mod:`sparge._constants`): read it, never
    write it."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).expand(heads)
    value = float(value)
    return device_constant(("per_head", value, heads), device,
                           lambda: torch.full((heads,), value, dtype=torch.float32,
                                              device=device))


def cdf_rule(threshold: float | torch.Tensor, heads: int, device: torch.device) -> torch.Tensor:
    """float32 (heads,): the CDF rule's thresholds, a threshold of 1 (or more) as infinity.

    A row's cumulative mass is at most 1, but its float32 sum can round above 1 (the softmax of
    the scores 0.94 and 0.77 adds to 1 + 2**-23), which compared with 1 would drop the last
    blocks; a threshold of 1 keeps every candidate block, as the rule means. A tensor's values
    are replaced on its device (no read-back)."""
    if isinstance(threshold, torch.Tensor):
        tau = per_head(threshold, heads, device)
        return torch.where(tau >= 1.0, math.inf, tau)
    return per_head(math.inf if float(threshold) >= 1.0 else threshold, heads, device)


@dataclass(frozen=True)
class Selection:
    """How the predictor chooses blocks. Thresholds are floats or (Hq,) tensors.

    Exactly one of ``cdf_threshold`` (keep the leading blocks, by pooled attention mass, whose
    cumulative mass stays <= the threshold, at least one; 1 keeps them all, see
    :func:`cdf_rule`) and ``topk`` (keep floor(topk * nK) blocks, at least one) is set. Blocks
    whose self-similarity is not above ``sim_threshold`` are forced on: a dissimilar key block
    for every query block, a dissimilar query block for every key block. ``attention_sink``
    forces key block 0 on. A query block with a pooled score that is NaN or infinite (its
    tokens, or K's, hold a NaN or an infinity) keeps every block.
    """

    sim_threshold: float | torch.Tensor = 0.6
    cdf_threshold: float | torch.Tensor | None = 0.98
    topk: float | torch.Tensor | None = None
    attention_sink: bool = False

    def __post_init__(self) -> None:
        if (self.cdf_threshold is None) == (self.topk is None):
            raise ValueError("give exactly one of cdf_threshold and topk")


def pooled_products(q_stats: BlockStats, k_stats: BlockStats) -> torch.Tensor:
    """float32 (B, Hq, nQ, nK): each query block's mean dotted with each key block's mean;
    query head h reads key head h // (Hq / Hk)."""
    heads_q, heads_k = q_stats.mean.shape[1], k_stats.mean.shape[1]
    k_mean = k_stats.mean
    if heads_q != heads_k:
        k_mean = k_mean.repeat_interleave(heads_q // heads_k, dim=1)
    return q_stats.mean @ k_mean.transpose(-1, -2)


def pooled_scores(q_stats: BlockStats, k_stats: BlockStats) -> torch.Tensor:
    """float32 (B, Hq, nQ, nK): :func:`pooled_products` over sqrt(D), sqrt(D) rounded to
    float32 and the quotient an IEEE float32 division on every device (CUDA would divide by a
    Python number through its reciprocal; the selection kernel divides as here)."""
    products = pooled_products(q_stats, k_stats)
    return products / torch.full_like(products, math.sqrt(q_stats.mean.shape[3]))


def select_blocks(q_stats: BlockStats, k_stats: BlockStats, selection: Selection, *, q_len: int,
                  k_len: int, block_q: int, block_k: int, causal: bool = False) -> SparseMask:
    """Choose the kept key blocks of each query block from pooled statistics (see
    :class:`Selection`). Causally invalid blocks are dropped. Returns a mask with H = Hq.

    Fixed-shape tensor operations only: nothing is read back to the host and no size depends on
    the data, so on a GPU this runs without synchronisation and can be captured in a CUDA graph.
    """
    sim_threshold, cdf_threshold = selection.sim_threshold, selection.cdf_threshold
    topk, attention_sink = selection.topk, selection.attention_sink
    batch, heads_q, n_q = q_stats.mean.shape[:3]
    heads_k, n_k = k_stats.mean.shape[1], k_stats.mean.shape[2]
    group = heads_q // heads_k
    device = q_stats.mean.device

    sim_thr = per_head(sim_threshold, heads_q, device)[None, :, None]
    # Query head h reads kv head h // group.
    k_sim = k_stats.similarity
    if group > 1:
        k_sim = k_sim.repeat_interleave(group, dim=1)
    k_similar = k_sim > sim_thr  # (B, Hq, nK)
    q_similar = q_stats.similarity > sim_thr  # (B, Hq, nQ)

    scores = pooled_scores(q_stats, k_stats)
    # A NaN or an infinity in a block's statistics comes from one in its tokens; the query
    # block then keeps every block, so that the attention meets the value as SDPA would.
    not_finite = ~torch.isfinite(scores).all(dim=-1, keepdim=True)  # (B, Hq, nQ, 1)
    allowed = k_similar[:, :, None, :]
    if causal:
        valid = causal_block_mask(q_len, k_len, block_q, block_k, device)
        allowed = allowed & valid
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no candidate: all zero

    # Stable: equal probabilities (a uniform row, masked blocks) rank by block index on every
    # device, so ties never make two devices keep different blocks.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    if cdf_threshold is not None:
        tau = cdf_rule(cdf_threshold, heads_q, device)[None, :, None, None]
        keep = (torch.cumsum(sorted_probs, dim=-1) <= tau).sum(dim=-1, keepdim=True)
    else:
        frac = per_head(topk, heads_q, device)[None, :, None, None]
        keep = torch.floor(frac * n_k).expand(batch, heads_q, n_q, 1)
    keep = keep.clamp_min(1)
    rank = torch.arange(n_k, device=device)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, rank < keep)

    chosen |= ~k_similar[:, :, None, :]
    chosen |= ~q_similar[:, :, :, None]
    chosen |= not_finite
    if attention_sink:
        chosen[..., 0] = True
    return SparseMask(chosen, block_q, block_k, q_len, k_len, causal)  # drops causally invalid


def predict_mask_reference(q: torch.Tensor, k: torch.Tensor, selection: Selection, *,
                           block_q: int, block_k: int, causal: bool = False) -> SparseMask:
    """The whole predictor in PyTorch: statistics of Q and smoothed K, then :func:`select_blocks`.

    q (B, Hq, Lq, D) and k (B, Hk, Lk, D) in layout HND.
    """
    return select_blocks(block_stats(q, block_q), block_stats(smooth_k(k), block_k), selection,
                         q_len=q.shape[2], k_len=k.shape[2], block_q=block_q, block_k=block_k,
                         causal=causal)
