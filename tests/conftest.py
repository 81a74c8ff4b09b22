"""Shared helpers for the test suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(TESTS), "src")


def run_interpreted(path: str, name: str) -> None:
    """Run the function ``name`` of the test module at ``path`` in a fresh Python process under
    Triton's interpreter: TRITON_INTERPRET must be set before Triton is imported and must not
    leak into other test modules. Fails with the child's output if the function raises."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join((SRC, TESTS, env.get("PYTHONPATH", "")))
    code = ("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('interpreted_cases', {path!r})\n"
            "mod = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(mod)\n"
            f"mod.{name}()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"


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
