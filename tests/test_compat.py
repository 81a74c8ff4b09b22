"""The drop-in ``spas_sage_attn`` module, used the way existing callers use it."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparge
import spas_sage_attn
from conftest import rel_l1
from sparge.cli import sdpa_math, video_like_qkv
from spas_sage_attn import (
    block_sparse_sage2_attn_cuda,
    spas_sage2_attn_meansim_cuda,
    spas_sage2_attn_meansim_topk_cuda,
    spas_sage_attn_meansim,
    spas_sage_attn_meansim_cuda,
    spas_sage_attn_meansim_topk_cuda,
    spas_sage_attn_meansim_triton,
)
from spas_sage_attn.core import get_cuda_arch_versions, infer_mask_granularity
from spas_sage_attn.utils import (
    block_map_lut_triton,
    get_block_map_meansim,
    hyperparameter_check,
    precision_metric,
)

QUANT_TOL = 0.05  # relative L1 of INT8 QK / FP16 PV against exact attention


def token_mask(blocks: torch.Tensor, block_q: int, block_k: int, q_len: int, k_len: int):
    return sparge.SparseMask(blocks != 0, block_q, block_k, q_len, k_len).to_token_mask()


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


# ----------------------------------------------------------------------------- names and defaults
def test_names_import_and_aliases():
    assert spas_sage_attn_meansim_cuda is spas_sage2_attn_meansim_cuda
    assert spas_sage_attn_meansim_topk_cuda is spas_sage2_attn_meansim_topk_cuda
    for name in ("spas_sage2_attn_meansim_cuda", "spas_sage2_attn_meansim_topk_cuda",
                 "block_sparse_sage2_attn_cuda", "spas_sage_attn_meansim_cuda",
                 "spas_sage_attn_meansim_topk_cuda", "spas_sage_attn_meansim",
                 "spas_sage_attn_meansim_triton"):
        assert callable(getattr(spas_sage_attn, name))
        assert name in spas_sage_attn.__all__
    assert get_cuda_arch_versions() == [
        f"sm{a}{b}" for a, b in (torch.cuda.get_device_capability(i)
                                 for i in range(torch.cuda.device_count()))]


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


E = inspect.Parameter.empty
MEANSIM = [("q", E), ("k", E), ("v", E), ("attn_mask", None), ("dropout_p", 0.0),
           ("is_causal", False), ("scale", None), ("smooth_k", True), ("simthreshd1", 0.6),
           ("cdfthreshd", 0.98), ("pvthreshd", 50), ("attention_sink", False),
           ("tensor_layout", "HND"), ("output_dtype", torch.float16),
           ("return_sparsity", False)]


def test_signatures_match_upstream():
    assert _params(spas_sage2_attn_meansim_cuda) == MEANSIM + [("return_lse", False)]
    assert _params(spas_sage_attn_meansim_triton) == MEANSIM
    topk = (MEANSIM[:8] + [("simthreshd1", -0.1), ("cdfthreshd", None), ("topk", 0.5)]
            + MEANSIM[10:] + [("return_lse", False)])
    assert _params(spas_sage2_attn_meansim_topk_cuda) == topk
    assert _params(block_sparse_sage2_attn_cuda) == [
        ("q", E), ("k", E), ("v", E), ("mask_id", None), ("dropout_p", 0.0), ("scale", None),
        ("smooth_k", True), ("pvthreshd", 50), ("attention_sink", False),
        ("tensor_layout", "HND"), ("output_dtype", torch.float16), ("return_sparsity", False),
        ("return_lse", False)]
    assert _params(get_block_map_meansim) == [
        ("q", E), ("k", E), ("is_causal", False), ("BLKQ", 128), ("BLKK", 64),
        ("simthreshd1", 0.1), ("cdfthreshd", 0.9), ("topk", None), ("is_sparse", True),
        ("return_lut", False), ("attention_sink", False)]
    assert _params(precision_metric) == [("quant_o", E), ("fa2_o", E), ("verbose", True),
                                         ("round_num", 4)]
    assert _params(hyperparameter_check) == [("hyper", E), ("H", E), ("device", E)]
    assert _params(block_map_lut_triton) == [("block_map", E)]


def test_autotune_names_come_from_sparge_tuning():
    import sparge.tuning
    from spas_sage_attn.autotune import (
        SparseAttentionMeansim,
        extract_sparse_attention_state_dict,
        load_sparse_attention_state_dict,
    )

    assert SparseAttentionMeansim is sparge.tuning.SparseAttentionMeansim
    assert extract_sparse_attention_state_dict is sparge.tuning.extract_sparse_attention_state_dict
    assert load_sparse_attention_state_dict is sparge.tuning.load_sparse_attention_state_dict
    assert issubclass(SparseAttentionMeansim, torch.nn.Module)


# ---------------------------------------------------------------------------- predicted masks
def test_meansim_random_matches_sdpa_like_upstream_test(rng):
    # upstream's tests/test_spargeattn.py, scaled down: N(0, 1) inputs, default arguments
    q, k, v = (randn(2, 4, 128, 128, gen=rng) for _ in range(3))
    out = spas_sage_attn_meansim(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_l1(out, sdpa_math(q, k, v)) < QUANT_TOL


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("causal", [False, True])
def test_meansim_cuda_vs_sdpa(rng, layout, causal):
    q, k, v = (randn(1, 2, 300, 64, gen=rng) for _ in range(3))
    args = (q, k, v) if layout == "HND" else (q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2))
    out, sparsity = spas_sage2_attn_meansim_cuda(*args, is_causal=causal, tensor_layout=layout,
                                                 return_sparsity=True)
    assert isinstance(sparsity, float)
    if layout == "NHD":
        out = out.transpose(1, 2)
    assert rel_l1(out, sdpa_math(q, k, v, is_causal=causal)) < QUANT_TOL


def test_meansim_on_structured_input_equals_its_mask():
    q, k, v = video_like_qkv(1536, 2, 64, height=16, width=32, seed=3)
    out, sparsity = spas_sage2_attn_meansim_cuda(q, k, v, return_sparsity=True)
    blocks = get_block_map_meansim(q, k, simthreshd1=0.6, cdfthreshd=0.98)
    assert blocks.shape == (1, 2, 12, 24)  # 128 x 64 blocks, as upstream's default
    assert sparsity == pytest.approx(1 - blocks.float().mean().item())
    assert sparsity > 0.2
    masked = sdpa_math(q, k, v, token_mask=token_mask(blocks, 128, 64, 1536, 1536))
    assert rel_l1(out, masked) < QUANT_TOL
    assert rel_l1(out, sdpa_math(q, k, v)) < QUANT_TOL


def test_topk_keeps_the_fraction():
    q, k, v = video_like_qkv(1024, 2, 64, height=16, width=32, seed=1)
    out, sparsity = spas_sage2_attn_meansim_topk_cuda(q, k, v, return_sparsity=True)
    # simthreshd1=-0.1: every block may be skipped; 16 key blocks of 64, keep floor(0.5 * 16)
    assert sparsity == pytest.approx(0.5)
    blocks = get_block_map_meansim(q, k, simthreshd1=-0.1, cdfthreshd=None, topk=0.5)
    assert (blocks.sum(-1) == 8).all()
    masked = sdpa_math(q, k, v, token_mask=token_mask(blocks, 128, 64, 1024, 1024))
    assert rel_l1(out, masked) < QUANT_TOL


def test_topk_causal_sparsity_is_exact():
    q, k, v = video_like_qkv(1024, 1, 64, height=16, width=32, seed=2)
    _, sparsity = spas_sage2_attn_meansim_topk_cuda(q, k, v, is_causal=True, topk=1.0,
                                                    return_sparsity=True)
    assert sparsity == pytest.approx(0.0)  # every causally visible block kept


def test_per_head_tensor_thresholds_equal_per_head_calls(rng):
    q, k, v = video_like_qkv(768, 2, 64, height=16, width=32, seed=4)
    cdf = torch.tensor([0.5, 0.99])
    sim = torch.tensor([0.3, -1.0])
    pv = torch.tensor([50.0, 5.0])
    out, sparsity = spas_sage2_attn_meansim_cuda(q, k, v, simthreshd1=sim, cdfthreshd=cdf,
                                                 pvthreshd=pv, return_sparsity=True)
    for h in range(2):
        alone = spas_sage2_attn_meansim_cuda(
            q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], simthreshd1=float(sim[h]),
            cdfthreshd=float(cdf[h]), pvthreshd=float(pv[h]))
        torch.testing.assert_close(out[:, h:h + 1], alone, rtol=0, atol=1e-6)


def test_output_dtype_follows_input_unless_asked(rng):
    q, k, v = (randn(1, 1, 130, 64, gen=rng) for _ in range(3))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert spas_sage2_attn_meansim_cuda(q.to(dtype), k.to(dtype), v.to(dtype)).dtype == dtype
    out = spas_sage2_attn_meansim_cuda(q.half(), k.half(), v.half(), output_dtype=torch.float32)
    assert out.dtype == torch.float32
    out = block_sparse_sage2_attn_cuda(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                       mask_id=torch.ones(1, 1, 2, 3, dtype=torch.int8))
    assert out.dtype == torch.bfloat16


def test_triton_variant_and_dispatcher_pass_arguments(rng):
    q, k, v = (randn(1, 2, 256, 64, gen=rng) for _ in range(3))
    ref = sdpa_math(q, k, v, is_causal=True)
    out = spas_sage_attn_meansim_triton(q, k, v, is_causal=True)
    assert rel_l1(out, ref) < QUANT_TOL
    out, sparsity = spas_sage_attn_meansim(q, k, v, None, 0.0, True, return_sparsity=True)
    assert rel_l1(out, ref) < QUANT_TOL and isinstance(sparsity, float)


def test_scale_and_gqa(rng):
    q = randn(1, 4, 200, 64, gen=rng)
    k, v = randn(1, 2, 260, 64, gen=rng), randn(1, 2, 260, 64, gen=rng)
    group_k, group_v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, group_k, group_v, scale=0.05)
    assert rel_l1(spas_sage2_attn_meansim_cuda(q, k, v, scale=0.05), ref) < QUANT_TOL


# ------------------------------------------------------------------------------ block-sparse
@pytest.mark.parametrize("block_q,block_k", [(128, 64), (64, 128)])
@pytest.mark.parametrize("q_len,k_len", [(512, 512), (333, 333), (256, 700)])
def test_mask_id_both_granularities_equal_token_masked(rng, block_q, block_k, q_len, k_len):
    q = randn(2, 2, q_len, 64, gen=rng)
    k, v = randn(2, 2, k_len, 64, gen=rng), randn(2, 2, k_len, 64, gen=rng)
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    mask_id = (torch.rand(2, 2, n_q, n_k, generator=rng) < 0.5).to(torch.int8)
    mask_id[0, 0, 0] = 0  # a query block with nothing kept returns zeros
    assert infer_mask_granularity(tuple(mask_id.shape), q_len, k_len) == (block_q, block_k)
    out, sparsity = block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask_id, return_sparsity=True)
    ref = sdpa_math(q, k, v, token_mask=token_mask(mask_id, block_q, block_k, q_len, k_len))
    assert rel_l1(out, ref) < QUANT_TOL
    assert (out[0, 0, :block_q] == 0).all()
    assert sparsity == pytest.approx(1 - mask_id.float().mean().item())


def test_mask_id_granularity_decides_the_result(rng):
    # The same mask tensor read at the other granularity would be a different mask: the test
    # above would catch a wrong reading. Here a (128, 128)-structured mask at both granularities
    # gives the same attention.
    q, k, v = (randn(1, 2, 512, 64, gen=rng) for _ in range(3))
    coarse = torch.rand(1, 2, 4, 4, generator=rng) < 0.5
    coarse[..., 0] = True
    as_128_64 = coarse.repeat_interleave(2, dim=3).to(torch.int8)
    as_64_128 = coarse.repeat_interleave(2, dim=2).to(torch.int8)
    out_a = block_sparse_sage2_attn_cuda(q, k, v, mask_id=as_128_64)
    out_b = block_sparse_sage2_attn_cuda(q, k, v, mask_id=as_64_128)
    ref = sdpa_math(q, k, v, token_mask=token_mask(coarse, 128, 128, 512, 512))
    assert rel_l1(out_a, ref) < QUANT_TOL and rel_l1(out_b, ref) < QUANT_TOL
    assert rel_l1(out_a, out_b) < QUANT_TOL


def test_mask_id_dtypes_and_broadcast(rng):
    q, k, v = (randn(2, 3, 256, 64, gen=rng) for _ in range(3))
    blocks = torch.rand(1, 1, 2, 4, generator=rng) < 0.5
    blocks[..., 1] = True
    ref = block_sparse_sage2_attn_cuda(q, k, v, mask_id=blocks.expand(2, 3, 2, 4).contiguous())
    for mask_id in (blocks, blocks.to(torch.int8), blocks.to(torch.int64) * 7):
        torch.testing.assert_close(block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask_id), ref,
                                   rtol=0, atol=0)


def test_mask_id_nhd_and_mixed_video_text_case(rng):
    # RadialAttention's mixed case: queries are the video tokens, keys video + text tokens.
    q = randn(1, 512, 2, 64, gen=rng)
    k, v = randn(1, 600, 2, 64, gen=rng), randn(1, 600, 2, 64, gen=rng)
    mask_id = (torch.rand(1, 2, 4, 10, generator=rng) < 0.6).to(torch.int8)
    mask_id[..., 9] = 0
    out = block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask_id, tensor_layout="NHD")
    assert out.shape == q.shape
    ref = sdpa_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    token_mask=token_mask(mask_id, 128, 64, 512, 600))
    assert rel_l1(out.transpose(1, 2), ref) < QUANT_TOL


def test_mask_id_single_block_is_unambiguous(rng):
    q, k, v = (randn(1, 1, 50, 64, gen=rng) for _ in range(3))
    assert infer_mask_granularity((1, 1, 1, 1), 50, 50) == (128, 64)
    out = block_sparse_sage2_attn_cuda(q, k, v, mask_id=torch.ones(1, 1, 1, 1, dtype=torch.bool))
    assert rel_l1(out, sdpa_math(q, k, v)) < QUANT_TOL


def test_attention_sink_is_honoured(rng):
    q, k, v = (randn(1, 1, 256, 64, gen=rng) for _ in range(3))
    mask_id = torch.zeros(1, 1, 2, 4, dtype=torch.int8)
    mask_id[..., 2] = 1
    out = block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask_id, attention_sink=True)
    with_sink = mask_id.clone()
    with_sink[..., 0] = 1
    masked = sdpa_math(q, k, v, token_mask=token_mask(with_sink, 128, 64, 256, 256))
    assert rel_l1(out, masked) < QUANT_TOL
    assert rel_l1(out, sdpa_math(q, k, v, token_mask=token_mask(mask_id, 128, 64, 256, 256))) > 0.3


def test_block_sparse_dense_mask_reports_zero_sparsity(rng):
    q, k, v = (randn(1, 2, 256, 64, gen=rng) for _ in range(3))
    out, sparsity = block_sparse_sage2_attn_cuda(
        q, k, v, mask_id=torch.ones(1, 2, 2, 4, dtype=torch.int8), return_sparsity=True)
    assert sparsity == 0.0  # upstream reports about -1 here (it divides by a causal count)
    assert rel_l1(out, sdpa_math(q, k, v)) < QUANT_TOL


# --------------------------------------------------------------------------------------- utils
def test_block_map_lut_known_values():
    block_map = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0],
                              [0, 0, 0, 0, 1]], dtype=torch.int8).view(1, 1, 4, 5)
    lut, count = block_map_lut_triton(block_map)
    assert lut.dtype == torch.int32 and count.dtype == torch.int32
    assert lut[0, 0].tolist() == [[1, 1, 2, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0],
                                  [4, 0, 0, 0, 0]]
    assert count[0, 0].tolist() == [3, 1, 0, 1]


def test_block_map_lut_round_trip(rng):
    block_map = torch.rand(2, 3, 7, 11, generator=rng) < 0.4
    lut, count = block_map_lut_triton(block_map)
    assert lut.shape == (2, 3, 7, 11) and count.shape == (2, 3, 7)
    assert torch.equal(sparge.SparseMask.blocks_from_lut(lut, count), block_map)
    assert torch.equal(count, block_map.sum(-1, dtype=torch.int32))
    # the table is what the lookup-table form of the same SparseMask gives
    mask = sparge.SparseMask(block_map, 128, 64, 7 * 128, 11 * 64)
    assert all(torch.equal(a, b) for a, b in zip(mask.to_lut(), (lut, count), strict=True))


def test_precision_metric_known_values(capsys):
    ref = torch.tensor([1.0, -2.0, 3.0, -4.0])
    assert precision_metric(ref.clone(), ref, verbose=False) == {"Cossim": 1.0, "L1": 0.0,
                                                                 "RMSE": 0.0}
    doubled = precision_metric(2 * ref, ref, verbose=True)
    assert doubled == {"Cossim": 1.0, "L1": 1.0, "RMSE": round((7.5 ** 0.5), 4)}
    assert "Cossim: 1.000000, L1: 1.000000, RMSE:2.738600" in capsys.readouterr().out
    assert precision_metric(-ref, ref, verbose=False)["Cossim"] == -1.0
    assert precision_metric(-ref, ref, verbose=False)["L1"] == 2.0
    ortho = precision_metric(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]), verbose=False,
                             round_num=2)
    assert ortho == {"Cossim": 0.0, "L1": round(4 / 3, 2), "RMSE": round(5 ** 0.5, 2)}
    with pytest.raises(ValueError, match="shapes differ"):
        precision_metric(torch.zeros(3), torch.zeros(4))


def test_hyperparameter_check():
    assert torch.equal(hyperparameter_check(0.5, 3, "cpu"), torch.full((3,), 0.5))
    assert torch.equal(hyperparameter_check(50, 2, "cpu"), torch.full((2,), 50.0))
    assert torch.equal(hyperparameter_check(torch.tensor(0.2), 2, "cpu"), torch.full((2,), 0.2))
    per_head = torch.tensor([0.1, 0.2, 0.3])
    assert torch.equal(hyperparameter_check(per_head, 3, "cpu"), per_head)
    with pytest.raises(ValueError, match="3 elements"):
        hyperparameter_check(torch.tensor([0.1, 0.2]), 3, "cpu")
    with pytest.raises(ValueError, match="0-D or 1-D"):
        hyperparameter_check(torch.zeros(3, 1), 3, "cpu")
    with pytest.raises(TypeError, match="float or a tensor"):
        hyperparameter_check("0.5", 3, "cpu")
    with pytest.raises(TypeError, match="float or a tensor"):
        hyperparameter_check(True, 3, "cpu")


def test_get_block_map_meansim(rng):
    q, k, _ = video_like_qkv(640, 2, 64, height=16, width=32, seed=5)
    blocks = get_block_map_meansim(q, k, simthreshd1=0.6, cdfthreshd=0.9, is_causal=True,
                                   attention_sink=True)
    mask = sparge.predict_mask(q, k, sim_threshold=0.6, cdf_threshold=0.9, is_causal=True,
                               attention_sink=True, block_q=128, block_k=64)
    assert blocks.dtype == torch.bool and torch.equal(blocks, mask.blocks)
    lut, count = get_block_map_meansim(q, k, simthreshd1=0.6, cdfthreshd=0.9, is_causal=True,
                                       attention_sink=True, return_lut=True)
    assert all(torch.equal(a, b) for a, b in zip((lut, count), mask.to_lut(), strict=True))
    dense = get_block_map_meansim(q, k, BLKQ=64, BLKK=128, is_sparse=False)
    assert dense.shape == (1, 2, 10, 5) and dense.all()
    with pytest.raises(ValueError, match="exactly one of cdfthreshd and topk"):
        get_block_map_meansim(q, k, cdfthreshd=0.9, topk=0.5)
    with pytest.raises(ValueError, match="block_q"):
        get_block_map_meansim(q, k, BLKQ=32)


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [spas_sage2_attn_meansim_cuda, spas_sage2_attn_meansim_topk_cuda,
                                spas_sage_attn_meansim_triton])
def test_unsupported_arguments_raise(rng, fn):
    q, k, v = (randn(1, 2, 128, 64, gen=rng) for _ in range(3))
    with pytest.raises(NotImplementedError, match="attn_mask"):
        fn(q, k, v, torch.ones(128, 128, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout"):
        fn(q, k, v, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="smooth_k"):
        fn(q, k, v, smooth_k=False)
    with pytest.raises(ValueError, match="tensor_layout"):
        fn(q, k, v, tensor_layout="BHSD")
    with pytest.raises(ValueError, match="simthreshd1"):
        fn(q, k, v, simthreshd1=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="pv_threshold"):
        fn(q, k, v, pvthreshd=-1.0)
    with pytest.raises(TypeError, match="pv_threshold must be a float or a tensor"):
        fn(q, k, v, pvthreshd=None)
    if fn is not spas_sage_attn_meansim_triton:
        with pytest.raises(NotImplementedError, match="return_lse"):
            fn(q, k, v, return_lse=True)


def test_selection_rule_errors(rng):
    q, k, v = (randn(1, 2, 128, 64, gen=rng) for _ in range(3))
    with pytest.raises(ValueError, match="exactly one of cdfthreshd and topk"):
        spas_sage2_attn_meansim_cuda(q, k, v, cdfthreshd=None)
    with pytest.raises(ValueError, match="exactly one of cdfthreshd and topk"):
        spas_sage2_attn_meansim_topk_cuda(q, k, v, cdfthreshd=0.9)
    with pytest.raises(ValueError, match="cdf_threshold"):
        spas_sage2_attn_meansim_cuda(q, k, v, cdfthreshd=1.5)
    # the CDF rule through the top-k function, as upstream allows
    out = spas_sage2_attn_meansim_topk_cuda(q, k, v, cdfthreshd=0.9, topk=None)
    assert out.shape == q.shape


def test_block_sparse_errors(rng):
    q, k, v = (randn(1, 2, 300, 64, gen=rng) for _ in range(3))
    with pytest.raises(ValueError, match="mask_id is required"):
        block_sparse_sage2_attn_cuda(q, k, v)
    with pytest.raises(ValueError, match=r"\(3, 5\) for blocks of 128x64 or \(5, 3\)"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=torch.ones(1, 2, 4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="4-D"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=torch.ones(2, 3, 5, dtype=torch.int8))
    with pytest.raises(TypeError, match="mask_id must be a torch.Tensor"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=[[1]])
    with pytest.raises(TypeError, match="mask_id must be a bool or integer block mask"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=torch.zeros(1, 2, 3, 5))
    ones = torch.ones(1, 2, 3, 5, dtype=torch.int8)
    with pytest.raises(NotImplementedError, match="dropout"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=ones, dropout_p=0.5)
    with pytest.raises(NotImplementedError, match=r"got dropout_p='0'\)"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=ones, dropout_p="0")
    with pytest.raises(NotImplementedError, match="smooth_k"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=ones, smooth_k=False)
    with pytest.raises(NotImplementedError, match="return_lse"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=ones, return_lse=True)
    with pytest.raises(ValueError, match="broadcast"):
        block_sparse_sage2_attn_cuda(q, k, v, mask_id=torch.ones(1, 3, 3, 5, dtype=torch.int8))
