"""The diffusers processor's routing of intercepted SDPA calls, without diffusers: a stand-in
inner processor that calls ``F.scaled_dot_product_attention``; CPU reference path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparge.integrations.diffusers import SpargeAttnProcessor, SpargeController


class _Inner:
    """A processor whose attention is one SDPA call on the tensors it is given."""

    def __call__(self, attn, q, k, v, **sdpa_kwargs):
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)


def _processor() -> SpargeAttnProcessor:
    controller = SpargeController("fixed", dense_steps=0, min_tokens=64)
    return SpargeAttnProcessor(_Inner(), None, controller, "attn", 0,
                               fixed=dict(cdf_threshold=1.0, quant="none"))


@pytest.mark.parametrize("case,reason", [
    ("value head dim", "value head dim differs"),
    ("short", "short sequence"),
    ("dropout", "dropout"),
])
def test_calls_sparge_cannot_take_run_the_original_sdpa_and_say_why(case, reason):
    q, k, v = (torch.randn(1, 4, 150, 32) for _ in range(3))
    kwargs = {}
    if case == "value head dim":
        v = torch.randn(1, 4, 150, 16)
    elif case == "short":
        q, k, v = q[:, :, :40], k[:, :, :40], v[:, :, :40]
    else:
        kwargs["dropout_p"] = 0.5
    proc = _processor()
    torch.manual_seed(0)
    out = proc(None, q, k, v, **kwargs)
    assert proc.stats.dense_reasons == {reason: 1}
    assert proc.stats.dense_calls == 1 and proc.stats.sparse_calls == 0
    torch.manual_seed(0)  # the same dropout draws
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs),
                               rtol=0, atol=0)


def test_differing_head_counts_without_enable_gqa_meet_sdpa_as_called():
    """SDPA raises for them, as sparse_attn would: the call goes to SDPA unchanged."""
    q, k, v = (torch.randn(1, h, 150, 32) for h in (4, 2, 2))
    proc = _processor()
    with pytest.raises(RuntimeError):
        proc(None, q, k, v)
    assert proc.stats.dense_reasons == {"head counts differ": 1}


def test_a_call_sparge_takes_runs_sparse():
    q, k, v = (torch.randn(1, 4, 150, 32) for _ in range(3))
    proc = _processor()
    out = proc(None, q, k, v)
    assert proc.stats.sparse_calls == 1 and proc.stats.dense_reasons == {}
    # every block kept, no quantization: SDPA's attention
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5,
                               atol=1e-5)
