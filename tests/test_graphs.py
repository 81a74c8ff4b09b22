"""Calls replayed as CUDA graphs (:mod:`sparge.kernels.graphs`).

- The ``INDIRECT`` kernels, on the CPU through Triton's interpreter (in a child process, as in
  ``test_kernels_prepass.py``): given the addresses of the real q, k, v and output, they read and
  write there and nowhere else. The tensors handed to them as arguments are NaN-filled
  stand-ins, so a kernel that read one would return NaN; the outputs equal the ordinary
  kernels' bit for bit (the same arithmetic).
- The replay bookkeeping, on the CPU with the capture stubbed: which call runs eagerly, which
  captures, which replays, and what is forgotten.
- On the GPU (marked ``gpu``): repeated public calls on fresh inputs give, bit for bit, what the
  same calls give with replay turned off, and which calls replay.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import run_interpreted

HERE = os.path.abspath(__file__)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _interpreted(name: str) -> None:
    """Run ``name()`` of this module in a fresh process under the Triton interpreter."""
    run_interpreted(HERE, name)


def _stand_in(x: torch.Tensor) -> torch.Tensor:
    """A NaN-filled tensor of x's shape, strides and dtype."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).fill_(float("nan"))


def _bits(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None or x.dtype.itemsize != 1 or not x.dtype.is_floating_point:
        return x
    return x.view(torch.uint8)


def _assert_same(a, b) -> None:
    for name in ("q", "q_scale", "k", "k_scale", "v", "v_scale", "k_scale_max"):
        x, y = _bits(getattr(a, name)), _bits(getattr(b, name))
        assert (x is None and y is None) or torch.equal(x, y), name


# ------------------------------------------------------------------------ interpreter cases
def case_indirect_prepass():
    from sparge.kernels import graphs
    from sparge.kernels.prepass import prepare_qkv

    print(f"random seed: {torch.seed()}")
    # NHD views (strided), GQA, partial last blocks
    q = torch.randn(1, 150, 4, 32).transpose(1, 2)
    k = (torch.randn(1, 200, 2, 32) + 3 * torch.randn(1, 1, 2, 32)).transpose(1, 2)
    v = torch.randn(1, 200, 2, 32).transpose(1, 2)
    for mode, v_in in (("int8_fp8", v), ("int8_fp16", v.float())):
        for stats in (False, True):
            direct, q_stats, k_stats = prepare_qkv(q, k, v_in, block_q=64, block_k=128,
                                                   mode=mode, with_stats=stats)
            addresses = graphs.address_buffer((q, k, v_in, q))
            read, q_read, k_read = prepare_qkv(
                _stand_in(q), _stand_in(k), _stand_in(v_in), block_q=64, block_k=128,
                mode=mode, with_stats=stats, addresses=addresses)
            _assert_same(direct, read)
            for ours, theirs in ((q_stats, q_read), (k_stats, k_read)):
                if stats:
                    assert torch.equal(ours.mean, theirs.mean)
                    assert torch.equal(ours.similarity, theirs.similarity)
                else:
                    assert ours is None and theirs is None


def case_indirect_pipeline():
    """The whole pipeline (pre-pass, selection, attention) writes the addressed output only."""
    from sparge import kernels
    from sparge.kernels import graphs
    from sparge.predict import Selection, per_head

    print(f"random seed: {torch.seed()}")
    b, hq, hk, length, d = 1, 2, 1, 200, 64
    q, k, v = (torch.randn(b, h, length, d) for h in (hq, hk, hk))
    selection = Selection(-1.0, 0.6)
    lam = per_head(50.0, hq, q.device)
    for mode in ("int8_fp16", "int8_fp8"):
        for causal in (False, True):
            kw = dict(mask=None, selection=selection, block_q=64, block_k=64, causal=causal,
                      scale=d ** -0.5, pv_threshold=lam, mode=mode)
            direct = torch.full_like(q, float("nan"))
            mask = kernels.attention(q, k, v, out=direct, **kw)
            out, stand_in_out = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
            read_mask = kernels.attention(
                _stand_in(q), _stand_in(k), _stand_in(v), out=stand_in_out,
                addresses=graphs.address_buffer((q, k, v, out)), **kw)
            assert torch.equal(mask.blocks, read_mask.blocks)
            assert 0 < mask.blocks.float().mean() < 1  # the selection kept some blocks
            assert torch.equal(out, direct)
            assert stand_in_out.isnan().all()  # never written


def case_indirect_block_mask():
    """With a given mask, the lookup-table kernel reads the addressed blocks: the stand-in mask
    handed to it as an argument is the addressed one's complement."""
    from sparge import kernels
    from sparge.kernels import graphs
    from sparge.mask import SparseMask
    from sparge.predict import per_head

    print(f"random seed: {torch.seed()}")
    b, hq, hk, length, d = 1, 2, 1, 200, 32
    q, k, v = (torch.randn(b, h, length, d) for h in (hq, hk, hk))
    lam = per_head(50.0, hq, q.device)
    for causal in (False, True):
        blocks = torch.rand(1, hq, 4, 2) < 0.6
        blocks[:, :, 1] = torch.tensor([True, False])
        blocks[:, :, 2] = False  # query rows 128-191 keep no block: zeros
        mask = SparseMask(blocks, 64, 128, length, length, causal).expand(b, hq)
        stand_in_mask = SparseMask._of_valid_blocks(~mask.blocks, 64, 128, length, length,
                                                    causal)
        kw = dict(selection=None, block_q=64, block_k=128, causal=causal, scale=d ** -0.5,
                  pv_threshold=lam, mode="int8_fp8")
        direct = torch.full_like(q, float("nan"))
        kernels.attention(q, k, v, mask=mask, out=direct, **kw)
        out, stand_in_out = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
        kernels.attention(_stand_in(q), _stand_in(k), _stand_in(v), mask=stand_in_mask,
                          out=stand_in_out,
                          addresses=graphs.address_buffer((q, k, v, out, mask.blocks)), **kw)
        assert torch.equal(out, direct)
        assert stand_in_out.isnan().all()  # never written
        assert (direct[:, :, 128:192] == 0).all() and direct[:, :, 64:128].abs().sum() > 0


def case_held_bytes_counts_the_pipelines_buffers():
    """:func:`held_bytes` against the buffers the pipeline allocates (every output of the
    pre-pass, the selection and the lookup table), dense, on a given mask and on a predicted
    one, FP8 and FP16 V: never more, and short of them by the scales and per-block statistics
    alone (under 3 % here)."""
    from sparge import kernels
    from sparge.kernels import graphs, prepass, select
    from sparge.mask import SparseMask
    from sparge.predict import Selection, per_head

    allocated = []

    def recording(alloc):
        def alloc_and_record(*shape, dtype, device):
            out = alloc(*shape, dtype=dtype, device=device)
            allocated.append(out.numel() * out.element_size())
            return out
        return alloc_and_record

    prepass._alloc, select._alloc = recording(prepass._alloc), recording(select._alloc)
    b, hq, hk, length, d = 1, 2, 1, 512, 64
    q, k, v = (torch.randn(b, h, length, d) for h in (hq, hk, hk))
    given = SparseMask(torch.rand(b, hq, 8, 4) < 0.5, 64, 128, length, length, False)
    kinds = {None: dict(mask=None, selection=None), "given": dict(mask=given, selection=None),
             "predicted": dict(mask=None, selection=Selection(-1.0, 0.6))}
    for mode, v_bytes in (("int8_fp8", 1), ("int8_fp16", 2)):
        for kind, kw in kinds.items():
            allocated.clear()
            kernels.attention(q, k, v, out=torch.empty_like(q), block_q=64, block_k=128,
                              causal=False, scale=d ** -0.5,
                              pv_threshold=per_head(50.0, hq, q.device), mode=mode, **kw)
            estimate = graphs.held_bytes(q, k, v, v_bytes=v_bytes, block_q=64, block_k=128,
                                         mask=kind)
            print(mode, kind, "estimate", estimate, "allocated", sum(allocated))
            assert estimate <= sum(allocated) <= 1.03 * estimate, (mode, kind)


CPU_CASES = sorted(name for name in dict(globals()) if name.startswith("case_"))


@pytest.mark.parametrize("case", CPU_CASES)
def test_interpreted(case):
    pytest.importorskip("triton")
    _interpreted(case)


def test_addresses_refused_where_unread():
    """Paths that read a caller's tensor through an argument refuse an address buffer."""
    pytest.importorskip("triton")
    from sparge import kernels
    from sparge.kernels.prepass import prepare_qkv
    from sparge.mask import SparseMask
    from sparge.predict import per_head

    q = k = v = torch.randn(1, 1, 64, 16, dtype=torch.float16)
    addresses = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="float16 V"):
        prepare_qkv(q, k, v, block_q=64, block_k=64, mode="int8_fp16", with_stats=False,
                    addresses=addresses)
    kw = dict(selection=None, block_q=64, block_k=64, causal=False, scale=0.25,
              pv_threshold=per_head(50.0, 1, q.device), out=torch.empty_like(q),
              addresses=addresses)
    with pytest.raises(ValueError, match="quantized modes only"):
        kernels.attention(q, k, v, mask=None, mode="none", **kw)
    mask = SparseMask.full(1, 1, 64, 64, 64, 64)
    with pytest.raises(ValueError, match="slot"):  # a buffer of four addresses has no mask
        kernels.attention(q, k, v, mask=mask, mode="int8_fp8", **kw)


