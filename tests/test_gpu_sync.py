"""Host synchronisation on a CUDA GPU (skipped without one): after a warm-up call, a call that
returns statistics, a tuned layer and the diffusers processor in "fixed" and "tuned" modes make
none (``torch.cuda.set_sync_debug_mode("error")`` raises on one); reading a sparsity afterwards
reads the mask back and gives its value. The processor runs without diffusers installed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge.integrations.diffusers import SpargeAttnProcessor, SpargeController
from sparge.tuning import SparseAttentionMeansim

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"
HEADS = 4
FIXED = {"cdf_threshold": 0.9, "sim_threshold": 0.0}


def qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v (1, HEADS, 1024, 64) in bfloat16."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(torch.randn(1, HEADS, 1024, 64, generator=gen, device=DEVICE,
                             dtype=torch.bfloat16) for _ in range(3))


@contextlib.contextmanager
def no_synchronisation() -> Iterator[None]:
    """A host synchronisation inside the block raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def tuned_module() -> SparseAttentionMeansim:
    """A layer with loaded (tuned) values, as in the diffusers "tuned" mode."""
    module = SparseAttentionMeansim()
    module.load_tuning_state({"is_sparse": torch.ones(HEADS, dtype=torch.bool),
                              "cdfthreshd": torch.full((HEADS,), 0.9),
                              "simthreshd1": torch.zeros(HEADS),
                              "simthreshd2": torch.zeros(HEADS),
                              "pvthreshd": torch.full((HEADS,), 20.0)}, DEVICE)
    return module


class SDPAProcessor:
    """Stands in for a diffusers attention processor, which ends in SDPA."""

    def __call__(self, attn: object, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


@needs_cuda
def test_return_stats_does_not_synchronise():
    q, k, v = qkv()
    sparge.sparse_attn(q, k, v, **FIXED, return_stats=True)  # warm-up: compiles the kernels
    with no_synchronisation():
        _, stats = sparge.sparse_attn(q, k, v, **FIXED, return_stats=True)
    assert stats.sparsity == stats.mask.sparsity()
    assert torch.equal(stats.per_head_sparsity, stats.mask.per_head_sparsity().cpu())
    assert stats.per_head_sparsity.device.type == "cpu"


@needs_cuda
@torch.no_grad()
def test_tuned_layer_does_not_synchronise():
    """Without and with ``record_sparsity`` (the count stays on the GPU until read)."""
    module = tuned_module()
    q, k, v = qkv()
    for record in (False, True):
        module.record_sparsity = record
        module(q, k, v)  # warm-up: compiles the kernels, reads the thresholds back once
        with no_synchronisation():
            module(q, k, v)
        assert (module.last_sparsity is None) != record
    recorded = float(module.last_sparsity)
    _, sparsity = module(q, k, v, return_sparsity=True)  # the same inputs give the same mask
    assert sparsity == recorded == float(module.last_sparsity) > 0


@needs_cuda
@pytest.mark.parametrize("mode", ["fixed", "tuned"])
@torch.no_grad()
def test_diffusers_processor_does_not_synchronise(mode):
    sparse = tuned_module() if mode == "tuned" else None
    proc = SpargeAttnProcessor(SDPAProcessor(), sparse, SpargeController(mode, 0, 128), "attn",
                               0, FIXED if mode == "fixed" else None)
    q, k, v = qkv()
    proc(None, q, k, v)  # warm-up
    with no_synchronisation():
        out = proc(None, q, k, v)
    assert proc.stats.sparse_calls == 2 and out.shape == q.shape
    _, stats = sparge.sparse_attn(q, k, v, **(FIXED if sparse is None else sparse.inference_args()),
                                  return_stats=True)
    assert proc.stats.last_sparsity == stats.sparsity
