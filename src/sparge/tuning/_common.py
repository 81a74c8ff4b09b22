"""Helpers shared by calibration and the error-budget controller: layouts, exact attention (whole or
for a few rows) and relative L1 error per head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._inputs import check_layout


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, H, L, D) view of x given in ``layout`` (the callers' ``tensor_layout``)."""
    check_layout(layout, "tensor_layout")
    return x if layout == "HND" else x.transpose(1, 2)


def from_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (B, H, L, D) back in ``layout``."""
    return x if layout == "HND" else x.transpose(1, 2)


def _expand_kv(k: torch.Tensor, heads_q: int) -> torch.Tensor:
    """Repeat the key/value heads of k (B, Hk, L, D) for grouped-query attention."""
    group = heads_q // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """Dense attention (B, Hq, Lq, D) in float32 arithmetic, layout HND, GQA allowed.

    Causal masking is top-left aligned, like ``scaled_dot_product_attention(is_causal=True)``.
    """
    heads_q = q.shape[1]
    kf, vf = _expand_kv(k.float(), heads_q), _expand_kv(v.float(), heads_q)
    return F.scaled_dot_product_attention(q.float(), kf, vf, is_causal=is_causal, scale=scale)


def sample_rows(q_len: int, count: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """``min(count, q_len)`` distinct query rows, stratified: one uniformly random row in each of
    ``count`` equal slices of the sequence, so every region of the sequence is represented.

    Returns an int64 tensor of ascending row indices on ``device``.
    """
    if count >= q_len:
        return torch.arange(q_len, device=device)
    edges = torch.linspace(0, q_len, count + 1, dtype=torch.float64)
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    rows = torch.floor(edges[:-1] + u * (edges[1:] - edges[:-1])).long().clamp_(0, q_len - 1)
    rows = torch.maximum(rows, torch.ceil(edges[:-1]).long())  # stay inside the slice
    return torch.unique(rows).to(device)


def exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, *,
               is_causal: bool = False, scale: float | None = None,
               head_chunk: int = 8) -> torch.Tensor:
    """Exact attention for the query rows ``rows`` only: (B, Hq, len(rows), D), float32.

    Costs O(B Hq len(rows) Lk D) and, per chunk of ``head_chunk`` heads, memory for
    len(rows) x Lk scores. On a CUDA GPU with half-precision inputs the products run in the input
    dtype (with float32 accumulation inside SDPA); elsewhere in float32.
    """
    heads_q, k_len = q.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    low_precision = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    qs = q.index_select(2, rows)
    mask = None
    if is_causal:
        mask = torch.arange(k_len, device=q.device)[None, :] <= rows[:, None]
    group = heads_q // k.shape[1]
    outs = []
    for start in range(0, heads_q, head_chunk):
        stop = min(start + head_chunk, heads_q)
        kv_heads = torch.arange(start, stop, device=q.device) // group
        kc, vc = k.index_select(1, kv_heads), v.index_select(1, kv_heads)
        qc = qs[:, start:stop]
        if not low_precision:
            qc, kc, vc = qc.float(), kc.float(), vc.float()
        outs.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask,
                                                   scale=scale).float())
    return torch.cat(outs, dim=1)


def rel_l1_per_head(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """sum |out - ref| / sum |ref| per head (dim 1) of (B, H, L, D) tensors: float32 (H,)."""
    diff = (out.float() - ref.float()).abs().sum(dim=(0, 2, 3))
    norm = ref.float().abs().sum(dim=(0, 2, 3))
    return diff / norm.clamp_min(torch.finfo(torch.float32).tiny)


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum |out - ref| / sum |ref| over the whole tensor."""
    diff = (out.float() - ref.float()).abs().sum()
    norm = ref.float().abs().sum().clamp_min(torch.finfo(torch.float32).tiny)
    return float(diff / norm)