# ------------------------------------------------------------------------ bookkeeping
class _FakeGraph:
    def __init__(self, log):
        self.log = log

    def replay(self):
        self.log.append("replay")


@pytest.fixture
def stubbed_capture(monkeypatch):
    """graphs.run with the capture replaced by a recording stand-in; returns the log."""
    pytest.importorskip("triton")
    from sparge.kernels import graphs

    log = []

    def capture(call, addresses, values, made):
        log.append("capture")
        return graphs._Graph(_FakeGraph(log), addresses, values, "captured result", made)

    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setattr(graphs, "_GRAPHS", {})
    return log


def _tensors():
    return tuple(torch.empty(4) for _ in range(4))


def test_first_call_eager_second_captures_then_replays(stubbed_capture):
    from sparge.kernels import graphs

    log = stubbed_capture

    def call(addresses, values):
        log.append("eager" if addresses is None else ("indirect", addresses.tolist()))
        seen.append(values)
        return f"result {len(seen)}"

    seen = []
    first, second, third = _tensors(), _tensors(), _tensors()
    values = [(torch.rand(3), torch.rand(3)) for _ in range(3)]
    assert graphs.run("key", first, call, values[0]) == "result 1"
    assert log == ["eager"] and seen[0] is values[0]
    assert graphs.run("key", second, call, values[1]) == "result 2"
    assert log[1:] == [("indirect", [t.data_ptr() for t in second]), "capture"]
    own = graphs._GRAPHS["key"].values
    # the graph reads its own copies of the values, not the caller's tensors
    assert seen[1] is own and all(a is not b and torch.equal(a, b)
                                  for a, b in zip(own, values[1], strict=True))
    # a replay returns what the captured call returned (the graph's own tensors)
    assert graphs.run("key", third, call, values[2]) == "captured result"
    assert log[3:] == ["replay"] and len(seen) == 2
    # the replay reads the third call's addresses and values
    assert graphs._GRAPHS["key"].addresses.tolist() == [t.data_ptr() for t in third]
    assert graphs._GRAPHS["key"].values is own
    assert all(torch.equal(a, b) for a, b in zip(own, values[2], strict=True))


