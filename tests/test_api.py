"""The public API: SDPA-compatible behaviour, layouts, dtypes, statistics and input errors."""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

import sparge
from conftest import exact_attention, rel_l1
from sparge import _inputs
from sparge._inputs import check_threshold


def qkv(rng, b=1, hq=4, hk=2, lq=300, lk=300, d=64, dtype=torch.float32):
    return (torch.randn(b, hq, lq, d, generator=rng).to(dtype),
            torch.randn(b, hk, lk, d, generator=rng).to(dtype),
            torch.randn(b, hk, lk, d, generator=rng).to(dtype))


def local_video_tokens(rng, frames=4, side=16, heads=2, dim=64):
    """Tokens of a (frames, side, side) grid whose features vary smoothly in space and time, so
    that attention concentrates on nearby tokens (as in video diffusion models).

    The spatial frequencies are a fixed draw: how local attention is depends on them (random
    ones gave block sparsities from 0.25 to 0.88 at the same thresholds), so the scene is fixed
    and the noise on Q and K and the values V are fresh per call.
    """
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(side), torch.arange(side),
                             indexing="ij")
    pos = torch.stack([t, y, x], dim=-1).reshape(-1, 3).float()
    freqs = torch.randn(3, dim // 2, generator=torch.Generator().manual_seed(0)) * 0.6
    phase = pos @ freqs
    feats = torch.cat([phase.sin(), phase.cos()], dim=-1) * 3.0
    tokens = feats[None, None].expand(1, heads, -1, -1)
    noise = lambda: 0.3 * torch.randn(tokens.shape, generator=rng)  # noqa: E731
    return tokens + noise(), tokens + noise(), torch.randn(tokens.shape, generator=rng)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_exact_mode_matches_sdpa_in_both_layouts(rng, layout, causal):
    q, k, v = qkv(rng, lq=200, lk=333)
    ref = sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = sparge.sparse_attn(q, k, v, topk=1.0, sim_threshold=-1.0, is_causal=causal,
                             layout=layout, quant="none")
    if layout == "NHD":
        out = out.transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("fn", [sparge.sparse_attn, sparge.quantized_attn])
def test_sdpa_arguments_by_position_or_by_name(rng, fn):
    """SDPA's arguments as SDPA takes them: query, key, value, attn_mask, dropout_p and
    is_causal by position or by name, scale and enable_gqa by name, so that a call written for
    SDPA runs unchanged."""
    q, k, v = qkv(rng, lq=150, lk=150)
    by_name = fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=0.1,
                 enable_gqa=True)
    by_position = fn(q, k, v, None, 0.0, True, scale=0.1, enable_gqa=True)
    torch.testing.assert_close(by_position, by_name, rtol=0, atol=0)
    torch.testing.assert_close(fn(q, k, v, is_causal=True, scale=0.1), by_name, rtol=0, atol=0)
    assert rel_l1(by_name, sdpa(q, k, v, None, 0.0, True, scale=0.1, enable_gqa=True)) < 0.05
    for call in (sdpa, fn):  # a seventh positional argument: refused by both
        with pytest.raises(TypeError):
            call(q, k, v, None, 0.0, True, 0.1)


@pytest.mark.parametrize("fn", [sparge.sparse_attn, sparge.quantized_attn])
def test_sdpa_shapes_without_heads_or_with_more_leading_dimensions(rng, fn):
    """As SDPA: (N, L, D) is one head per batch entry; (N, M, H, L, D) runs as (N * M, H, L, D)
    and comes back in q's shape."""
    q3, k3, v3 = (torch.randn(3, 130, 32, generator=rng) for _ in range(3))
    out = fn(q3, k3, v3, is_causal=True)
    assert out.shape == q3.shape
    as_heads = fn(q3[:, None], k3[:, None], v3[:, None], is_causal=True)[:, 0]
    torch.testing.assert_close(out, as_heads, rtol=0, atol=0)
    assert rel_l1(out, sdpa(q3, k3, v3, is_causal=True)) < 0.05

    q5 = torch.randn(2, 3, 4, 100, 32, generator=rng)
    k5, v5 = (torch.randn(2, 3, 2, 120, 32, generator=rng) for _ in range(2))
    out = fn(q5, k5, v5)
    flat = fn(*(t.reshape(6, *t.shape[2:]) for t in (q5, k5, v5)))
    torch.testing.assert_close(out, flat.reshape(q5.shape), rtol=0, atol=0)
    with pytest.raises(ValueError, match="q, k and v must share their leading dimensions"):
        fn(q5, k5[:1], v5[:1])
    assert fn(q5[:0], k5[:0], v5[:0]).shape == (0, 3, 4, 100, 32)
    with pytest.raises(ValueError, match="q must be 4-D"):  # NHD stays 4-D only
        fn(q5, k5, v5, layout="NHD")


