"""The mask predictor: block statistics and the selection rules of the design."""

import math

import pytest
import torch

from sparge.predict import BlockStats, Selection, block_stats, predict_mask_reference, select_blocks


def brute_force_stats(x, block):
    """Per-block mean and mean pairwise cosine similarity, with explicit loops."""
    b, h, length, d = x.shape
    n = -(-length // block)
    mean = torch.zeros(b, h, n, d, dtype=torch.float64)
    sim = torch.zeros(b, h, n, dtype=torch.float64)
    for i in range(n):
        rows = x[:, :, i * block:(i + 1) * block].double()
        mean[:, :, i] = rows.mean(dim=2)
        norms = rows.norm(dim=-1, keepdim=True)
        unit = torch.where(norms > 0, rows / norms, torch.zeros_like(rows))
        pairwise = unit @ unit.transpose(-1, -2)  # zero rows: cosine 0 with everything
        sim[:, :, i] = pairwise.mean(dim=(-1, -2))
    return mean, sim


@pytest.mark.parametrize("length", [1, 64, 100, 257])
def test_block_stats_match_pairwise_definition(rng, length):
    x = torch.randn(2, 3, length, 16, generator=rng)
    x[0, 0, 0] = 0.0  # a zero row has no direction and must not produce NaN
    stats = block_stats(x, 64)
    mean, sim = brute_force_stats(x, 64)
    torch.testing.assert_close(stats.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.similarity.double(), sim, rtol=1e-4, atol=1e-5)
    assert not stats.similarity.isnan().any()


def test_identical_rows_are_fully_similar_and_random_rows_are_not(rng):
    same = torch.randn(1, 1, 1, 32, generator=rng).expand(1, 1, 64, 32)
    noise = torch.randn(1, 1, 64, 32, generator=rng)
    assert block_stats(same, 64).similarity.item() == pytest.approx(1.0, abs=1e-5)
    assert block_stats(noise, 64).similarity.item() < 0.2


def stats_from(mean, sim):
    return BlockStats(mean.float(), sim.float())


def one_head_stats(scores_row, dim=4):
    """Pooled means whose scaled dot products with one query block are ``scores_row``."""
    n_k = len(scores_row)
    q_mean = torch.zeros(1, 1, 1, dim)
    q_mean[..., 0] = math.sqrt(dim)  # <q, k_j> / sqrt(dim) = k_j[0]
    k_mean = torch.zeros(1, 1, n_k, dim)
    k_mean[0, 0, :, 0] = torch.tensor(scores_row)
    return stats_from(q_mean, torch.ones(1, 1, 1)), stats_from(k_mean, torch.ones(1, 1, n_k))


def test_cdf_rule_keeps_the_leading_blocks_within_the_threshold():
    # softmax of log([0.5, 0.3, 0.15, 0.05]) = the masses themselves; cdf = .5 .8 .95 1.0
    qs, ks = one_head_stats([math.log(m) for m in (0.15, 0.5, 0.05, 0.3)])
    for tau, kept in [(0.4, [1]), (0.85, [1, 3]), (0.96, [0, 1, 3]), (1.0, [0, 1, 2, 3])]:
        mask = select_blocks(qs, ks, Selection(0.0, tau), q_len=64, k_len=256, block_q=64,
                             block_k=64)
        assert mask.blocks[0, 0, 0].nonzero().flatten().tolist() == kept, tau


def test_cdf_threshold_one_keeps_every_block_whatever_the_rounding():
    """The softmax of these two scores adds to 1 + 2**-23 in float32: a cumulative sum compared
    with 1 would drop the second block, which holds 46 % of the mass."""
    scores = [0.9398099184036255, 0.7748488187789917]
    assert torch.softmax(torch.tensor(scores), -1).cumsum(-1)[-1] > 1.0  # the premise
    qs, ks = one_head_stats(scores)
    for tau in (1.0, torch.tensor([1.0])):
        mask = select_blocks(qs, ks, Selection(0.0, tau), q_len=64, k_len=128, block_q=64,
                             block_k=64)
        assert mask.blocks.all(), tau


def test_topk_rule_keeps_floor_of_fraction_at_least_one():
    qs, ks = one_head_stats([0.1, 3.0, 2.0, 0.5, 1.0, -1.0, 0.0])
    for frac, kept in [(0.01, [1]), (0.3, [1, 2]), (0.5, [1, 2, 4]), (1.0, list(range(7)))]:
        mask = select_blocks(qs, ks, Selection(0.0, None, frac), q_len=64, k_len=7 * 64,
                             block_q=64, block_k=64)
        assert mask.blocks[0, 0, 0].nonzero().flatten().tolist() == kept, frac


def test_dissimilar_blocks_are_forced_on_and_sink_keeps_block_zero(rng):
    q_mean = torch.randn(1, 1, 3, 8, generator=rng)
    k_mean = torch.zeros(1, 1, 5, 8)
    k_mean[0, 0, 4, 0] = 100.0  # key block 4 takes all the mass for query blocks with q[0] > 0
    q_mean[..., 0] = 1.0
    q_sim = torch.tensor([[[0.9, 0.1, 0.9]]])  # query block 1 dissimilar: whole row on
    k_sim = torch.tensor([[[0.9, 0.9, 0.2, 0.9, 0.9]]])  # key block 2 dissimilar: column on
    qs, ks = stats_from(q_mean, q_sim), stats_from(k_mean, k_sim)
    sel = Selection(sim_threshold=0.5, cdf_threshold=0.5)
    mask = select_blocks(qs, ks, sel, q_len=192, k_len=320, block_q=64, block_k=64)
    expected = torch.tensor([[0, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask.blocks[0, 0], expected)
    sink = select_blocks(qs, ks, Selection(0.5, 0.5, attention_sink=True), q_len=192,
                         k_len=320, block_q=64, block_k=64)
    assert sink.blocks[0, 0, :, 0].all()
    # A negative threshold makes every block similar: nothing forced.
    loose = select_blocks(qs, ks, Selection(-0.1, 0.5), q_len=192, k_len=320, block_q=64,
                          block_k=64)
    assert torch.equal(loose.blocks[0, 0], torch.tensor([[0, 0, 0, 0, 1]] * 3, dtype=torch.bool))


def test_causal_selection_never_keeps_blocks_above_the_diagonal(rng):
    q = torch.randn(1, 2, 500, 32, generator=rng)
    k = torch.randn(1, 2, 500, 32, generator=rng)
    mask = predict_mask_reference(q, k, Selection(-1.0, None, 1.0), block_q=64, block_k=128,
                                  causal=True)
    rows = torch.arange(mask.shape[2])[:, None]
    cols = torch.arange(mask.shape[3])[None, :]
    assert torch.equal(mask.blocks[0, 0], cols * 128 <= torch.clamp((rows + 1) * 64, max=500) - 1)


def test_per_head_thresholds_equal_separate_calls(rng):
    q = torch.randn(1, 4, 600, 32, generator=rng)
    k = torch.randn(1, 2, 600, 32, generator=rng)
    k[:, :, :300] += 3 * torch.randn(1, 2, 1, 32, generator=rng)  # some structure
    taus = torch.tensor([0.3, 0.6, 0.9, 0.99])
    sims = torch.tensor([-1.0, 0.05, -1.0, 0.05])
    mask = predict_mask_reference(q, k, Selection(sims, taus), block_q=64, block_k=64)
    for h in range(4):
        single = predict_mask_reference(q, k, Selection(float(sims[h]), float(taus[h])),
                                        block_q=64, block_k=64)
        assert torch.equal(mask.blocks[:, h], single.blocks[:, h])


def test_gqa_uses_the_key_head_of_each_query_group(rng):
    q = torch.randn(1, 4, 256, 16, generator=rng)
    k = torch.randn(1, 2, 512, 16, generator=rng)
    mask = predict_mask_reference(q, k, Selection(-1.0, 0.5), block_q=64, block_k=64)
    for h in range(4):
        alone = predict_mask_reference(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], Selection(-1.0, 0.5),
                                       block_q=64, block_k=64)
        assert torch.equal(mask.blocks[:, h], alone.blocks[:, 0])


def test_selection_needs_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one"):
        Selection(0.5, 0.9, 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        Selection(0.5, None, None)