def test_replays_copy_addresses_only_when_they_change(stubbed_capture, monkeypatch):
    """A replay writes the caller's addresses into the graph's buffer only when they differ from
    the ones it holds (a host-to-device copy saved where the allocator hands the same memory
    out again)."""
    from sparge.kernels import graphs

    writes = []
    write = graphs._write
    monkeypatch.setattr(graphs, "_write", lambda buffer, pointers: writes.append(pointers)
                        or write(buffer, pointers))

    def call(addresses, values):
        return None

    first, second, third = _tensors(), _tensors(), _tensors()
    graphs.run("key", first, call)
    graphs.run("key", second, call)  # captures: the buffer holds the second call's addresses
    assert writes == [graphs._pointers(second)]
    graphs.run("key", second, call)
    graphs.run("key", second, call)
    assert stubbed_capture.count("replay") == 2 and len(writes) == 1
    graphs.run("key", third, call)
    graphs.run("key", second, call)
    assert writes[1:] == [graphs._pointers(third), graphs._pointers(second)]
    assert graphs._GRAPHS["key"].addresses.tolist() == list(graphs._pointers(second))


def test_graph_keeps_what_the_call_made_before_its_capture(monkeypatch):
    """On a key's second call the call runs eagerly, then under capture: a constant it keeps in
    ``made`` on the first run is there for the capture to read, and the graph keeps it."""
    pytest.importorskip("triton")
    from sparge.kernels import graphs

    monkeypatch.setattr(graphs, "_GRAPHS", {})
    captured = []

    def capture(call, addresses, values, made):
        captured.append(dict(made))  # what the capture would read
        return graphs._Graph(_FakeGraph([]), addresses, values, None, made)

    monkeypatch.setattr(graphs, "_capture", capture)
    made = {}

    def call(addresses, values):
        made.setdefault("threshold", torch.full((2,), 0.5))

    graphs.run("key", _tensors(), call, (), {})  # first call: eager, its own container
    graphs.run("key", _tensors(), call, (), made)
    assert captured[0]["threshold"] is made["threshold"]
    assert graphs._GRAPHS["key"].made is made