def test_sparse_attn_mask_of_flattened_leading_dimensions(rng):
    q, k, v = (torch.randn(2, 3, 2, 200, 32, generator=rng) for _ in range(3))
    out, stats = sparge.sparse_attn(q, k, v, return_stats=True)
    assert out.shape == q.shape and stats.mask.shape == (6, 2, 4, 2)


@pytest.mark.parametrize("fn", [sparge.sparse_attn, sparge.quantized_attn])
def test_enable_gqa_false_requires_equal_head_counts_as_in_sdpa(rng, fn):
    q, k, v = qkv(rng, lq=70, lk=90)  # Hq 4, Hk 2
    with pytest.raises(ValueError, match=r"enable_gqa=False needs as many query heads as key "
                                         r"heads \(as SDPA\), got Hq=4 and Hk=2"):
        fn(q, k, v, enable_gqa=False)
    assert fn(q[:, :2], k, v, enable_gqa=False).shape == (1, 2, 70, 64)
    assert fn(q, k, v, enable_gqa=None).shape == fn(q, k, v, enable_gqa=True).shape
    with pytest.raises(TypeError, match="enable_gqa must be a bool or None, got 1"):
        fn(q, k, v, enable_gqa=1)


def test_non_contiguous_inputs_and_custom_scale(rng):
    q, k, v = qkv(rng, hq=2, hk=2, lq=150, lk=150, d=32)
    q, k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    assert not q.is_contiguous()
    out = sparge.quantized_attn(q, k, v, scale=0.1, quant="none")
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.1), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_follows_input_unless_asked(rng, dtype):
    q, k, v = qkv(rng, lq=130, lk=130, dtype=dtype)
    assert sparge.sparse_attn(q, k, v).dtype == dtype
    out = sparge.sparse_attn(q, k, v, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert rel_l1(out, exact_attention(q, k, v)) < 0.05


def test_inputs_of_magnitude_1e4_give_finite_output(rng):
    q, k, v = qkv(rng, lq=200, lk=200, dtype=torch.float16)
    q, k, v = q * 1e4 / q.abs().max(), k * 1e4 / k.abs().max(), v * 1e4 / v.abs().max()
    out = sparge.sparse_attn(q, k, v)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_check_finite_switch_names_the_tensor_with_nan_or_infinity(rng, tensor, monkeypatch):
    """Off by default: no call reads its inputs' values back. With SPARGE_CHECK_FINITE=1 every
    attention entry point raises on a NaN or an infinity, naming the tensor and the counts."""
    q, k, v = qkv(rng, lq=130, lk=150)
    bad = dict(q=q, k=k, v=v)
    bad[tensor] = bad[tensor].clone()
    bad[tensor][0, 1, 7, 3] = math.nan
    bad[tensor][0, 0, 2, :2] = -math.inf
    mask = sparge.SparseMask.full(1, 4, 130, 150)
    calls = [lambda a: sparge.sparse_attn(*a), lambda a: sparge.quantized_attn(*a),
             lambda a: sparge.block_sparse_attn(*a, mask)]
    monkeypatch.delenv("SPARGE_CHECK_FINITE", raising=False)
    for call in calls:
        call((bad["q"], bad["k"], bad["v"]))
    monkeypatch.setenv("SPARGE_CHECK_FINITE", "1")
    for call in calls:
        with pytest.raises(ValueError, match=f"^{tensor} holds 1 NaN and 2 infinite values"):
            call((bad["q"], bad["k"], bad["v"]))
        assert torch.isfinite(call((q, k, v))).all()
    # where nothing may be read back, the switch says so instead of skipping the check
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="SPARGE_CHECK_FINITE=1 .* torch.compile"):
        sparge.quantized_attn(q, k, v)


