"""SparseMask: block bookkeeping, sparsity accounting and conversions."""

import pytest
import torch

from sparge import SparseMask
from sparge.mask import causal_block_mask


def brute_force_token_mask(blocks, bq, bk, q_len, k_len, causal):
    b, h = blocks.shape[:2]
    out = torch.zeros(b, h, q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        for j in range(k_len):
            if causal and j > i:
                continue
            out[:, :, i, j] = blocks[:, :, i // bq, j // bk]
    return out


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (70, 200), (300, 129), (129, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_token_mask_matches_brute_force(rng, q_len, k_len, causal):
    n_q, n_k = -(-q_len // 64), -(-k_len // 128)
    blocks = torch.rand(2, 3, n_q, n_k, generator=rng) < 0.5
    mask = SparseMask(blocks, 64, 128, q_len, k_len, causal)
    expected = brute_force_token_mask(mask.blocks, 64, 128, q_len, k_len, causal)
    assert torch.equal(mask.to_token_mask(), expected)


def test_causal_mask_drops_blocks_above_the_diagonal():
    # Lq=200 (4 query blocks of 64), Lk=300 (3 key blocks of 128): key block j is valid for
    # query block i iff 128 j <= last query index of block i.
    valid = causal_block_mask(200, 300, 64, 128)
    expected = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(valid, expected)
    mask = SparseMask.full(1, 1, 200, 300, 64, 128, causal=True)
    assert torch.equal(mask.blocks[0, 0], expected)
    assert mask.sparsity() == 0.0


def test_sparsity_counts_only_visitable_blocks():
    mask = SparseMask.full(2, 2, 256, 256, 64, 128, causal=True)  # 4 x 2 blocks, 6 visitable
    blocks = mask.blocks.clone()
    blocks[0, 0, 3, 1] = False  # one of 24 visitable blocks dropped
    sparse = SparseMask(blocks, 64, 128, 256, 256, causal=True)
    assert sparse.sparsity() == pytest.approx(1 / 24)
    per_head = sparse.per_head_sparsity()
    assert per_head.tolist() == pytest.approx([1 / 12, 0.0])


@pytest.mark.parametrize("q_len,k_len,bq,bk", [(1, 1, 64, 64), (200, 300, 64, 128),
                                             (1000, 129, 128, 64), (129, 5000, 64, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_deferred_sparsity_counts_on_the_device_and_reads_when_asked(rng, q_len, k_len, bq, bk,
                                                                      causal):
    """The visitable blocks are counted on the host (the same count as the causal block mask);
    the kept ones on the mask's device, read back only by ``float``."""
    n_q, n_k = -(-q_len // bq), -(-k_len // bk)
    mask = SparseMask(torch.rand(2, 3, n_q, n_k, generator=rng) < 0.4, bq, bk, q_len, k_len,
                      causal)
    assert mask.visitable_count() == int(mask.visitable().sum())
    deferred = mask.deferred_sparsity()
    assert deferred.kept.dim() == 0 and deferred.kept.device == mask.device
    kept = int(mask.blocks.sum())
    assert float(deferred) == mask.sparsity() == 1.0 - kept / (6 * mask.visitable_count())


def test_lut_is_delta_encoded_with_counts():
    blocks = torch.tensor([[[[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]]]], dtype=torch.bool)
    mask = SparseMask(blocks, 64, 64, 192, 320)
    lut, counts = mask.to_lut()
    assert lut.dtype == torch.int32 and counts.dtype == torch.int32
    assert lut[0, 0].tolist() == [[1, 2, 1, 0, 0], [0, 0, 0, 0, 0], [0, 4, 0, 0, 0]]
    assert counts[0, 0].tolist() == [3, 0, 2]
    n, idx = mask.kv_indices()
    assert idx[0, 0].tolist() == [[1, 3, 4, 0, 0], [0, 0, 0, 0, 0], [0, 4, 0, 0, 0]]
    assert torch.equal(n, counts)


def test_lut_round_trip(rng):
    blocks = torch.rand(2, 4, 9, 13, generator=rng) < 0.4
    mask = SparseMask(blocks, 128, 64, 9 * 128 - 5, 13 * 64)
    assert torch.equal(SparseMask.blocks_from_lut(*mask.to_lut()), blocks)


def test_union_and_intersection(rng):
    a = SparseMask(torch.rand(1, 2, 3, 3, generator=rng) < 0.5, 64, 128, 150, 300)
    b = SparseMask(torch.rand(1, 2, 3, 3, generator=rng) < 0.5, 64, 128, 150, 300)
    assert torch.equal((a | b).blocks, a.blocks | b.blocks)
    assert torch.equal((a & b).blocks, a.blocks & b.blocks)
    other = SparseMask.full(1, 2, 150, 300, 128, 128)
    with pytest.raises(ValueError, match="differ"):
        _ = a | other


def test_union_and_intersection_broadcast_batch_and_heads_or_say_why():
    one = SparseMask.full(1, 1, 150, 300)
    assert (one | SparseMask.full(2, 3, 150, 300)).shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"\(B, H\) = \(2, 1\) and \(3, 1\) do not broadcast"):
        _ = SparseMask.full(2, 1, 150, 300) & SparseMask.full(3, 1, 150, 300)
    with pytest.raises(TypeError, match="unsupported operand"):
        _ = one | one.blocks


def test_expand_broadcasts_batch_and_heads():
    mask = SparseMask.full(1, 1, 100, 100, 64, 64)
    assert mask.expand(3, 8).shape == (3, 8, 2, 2)
    with pytest.raises(ValueError, match="broadcast"):
        SparseMask.full(2, 1, 100, 100, 64, 64).expand(3, 8)


def test_expand_is_a_view_of_the_causal_blocks():
    """Expanding views the (causally valid) blocks: nothing is copied or recomputed."""
    blocks = torch.rand(1, 2, 4, 3) < 0.7
    mask = SparseMask(blocks, 64, 128, 250, 300, causal=True)
    wide = mask.expand(3, 2)
    assert wide.causal and wide.blocks.data_ptr() == mask.blocks.data_ptr()
    assert torch.equal(wide.blocks, mask.blocks.expand(3, 2, 4, 3))
    assert mask.expand(1, 2) is mask


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(blocks=torch.ones(1, 1, 2, 2, dtype=torch.int8)), ValueError, "bool"),
    (dict(blocks=torch.ones(2, 2, dtype=torch.bool)), ValueError, "4-D"),
    (dict(block_q=32), ValueError, "block_q"),
    (dict(block_k=64.0), ValueError, r"block_k must be one of \(64, 128\) \(an int\), got 64.0"),
    (dict(q_len=300), ValueError, "need"),
    (dict(k_len=0), ValueError, ">= 1"),
    (dict(blocks=[[[[True]]]]), TypeError, "blocks must be a 4-D bool tensor .* got list"),
    (dict(q_len=128.0), TypeError, "q_len must be an int, got 128.0"),
    (dict(k_len="128"), TypeError, "k_len must be an int, got '128'"),
    (dict(causal="no"), TypeError, "causal must be a bool, got 'no'"),
])
def test_invalid_masks_are_rejected(kwargs, error, match):
    """Wrong values raise ValueError, fields of the wrong type TypeError, naming the field."""
    args = dict(blocks=torch.ones(1, 1, 2, 2, dtype=torch.bool), block_q=64, block_k=64,
                q_len=128, k_len=128)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SparseMask(**args)