def test_failed_capture_stays_eager(stubbed_capture, monkeypatch):
    from sparge.kernels import graphs

    monkeypatch.setattr(graphs, "_capture", lambda call, addresses, values, made: graphs._EAGER)
    calls = []
    for _ in range(4):
        graphs.run("key", _tensors(), lambda addresses, values: calls.append(addresses))
    assert calls[0] is None and calls[2:] == [None, None]  # the second ran indirect, then eager
    assert calls[1] is not None


def test_failing_indirect_kernels_fall_back(stubbed_capture):
    """If the address-reading call fails, the call runs eagerly, now and from then on."""
    from sparge.kernels import graphs

    log = []

    def call(addresses, values):
        if addresses is not None:
            raise RuntimeError("no such kernel")
        log.append("eager")

    graphs.run("key", _tensors(), call)
    with pytest.warns(RuntimeWarning, match="no such kernel"):
        graphs.run("key", _tensors(), call)
    graphs.run("key", _tensors(), call)
    assert log == ["eager"] * 3 and "capture" not in stubbed_capture


def test_oldest_key_forgotten(stubbed_capture, monkeypatch):
    """Past MAX_GRAPHS keys the oldest goes; a graph only after the GPU has finished with it."""
    from sparge.kernels import graphs

    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", waits.append)
    for _ in range(2):
        graphs.run("captured", _tensors(), lambda addresses, values: None)
    assert isinstance(graphs._GRAPHS["captured"], graphs._Graph)
    for key in range(graphs.MAX_GRAPHS):
        graphs.run(key, _tensors(), lambda addresses, values: None)
    assert "captured" not in graphs._GRAPHS and len(graphs._GRAPHS) == graphs.MAX_GRAPHS
    assert len(waits) == 1  # before dropping the graph
    graphs.clear()
    assert not graphs._GRAPHS and len(waits) == 1  # nothing else held a graph


def test_cpu_calls_never_replay(monkeypatch):
    """The public API on CPU tensors (the reference path) does not reach the replay."""
    pytest.importorskip("triton")
    import sparge
    from sparge.kernels import graphs

    monkeypatch.setattr(graphs, "run", lambda *a: pytest.fail("replayed on the CPU"))
    q = torch.randn(1, 2, 64, 16)
    sparge.sparse_attn(q, q, q)


