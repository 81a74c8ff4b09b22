"""The host side of a call: the launch cache (sparge.kernels.launcher) and the cached device
constants (sparge._constants). Both exist to cut host time per call; neither may change what a
call computes."""

from __future__ import annotations

import warnings

import pytest
import torch

import sparge
from sparge import _constants
from sparge.kernels import launcher

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class FakeKernel:
    """Stands in for a JIT function: records launches through Triton and through the compiled
    handle it returns."""

    arg_names = ["x", "n", "scale", "BLOCK", "EVEN"]

    def __init__(self, fail_direct: bool = False):
        self.jit_launches: list[tuple] = []
        self.direct_launches: list[tuple] = []
        self.fail_direct = fail_direct
        kernel = self

        class Handle:
            def __getitem__(self, grid):
                def runner(*args):
                    if kernel.fail_direct:
                        raise TypeError("launcher signature changed")
                    kernel.direct_launches.append((grid, args))
                return runner

        self.handle = Handle()

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.jit_launches.append((grid, args, meta))
            return self.handle
        return launch


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors treated as on a GPU, with an empty cache."""
    monkeypatch.setattr(launcher, "_on_gpu", lambda first: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launcher, "_CACHE", {})
    monkeypatch.setattr(launcher, "_enabled", True)


def test_repeated_launch_calls_the_compiled_kernel(fake_gpu):
    kernel = FakeKernel()
    x = torch.empty(64)
    for _ in range(3):
        handle = launcher.run(kernel, (4,), x, 64, 0.5, BLOCK=16, EVEN=True, num_warps=4)
        assert handle is kernel.handle
    assert len(kernel.jit_launches) == 1
    # the grid padded to three dimensions; the constexprs appended in parameter order
    assert kernel.direct_launches == [((4, 1, 1), (x, 64, 0.5, 16, True))] * 2


@pytest.mark.parametrize("change", ["alignment", "dtype", "integer", "constexpr", "option",
                                    "bool for int"])
def test_a_new_specialisation_goes_through_triton(fake_gpu, change):
    kernel = FakeKernel()
    base = torch.empty(65)
    args, meta = [base[:64], 64, 0.5], dict(BLOCK=16, EVEN=True, num_warps=4)
    launcher.run(kernel, (4,), *args, **meta)
    if change == "alignment":
        args[0] = base[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = torch.empty(64, dtype=torch.float16)
    elif change == "integer":
        args[1] = 48
    elif change == "constexpr":
        meta["BLOCK"] = 32
    elif change == "option":
        meta["num_warps"] = 8
    else:
        args[1] = True  # equal to 1 in Python, a different type for Triton
        launcher.run(kernel, (4,), args[0], 1, 0.5, **meta)
    launcher.run(kernel, (4,), *args, **meta)
    assert kernel.direct_launches == []
    assert len(kernel.jit_launches) == (3 if change == "bool for int" else 2)


def test_unknown_argument_types_go_through_triton(fake_gpu):
    kernel = FakeKernel()
    x = torch.nn.Parameter(torch.empty(64))  # a tensor subclass
    for _ in range(2):
        launcher.run(kernel, (1,), x, 64, 0.5, BLOCK=16, EVEN=True)
    assert len(kernel.jit_launches) == 2 and kernel.direct_launches == []


def test_a_failing_direct_launch_falls_back_and_warns_once(fake_gpu):
    kernel = FakeKernel(fail_direct=True)
    x = torch.empty(64)
    launcher.run(kernel, (1,), x, 64, 0.5, BLOCK=16, EVEN=True)
    with pytest.warns(RuntimeWarning, match="direct kernel launches failed"):
        launcher.run(kernel, (1,), x, 64, 0.5, BLOCK=16, EVEN=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launcher.run(kernel, (1,), x, 64, 0.5, BLOCK=16, EVEN=True)
    assert len(kernel.jit_launches) == 3 and not launcher._enabled


def test_cache_is_bounded(fake_gpu, monkeypatch):
    monkeypatch.setattr(launcher, "MAX_ENTRIES", 4)
    kernel = FakeKernel()
    x = torch.empty(64)
    for n in range(10):
        launcher.run(kernel, (1,), x, n, 0.5, BLOCK=16, EVEN=True)
    assert len(launcher._CACHE) == 4


def test_host_integer_helpers():
    assert [launcher.cdiv(a, 64) for a in (1, 64, 65, 128)] == [1, 1, 2, 2]
    assert [launcher.next_pow2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]


def test_constants_are_not_kept_on_the_cpu():
    made = []

    def make():
        made.append(1)
        return torch.zeros(3)

    a = _constants.device_constant(("test", 3), torch.device("cpu"), make)
    b = _constants.device_constant(("test", 3), torch.device("cpu"), make)
    assert a is not b and len(made) == 2


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@gpu
def test_constants_are_kept_on_the_default_stream_only():
    """Kept for calls on the default stream; made afresh on another stream (where
    torch.compile's CUDA graphs warm up, in a pool no tensor may outlive a call) and during
    capture."""
    device = torch.device("cuda")
    key = ("test constant", torch.seed())

    def make():
        return torch.full((4,), 2.0, device=device)

    first = _constants.device_constant(key, device, make)
    assert _constants.device_constant(key, device, make) is first
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        made_on_side = [_constants.device_constant(key, device, make) for _ in range(2)]
    assert made_on_side[0] is not first and made_on_side[1] is not made_on_side[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _constants.device_constant(key, device, make)
    assert all(captured is not t for t in (first, *made_on_side))
    assert _constants.device_constant(key, device, make) is first


@pytest.mark.gpu
@gpu
def test_launch_cache_keeps_results_exact_across_alignments_and_shapes():
    """The same inputs give the same bits whether launched through Triton or through the cache,
    at 16-byte-aligned and misaligned addresses (views one element in) and across shapes."""
    torch.manual_seed(torch.seed() % 2 ** 31)
    heads, dim = 4, 64
    storage = torch.randn(3, 1, heads, 1000 * dim + 1, device="cuda", dtype=torch.bfloat16)

    def views(length, offset):
        return [storage[i, :, :, offset:offset + length * dim].unflatten(-1, (length, dim))
                for i in range(3)]

    for length, offset in ((1000, 0), (1000, 1), (1000, 0), (777, 1), (777, 0)):
        q, k, v = views(length, offset)
        assert (q.data_ptr() % 16 == 0) == (offset == 0)
        launcher._CACHE.clear()
        through_triton = [sparge.quantized_attn(q, k, v), sparge.sparse_attn(q, k, v)]
        cached = [sparge.quantized_attn(q, k, v), sparge.sparse_attn(q, k, v)]
        copies = [t.clone() for t in (q, k, v)]
        aligned = [sparge.quantized_attn(*copies), sparge.sparse_attn(*copies)]
        for a, b, c in zip(through_triton, cached, aligned, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_dependent_launch_from_sm90_on(monkeypatch):
    """Programmatic dependent launch: the ``PDL`` constexpr and Triton's ``launch_pdl`` option on
    CUDA devices of compute capability 9.0 and newer, unless ``SPARGE_DEPENDENT_LAUNCH=0``;
    never on the CPU (the interpreter) or before sm90."""
    cuda = torch.device("cuda", 0)
    assert launcher.dependent_launch(torch.device("cpu")) == {"PDL": False}
    for capability, on in (((7, 5), False), ((8, 9), False), ((9, 0), True), ((12, 0), True)):
        monkeypatch.setattr(launcher, "capability_of", lambda device, c=capability: c)
        expected = {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
        assert launcher.dependent_launch(cuda) == expected
        monkeypatch.setenv("SPARGE_DEPENDENT_LAUNCH", "0")
        assert launcher.dependent_launch(cuda) == {"PDL": False}
        monkeypatch.delenv("SPARGE_DEPENDENT_LAUNCH")


@pytest.mark.gpu
@gpu
def test_dependent_launch_changes_no_bit_gpu(monkeypatch):
    """Every kernel of the three public calls is launched as a dependent launch from sm90 on,
    and the results equal those of ordinary launches bit for bit (eager calls: no replay)."""
    monkeypatch.setenv("SPARGE_CUDA_GRAPHS", "0")
    print(f"random seed: {torch.seed()}")
    q = torch.randn(2, 8, 3000, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 2500, 128, device="cuda", dtype=torch.bfloat16) + 1
    v = torch.randn(2, 2, 2500, 128, device="cuda", dtype=torch.bfloat16)
    blocks = torch.rand(2, 8, 47, 20, device="cuda") < 0.5
    calls = (lambda: sparge.sparse_attn(q, k, v, is_causal=True),
             lambda: sparge.sparse_attn(q, k, v, topk=0.3, sim_threshold=0.4),
             lambda: sparge.quantized_attn(q, k, v),
             lambda: sparge.block_sparse_attn(q, k, v, blocks, block_q=64, block_k=128))
    launches, run = [], launcher.run

    def recording(kernel, grid, *args, **meta):
        launches.append((kernel.fn.__name__, meta.get("launch_pdl", False)))
        return run(kernel, grid, *args, **meta)

    monkeypatch.setattr(launcher, "run", recording)
    dependent = [call() for call in calls]
    expected = torch.cuda.get_device_capability() >= (9, 0)
    assert {name for name, _ in launches} >= {"_channel_stats_kernel", "_quantize_kernel",
                                              "_products_kernel", "_select_kernel",
                                              "_lut_kernel", "_sparse_attn_fwd"}
    assert all(pdl == expected for _, pdl in launches), launches
    monkeypatch.setenv("SPARGE_DEPENDENT_LAUNCH", "0")
    launches.clear()
    ordinary = [call() for call in calls]
    assert not any(pdl for _, pdl in launches)
    for a, b in zip(dependent, ordinary, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)