def test_stats_report_exact_sparsity_of_the_mask_used(rng):
    q, k, v = local_video_tokens(rng)
    out, stats = sparge.sparse_attn(q, k, v, cdf_threshold=0.9, sim_threshold=-1.0,
                                    return_stats=True)
    mask = sparge.predict_mask(q, k, cdf_threshold=0.9, sim_threshold=-1.0)
    assert torch.equal(stats.mask.blocks, mask.blocks)
    assert stats.sparsity == pytest.approx(mask.sparsity())
    assert stats.per_head_sparsity.shape == (2,)
    assert stats.sparsity > 0.3
    assert stats.backend == "reference" and stats.quant == "int8_fp16"
    token = mask.to_token_mask()
    masked = exact_attention(q, k, v, token_mask=token)
    assert rel_l1(out, masked) < 0.02, "the output is attention over the kept blocks"


def test_stats_compute_the_sparsities_when_first_read(rng, monkeypatch):
    """return_stats=True leaves the mask on the device (reading it back synchronises a GPU): the
    first read of each sparsity computes it from the mask, once."""
    calls: list[str] = []
    for name in ("sparsity", "per_head_sparsity"):
        method = getattr(sparge.SparseMask, name)
        monkeypatch.setattr(sparge.SparseMask, name,
                            lambda self, _m=method, _n=name: calls.append(_n) or _m(self))
    q, k, v = local_video_tokens(rng)
    _, stats = sparge.sparse_attn(q, k, v, cdf_threshold=0.9, sim_threshold=-1.0,
                                  return_stats=True)
    assert calls == []
    sparsity, per_head = stats.sparsity, stats.per_head_sparsity
    assert stats.sparsity == sparsity and stats.per_head_sparsity is per_head
    assert calls == ["sparsity", "per_head_sparsity"]
    monkeypatch.undo()
    assert isinstance(sparsity, float) and sparsity == stats.mask.sparsity() > 0.3
    assert per_head.dtype == torch.float32 and per_head.device.type == "cpu"
    assert torch.equal(per_head, stats.mask.per_head_sparsity())


def test_stats_without_a_mask_are_dense():
    stats = sparge.AttentionStats(None, "reference", "none", 3)
    assert stats.sparsity == 0.0 and isinstance(stats.sparsity, float)
    assert torch.equal(stats.per_head_sparsity, torch.zeros(3, dtype=torch.float32))


def test_sparse_error_matches_block_sparse_run_on_same_mask(rng):
    q, k, v = local_video_tokens(rng)
    out, stats = sparge.sparse_attn(q, k, v, topk=0.25, quant="none", return_stats=True)
    again = sparge.block_sparse_attn(q, k, v, stats.mask, quant="none")
    assert torch.equal(out, again)
    ref = exact_attention(q, k, v, token_mask=stats.mask.to_token_mask())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)


def test_block_sparse_accepts_a_tensor_and_broadcasts_heads(rng):
    q, k, v = qkv(rng, lq=256, lk=256)
    blocks = torch.tensor([[[[1, 0], [0, 1], [1, 1], [0, 0]]]], dtype=torch.int8)
    out = sparge.block_sparse_attn(q, k, v, blocks, block_q=64, block_k=128, quant="none")
    token = sparge.SparseMask(blocks.bool(), 64, 128, 256, 256).to_token_mask()
    torch.testing.assert_close(out.double(), exact_attention(q, k, v, token_mask=token),
                               rtol=1e-5, atol=2e-5)
    assert out[:, :, 192:].abs().max() == 0  # last query block keeps nothing