# ------------------------------------------------------------------------ GPU
def _replays(monkeypatch) -> list:
    """Record the graph replays of every later call."""
    from sparge.kernels import graphs

    seen = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda self: (seen.append(self), replay(self))[1])
    monkeypatch.setattr(graphs, "_GRAPHS", {})
    return seen


def _eager(monkeypatch, fn):
    """fn() with replay turned off."""
    with monkeypatch.context() as m:
        m.setenv("SPARGE_CUDA_GRAPHS", "0")
        return fn()


# entry point and its arguments
CALLS = {
    "sparse_attn": ("sparse_attn", dict(sim_threshold=0.5)),
    "sparse_attn causal topk sink": ("sparse_attn", dict(topk=0.3, is_causal=True,
                                                        attention_sink=True)),
    "sparse_attn int8_fp16": ("sparse_attn", dict(quant="int8_fp16", pv_threshold=4.0)),
    # fresh per-head threshold tensors on every call (see _call_args)
    "sparse_attn tensor thresholds": ("sparse_attn", dict(tensor_thresholds="cdf")),
    "sparse_attn causal tensor topk": ("sparse_attn", dict(tensor_thresholds="topk",
                                                          is_causal=True)),
    # the statistics: each call's predicted mask, a copy of the graph's own
    "sparse_attn return_stats": ("sparse_attn", dict(tensor_thresholds="cdf",
                                                     return_stats=True)),
    "block_sparse_attn return_stats": ("block_sparse_attn", dict(block_q=64, block_k=128,
                                                                 return_stats=True)),
    "quantized_attn": ("quantized_attn", {}),
    "quantized_attn causal float32 out": ("quantized_attn", dict(is_causal=True,
                                                                 out_dtype=torch.float32)),
    # a fresh random block mask on every call (see _call_args)
    "block_sparse_attn": ("block_sparse_attn", dict(block_q=64, block_k=128)),
    "block_sparse_attn causal int8_fp16 heads broadcast": (
        "block_sparse_attn", dict(block_q=128, block_k=64, is_causal=True, quant="int8_fp16",
                                  one_head_mask=True)),
}


