"""Error-budget mode through the Triton kernels on a CUDA GPU (skipped without one).

Two checks: a Wan-style self-attention stack written in plain PyTorch (needs no diffusers:
RMS-normed queries and keys over all heads, keys tied to queries, on a smooth latent video), and,
where diffusers is installed, the tiny Wan transformer of the CPU tests.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from sparge.integrations.testing import smooth_field
from sparge.tuning import ErrorBudgetAttention
from sparge.tuning._common import exact_attention, rel_l1

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BUDGET = 0.05


def _wan_style_qkv(layer: int, step: int, heads: int = 8, dim: int = 64, sharp: float = 6.0):
    """q, k, v (1, heads, 4096, dim) in bfloat16: 4 latent frames of 32 x 32 tokens."""
    g = torch.Generator().manual_seed(1000 * layer)
    latent = smooth_field((1, 16, 4, 32, 32), seed=step, noise=0.1)  # step: slowly new input
    tokens = latent.flatten(2).transpose(1, 2)  # (1, 4096, 16)
    w_qk = torch.randn(16, heads * dim, generator=g) / 4
    w_v = torch.randn(16, heads * dim, generator=g) / 4
    qk = tokens @ w_qk
    qk = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMS norm across heads
    q = (sharp * qk).view(1, -1, heads, dim).transpose(1, 2)
    k = qk.view(1, -1, heads, dim).transpose(1, 2)
    v = (tokens @ w_v).view(1, -1, heads, dim).transpose(1, 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (t.contiguous().to(device, torch.bfloat16) for t in (q, k, v))


@needs_cuda
@torch.no_grad()
def test_budget_mode_through_kernels_wan_style():
    layers = [ErrorBudgetAttention(BUDGET, backend="triton") for _ in range(3)]
    errors: list[list[float]] = [[] for _ in layers]
    for step in range(12):
        for i, layer in enumerate(layers):
            q, k, v = _wan_style_qkv(i, step)
            out = layer(q, k, v)
            errors[i].append(rel_l1(out.float(), exact_attention(q, k, v)))
    for i, layer in enumerate(layers):
        rep = layer.report()
        sparsity = statistics.mean(rep.mean_sparsity)
        print(f"layer {i}: mean sparsity {sparsity:.3f}, max true error {max(errors[i]):.4f}, "
              f"mean estimated error {statistics.mean(rep.mean_est_error):.4f}, "
              f"recomputed head-calls {sum(rep.recomputed)}")
        assert max(errors[i]) <= BUDGET
    assert statistics.mean(statistics.mean(m.report().mean_sparsity) for m in layers) > 0.25


@needs_cuda
@torch.no_grad()
def test_budget_mode_through_kernels_tiny_wan():
    pytest.importorskip("diffusers")
    from sparge.integrations.diffusers import disable_sparge, enable_sparge, sparge_report
    from sparge.integrations.testing import tiny_inputs, tiny_transformer

    model = tiny_transformer("wan").to("cuda")
    enable_sparge(model, "budget", budget=BUDGET, dense_layers=0, dense_steps=0,
                  sparse_kwargs={"backend": "triton"})
    errors: dict[str, list[float]] = {}
    for name, proc in model._sparge.processors.items():
        def hook(mod, args, kwargs, out, _name=name):
            errors.setdefault(_name, []).append(rel_l1(out, exact_attention(*args)))
        proc.sparse.register_forward_hook(hook, with_kwargs=True)
    for i in range(10):
        inputs = tiny_inputs("wan", timestep=1000.0 - 100 * i, width=64)
        model(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    report = sparge_report(model)
    for name, errs in errors.items():
        print(f"{name}: mean sparsity {statistics.mean(report[name].budget.mean_sparsity):.3f}, "
              f"max true error {max(errs):.4f}")
        assert max(errs) <= BUDGET
    assert statistics.mean(statistics.mean(s.budget.mean_sparsity)
                           for s in report.values()) > 0.25
    disable_sparge(model)
