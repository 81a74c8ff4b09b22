"""Static patterns against brute-force token-level constructions, the mask algebra across
granularities, and the FlexAttention BlockMask conversion."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import sparge
from conftest import exact_attention
from sparge import SparseMask
from sparge.patterns import (
    causal_mask,
    from_flex_block_mask,
    from_token_mask,
    intersection,
    regrid,
    sink_mask,
    sliding_tile_mask,
    sliding_window_mask,
    to_flex_block_mask,
    union,
)

flex = pytest.importorskip("torch.nn.attention.flex_attention")


# ------------------------------------------------------------------------- brute-force helpers
def token_pattern(q_len: int, k_len: int, allowed) -> torch.Tensor:
    """Bool (Lq, Lk) from a Python predicate, one pair at a time."""
    rows = [[bool(allowed(i, j)) for j in range(k_len)] for i in range(q_len)]
    return torch.tensor(rows, dtype=torch.bool).reshape(q_len, k_len)


def covering_blocks(pattern: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Bool (nQ, nK): a block is kept iff some pair inside it is allowed (plain loops)."""
    q_len, k_len = pattern.shape
    n_q, n_k = -(-q_len // bq), -(-k_len // bk)
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for a in range(n_q):
        for b in range(n_k):
            out[a, b] = bool(pattern[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk].any())
    return out


def expand_blocks(blocks: torch.Tensor, bq: int, bk: int, q_len: int, k_len: int) -> torch.Tensor:
    """Token-level semantics "kept block -> all its pairs", by loops."""
    return token_pattern(q_len, k_len, lambda i, j: blocks[i // bq, j // bk])


SIZES = [(64, 128), (128, 64), (64, 64), (128, 128)]


# ------------------------------------------------------------------------------------ patterns
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (200, 200), (130, 257), (300, 90)])
@pytest.mark.parametrize("bq,bk", SIZES)
def test_causal_mask_is_exact(q_len, k_len, bq, bk):
    mask = causal_mask(q_len, k_len, block_q=bq, block_k=bk)
    expected = token_pattern(q_len, k_len, lambda i, j: j <= i)
    assert mask.shape[:2] == (1, 1)
    assert torch.equal(mask.to_token_mask()[0, 0], expected)


@pytest.mark.parametrize("sink_len", [0, 1, 64, 100, 128, 129, 500])
@pytest.mark.parametrize("bq,bk", SIZES)
def test_sink_mask(sink_len, bq, bk):
    q_len, k_len = 150, 300
    pattern = token_pattern(q_len, k_len, lambda i, j: j < sink_len)
    mask = sink_mask(q_len, k_len, sink_len, block_q=bq, block_k=bk)
    assert torch.equal(mask.blocks[0, 0], covering_blocks(pattern, bq, bk))
    tokens = mask.to_token_mask()[0, 0]
    assert bool((tokens >= pattern).all())
    if sink_len % bk == 0 or sink_len >= k_len:
        assert torch.equal(tokens, pattern)


@pytest.mark.parametrize("q_len,k_len", [(257, 257), (190, 333), (333, 100)])
@pytest.mark.parametrize("window", [0, 5, 64, (100, 3), (0, 130), 1000])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bq,bk", [(64, 128), (128, 64)])
def test_sliding_window_mask(q_len, k_len, window, causal, bq, bk):
    left, right = (window, window) if isinstance(window, int) else window

    def allowed(i, j):
        return i - left <= j <= (i if causal else i + right)

    pattern = token_pattern(q_len, k_len, allowed)
    mask = sliding_window_mask(q_len, k_len, window, causal=causal, block_q=bq, block_k=bk)
    assert mask.causal == causal
    assert torch.equal(mask.blocks[0, 0], covering_blocks(pattern, bq, bk))
    tokens = mask.to_token_mask()[0, 0]
    assert bool((tokens >= pattern).all())
    if causal:  # the causal part is exact: nothing above the diagonal
        assert not bool(torch.triu(tokens, diagonal=1).any())


def test_sliding_window_rejects_negative():
    with pytest.raises(ValueError, match="window"):
        sliding_window_mask(10, 10, (-1, 2))


@pytest.mark.parametrize("grid,window,text_len", [
    ((4, 6, 7), (1, 2, 2), 0),
    ((4, 6, 7), (0, 1, 3), 20),
    ((3, 5, 9), (2, 0, 1), 70),
    ((2, 4, 4), (5, 5, 5), 0),
])
@pytest.mark.parametrize("bq,bk", [(64, 128), (64, 64)])
def test_sliding_tile_mask(grid, window, text_len, bq, bk):
    t, h, w = grid
    video = t * h * w
    length = video + text_len

    def coords(i):
        return i // (h * w), (i // w) % h, i % w

    def allowed(i, j):
        if i >= video or j >= video:
            return True
        return all(abs(a - b) <= r for a, b, r in zip(coords(i), coords(j), window, strict=True))

    pattern = token_pattern(length, length, allowed)
    mask = sliding_tile_mask(grid, window, text_len=text_len, block_q=bq, block_k=bk, chunk=2)
    assert (mask.q_len, mask.k_len) == (length, length)
    assert torch.equal(mask.blocks[0, 0], covering_blocks(pattern, bq, bk))
    assert bool((mask.to_token_mask()[0, 0] >= pattern).all())


def test_sliding_tile_block_aligned_is_exact():
    # Frames of 8 x 8 = 64 tokens, window of one frame in time and the whole frame in space:
    # the pattern is a band of whole 64-token frames, so 64 x 64 blocks represent it exactly.
    grid, window = (5, 8, 8), (1, 7, 7)
    mask = sliding_tile_mask(grid, window, block_q=64, block_k=64)
    pattern = token_pattern(320, 320, lambda i, j: abs(i // 64 - j // 64) <= 1)
    assert torch.equal(mask.to_token_mask()[0, 0], pattern)


@pytest.mark.parametrize("causal", [False, True])
def test_from_token_mask(rng, causal):
    tokens = torch.rand(2, 3, 150, 260, generator=rng) < 0.002
    mask = from_token_mask(tokens, block_q=64, block_k=128, causal=causal)
    for b, h in itertools.product(range(2), range(3)):
        pattern = torch.tril(tokens[b, h]) if causal else tokens[b, h]
        assert torch.equal(mask.blocks[b, h], covering_blocks(pattern, 64, 128))


# ------------------------------------------------------------------------------------- algebra
def random_mask(rng, b, h, q_len, k_len, bq, bk, causal=False, p=0.4) -> SparseMask:
    blocks = torch.rand(b, h, -(-q_len // bq), -(-k_len // bk), generator=rng) < p
    return SparseMask(blocks, bq, bk, q_len, k_len, causal)


@pytest.mark.parametrize("q_len,k_len", [(300, 300), (129, 500), (64, 65)])
@pytest.mark.parametrize("causal", [False, True])
def test_regrid_refining_is_exact(rng, q_len, k_len, causal):
    mask = random_mask(rng, 2, 2, q_len, k_len, 128, 128, causal)
    for bq, bk in SIZES:
        fine = regrid(mask, bq, bk)
        assert (fine.block_q, fine.block_k, fine.causal) == (bq, bk, causal)
        assert torch.equal(fine.to_token_mask(), mask.to_token_mask())


@pytest.mark.parametrize("q_len,k_len", [(300, 300), (129, 500)])
def test_regrid_coarsening_covers(rng, q_len, k_len):
    mask = random_mask(rng, 1, 2, q_len, k_len, 64, 64, p=0.2)
    coarse = regrid(mask, 128, 128)
    tokens = mask.to_token_mask()
    for h in range(2):
        expected = covering_blocks(tokens[0, h], 128, 128)
        assert torch.equal(coarse.blocks[0, h], expected)
    assert bool((coarse.to_token_mask() >= tokens).all())


def test_union_and_intersection_across_granularities(rng):
    q_len = k_len = 400
    static = sliding_window_mask(q_len, k_len, 100, block_q=128, block_k=128)
    predicted = random_mask(rng, 2, 3, q_len, k_len, 64, 128, p=0.3)
    sink = sink_mask(q_len, k_len, 64, block_q=64, block_k=64)
    both = union(static, predicted, sink)
    assert (both.block_q, both.block_k) == (64, 64) and both.shape[:2] == (2, 3)
    expected = static.to_token_mask() | predicted.to_token_mask() | sink.to_token_mask()
    assert torch.equal(both.to_token_mask(), expected)
    common = intersection(static, predicted, causal_mask(q_len, k_len, block_q=128, block_k=64))
    assert common.causal
    expected = (static.to_token_mask() & predicted.to_token_mask()
                & torch.tril(torch.ones(q_len, k_len, dtype=torch.bool)))
    assert torch.equal(common.to_token_mask(), expected)
    # SparseMask's own operators broadcast a static (1, 1) mask against a predicted (B, H) one.
    assert torch.equal((predicted | regrid(static, 64, 128)).blocks,
                       predicted.blocks | regrid(static, 64, 128).blocks)


def test_union_rejects_different_lengths():
    with pytest.raises(ValueError, match="different sequence lengths"):
        union(causal_mask(100, 100), causal_mask(100, 200))


# ------------------------------------------------------------------------------- FlexAttention
@pytest.mark.parametrize("q_len,k_len", [(200, 200), (130, 300), (256, 128)])
@pytest.mark.parametrize("bq,bk", [(64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_flex_round_trip(rng, q_len, k_len, bq, bk, causal):
    mask = random_mask(rng, 2, 3, q_len, k_len, bq, bk, causal)
    block_mask = to_flex_block_mask(mask)
    assert tuple(block_mask.BLOCK_SIZE) == (bq, bk)
    assert tuple(block_mask.seq_lengths) == (q_len, k_len)
    assert torch.equal(block_mask.to_dense().bool(), mask.blocks)
    if not causal:
        assert int(block_mask.kv_num_blocks.sum()) == 0  # every kept block is a full block
    back = from_flex_block_mask(block_mask, q_len, k_len, causal=causal)
    assert torch.equal(back.blocks, mask.blocks)
    assert (back.block_q, back.block_k, back.causal) == (bq, bk, causal)
    # With the causal mask_mod evaluated, the same blocks come back without declaring causal.
    evaluated = from_flex_block_mask(block_mask, q_len, k_len, evaluate_mask_mod=True)
    assert torch.equal(evaluated.blocks, mask.blocks)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len", [(200, 200), (150, 333)])
def test_flex_attention_matches_sparge(rng, causal, q_len, k_len):
    mask = random_mask(rng, 1, 2, q_len, k_len, 64, 128, causal, p=0.5)
    blocks = mask.blocks.clone()
    blocks[:, 0, 1] = False  # a query block with no key: zeros from both
    mask = SparseMask(blocks, 64, 128, q_len, k_len, causal)
    q = torch.randn(1, 2, q_len, 32, generator=rng)
    k = torch.randn(1, 2, k_len, 32, generator=rng)
    v = torch.randn(1, 2, k_len, 32, generator=rng)
    with warnings.catch_warnings():  # eager flex_attention warns (once) that it is unfused
        warnings.simplefilter("ignore", UserWarning)
        out_flex = flex.flex_attention(q, k, v, block_mask=to_flex_block_mask(mask))
    out = sparge.block_sparse_attn(q, k, v, mask, quant="none", backend="reference")
    expected = exact_attention(q, k, v, token_mask=mask.to_token_mask())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_flex.double(), expected, atol=2e-5, rtol=1e-4)


def test_from_flex_sliding_window():
    q_len = k_len = 300

    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 40

    block_mask = flex.create_block_mask(window, 1, 1, q_len, k_len, device="cpu",
                                        BLOCK_SIZE=(64, 128))
    expected = sliding_window_mask(q_len, k_len, 40, block_q=64, block_k=128)
    exact = from_flex_block_mask(block_mask, q_len, k_len, evaluate_mask_mod=True)
    assert torch.equal(exact.blocks, expected.blocks)
    covering = from_flex_block_mask(block_mask, q_len, k_len)
    assert torch.equal(covering.blocks, expected.blocks)  # no partial block is empty here


def test_from_flex_drops_empty_partial_blocks():
    # A hand-made BlockMask whose partial block (0, 1) allows nothing: its mask_mod only allows
    # the first key block.
    kv_num = torch.tensor([[[2]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[0, 1]]]], dtype=torch.int32)

    def first_block(b, h, q_idx, kv_idx):
        return kv_idx < 128

    block_mask = flex.BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(128, 128),
                                               mask_mod=first_block, seq_lengths=(100, 256))
    kept = from_flex_block_mask(block_mask, 100, 256)
    assert kept.blocks.tolist() == [[[[True, True]]]]
    exact = from_flex_block_mask(block_mask, 100, 256, evaluate_mask_mod=True)
    assert exact.blocks.tolist() == [[[[True, False]]]]


def test_from_flex_other_block_size():
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = flex.create_block_mask(causal, 1, 1, 200, 200, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="block_q and block_k"):
        from_flex_block_mask(block_mask, 200, 200)
    mask = from_flex_block_mask(block_mask, 200, 200, block_q=64, block_k=128, causal=True)
    assert torch.equal(mask.to_token_mask()[0, 0],
                       causal_mask(200, 200).to_token_mask()[0, 0])


def test_from_flex_checks_lengths():
    block_mask = to_flex_block_mask(causal_mask(100, 100))
    with pytest.raises(ValueError, match="fewer"):
        from_flex_block_mask(block_mask, 300, 100)