def test_per_head_thresholds(rng):
    q, k, v = local_video_tokens(rng, heads=2)
    _, stats = sparge.sparse_attn(q, k, v, topk=torch.tensor([0.1, 1.0]), sim_threshold=-1.0,
                                  return_stats=True)
    assert stats.per_head_sparsity[1] == 0.0 and stats.per_head_sparsity[0] > 0.8


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: sparge.sparse_attn(q[0], k, v), ValueError, "4-D"),
    (lambda q, k, v: sparge.sparse_attn(q, k.double(), v), TypeError, "dtype"),
    (lambda q, k, v: sparge.sparse_attn(q.half(), k, v), TypeError, "share a dtype"),
    (lambda q, k, v: sparge.sparse_attn(q, k[:, :, :10], v), ValueError, "same shape"),
    (lambda q, k, v: sparge.sparse_attn(q[:, :3], k, v), ValueError, "multiple"),
    (lambda q, k, v: sparge.sparse_attn(q[:, :0], k, v), ValueError, "query heads"),
    (lambda q, k, v: sparge.predict_mask(q[:, :0], k), ValueError, "query heads"),
    (lambda q, k, v: sparge.sparse_attn(q[..., :32], k, v), ValueError, "head dim"),
    (lambda q, k, v: sparge.sparse_attn(q[:, :, :0], k, v), ValueError, ">= 1"),
    (lambda q, k, v: sparge.sparse_attn(q, k, None), TypeError, "v must be a torch.Tensor"),
    (lambda q, k, v: sparge.quantized_attn(q, k, None), TypeError, "v must be a torch.Tensor"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, None, sparge.SparseMask.full(1, 4, 300, 300)),
     TypeError, "v must be a torch.Tensor"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, layout="BHLD"), ValueError, "layout"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, block_q=32), ValueError, "block_q"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, block_q=64.0), ValueError, "block_q"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, v, torch.ones(1, 1, 3, 3, dtype=bool),
                                              block_q=128, block_k=128.0), ValueError, "block_k"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, cdf_threshold=math.nan), ValueError, "NaN"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, cdf_threshold=1.5), ValueError, "<= 1"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, topk=0.0), ValueError, "> 0"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, topk=0.5, cdf_threshold=0.9), ValueError,
     "not both"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, sim_threshold=torch.tensor([0.1, 0.2])),
     ValueError, r"\(4,\)"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, sim_threshold=math.inf), ValueError, "finite"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, topk=torch.ones(4, dtype=torch.bool)),
     TypeError, "topk must be a tensor of real numbers .* got dtype torch.bool"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, pv_threshold=torch.full((4,), 5 + 1j)),
     TypeError, "pv_threshold must be a tensor of real numbers"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, pv_threshold=-1.0), ValueError, ">= 0"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, sim_threshold=None), TypeError,
     "sim_threshold must be a float or a tensor of shape .* got NoneType"),
    (lambda q, k, v: sparge.predict_mask(q, k, sim_threshold=None), TypeError, "sim_threshold"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, v, sparge.SparseMask.full(1, 4, 300, 300),
                                              pv_threshold=None), TypeError, "pv_threshold"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, scale=0.0), ValueError, "scale"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, quant="int4"), ValueError, "quant"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, out_dtype=torch.int8), TypeError, "out_dtype"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, attn_mask=torch.ones(300, 300, dtype=bool)),
     NotImplementedError, "attn_mask"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, dropout_p=0.1), NotImplementedError, "dropout"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, dropout_p="0"), NotImplementedError,
     r"got dropout_p='0'\)"),  # was shown as dropout_p=0, which looked allowed
    (lambda q, k, v: sparge.sparse_attn(q, k, v, is_causal="False"), TypeError,
     "is_causal must be a bool, got 'False'"),
    (lambda q, k, v: sparge.sparse_attn(q, k, v, attention_sink=None), TypeError,
     "attention_sink must be a bool"),
    (lambda q, k, v: sparge.quantized_attn(q, k, v, is_causal="no"), TypeError, "is_causal"),
    (lambda q, k, v: sparge.predict_mask(q, k, is_causal="no"), TypeError, "is_causal"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, v, sparge.SparseMask.full(1, 4, 300, 300),
                                              is_causal="no"), TypeError, "is_causal"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, v, torch.ones(1, 1, 5, 3)), ValueError,
     "block_q and block_k"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, v, torch.zeros(1, 1, 5, 3), block_q=64,
                                              block_k=128), TypeError,
     "mask must be a bool or integer block mask .* got dtype torch.float32"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, v, torch.ones(1, 1, 4, 4, dtype=bool),
                                              block_q=64, block_k=128), ValueError, "need"),
    (lambda q, k, v: sparge.block_sparse_attn(q, k, v, sparge.SparseMask.full(1, 4, 100, 300)),
     ValueError, "made for"),
])
def test_bad_input_raises_a_clear_error(rng, call, error, match):
    q, k, v = qkv(rng)
    with pytest.raises(error, match=match):
        call(q, k, v)


