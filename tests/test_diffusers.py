"""sparge in diffusers transformers: tiny randomly initialised models, CPU reference path."""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import sparge.integrations.diffusers as diffusers_integration  # noqa: E402
import sparge.tuning.calibrate as calibrate_module  # noqa: E402
from sparge import SparseMask, predict_mask  # noqa: E402
from sparge.integrations.diffusers import (  # noqa: E402
    disable_sparge,
    enable_sparge,
    is_enabled,
    select_layers,
    sparge_report,
)
from sparge.integrations.testing import (  # noqa: E402
    available_families,
    tiny_inputs,
    tiny_transformer,
)
from sparge.mask import DeferredSparsity  # noqa: E402
from sparge.tuning import calibration, read_tuning, save_tuning  # noqa: E402
from sparge.tuning._common import exact_attention, rel_l1  # noqa: E402

FAMILIES = available_families()
BUDGET = 0.05


def _measure_layers(transformer) -> dict[str, list[float]]:
    """Hook every sparse layer module: true relative L1 of each call against exact attention."""
    errors: dict[str, list[float]] = {}
    for name, proc in transformer._sparge.processors.items():
        def hook(mod, args, kwargs, out, _name=name):
            q, k, v = args
            ref = exact_attention(q, k, v, is_causal=kwargs.get("is_causal", False),
                                  scale=kwargs.get("scale"))
            result = out[0] if isinstance(out, tuple) else out
            errors.setdefault(_name, []).append(rel_l1(result, ref))

        proc.sparse.register_forward_hook(hook, with_kwargs=True)
    return errors


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_dense_mode_reproduces_and_budget_mode_stays_in_budget(family):
    model = tiny_transformer(family)
    original = dict(model.attn_processors) if hasattr(model, "attn_processors") else None
    ref = model(**tiny_inputs(family))[0]

    enable_sparge(model, "dense", dense_layers=0, dense_steps=0)
    out = model(**tiny_inputs(family))[0]
    report = sparge_report(model)
    assert torch.equal(out, ref)
    assert sum(s.sparse_calls for s in report.values()) == len(report) > 0
    disable_sparge(model)

    enable_sparge(model, "budget", budget=BUDGET, dense_layers=0, dense_steps=0)
    errors = _measure_layers(model)
    for t in (900.0, 700.0, 500.0):
        sparse = model(**tiny_inputs(family, timestep=t))[0]
    assert model._sparge.step == 2
    report = sparge_report(model)
    assert all(stats.sparse_calls == 3 for stats in report.values())
    assert max(max(stats.budget.mean_sparsity) for stats in report.values()) > 0
    for name, errs in errors.items():
        assert max(errs) <= BUDGET, (name, errs)
    disable_sparge(model)
    # off again: the original processors and outputs
    if original is not None:
        assert {k: type(v) for k, v in model.attn_processors.items()} == \
               {k: type(v) for k, v in original.items()}
    dense_again = model(**tiny_inputs(family, timestep=500.0))[0]
    assert rel_l1(sparse, dense_again) < 0.5  # same model, a sane output
    assert torch.equal(model(**tiny_inputs(family))[0], ref)


@torch.no_grad()
def test_wan_error_budget_reaches_sparsity_with_measured_error_under_budget():
    """Tiny Wan, locality-structured latents (1024 tokens per sparse layer), 10 steps."""
    model = tiny_transformer("wan")
    enable_sparge(model, "budget", budget=BUDGET, dense_layers=0, dense_steps=0)
    errors = _measure_layers(model)
    for i in range(10):
        model(**tiny_inputs("wan", timestep=1000.0 - 100 * i, width=64))
    report = sparge_report(model)
    sparsity = {n: statistics.mean(s.budget.mean_sparsity) for n, s in report.items()}
    print("per-layer mean sparsity", sparsity)
    print("per-layer max true error", {n: max(e) for n, e in errors.items()})
    for name, errs in errors.items():
        assert len(errs) == 10
        assert max(errs) <= BUDGET, (name, errs)
    assert statistics.mean(sparsity.values()) > 0.25
    disable_sparge(model)


