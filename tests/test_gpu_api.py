"""The public API on a CUDA GPU: torch.compile and CUDA graphs around sparge.sparse_attn."""

import pytest
import torch

import sparge

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(seed: int, length: int = 3000):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, 8, length, 128)
    return tuple(torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
                 for _ in range(3))


@pytest.mark.gpu
@gpu
def test_sparse_attn_compiles_without_graph_breaks():
    q, k, v = inputs(torch.seed() % 2**31)

    def layer(q, k, v):
        return sparge.sparse_attn(q * 1.0, k, v, cdf_threshold=0.9, is_causal=True) * 2.0

    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.gpu
@gpu
def test_sparse_attn_replays_in_a_cuda_graph():
    q, k, v = inputs(torch.seed() % 2**31)
    static = [t.clone() for t in (q, k, v)]
    sparge.sparse_attn(*static, topk=0.3)  # compile kernels, tune, warm the allocator
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparge.sparse_attn(*static, topk=0.3)
    fresh = inputs(torch.seed() % 2**31)
    for buf, new in zip(static, fresh, strict=True):
        buf.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, sparge.sparse_attn(*fresh, topk=0.3), rtol=0, atol=0)


@pytest.mark.gpu
@gpu
def test_sparse_attn_replays_under_compile_reduce_overhead():
    """torch.compile's CUDA graphs (``mode="reduce-overhead"``) record the whole call and replay
    it: no graph is skipped, and every call gives the eager bits on fresh inputs."""
    from torch._dynamo.utils import counters

    def layer(q, k, v):
        return sparge.sparse_attn(q, k, v, topk=0.3, is_causal=True)

    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, recording, replays
        q, k, v = inputs(torch.seed() % 2**31)
        got = run(q, k, v).clone()  # a replay overwrites the previous output
        torch.testing.assert_close(got, layer(q, k, v), rtol=0, atol=0)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    """A model spread over GPUs calls with tensors on a GPU that is not the current device:
    every entry point runs there and gives what it gives with that GPU current."""
    gen = torch.Generator(device="cuda:1").manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(1, 4, 2000, 64, generator=gen, device="cuda:1",
                           dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(1, 4, 32, 16, generator=gen, device="cuda:1") < 0.5
    calls = {
        "sparse_attn": lambda: sparge.sparse_attn(q, k, v, is_causal=True),
        "sparse_attn, tensor thresholds": lambda: sparge.sparse_attn(
            q, k, v, topk=torch.full((4,), 0.3, device="cuda:1")),
        "quantized_attn": lambda: sparge.quantized_attn(q, k, v),
        "block_sparse_attn": lambda: sparge.block_sparse_attn(q, k, v, mask, block_q=64,
                                                              block_k=128),
        "predict_mask": lambda: sparge.predict_mask(q, k).blocks,
    }
    for name, call in calls.items():
        with torch.cuda.device(1):
            expected = call()
        torch.cuda.set_device(0)
        for _ in range(3):  # the replayed calls too
            got = call()
            assert got.device == q.device, name
            assert torch.equal(got, expected), name


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("call", ["sparse_attn", "quantized_attn", "block_sparse_attn"])
def test_more_heads_than_a_grid_axis_holds(call):
    """B * H = 65540, past the 65535 programs that a CUDA grid's second and third axes hold:
    every kernel puts (batch, head) on the first axis. Each head's output is that head's output
    computed alone, bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    batch, heads, length = 2, 32770, 130
    q, k, v = (torch.randn(batch, heads, length, 64, generator=gen, device="cuda",
                           dtype=torch.bfloat16) for _ in range(3))
    blocks = torch.rand(batch, heads, 3, 2, generator=gen, device="cuda") < 0.5

    def run(b: slice, h: slice) -> torch.Tensor:
        if call == "sparse_attn":
            return sparge.sparse_attn(q[b, h], k[b, h], v[b, h], cdf_threshold=0.5,
                                      is_causal=True)
        if call == "quantized_attn":
            return sparge.quantized_attn(q[b, h], k[b, h], v[b, h])
        mask = sparge.SparseMask(blocks[b, h], 64, 128, length, length, True)
        return sparge.block_sparse_attn(q[b, h], k[b, h], v[b, h], mask)

    out = run(slice(None), slice(None))
    assert torch.isfinite(out).all()
    for b, h in ((0, 0), (1, heads - 1), (1, 12345)):
        alone = run(slice(b, b + 1), slice(h, h + 1))
        assert torch.equal(out[b:b + 1, h:h + 1], alone), (b, h)