@pytest.mark.parametrize("call", [
    lambda q, k, v: sparge.sparse_attn(q, k, v),
    lambda q, k, v: sparge.sparse_attn(q, k, v, return_stats=True)[0],
    lambda q, k, v: sparge.quantized_attn(q, k, v, quant="none"),
    lambda q, k, v: sparge.block_sparse_attn(q, k, v, sparge.SparseMask.full(1, 4, 300, 300)),
])
def test_backward_is_refused_with_a_clear_error(rng, call):
    """No backward pass: the forward runs, backpropagating through its output says why (the
    reference path's roundings would otherwise give silently wrong, mostly zero, gradients)."""
    q, k, v = qkv(rng)
    q.requires_grad_()
    out = call(q, k, v)
    torch.testing.assert_close(out, call(q.detach(), k, v), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="no backward pass.*torch.no_grad"):
        out.sum().backward()
    with torch.no_grad():
        assert not call(q, k, v).requires_grad


@pytest.fixture
def readbacks(monkeypatch) -> list[torch.Tensor]:
    """The tensors whose values check_threshold reads back to the host, in order."""
    seen: list[torch.Tensor] = []
    read_back = _inputs._read_back

    def counted(value: torch.Tensor) -> list[float]:
        seen.append(value)
        return read_back(value)

    monkeypatch.setattr(_inputs, "_read_back", counted)
    return seen


def _check_topk(value: torch.Tensor) -> None:
    check_threshold("topk", value, 4, low=0.0, high=1.0, low_open=True)


def test_a_tensor_threshold_is_read_back_once(rng, readbacks):
    q, k, v = qkv(rng, lq=128, lk=128)
    topk = 0.1 + 0.9 * torch.rand(4, generator=rng)
    pv = 50.0 * torch.rand(4, generator=rng)
    for _ in range(3):
        sparge.sparse_attn(q, k, v, topk=topk, sim_threshold=-1.0, pv_threshold=pv)
    assert len(readbacks) == 2 and readbacks[0] is topk and readbacks[1] is pv


