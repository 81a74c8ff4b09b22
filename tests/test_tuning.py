"""Calibration (upstream-compatible) and the error-budget controller, on the CPU reference path."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparge import SparseMask, _inputs, predict_mask, sparse_attn
from sparge.tuning import (
    ErrorBudgetAttention,
    SparseAttentionMeansim,
    calibration,
    estimate_error,
    extract_sparse_attention_state_dict,
    load_sparse_attention_state_dict,
    load_tuning,
    read_tuning,
    save_tuning,
    summarize,
    tuned_error,
)
from sparge.tuning._common import exact_attention, exact_rows, rel_l1_per_head, sample_rows


def local_qkv(seed: int, heads: int = 2, length: int = 512, dim: int = 32, sharp: float = 6.0,
              kv_heads: int | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs with local attention that decays smoothly with distance: q = k are sinusoids of
    the position with random low frequencies (like rotary embeddings), so that q_i . k_j is a
    smooth function of |i - j|, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    pos = torch.arange(length, dtype=torch.float32)
    freq = 0.1 * torch.rand(kv_heads, dim // 2, generator=g)
    phase = pos[None, :, None] * freq[:, None, :]
    k = torch.cat([phase.cos(), phase.sin()], dim=-1)[None] / (dim // 2) ** 0.5
    k = k * dim ** 0.5 + 0.1 * torch.randn(k.shape, generator=g)
    q = sharp ** 0.5 * k.repeat_interleave(heads // kv_heads, dim=1)
    k = sharp ** 0.5 * k
    v = torch.randn(k.shape, generator=g)
    return q, k, v


# ------------------------------------------------------------------------------- estimator
def test_sample_rows_is_stratified_and_distinct():
    g = torch.Generator().manual_seed(0)
    rows = sample_rows(1000, 50, g)
    assert rows.numel() == 50 and torch.unique(rows).numel() == 50
    assert torch.equal(torch.div(rows, 20, rounding_mode="floor"), torch.arange(50))
    assert torch.equal(sample_rows(10, 64), torch.arange(10))


@pytest.mark.parametrize("causal", [False, True])
def test_exact_rows_match_full_attention(causal):
    q, k, v = local_qkv(0, heads=4, length=300, kv_heads=2)
    rows = torch.tensor([0, 5, 128, 299])
    got = exact_rows(q, k, v, rows, is_causal=causal, head_chunk=3)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         is_causal=causal)[:, :, rows]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_estimator_tracks_true_error():
    """Estimated (128 sampled rows of 1024) vs true relative L1 over 24 head-calls."""
    est, true = [], []
    g = torch.Generator().manual_seed(1)
    for seed in range(4):
        for sharp in (3.0, 6.0, 12.0):
            q, k, v = local_qkv(seed, length=1024, sharp=sharp)
            out = sparse_attn(q, k, v, sim_threshold=0.0, cdf_threshold=0.9, quant="none")
            e, num, den = estimate_error(q, k, v, out, rows=128, generator=g)
            assert torch.allclose(e, num / den)
            est += e.tolist()
            true += rel_l1_per_head(out, exact_attention(q, k, v)).tolist()
    pairs = [(e, t) for e, t in zip(est, true, strict=True) if t > 1e-3]
    assert len(pairs) >= 16
    ratio = [e / t for e, t in pairs]
    print(f"est/true: mean {statistics.mean(ratio):.3f} median |dev| "
          f"{statistics.median(abs(r - 1) for r in ratio):.3f} min {min(ratio):.3f} "
          f"max {max(ratio):.3f}")
    assert 0.8 < statistics.mean(ratio) < 1.2  # no bias
    assert statistics.median(abs(r - 1) for r in ratio) < 0.45
    assert 0.2 < min(ratio) and max(ratio) < 2.0
    # the error of exact attention is estimated as zero
    q, k, v = local_qkv(0)
    e, _, _ = estimate_error(q, k, v, exact_attention(q, k, v), rows=32)
    assert float(e.max()) < 1e-5


# ------------------------------------------------------------------------------- error budget
def test_estimator_refuses_an_output_of_another_shape_and_no_rows():
    """An output of another shape broadcast silently, and no rows gave an estimate of 0."""
    q, k, v = local_qkv(0, heads=2, length=128)
    out = sparse_attn(q, k, v)
    with pytest.raises(ValueError, match=r"out must have q's shape \(1, 2, 128, 32\)"):
        estimate_error(q, k, v, out[:, :1])
    with pytest.raises(ValueError, match="rows must be a count >= 1"):
        estimate_error(q, k, v, out, rows=0)
    with pytest.raises(ValueError, match="rows must be"):
        estimate_error(q, k, v, out, rows=torch.zeros(0, dtype=torch.long))


def test_budget_layer_stays_under_budget_and_gets_sparse():
    layer = ErrorBudgetAttention(0.05, quant="none", seed=0)
    errors, sparsity = [], []
    for call in range(12):
        q, k, v = local_qkv(call % 3, length=1024)
        out = layer(q, k, v)
        errors.append(float(rel_l1_per_head(out, exact_attention(q, k, v)).max()))
        sparsity.append(float(torch.tensor(layer.report().sparsity).mean()))
    report = layer.report()
    assert report.calls == 12 and len(report.level) == 2
    assert max(errors) <= 0.05
    assert statistics.mean(sparsity[4:]) > 0.2
    assert min(report.level) > 0
    header, line = summarize({"blocks.0.attn": report}).splitlines()
    assert header.split() == ["layer", "calls", "sparsity", "est.err", "max", "err", "recomp"]
    name, calls, mean_sparsity, mean_err, max_err, recomputed = line.split()
    assert (name, int(calls), int(recomputed)) == ("blocks.0.attn", 12, sum(report.recomputed))
    assert float(mean_sparsity) == pytest.approx(statistics.mean(report.mean_sparsity), abs=1e-3)
    assert float(mean_err) == pytest.approx(statistics.mean(report.mean_est_error), abs=1e-4)
    assert float(max_err) == pytest.approx(max(report.max_est_error), abs=1e-4)


def test_budget_layer_nhd_causal_gqa_and_state():
    q, k, v = local_qkv(3, heads=4, kv_heads=2, length=256)
    layer = ErrorBudgetAttention(0.05, quant="none", sample_rows=32)
    out = layer(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                tensor_layout="NHD")
    ref = exact_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert out.shape == ref.shape
    assert float((out - ref).abs().sum() / ref.abs().sum()) < 0.05
    fresh = ErrorBudgetAttention(0.05)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.level, layer.level)
    with pytest.raises(ValueError):
        layer(q[:, :2], k[:, :1], v[:, :1])  # head count changed
    with pytest.raises(ValueError):
        ErrorBudgetAttention(1.5)


def test_budget_layer_goes_dense_when_nothing_fits():
    """Uniform attention: every dropped block costs its full share, so the head must go dense
    (or recompute) rather than exceed the budget."""
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 1, 512, 32), 1e-3)  # similar blocks, scores all ~0: uniform attention
    k, v = torch.randn(1, 1, 512, 32, generator=g), torch.randn(1, 1, 512, 32, generator=g)
    layer = ErrorBudgetAttention(0.01, quant="none", init_level=0.5, max_level=0.6)
    for _ in range(8):
        out = layer(q, k, v)
        assert float(rel_l1_per_head(out, exact_attention(q, k, v))) <= 0.01
    assert layer.report().recomputed[0] >= 1


def test_budget_layer_reset_statistics_keeps_what_it_learned():
    """reset_statistics forgets the running statistics (calls, sparsity, errors, recomputed
    calls) and keeps the per-head levels, ceilings and dense back-off: the next call is the
    same as without the reset. Uniform attention (as above) drives the head into a lowered
    ceiling and a dense back-off first, so that there is something to keep."""
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 1, 512, 32), 1e-3)
    k, v = torch.randn(1, 1, 512, 32, generator=g), torch.randn(1, 1, 512, 32, generator=g)
    layer, twin = (ErrorBudgetAttention(0.01, quant="none", init_level=0.5, max_level=0.6)
                   for _ in range(2))
    for _ in range(3):
        layer(q, k, v)
        twin(q, k, v)
    before = layer.report()
    assert before.calls == 3 and before.recomputed[0] >= 1
    assert layer._dense_left[0] > 0 and layer._ceiling[0] < layer.max_level  # learned
    layer.reset_statistics()
    after = layer.report()
    assert after.calls == 0 and after.level == before.level
    assert after.mean_sparsity == after.mean_est_error == after.max_est_error == [0.0]
    assert after.recomputed == [0]
    torch.testing.assert_close(layer(q, k, v), twin(q, k, v), rtol=0, atol=0)
    assert torch.equal(layer._dense_left, twin._dense_left)
    assert torch.equal(layer._ceiling, twin._ceiling)
    assert layer.report().calls == 1 and layer.report().level == twin.report().level


# ------------------------------------------------------------------------------- calibration
def _tuned_module(seed: int = 0) -> tuple[SparseAttentionMeansim, tuple[torch.Tensor, ...]]:
    q, k, v = local_qkv(seed, length=512)
    module = SparseAttentionMeansim(granularity=2, pv_tol=2.0, quant="none")
    out = module(q, k, v, tune_mode=True)
    torch.testing.assert_close(out, exact_attention(q, k, v))  # tune mode returns exact
    return module, (q, k, v)


def test_calibration_meets_target_and_finds_sparsity():
    module, (q, k, v) = _tuned_module()
    err, sparsity = tuned_error(module, q, k, v)
    assert err < module.pv_l1
    assert sparsity > 0.2
    assert module.is_sparse.dtype == torch.bool and bool(module.is_sparse.all())
    assert float(module.cdfthreshd.max()) <= 1.0
    # a head gaining little stays dense: uniform attention
    dense = SparseAttentionMeansim(granularity=2, pv_tol=5.0, quant="none", tune_pv=False)
    qz = torch.zeros(1, 1, 512, 32)
    dense(qz, k[:, :1], v[:, :1], tune_mode=True)
    assert not bool(dense.is_sparse[0])
    assert float(dense.simthreshd1[0]) == 1.0


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": SparseAttentionMeansim(
            granularity=2, pv_tol=5.0, quant="none")}) for _ in range(2))
        self.proj = nn.Linear(2, 2)

    def forward(self, qkv):
        return [blk["attn"](*qkv) for blk in self.blocks]


def _predictor_args(args: dict) -> dict:
    return {k: v for k, v in args.items() if k != "pv_threshold"}


def _count_tuning(model: _Model) -> list[str]:
    """Record, per tuning call, the index of the block that tuned."""
    seen: list[str] = []
    for i, blk in enumerate(model.blocks):
        module = blk["attn"]
        original = module._tune

        def counted(*args, _i=str(i), _orig=original, **kwargs):
            seen.append(_i)
            return _orig(*args, **kwargs)

        module._tune = counted
    return seen


def test_state_dict_roundtrip_gives_same_masks(tmp_path):
    model = _Model()
    qkv = local_qkv(0, length=512)
    for blk in model.blocks:
        blk["attn"](*qkv, tune_mode=True)
    state = extract_sparse_attention_state_dict(model)
    assert set(state) == {f"blocks.{i}.attn.{n}" for i in range(2) for n in
                          ("is_sparse", "cdfthreshd", "simthreshd1", "simthreshd2", "pvthreshd")}
    fresh = load_sparse_attention_state_dict(_Model(), state)
    json_path, st_path = tmp_path / "t.json", tmp_path / "t.safetensors"
    save_tuning(model, json_path)
    save_tuning(model, st_path)
    from_json, from_st = _Model(), _Model()
    assert load_tuning(from_json, json_path) == ["blocks.0.attn", "blocks.1.attn"]
    load_tuning(from_st, st_path)
    for other in (fresh, from_json, from_st):
        for a, b in zip(model.blocks, other.blocks, strict=True):
            args_a, args_b = a["attn"].inference_args(), b["attn"].inference_args()
            for key in args_a:
                assert torch.equal(torch.as_tensor(args_a[key]), torch.as_tensor(args_b[key]))
            mask_a = predict_mask(qkv[0], qkv[1], **_predictor_args(args_a))
            mask_b = predict_mask(qkv[0], qkv[1], **_predictor_args(args_b))
            assert torch.equal(mask_a.blocks, mask_b.blocks)
            assert torch.equal(a["attn"](*qkv), b["attn"](*qkv))
    assert set(read_tuning(st_path)) == set(read_tuning(json_path)) == {"blocks.0.attn",
                                                                        "blocks.1.attn"}
    # torch's own load_state_dict fills an untuned module too
    plain = _Model()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.blocks[1]["attn"].cdfthreshd, model.blocks[1]["attn"].cdfthreshd)


def test_calibration_is_resumable(tmp_path):
    path = tmp_path / "cal.json"
    qkv = local_qkv(1, length=256)
    model = _Model()
    calls = _count_tuning(model)
    with pytest.raises(KeyboardInterrupt):
        with calibration(model, path, calls=2, progress=False):
            model.blocks[0]["attn"](*qkv)
            model.blocks[0]["attn"](*qkv)
            model.blocks[1]["attn"](*qkv)
            raise KeyboardInterrupt  # interrupted: layer 0 done, layer 1 half done
    assert calls == ["0", "0", "1"]
    saved = read_tuning(path)
    assert int(saved["blocks.0.attn"]["num_data_passed"]) == 2
    assert int(saved["blocks.1.attn"]["num_data_passed"]) == 1

    restarted = _Model()
    tuned_calls = _count_tuning(restarted)
    with calibration(restarted, path, calls=2, progress=False) as cal:
        assert sorted(cal.resumed) == ["blocks.0.attn", "blocks.1.attn"]
        assert not cal.finished
        restarted(qkv)
        assert cal.finished
    assert tuned_calls == ["1"]
    assert restarted.blocks[1]["attn"].num_data_passed == 2
    torch.testing.assert_close(restarted.blocks[0]["attn"].cdfthreshd,
                               model.blocks[0]["attn"].cdfthreshd)


def test_upstream_signature_and_refusals():
    module = SparseAttentionMeansim()
    q, k, v = local_qkv(0, length=128)
    with pytest.raises(RuntimeError):
        module(q, k, v)  # not tuned
    with pytest.raises(NotImplementedError):
        module(q, k, v, mask=torch.ones(128, 128, dtype=torch.bool), tune_mode=True)
    with pytest.raises(NotImplementedError):
        module(q, k, v, smooth_k=False, tune_mode=True)
    with pytest.raises(ValueError):
        SparseAttentionMeansim(l1=0.08, pv_l1=0.07)
    topk = SparseAttentionMeansim(rule="topk", granularity=1, tune_pv=False, quant="none")
    out, sparsity = topk(q, k, v, tune_mode=True, return_sparsity=True)
    assert topk.topk is not None and 0 <= sparsity <= 1
    assert "topk" in topk.inference_args()


@pytest.mark.parametrize("make,error,match", [
    (lambda: SparseAttentionMeansim(pv_tol=-1.0), ValueError, "pv_tol must be > 0"),
    (lambda: SparseAttentionMeansim(cdf_tol=0.0), ValueError, "cdf_tol"),
    (lambda: SparseAttentionMeansim(quant="fp8"), ValueError, "quant must be one of"),
    (lambda: SparseAttentionMeansim(backend="cuda"), ValueError, "backend must be one of"),
    (lambda: SparseAttentionMeansim(block_q=32), ValueError, "block_q must be one of"),
    (lambda: ErrorBudgetAttention(quant="fp8"), ValueError, "quant must be one of"),
    (lambda: ErrorBudgetAttention(backend="cuda"), ValueError, "backend must be one of"),
    (lambda: ErrorBudgetAttention(block_k=256), ValueError, "block_k must be one of"),
    (lambda: ErrorBudgetAttention(sim_threshold=float("nan")), ValueError,
     "sim_threshold must not be NaN"),
    (lambda: ErrorBudgetAttention(pv_threshold=-1.0), ValueError, "pv_threshold must be >= 0"),
])
def test_tuning_modules_check_their_arguments_when_made(make, error, match):
    """Bad settings fail when the module is made, not after a calibration's work (a tolerance
    <= 0 made the bisection loop forever)."""
    with pytest.raises(error, match=match):
        make()


def test_calibration_layer_checks_inputs_and_head_count(rng):
    """Tune mode computes exact attention itself: bad inputs get sparge's errors, not a matrix
    product's; a layer tuned for H heads says so when called with another count (in tune mode
    the call was silently taken as calibration data)."""
    q, k, v = local_qkv(0, heads=2, length=128)
    fresh = SparseAttentionMeansim(granularity=1, tune_pv=False)
    with pytest.raises(ValueError, match="head dim"):
        fresh(q, k[..., :16], v[..., :16], tune_mode=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fresh(torch.cat([q, q[:, :1]], dim=1), k, v, tune_mode=True)
    tuned = _quick_tuned(rng)
    q4, k4, v4 = local_qkv(1, heads=4, length=256)
    for tune_mode in (False, True):
        with pytest.raises(ValueError, match="tuned for 2 heads, got 4"):
            tuned(q4, k4, v4, tune_mode=tune_mode)


def test_budget_layer_checks_threshold_tensors_against_the_heads():
    q, k, v = local_qkv(0, heads=2, length=128)
    with pytest.raises(ValueError, match=r"sim_threshold must be a scalar or have shape \(2,\)"):
        ErrorBudgetAttention(sim_threshold=torch.zeros(3))(q, k, v)


# ------------------------------------------------------------------------------- inference args
def _quick_tuned(rng: torch.Generator) -> SparseAttentionMeansim:
    """A module tuned on fresh inputs in under a second (coarse search, PV not tuned)."""
    module = SparseAttentionMeansim(granularity=1, tune_pv=False, cdf_tol=1.0, quant="none")
    module(*local_qkv(int(torch.randint(10**6, (1,), generator=rng)), length=256),
           tune_mode=True)
    return module


@pytest.mark.parametrize("inference_mode", [False, True])
def test_inference_args_are_the_same_tensors_read_back_once(rng, monkeypatch, inference_mode):
    module = _quick_tuned(rng)
    readbacks: list[torch.Tensor] = []
    read_back = _inputs._read_back
    monkeypatch.setattr(_inputs, "_read_back", lambda t: readbacks.append(t) or read_back(t))
    qkv = local_qkv(int(torch.randint(10**6, (1,), generator=rng)), length=256)
    with torch.inference_mode(inference_mode):
        args = module.inference_args()
        assert all(value is args[key] for key, value in module.inference_args().items())
        for _ in range(3):
            module(*qkv)
    assert sorted(map(id, readbacks)) == sorted(id(args[key]) for key in
                                                ("sim_threshold", "cdf_threshold", "pv_threshold"))


def test_tuned_forward_reads_the_sparsity_back_only_when_asked(rng, monkeypatch):
    """A tuned call asks for no statistics unless ``return_sparsity`` (a readback on a GPU) or
    ``record_sparsity`` (a count kept on the device in ``last_sparsity``, read by ``float``)."""
    from sparge.tuning import calibrate

    module = _quick_tuned(rng)
    asked: list[bool] = []
    monkeypatch.setattr(calibrate, "sparse_attn", lambda *args, **kw: (
        asked.append(kw["return_stats"]), sparse_attn(*args, **kw))[1])
    reads: list[str] = []
    for name in ("sparsity", "per_head_sparsity"):
        method = getattr(SparseMask, name)
        monkeypatch.setattr(SparseMask, name,
                            lambda self, _m=method, _n=name: reads.append(_n) or _m(self))
    q, k, v = local_qkv(int(torch.randint(10**6, (1,), generator=rng)), length=1024)
    out = module(q, k, v)
    assert asked == [False] and reads == [] and module.last_sparsity is None
    module.record_sparsity = True
    assert torch.equal(module(q, k, v), out)
    assert asked[1:] == [True] and reads == []
    selection = {key: value for key, value in module.inference_args().items()
                 if key != "pv_threshold"}
    expected = predict_mask(q, k, **selection).sparsity()
    assert float(module.last_sparsity) == expected > 0.3
    _, sparsity = module(q, k, v, return_sparsity=True)
    assert sparsity == expected and reads[-1] == "sparsity"
    module(q, k, v, tune_mode=True)
    assert module.last_sparsity is None
    _, sparsity = module(q, k, v, tune_mode=True, return_sparsity=True)
    assert sparsity == float(module.tuning_sparsity.mean())


def _random_state(module: SparseAttentionMeansim, rng: torch.Generator) -> dict:
    state = {key: value.clone() for key, value in module.state_dict().items()}
    state.update(cdfthreshd=torch.rand(2, generator=rng),
                 simthreshd1=2.0 * torch.rand(2, generator=rng) - 1.0,
                 pvthreshd=50.0 * torch.rand(2, generator=rng))
    return state


@pytest.mark.parametrize("change", ["in place", "tuning", "load_state_dict", "assign",
                                    "upstream loader", "new parameter", "to", "attention_sink"])
def test_inference_args_are_made_anew_after_a_change(rng, change):
    module = _quick_tuned(rng)
    old = module.inference_args()
    if change == "in place":
        with torch.no_grad():
            module.pvthreshd.copy_(50.0 * torch.rand(2, generator=rng))
    elif change == "tuning":  # the module writes its parameters through .data
        module(*local_qkv(int(torch.randint(10**6, (1,), generator=rng)), length=256),
               tune_mode=True)
    elif change == "load_state_dict":
        module.load_state_dict(_random_state(module, rng))
    elif change == "assign":
        module.load_state_dict(_random_state(module, rng), assign=True)
    elif change == "upstream loader":
        load_sparse_attention_state_dict(module, _random_state(module, rng))
    elif change == "new parameter":
        module.simthreshd1 = nn.Parameter(torch.rand(2, generator=rng), requires_grad=False)
    elif change == "to":  # parameters change through .data
        module.to(torch.float64)
    else:
        module.attention_sink = not module.attention_sink
    new = module.inference_args()
    expected = {"sim_threshold": module.simthreshd1.float(),
                "cdf_threshold": module.cdfthreshd.float().clamp(1e-6, 1.0),
                "pv_threshold": module.pvthreshd.float()}
    for key, value in expected.items():
        assert new[key] is not old[key]
        assert new[key].dtype == torch.float32 and torch.equal(new[key], value)
    assert new["attention_sink"] == module.attention_sink