def _call_args(entry: str, kwargs: dict, b: int, hq: int, lq: int, lk: int) -> tuple:
    """The positional and keyword arguments after q, k and v: for ``block_sparse_attn`` a fresh
    block mask tensor, about 60 % kept, of one head if ``one_head_mask``; with
    ``tensor_thresholds`` fresh random (Hq,) tensors for the similarity, the CDF or top-k rule
    and the P.V threshold (a scalar tensor)."""
    kwargs = dict(kwargs)
    rule = kwargs.pop("tensor_thresholds", None)
    if rule is not None:
        kwargs.update(sim_threshold=torch.rand(hq, device="cuda") - 0.5,
                      pv_threshold=torch.rand((), device="cuda") * 10)
        kwargs["cdf_threshold" if rule == "cdf" else "topk"] = (
            0.3 + 0.6 * torch.rand(hq, device="cuda"))
    if entry != "block_sparse_attn":
        return (), kwargs
    heads = 1 if kwargs.pop("one_head_mask", False) else hq
    n_q, n_k = -(-lq // kwargs["block_q"]), -(-lk // kwargs["block_k"])
    return (torch.rand(b, heads, n_q, n_k, device="cuda") < 0.6,), kwargs


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("shape", [(1, 8, 2, 2000, 2000, 128, "HND"),
                                   (2, 4, 4, 777, 1500, 64, "NHD")])
def test_replay_equals_eager_gpu(name, shape, monkeypatch):
    """Four calls on fresh inputs (the previous inputs freed): the first runs eagerly, the second
    captures, the last two replay; each equals the call with replay off, bit for bit, and so
    does each call's mask with ``return_stats``, still after the later replays."""
    import sparge

    print(f"random seed: {torch.seed()}")
    b, hq, hk, lq, lk, d, layout = shape
    entry, kwargs = CALLS[name]
    fn = getattr(sparge, entry)
    replays = _replays(monkeypatch)

    def sizes(heads, length):
        return (b, heads, length, d) if layout == "HND" else (b, length, heads, d)

    masks = []  # (this call's stats, the eager call's) with return_stats
    for i in range(4):
        q = torch.randn(sizes(hq, lq), device="cuda", dtype=torch.bfloat16)
        k = torch.randn(sizes(hk, lk), device="cuda", dtype=torch.bfloat16) + 2
        v = torch.randn(sizes(hk, lk), device="cuda", dtype=torch.bfloat16)
        args, kw = _call_args(entry, kwargs, b, hq, lq, lk)
        out = fn(q, k, v, *args, layout=layout, **kw)
        assert len(replays) == max(0, i - 1)
        expected = _eager(monkeypatch, lambda inputs=(q, k, v, *args), kw=kw: fn(
            *inputs, layout=layout, **kw))
        if kw.get("return_stats"):
            (out, stats), (expected, eager_stats) = out, expected
            masks.append((stats, eager_stats))
        assert torch.isfinite(out).all()
        assert torch.equal(out, expected), f"call {i}"
        del q, k, v, args
    for i, (stats, eager_stats) in enumerate(masks):
        assert torch.equal(stats.mask.blocks, eager_stats.mask.blocks), f"call {i}"
        assert stats.sparsity == eager_stats.sparsity, f"call {i}"
    if kwargs.get("return_stats"):
        assert len(masks) == 4 and len({m.mask.blocks.data_ptr() for m, _ in masks}) == 4
        assert max(m.sparsity for m, _ in masks) > 0  # masks that differ from call to call


@pytest.mark.gpu
@gpu
def test_calls_that_never_replay_gpu(monkeypatch):
    """A float16 V for FP16 P.V, unaligned inputs or masks, and calls whose graph would keep
    more than :data:`MAX_HELD_BYTES` run eagerly every time; at the limit they replay."""
    import sparge
    from sparge.kernels import graphs

    replays = _replays(monkeypatch)
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    unaligned = torch.randn(1 * 4 * 1024 * 64 + 1, device="cuda", dtype=torch.float16)[1:]
    calls = [
        lambda: sparge.sparse_attn(q, k, v, quant="int8_fp16"),
        lambda: sparge.block_sparse_attn(q, k, v, torch.ones(1 + 16 * 8, dtype=torch.bool,
                                                              device="cuda")[1:].view(1, 1, 16, 8),
                                         block_q=64, block_k=128),
        lambda: sparge.quantized_attn(unaligned.view(1, 4, 1024, 64), k, v),
    ]
    for call in calls:
        for _ in range(3):
            call()
    # one byte over the limit: eager; at the limit: replayed
    monkeypatch.setattr(graphs, "MAX_HELD_BYTES", 3 * q.numel() - 1)
    for _ in range(3):
        sparge.quantized_attn(q, k, v)
    assert replays == [] and graphs._GRAPHS == {}
    monkeypatch.setattr(graphs, "MAX_HELD_BYTES", 3 * q.numel())
    for _ in range(3):
        sparge.quantized_attn(q, k, v)
    assert len(replays) == 1


@pytest.mark.gpu
@gpu
def test_long_call_of_few_heads_replays_within_its_memory_estimate_gpu(monkeypatch):
    """The demo's shape (L32768, 8 heads, D128, most blocks skipped) is host-bound when eager,
    and its graph's buffers fit :data:`MAX_HELD_BYTES`: it replays, equal to the eager call,
    and the memory its capture reserved is what :func:`held_bytes` estimates (the allocator
    rounds up, and reserves segments for the small buffers)."""
    import sparge
    from sparge.backend import has_fp8_tensor_cores
    from sparge.kernels import graphs

    print(f"random seed: {torch.seed()}")
    replays = _replays(monkeypatch)
    shape = (1, 8, 32768, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v_bytes = 1 if has_fp8_tensor_cores(q.device) else 2  # "auto": FP8 V, else an FP16 copy
    estimate = graphs.held_bytes(q, k, v, v_bytes=v_bytes, block_q=64, block_k=128,
                                 mask="predicted")  # sparse_attn's block sizes
    assert estimate <= graphs.MAX_HELD_BYTES
    sparge.sparse_attn(q, k, v, cdf_threshold=0.5)  # eager: compiles and tunes
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    sparge.sparse_attn(q, k, v, cdf_threshold=0.5)  # captures
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved() - before
    print(f"graph memory: {reserved / 2**20:.1f} MiB reserved, {estimate / 2**20:.1f} MiB "
          "estimated")
    assert 0.9 * estimate <= reserved <= 1.3 * estimate
    out = sparge.sparse_attn(q, k, v, cdf_threshold=0.5)
    assert len(replays) == 1
    assert torch.equal(out, _eager(monkeypatch, lambda: sparge.sparse_attn(
        q, k, v, cdf_threshold=0.5)))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["sparse_attn", "sparse_attn causal topk sink",
                                  "quantized_attn", "block_sparse_attn"])
@pytest.mark.parametrize("stream", ["default", "side"])
def test_replays_run_only_the_pipelines_kernels_gpu(name, stream, monkeypatch):
    """A replayed call with number thresholds runs the copy of its addresses and the pipeline's
    Triton kernels, and no PyTorch kernel: the thresholds were filled before the capture, and
    the selection kernel reads a CDF threshold of 1 or more as keeping every block itself."""
    from torch.profiler import ProfilerActivity, profile

    import sparge

    replays = _replays(monkeypatch)
    b, hq, lq, d = 1, 4, 1024, 64
    entry, kwargs = CALLS[name]
    fn = getattr(sparge, entry)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side if stream == "side" else torch.cuda.current_stream()):
        for i in range(3):
            q, k, v = (torch.randn(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            args, kw = _call_args(entry, kwargs, b, hq, lq, lq)
            torch.cuda.synchronize()
            if i < 2:
                fn(q, k, v, *args, **kw)  # eager, then the capture
                continue
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(q, k, v, *args, **kw)
                torch.cuda.synchronize()
    assert len(replays) == 1
    names = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if not n.startswith("Memcpy")]
    assert kernels and all(n.startswith("_") for n in kernels), names


@pytest.mark.gpu
@gpu
def test_streams_have_graphs_of_their_own_gpu(monkeypatch):
    import sparge
    from sparge.kernels import graphs

    replays = _replays(monkeypatch)
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    outs = [sparge.sparse_attn(q, k, v) for _ in range(3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outs += [sparge.sparse_attn(q, k, v) for _ in range(3)]
    torch.cuda.current_stream().wait_stream(side)
    assert len(replays) == 2 and replays[0] is not replays[1]
    assert len(graphs._GRAPHS) == 2
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.gpu
@gpu
def test_inside_callers_capture_gpu(monkeypatch):
    """A call captured by the caller's own CUDA graph runs the ordinary kernels into it."""
    import sparge

    replays = _replays(monkeypatch)
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: this library's own graph replays once here
            sparge.sparse_attn(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    assert len(replays) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparge.sparse_attn(q, k, v)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, _eager(monkeypatch, lambda: sparge.sparse_attn(q, k, v)))


@pytest.mark.gpu
@gpu
def test_replay_does_not_wait_for_the_gpu(monkeypatch):
    """Writing the addresses and replaying never synchronises: a replayed call returns while
    the GPU is still busy with work queued before it."""
    import time

    import sparge

    replays = _replays(monkeypatch)
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(3):
        sparge.sparse_attn(q, k, v)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles, queued first
    start = time.perf_counter()
    sparge.sparse_attn(q, k, v)
    host = time.perf_counter() - start
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert len(replays) == 2
    assert busy and host < 0.1