@pytest.mark.parametrize("write", ["index", "fill_", "through a view"])
def test_a_threshold_modified_in_place_is_checked_again(rng, write):
    q, k, v = qkv(rng, lq=128, lk=128)
    sim = 2.0 * torch.rand(4, generator=rng) - 1.0
    sparge.sparse_attn(q, k, v, sim_threshold=sim)
    head = int(torch.randint(4, (1,), generator=rng))
    if write == "index":
        sim[head] = math.nan
    elif write == "fill_":
        sim.fill_(math.nan)
    else:
        sim.view(2, 2)[head // 2, head % 2] = math.nan
    for _ in range(2):  # a tensor that failed is not remembered
        with pytest.raises(ValueError, match="sim_threshold must not be NaN"):
            sparge.sparse_attn(q, k, v, sim_threshold=sim)
    sim.fill_(0.5)
    sparge.sparse_attn(q, k, v, sim_threshold=sim)


def test_another_tensor_or_another_check_reads_back_again(rng, readbacks):
    values = 0.1 + 0.9 * torch.rand(4, generator=rng)
    a, b = values.clone(), values.clone()
    for t in (a, b, a, b):
        _check_topk(t)
    assert [id(t) for t in readbacks] == [id(a), id(b)]
    # the same tensor under other rules: valid as a similarity threshold, not as a fraction
    sim = -torch.rand(4, generator=rng)
    check_threshold("sim_threshold", sim, 4)
    with pytest.raises(ValueError, match="topk must be > 0"):
        _check_topk(sim)


def test_an_inference_tensor_is_read_back_on_every_call(rng, readbacks):
    with torch.inference_mode():  # such a tensor has no version counter
        topk = 0.1 + 0.9 * torch.rand(4, generator=rng)
    for _ in range(2):
        _check_topk(topk)
    assert len(readbacks) == 2


def test_a_new_tensor_at_a_dead_tensors_address_is_read_back(rng):
    for _ in range(100):
        valid = 0.1 + 0.9 * torch.rand(4, generator=rng)
        _check_topk(valid)
        old_id = id(valid)
        del valid
        bad = torch.full((4,), math.nan)  # same id, version and check as the dead tensor
        if id(bad) == old_id:
            with pytest.raises(ValueError, match="topk must not be NaN"):
                _check_topk(bad)
            return
    pytest.skip("no tensor reused a dead tensor's id in 100 tries")


def test_explicit_triton_backend_without_gpu_says_why(rng, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(rng, lq=64, lk=64)
    with pytest.raises(RuntimeError, match="triton"):
        sparge.sparse_attn(q, k, v, backend="triton")


@pytest.mark.parametrize("capability,runs", [((7, 5), False), ((8, 0), True), ((8, 9), True),
                                             ((9, 0), True), ((12, 0), True)])
def test_triton_path_from_ampere_on(capability, runs, monkeypatch):
    """The Triton kernels run from compute capability 8.0 on. A Turing GPU takes the reference
    path (Triton has no tensor-core products for sm_75), and asking for Triton there says why."""
    from sparge import backend

    pytest.importorskip("triton")
    monkeypatch.setattr(backend, "capability_of", lambda device: capability)
    monkeypatch.setattr(backend, "_WARNED", set())
    cuda = torch.device("cuda", 0)
    ok, why = backend.triton_status(cuda)
    assert ok == runs
    if runs:
        assert backend.choose_backend("auto", cuda) == "triton"
        return
    assert "below 8.0" in why
    with pytest.warns(RuntimeWarning, match="below 8.0.* slower than scaled_dot_product"):
        assert backend.choose_backend("auto", cuda) == "reference"
    with pytest.raises(RuntimeError, match="below 8.0"):
        backend.choose_backend("triton", cuda)


@pytest.mark.parametrize("version,runs", [("3.2.0", False), ("3.3.1", False), ("3.4.0", True),
                                          ("3.6.0+git9a8b7c6", True), ("4.0.0", True)])
def test_triton_older_than_3_4_takes_the_reference_path_and_says_why(version, runs, monkeypatch):
    """Triton before 3.4 has no host-side tensor descriptors: on a GPU, "auto" then takes the
    reference path with one warning, and an explicit "triton" refuses, naming the version. The
    CPU path says nothing."""
    from sparge import backend

    pytest.importorskip("triton")
    monkeypatch.setattr(backend, "capability_of", lambda device: (9, 0))
    monkeypatch.setattr(backend, "triton_version", lambda: version)
    monkeypatch.setattr(backend, "_WARNED", set())
    cuda = torch.device("cuda", 0)
    assert backend.triton_status(cuda)[0] == runs
    if runs:
        assert backend.choose_backend("auto", cuda) == "triton"
        return
    message = f"Triton {version} is older than 3.4"
    with pytest.warns(RuntimeWarning, match=message):
        assert backend.choose_backend("auto", cuda) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        assert backend.choose_backend("auto", cuda) == "reference"
        assert backend.choose_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match=message):
        backend.choose_backend("triton", cuda)


@pytest.mark.parametrize("dist", ["triton", "triton-windows", "pytorch-triton", None])
def test_triton_version_is_read_from_each_distribution(dist, monkeypatch):
    """Triton installs as ``triton``, as ``triton-windows`` on Windows and as ``pytorch-triton``
    with PyTorch's nightly builds; the version comes from whichever is there."""
    import importlib.metadata

    from sparge import backend

    def version(name):
        if name != dist:
            raise importlib.metadata.PackageNotFoundError(name)
        return "3.6.0+git1a2b3c4"

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(backend, "_TRITON_VERSION", [])
    assert backend.triton_version() == ("" if dist is None else "3.6.0+git1a2b3c4")


@pytest.mark.parametrize("version,compiles", [("3.4.0", False), ("3.5.0", True),
                                               ("3.5.1+git1a2b3c4", True), ("3.10.0", True),
                                               ("unknown", False)])
def test_dependent_launch_from_triton_3_5_on(version, compiles):
    """Triton 3.4 cannot compile the dependent-launch wait: kernels there launch without it."""
    launcher = pytest.importorskip("sparge.kernels.launcher")
    assert launcher.compiles_dependent_launch(version) is compiles


def test_import_does_not_import_torch_dynamo():
    """``import sparge`` stays about as quick as ``import torch``: importing ``torch._dynamo``
    took another 2 to 3 s on a CPU machine."""
    code = "import sys, sparge; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_constant_lookups_are_marked_as_pytorch_marks_them():
    """The capability and Triton lookups carry the marking of
    ``torch.compiler.assume_constant_result`` (set without importing ``torch._dynamo``)."""
    from sparge import backend

    def lookup():
        return 0

    torch.compiler.assume_constant_result(lookup)
    for fn in (backend.cuda_capability, backend.triton_installed, backend.triton_version):
        assert {k: v for k, v in vars(fn).items() if k.startswith("_dynamo")} == vars(lookup)


# Relative L1 against float64 attention with every block kept, by quantization mode and input
# dtype. No quantization: the input dtype's rounding of P and of the output (bfloat16 keeps 8
# bits: measured up to 1.5e-3; float16 2e-4). INT8 Q.K^T with FP16 P.V: the scores' rounding
# (measured up to 0.014). FP8 P.V: P's and V's 3-bit mantissas (measured up to 0.041, the
# issue's 0.04 at D128). An indexing, masking or selection bug moves whole rows: O(0.1) and more.
EVERY_BLOCK_TOLERANCE = {("none", torch.float32): 1e-5, ("none", torch.float16): 1e-3,
                         ("none", torch.bfloat16): 5e-3, "int8_fp16": 0.02, "int8_fp8": 0.06}


def test_random_calls_with_every_block_kept_match_exact_attention():
    """Sixty calls drawn at random (entry point, rule, lengths 1 to 400, D 8 to 128, GQA,
    layouts, causal, dtypes, modes; the seed is printed) with every block kept: each output is
    exact attention within its mode's rounding. ``cdf_threshold=1`` dropped blocks before."""
    import random

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    draw = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for i in range(60):
        b, hk = draw.choice([1, 2]), draw.choice([1, 2, 3])
        hq, lq, lk = hk * draw.choice([1, 2, 3]), draw.randint(1, 400), draw.randint(1, 400)
        d = draw.choice([8, 16, 40, 64, 100, 128])
        dtype = draw.choice([torch.float32, torch.float16, torch.bfloat16])
        quant, layout = draw.choice(["none", "int8_fp16", "int8_fp8"]), draw.choice(["HND", "NHD"])
        causal, call = draw.random() < 0.4, draw.choice(["cdf", "topk", "dense", "mask"])
        q, k, v = qkv(gen, b, hq, hk, lq, lk, d, dtype)
        args = (q, k, v) if layout == "HND" else tuple(t.transpose(1, 2) for t in (q, k, v))
        kw = dict(is_causal=causal, layout=layout, quant=quant)
        if call == "cdf":
            out = sparge.sparse_attn(*args, cdf_threshold=1.0, sim_threshold=-1.0, **kw)
        elif call == "topk":
            out = sparge.sparse_attn(*args, topk=1.0, sim_threshold=-1.0, **kw)
        elif call == "dense":
            out = sparge.quantized_attn(*args, **kw)
        else:
            bq, bk = draw.choice([64, 128]), draw.choice([64, 128])
            mask = torch.ones(b, 1, -(-lq // bq), -(-lk // bk), dtype=torch.bool)
            out = sparge.block_sparse_attn(*args, mask, block_q=bq, block_k=bk, **kw)
        out = out if layout == "HND" else out.transpose(1, 2)
        ref = exact_attention(q, k, v, causal=causal)
        tol = EVERY_BLOCK_TOLERANCE.get(quant, EVERY_BLOCK_TOLERANCE.get((quant, dtype)))
        what = f"call {i}: {call} B{b} Hq{hq} Hk{hk} Lq{lq} Lk{lk} D{d} {dtype} {quant} {layout}"
        assert out.shape == q.shape and out.dtype == dtype, what
        # causal masking is top-left aligned: every row sees key 0, so ref has no zero rows
        assert rel_l1(out, ref) <= tol, f"{what}: {rel_l1(out, ref):.3g} > {tol}"


def test_a_value_head_dim_other_than_qs_raises_with_what_to_do():
    """SDPA's Ev != E is not taken. A smaller v padded with zero channels gives its attention in
    the output's first Ev channels (here with every block kept and no quantization, against
    SDPA on the unpadded v)."""
    q, k = (torch.randn(1, 2, 150, 64) for _ in range(2))
    v = torch.randn(1, 2, 150, 40)
    with pytest.raises(NotImplementedError, match=r"Ev != E.*padded with zeros"):
        sparge.sparse_attn(q, k, v)
    with pytest.raises(NotImplementedError, match=r"Ev != E is not supported\)\.$"):
        sparge.quantized_attn(q[..., :32], k[..., :32], v)
    padded = torch.nn.functional.pad(v, (0, 24))
    out = sparge.sparse_attn(q, k, padded, cdf_threshold=1.0, quant="none")
    torch.testing.assert_close(out[..., :40], torch.nn.functional.scaled_dot_product_attention(
        q, k, v), rtol=1e-5, atol=1e-5)
    assert (out[..., 40:] == 0).all()