@torch.no_grad()
def test_dense_steps_and_layers_schedule():
    model = tiny_transformer("wan", layers=3)
    assert select_layers(model) == ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1"]
    assert not is_enabled(model)
    controller = enable_sparge(model, "fixed", dense_layers=1, dense_steps=2,
                               sparse_kwargs={"cdf_threshold": 0.9, "sim_threshold": 0.0})
    assert list(controller.processors) == ["blocks.1.attn1", "blocks.2.attn1"]
    for t in (999.0, 999.0, 800.0, 600.0):  # the same timestep twice: one step (CFG)
        model(**tiny_inputs("wan", timestep=t))
    report = sparge_report(model)
    for stats in report.values():
        assert stats.dense_calls == 3 and stats.sparse_calls == 1
        assert stats.last_sparsity > 0
    model(**tiny_inputs("wan", timestep=999.0))  # timestep went up: a new generation
    assert controller.step == 0
    assert is_enabled(model)
    disable_sparge(model)
    assert not hasattr(model, "_sparge") and not is_enabled(model)


@torch.no_grad()
def test_calibrated_values_reload_into_fresh_model_with_same_masks(tmp_path):
    path = tmp_path / "wan_tuned.json"
    kwargs = {"granularity": 2, "pv_tol": 5.0}
    model = tiny_transformer("wan")
    enable_sparge(model, "calibrate", dense_layers=0, dense_steps=0, sparse_kwargs=kwargs)
    with calibration(model, path, calls=1, progress=False) as cal:
        calibrated_out = model(**tiny_inputs("wan"))[0]
        assert cal.finished
    saved = read_tuning(path)
    assert set(saved) == {"blocks.0.attn1.processor.sparse", "blocks.1.attn1.processor.sparse"}

    fresh = tiny_transformer("wan")
    enable_sparge(fresh, "tuned", tuned=path, dense_layers=0, dense_steps=0,
                  sparse_kwargs=kwargs)
    captured: dict[str, list] = {}
    for net in (model, fresh):
        for name, proc in net._sparge.processors.items():
            def hook(mod, args, kw, out, _name=name):
                masks = predict_mask(args[0], args[1], **{
                    k: v for k, v in mod.inference_args().items() if k != "pv_threshold"})
                captured.setdefault(_name, []).append((masks.blocks, out[0]))

            proc.sparse.register_forward_hook(hook, with_kwargs=True)
        net(**tiny_inputs("wan", seed=3))
    for name, ((mask_a, out_a), (mask_b, out_b)) in captured.items():
        assert torch.equal(mask_a, mask_b), name
        assert torch.equal(out_a, out_b), name
        assert 0 < (~mask_a).float().mean() < 1  # a real, non-trivial mask
    # calibration returned exact attention, the tuned run sparse attention close to it
    tuned_out = fresh(**tiny_inputs("wan"))[0]
    assert rel_l1(tuned_out, calibrated_out) < 0.2
    save_tuning(fresh, tmp_path / "again.safetensors")
    assert set(read_tuning(tmp_path / "again.safetensors")) == set(saved)


