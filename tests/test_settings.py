"""Environment switches: one definition of each default, the same values the kernels read."""

import os

import pytest

from sparge import settings


@pytest.mark.parametrize("switch", settings.SWITCHES, ids=lambda s: s.name)
def test_switch_default_and_override(switch, monkeypatch):
    monkeypatch.delenv(switch.name, raising=False)
    assert switch.enabled() is switch.default_on
    assert switch.value() == ("1" if switch.default_on else "0")
    # only the opposite of the default's value flips a switch; anything else leaves it as is
    monkeypatch.setenv(switch.name, "0" if switch.default_on else "1")
    assert switch.enabled() is not switch.default_on
    monkeypatch.setenv(switch.name, "yes")
    assert switch.enabled() is switch.default_on


def test_defaults_are_the_documented_ones():
    on = {s.name for s in settings.SWITCHES if s.default_on}
    assert on == {"SPARGE_AUTOTUNE", "SPARGE_LAUNCH_CACHE", "SPARGE_CUDA_GRAPHS",
                  "SPARGE_DEPENDENT_LAUNCH"}
    assert {s.name for s in settings.SWITCHES} - on == {"TRITON_INTERPRET", "SPARGE_PV_TILE_SKIP",
                                                       "SPARGE_CHECK_FINITE"}


def test_cuda_graphs_names_every_replayed_entry_point():
    """``sparge info`` prints the meaning: it names each entry point whose calls replay."""
    for name in ("sparse_attn", "quantized_attn", "block_sparse_attn"):
        assert name in settings.CUDA_GRAPHS.meaning


@pytest.mark.parametrize("before", [None, "0", "1", "yes"])
@pytest.mark.parametrize("on", [True, False])
def test_forced_holds_within_the_block_and_restores_the_variable(before, on, monkeypatch):
    switch = settings.AUTOTUNE
    if before is None:
        monkeypatch.delenv(switch.name, raising=False)
    else:
        monkeypatch.setenv(switch.name, before)
    with switch.forced(on):
        assert switch.enabled() is on
    assert os.environ.get(switch.name) == before


def test_forced_restores_the_variable_when_the_block_raises(monkeypatch):
    monkeypatch.setenv(settings.AUTOTUNE.name, "1")
    with pytest.raises(RuntimeError), settings.AUTOTUNE.forced(False):
        raise RuntimeError("inside the block")
    assert os.environ[settings.AUTOTUNE.name] == "1"
