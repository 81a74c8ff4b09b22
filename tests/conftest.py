"""Shared helpers for the test suite."""

from __future__ import annotations

import pytest
import torch


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum |out - ref| / sum |ref|, in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().sum() / ref.abs().sum())


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    token_mask: torch.Tensor | None = None, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """Float64 attention in layout HND with GQA; rows with no allowed key are zero.

    token_mask: bool (B or 1, H or 1, Lq, Lk), True = allowed.
    """
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    q = q.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    if causal:
        allowed = torch.tril(allowed)
    if token_mask is not None:
        allowed = allowed & token_mask
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh random seed per test; pytest shows the seed if the test fails."""
    gen = torch.Generator()
    print(f"random seed: {gen.seed()}")
    return gen