@pytest.mark.parametrize("mode", ["fixed", "calibrate"])
@torch.no_grad()
def test_last_sparsity_is_read_back_when_read_not_on_every_call(mode, monkeypatch):
    """Fixed and calibrated layers count each call's kept blocks on the device and read the
    count back (a GPU synchronisation) only when ``last_sparsity`` is read."""
    model = tiny_transformer("wan")
    if mode == "fixed":
        enable_sparge(model, "fixed", dense_layers=0, dense_steps=0,
                      sparse_kwargs={"cdf_threshold": 0.9, "sim_threshold": 0.0})
    else:
        enable_sparge(model, "calibrate", dense_layers=0, dense_steps=0,
                      sparse_kwargs={"granularity": 2, "pv_tol": 5.0})
        with calibration(model, calls=1, progress=False):
            model(**tiny_inputs("wan"))
        for stats, proc in zip(sparge_report(model).values(),
                               model._sparge.processors.values(), strict=True):
            assert stats.last_sparsity == float(proc.sparse.tuning_sparsity.mean())
    returned = []  # every call's AttentionStats, in call order
    owner = diffusers_integration if mode == "fixed" else calibrate_module
    sparse_attn = owner.sparse_attn

    def recording(*args, **kwargs):
        out, stats = sparse_attn(*args, **kwargs)
        returned.append(stats)
        return out, stats

    monkeypatch.setattr(owner, "sparse_attn", recording)
    reads: list[str] = []
    for name in ("sparsity", "per_head_sparsity"):
        method = getattr(SparseMask, name)
        monkeypatch.setattr(SparseMask, name,
                            lambda self, _m=method, _n=name: reads.append(_n) or _m(self))
    to_float = DeferredSparsity.__float__
    monkeypatch.setattr(DeferredSparsity, "__float__",
                        lambda self: reads.append("count") or to_float(self))
    for t in (900.0, 800.0):
        model(**tiny_inputs("wan", timestep=t))
    assert reads == [] and len(returned) == 4
    report = sparge_report(model)
    values = [stats.last_sparsity for stats in report.values()]
    assert reads == ["count", "count"]
    assert [dataclasses.asdict(stats)["last_sparsity"] for stats in report.values()] == values
    assert len(reads) == 2  # read once
    monkeypatch.undo()
    assert values == [stats.mask.sparsity() for stats in returned[2:]]
    assert all(value > 0 for value in values)
    disable_sparge(model)


def test_refuses_other_attention_backends():
    model = tiny_transformer("wan", layers=1)
    enable_sparge(model, "dense", dense_layers=0, dense_steps=0)
    proc = model._sparge.processors["blocks.0.attn1"]
    proc._attention_backend = "flash"
    with pytest.raises(RuntimeError, match="native"):
        with torch.no_grad():
            model(**tiny_inputs("wan"))
    proc._attention_backend = None
    disable_sparge(model)
    with pytest.raises(ValueError):
        enable_sparge(model, "nope")


@pytest.mark.parametrize("kwargs,match", [
    (dict(dense_layers=-1), "dense_layers must be an int >= 0, got -1"),  # was: the last layer
    (dict(dense_layers=1.5), "dense_layers"),
    (dict(dense_steps=-2), "dense_steps"),
    (dict(min_tokens=-5), "min_tokens"),
])
def test_schedule_arguments_are_checked(kwargs, match):
    model = tiny_transformer("wan", layers=3)
    with pytest.raises(ValueError, match=match):
        enable_sparge(model, "fixed", **kwargs)
    assert not hasattr(model, "_sparge")


@pytest.mark.parametrize("mode,kwargs,error,match", [
    ("fixed", dict(sparse_kwargs={"cdf_treshold": 0.9}), TypeError,
     r"\['cdf_treshold'\] are not arguments of sparge.sparse_attn"),
    ("fixed", dict(sparse_kwargs={"is_causal": True}), TypeError, "come from each SDPA call"),
    ("fixed", dict(tuned={}), ValueError, "mode='fixed' has no tuned values"),
    ("dense", dict(tuned={}), ValueError, "mode='dense' has no tuned values"),
    ("dense", dict(sparse_kwargs={"topk": 0.5}), ValueError, "uses no sparse_kwargs"),
])
def test_arguments_a_mode_would_not_use_are_refused(mode, kwargs, error, match):
    """Refused when sparge is enabled, not ignored (tuned values) or at the first denoising
    step (a misspelt threshold)."""
    model = tiny_transformer("wan", layers=3)
    with pytest.raises(error, match=match):
        enable_sparge(model, mode, **kwargs)
    assert not hasattr(model, "_sparge")


def test_example_script_tiny_path():
    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        spec = importlib.util.spec_from_file_location("sparge_example_wan", examples / "wan.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        report = module.main(["--tiny", "--steps", "4"])
    finally:
        sys.path.remove(str(examples))
    assert list(report) == ["blocks.1.attn1"]  # first layer dense
    assert report["blocks.1.attn1"].sparse_calls == 2  # first two steps dense
    assert report["blocks.1.attn1"].budget.calls == 2
