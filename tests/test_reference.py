"""The PyTorch reference path: exact attention when every block is kept, masked attention for a
given mask, the PV-threshold rule, and the error that quantization adds.

Tolerances: exact mode computes in float32 against float64 references, so errors are float32
rounding (~1e-6 relative, 2e-5 absolute with margin for long softmax sums). Quantized modes follow
the error budget of INT8 Q/K (per-block scales) and FP8 e4m3 P/V (3 mantissa bits), ~0.03 relative
L1 on N(0, 1) inputs; 0.05 is the issue's bound.
"""

import math

import pytest
import torch

from conftest import exact_attention, rel_l1
from sparge import SparseMask
from sparge.quant import (
    FP8_MAX,
    int8_values,
    quantize_int8_per_block,
    quantize_v_fp8,
    times_reciprocal,
)
from sparge.reference import LOG2E, attention_reference


def run(q, k, v, mask, mode="none", pv=math.inf, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lam = torch.full((q.shape[1],), pv)
    return attention_reference(q, k, v, mask, scale=scale, pv_threshold=lam, mode=mode,
                               out_dtype=torch.float64)


@pytest.mark.parametrize("dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("length", [1, 77, 128, 1000])
def test_all_blocks_kept_equals_exact_attention(rng, dim, length):
    q = torch.randn(1, 2, length, dim, generator=rng)
    k = torch.randn(1, 2, length, dim, generator=rng)
    v = torch.randn(1, 2, length, dim, generator=rng)
    out = run(q, k, v, SparseMask.full(1, 2, length, length, 64, 128))
    torch.testing.assert_close(out, exact_attention(q, k, v), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("q_len,k_len", [(77, 1000), (1000, 77), (1, 300), (300, 1)])
def test_causal_gqa_with_different_lengths_is_top_left_aligned(rng, q_len, k_len):
    q = torch.randn(2, 6, q_len, 64, generator=rng)
    k = torch.randn(2, 2, k_len, 64, generator=rng)
    v = torch.randn(2, 2, k_len, 64, generator=rng)
    out = run(q, k, v, SparseMask.full(2, 6, q_len, k_len, 128, 64, causal=True))
    torch.testing.assert_close(out, exact_attention(q, k, v, causal=True), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_block_mask_equals_token_level_masked_attention(rng, causal):
    q = torch.randn(1, 4, 700, 64, generator=rng)
    k = torch.randn(1, 2, 600, 64, generator=rng)
    v = torch.randn(1, 2, 600, 64, generator=rng)
    blocks = torch.rand(1, 4, 11, 5, generator=rng) < 0.4
    blocks[0, 0, 3] = False  # a query block with nothing kept returns zeros
    mask = SparseMask(blocks, 64, 128, 700, 600, causal)
    out = run(q, k, v, mask)
    ref = exact_attention(q, k, v, token_mask=mask.to_token_mask())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    assert torch.equal(out[0, 0, 192:256], torch.zeros(64, 64, dtype=torch.float64))


def pv_threshold_brute_force(q, k, v, mask, lam, scale):
    """Row by row: walk kept key blocks in order and drop a block's contribution to a row when
    its maximum base-2 score is more than lam below the running maximum (first contributing block
    and, if causal, the block holding the row's own position, never dropped)."""
    q, k, v = q.double(), k.double(), v.double()
    b_, h_, q_len, _ = q.shape
    out = torch.zeros_like(q)
    skipped = 0
    allowed = mask.to_token_mask()
    bk = mask.block_k
    for b in range(b_):
        for h in range(h_):
            for i in range(q_len):
                s = (k[b, h] @ q[b, h, i]) * scale * LOG2E
                s = s.masked_fill(~allowed[b, h, i], float("-inf"))
                running, used = float("-inf"), torch.zeros_like(s, dtype=torch.bool)
                for j in range(mask.shape[3]):
                    cols = slice(j * bk, (j + 1) * bk)
                    local = s[cols].max().item()
                    if local == float("-inf"):
                        continue
                    own_block = mask.causal and j * bk <= i < (j + 1) * bk
                    if running > float("-inf") and local - running < -lam and not own_block:
                        skipped += 1
                        continue
                    used[cols] = True
                    running = max(running, local)
                w = torch.exp2(s - running).masked_fill(~used, 0.0)
                out[b, h, i] = (w @ v[b, h]) / w.sum()
    return out, skipped


@pytest.mark.parametrize("causal", [False, True])
def test_pv_threshold_rule_is_per_row(rng, causal):
    q = torch.randn(1, 2, 300, 16, generator=rng) * 2
    k = torch.randn(1, 2, 320, 16, generator=rng) * 2
    k[:, :, :64] *= 4  # the first block dominates, so that later ones fall below the threshold
    v = torch.randn(1, 2, 320, 16, generator=rng)
    mask = SparseMask.full(1, 2, 300, 320, 64, 64, causal)
    scale = 0.25
    lam = 3.0
    out = run(q, k, v, mask, pv=lam, scale=scale)
    ref, skipped = pv_threshold_brute_force(q, k, v, mask, lam, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    assert skipped > 0, "the inputs should make the rule skip some (row, block) pairs"


def test_large_pv_threshold_changes_nothing(rng):
    q, k, v = (torch.randn(1, 2, 300, 32, generator=rng) for _ in range(3))
    mask = SparseMask.full(1, 2, 300, 300, 64, 128)
    assert torch.equal(run(q, k, v, mask, pv=50.0), run(q, k, v, mask))


@pytest.mark.parametrize("mode,bound", [("int8_fp8", 0.05), ("int8_fp16", 0.02)])
@pytest.mark.parametrize("causal", [False, True])
def test_quantized_error_is_small_on_random_inputs(rng, mode, bound, causal):
    q = torch.randn(1, 4, 1000, 128, generator=rng)
    k = torch.randn(1, 2, 1000, 128, generator=rng)
    v = torch.randn(1, 2, 1000, 128, generator=rng)
    out = run(q, k, v, SparseMask.full(1, 4, 1000, 1000, 64, 128, causal), mode=mode)
    assert rel_l1(out, exact_attention(q, k, v, causal=causal)) < bound


def test_k_smoothing_makes_quantization_robust_to_channel_offsets(rng):
    q = torch.randn(1, 2, 512, 64, generator=rng)
    k = torch.randn(1, 2, 512, 64, generator=rng) + 40 * torch.randn(1, 2, 1, 64, generator=rng)
    v = torch.randn(1, 2, 512, 64, generator=rng)
    out = run(q, k, v, SparseMask.full(1, 2, 512, 512, 64, 128), mode="int8_fp8")
    assert rel_l1(out, exact_attention(q, k, v)) < 0.05


def test_int8_quantization_round_trip(rng):
    x = torch.randn(2, 3, 200, 48, generator=rng)
    x[0, 0, :64] = 0.0  # an all-zero block
    values, scales = quantize_int8_per_block(x, 64)
    assert values.dtype == torch.int8 and values.abs().max() <= 127
    assert scales.shape == (2, 3, 4)
    assert torch.equal(values[0, 0, :64], torch.zeros(64, 48, dtype=torch.int8))
    restored = values.float() * scales.repeat_interleave(64, dim=2)[:, :, :200, None]
    error = (restored - x).abs()
    assert (error <= scales.repeat_interleave(64, dim=2)[:, :, :200, None] / 2 + 1e-7).all()


def test_fp8_v_uses_one_scale_per_channel(rng):
    v = torch.randn(1, 2, 300, 16, generator=rng) * torch.logspace(-3, 3, 16)
    values, scales = quantize_v_fp8(v)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (1, 2, 16)
    assert values.float().abs().amax(dim=2).sub(FP8_MAX).abs().max() == 0
    assert rel_l1(values.float() * scales[:, :, None], v) < 0.03


def test_division_by_a_scale_is_the_quotient_but_near_rounding_points(rng):
    """Quantizers multiply by the scale's reciprocal instead of dividing: the INT8 values equal
    round(x / scale) except where x / scale lies within a few ulps of a half-integer, and the
    float32 products equal the quotients within an ulp."""
    scale = torch.rand(4, 1, generator=rng) * 0.05 + 0.01
    halves = torch.randint(-127, 127, (4, 50_000), generator=rng) + 0.5
    near_ties = ((halves * scale).view(torch.int32)
                 + torch.randint(-2, 3, halves.shape, generator=rng, dtype=torch.int32))
    x = torch.cat([torch.randn(4, 50_000, generator=rng) * 3, near_ties.view(torch.float32)], 1)
    quotient = x / scale
    values = int8_values(x, scale)
    differ = values != torch.round(quotient).clamp(-127, 127)
    assert differ.any()
    distance_to_tie = (quotient.abs() - quotient.abs().floor() - 0.5).abs()
    assert (distance_to_tie[differ] <= 4 * quotient.abs()[differ] * 2.0 ** -24).all()
    product = times_reciprocal(x, scale)
    assert ((product - quotient).abs() <= torch.finfo(torch.float32).eps * quotient.abs()).all()
