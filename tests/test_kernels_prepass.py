"""The fused pre-pass, the GPU block selection, the lookup-table kernel and the custom operator,
against their PyTorch specifications (sparge.quant, sparge.predict, SparseMask.to_lut).

CPU tests run the Triton kernels through the interpreter. TRITON_INTERPRET must be set before
Triton is imported and must not leak into other test modules, so each CPU case runs in a fresh
Python process (``_interpreted``). The interpreter's bf16 is wrong and its float -> fp8 conversion
differs from PyTorch's; the kernels round to the e4m3 grid themselves, so FP8 V is compared bit
for bit here, and bf16 only on the GPU. Before Triton 3.9 its tl.fma rounds the product first; the
kernels' FMA (``sparge.kernels.rounding.fma``) is exact under the interpreter on every version.
GPU tests are marked ``gpu`` and skipped without CUDA.

Outputs are poisoned before the kernels write them (NaN, int8 -128, which quantization never
produces, int32 garbage), so "equal to the reference" also proves every element was written.
"""

import math
import os

import pytest
import torch

from conftest import run_interpreted

HERE = os.path.abspath(__file__)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------ helpers
def _fresh_seed() -> int:
    seed = torch.seed()
    print(f"random seed: {seed}")
    return seed


def _poison_allocations(monkeypatch=None):
    """Make the pre-pass and LUT allocate poisoned buffers instead of empty ones (for the rest of
    the process, or until ``monkeypatch`` undoes it)."""
    from sparge.kernels import prepass, select

    def poisoned(*shape, dtype, device):
        t = torch.empty(*shape, dtype=dtype, device=device)
        if dtype.is_floating_point and dtype.itemsize == 1:  # fp8: 0x7F is NaN in e4m3fn
            t.view(torch.uint8).fill_(0x7F)
        elif dtype.is_floating_point:
            t.fill_(float("nan"))
        elif dtype == torch.int8:
            t.fill_(-128)
        else:
            t.fill_(-12345)
        return t

    for module in (prepass, select):
        if monkeypatch is None:
            module._alloc = poisoned
        else:
            monkeypatch.setattr(module, "_alloc", poisoned)


def _smooth_tokens(batch, heads, length, dim, device="cpu", dtype=torch.float32, step=0.05):
    """Slowly varying tokens (a random walk plus a per-head offset): blocks are self-similar and
    the pooled scores are uneven, so the selection keeps some blocks and drops others."""
    walk = torch.randn(batch, heads, length, dim, device=device).cumsum(2) * step
    return (walk + torch.randn(batch, heads, 1, dim, device=device)).to(dtype)


def _interpreted(name: str) -> None:
    """Run ``name()`` of this module in a fresh process under the Triton interpreter."""
    run_interpreted(HERE, name)


# ------------------------------------------------------------------------------ shared checks
def check_prepare_qkv(q, k, v, block_q, block_k, mode):
    """prepare_qkv against sparge.quant (bit for bit) and sparge.predict (float32 rounding).

    The references run on the CPU, whatever the device: there every division is IEEE, as in the
    kernels (PyTorch on CUDA divides by a Python scalar through its reciprocal, which can move a
    scale by one ulp).
    """
    from sparge.kernels.layout import fp8_v_natural, pv_slots
    from sparge.kernels.prepass import channel_mean, prepare_qkv
    from sparge.predict import block_stats, smooth_k
    from sparge.quant import quantize_int8_per_block, quantize_qkv

    got, q_stats, k_stats = prepare_qkv(q, k, v, block_q=block_q, block_k=block_k, mode=mode,
                                        with_stats=True)
    mean = channel_mean(k).cpu()
    v_in = v
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    ref = quantize_qkv(q, k, v, block_q=block_q, block_k=block_k, mode=mode)
    assert got.q.dtype == torch.int8 and got.q.shape == q.shape
    assert torch.equal(got.q.cpu(), ref.q)
    assert torch.equal(got.q_scale.cpu(), ref.q_scale)
    # K: exact given the same channel mean. The kernels sum the mean in another order than
    # torch's mean (chunk partials, see sparge.kernels.prepass), so it matches smooth_k's to
    # float32 rounding of a sum over Lk terms: a few units of rounding (u = 2**-24) of partial
    # sums no larger than sum |k|, divided by Lk (atol 16 u mean|k| per channel; seen on an
    # H100 with |k| ~ 1e4: 2.3e-5 against an atol of 7e-3).
    mean_abs = float(k.float().abs().mean(dim=2).max())
    torch.testing.assert_close(mean, k.float().mean(dim=2), rtol=1e-5,
                               atol=16 * 2.0 ** -24 * mean_abs + 1e-7)
    k8, ks = quantize_int8_per_block(k.float() - mean[:, :, None, :], block_k)
    assert torch.equal(got.k.cpu(), k8)
    assert torch.equal(got.k_scale.cpu(), ks)
    # each head's largest K scale, which the attention kernel reads (an atomic maximum over
    # the K programs, into a buffer the statistics launch zeroes: allocations are poisoned)
    assert torch.equal(got.k_scale_max.cpu(), ks.amax(dim=-1))
    # Against the spec, the mean's difference d moves an amax by d at most (the scale: rtol
    # 1e-5), and an INT8 value by one at most, only where smooth_k(k) / scale lies within
    # about d / scale steps of a rounding tie (twice that, plus float32 rounding, is allowed).
    torch.testing.assert_close(got.k_scale.cpu(), ref.k_scale, rtol=1e-5, atol=0)
    off = got.k.cpu() != ref.k
    assert (got.k.cpu().int() - ref.k.int()).abs().max() <= 1
    if off.any():
        steps = ref.k_scale.repeat_interleave(block_k, dim=2)[:, :, :k.shape[2], None]
        d = (mean - k.float().mean(dim=2))[:, :, None, :].abs()
        y = (smooth_k(k) / steps).abs()
        near_tie = (y - y.floor() - 0.5).abs() <= 2 * d / steps + 1e-4
        assert near_tie[off].all(), "an INT8 K value moved away from a rounding tie"

    if mode == "int8_fp8":
        batch, heads, length, dim = v.shape
        # The kernel's buffer: K-major, padded to whole key blocks, keys in their slots.
        padded = -(-length // block_k) * block_k
        assert got.v.shape == (batch, heads, dim, padded) and got.v.is_contiguous()
        assert got.v.dtype == torch.float8_e4m3fn
        natural = fp8_v_natural(got.v, length).cpu()
        assert torch.equal(natural.view(torch.uint8), ref.v.view(torch.uint8))
        assert torch.equal(got.v_scale.cpu(), ref.v_scale)
        padding = pv_slots(padded)[length:]  # the slots of keys past Lk hold zeros
        assert (got.v.cpu()[..., padding].view(torch.uint8) == 0).all()
    else:
        assert got.v.dtype == torch.float16 and got.v_scale is None
        assert torch.equal(got.v.cpu(), ref.v)
        # float16 V is used as it is; other dtypes are cast by the pre-pass's V job into a
        # contiguous buffer (poisoned when allocated: every element is written)
        assert got.v is v_in if v_in.dtype == torch.float16 else got.v.is_contiguous()

    for stats, x in ((q_stats, q), (k_stats, k)):
        ref_stats = block_stats(x, block_q) if x is q else block_stats(smooth_k(k), block_k)
        assert stats.mean.dtype == torch.float32 and stats.similarity.dtype == torch.float32
        # A block sum of values of size |x| rounds differently per summation order, by a few
        # float32 ulps of |x|; the kernels' x / |x| (one reciprocal per row) is an ulp off at most.
        atol = max(1e-5, 2e-6 * float(x.float().abs().max()))
        torch.testing.assert_close(stats.mean.cpu(), ref_stats.mean, rtol=1e-5, atol=atol)
        torch.testing.assert_close(stats.similarity.cpu(), ref_stats.similarity, rtol=1e-5,
                                   atol=1e-5)


def check_selection_matches(q, k, selection, block_q, block_k, causal, max_diff=0.0):
    """select_blocks_gpu on the inputs' device from the same statistics equals select_blocks on
    the CPU, and predict_mask_gpu == predict_mask_reference, exactly unless ``max_diff``: the
    fraction of blocks allowed to flip. On a GPU the pooled scores, the softmax and the cumulative
    sum add in another order than on the CPU, so a block whose cumulative probability lies within
    float32 rounding of the CDF threshold may flip (ties in probability cannot: both rank them
    by index); from the GPU's own statistics, also a block whose similarity lies within
    rounding of its threshold."""
    from sparge.kernels.select import predict_mask_gpu, select_blocks_gpu, select_with_table
    from sparge.predict import (
        BlockStats,
        block_stats,
        predict_mask_reference,
        select_blocks,
        smooth_k,
    )

    qs, ks = block_stats(q, block_q), block_stats(smooth_k(k), block_k)
    kw = dict(q_len=q.shape[2], k_len=k.shape[2], block_q=block_q, block_k=block_k,
              causal=causal)
    got = select_blocks_gpu(qs, ks, selection, **kw)
    # the same selection with its lookup table written by the same programs
    with_table, table = select_with_table(qs, ks, selection, **kw)
    assert torch.equal(with_table.blocks, got.blocks)
    check_mask_table(with_table, table)
    on_cpu = [BlockStats(s.mean.cpu(), s.similarity.cpu()) for s in (qs, ks)]
    cpu_selection = type(selection)(*(x.cpu() if isinstance(x, torch.Tensor) else x
                                      for x in (selection.sim_threshold, selection.cdf_threshold,
                                                selection.topk, selection.attention_sink)))
    ref = select_blocks(*on_cpu, cpu_selection, **kw)
    assert got.shape == ref.shape and got.causal == causal
    differ = (got.blocks.cpu() != ref.blocks).float().mean().item()
    assert differ <= max_diff, f"{differ:.2e} of the blocks differ from the same statistics"

    ref = predict_mask_reference(q, k, selection, block_q=block_q, block_k=block_k, causal=causal)
    got = predict_mask_gpu(q, k, selection, block_q=block_q, block_k=block_k, causal=causal)
    assert got.shape == ref.shape
    differ = (got.blocks != ref.blocks).float().mean().item()
    assert differ <= max_diff, f"{differ:.2e} of the blocks differ"
    return ref


def check_lut(blocks):
    from sparge.kernels.select import block_map_to_lut
    from sparge.mask import SparseMask

    b, h, n_q, n_k = blocks.shape
    ref_lut, ref_counts = SparseMask(blocks != 0, 64, 64, n_q * 64, n_k * 64).to_lut()
    lut, counts = block_map_to_lut(blocks)
    assert lut.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(lut, ref_lut) and torch.equal(counts, ref_counts)
    assert torch.equal(SparseMask.blocks_from_lut(lut, counts), blocks != 0)
    ref_counts, ref_indices = SparseMask(blocks != 0, 64, 64, n_q * 64, n_k * 64).kv_indices()
    indices, counts = block_map_to_lut(blocks, delta=False)
    assert torch.equal(indices, ref_indices) and torch.equal(counts, ref_counts)


def check_mask_table(mask, table=None):
    """The attention kernel's table (``mask_table(mask)`` unless ``table`` is given): kv_indices,
    plus n_full as the kernel's contract defines it (kept blocks below k_len // block_k and,
    when causal, ending before the query block)."""
    from sparge.kernels.select import mask_table

    indices, counts, n_full = mask_table(mask) if table is None else table
    ref_counts, ref_indices = mask.kv_indices()
    assert torch.equal(indices.cpu(), ref_indices.cpu())
    assert torch.equal(counts.cpu(), ref_counts.cpu())
    n_q, n_k = mask.shape[2:]
    limit = torch.full((n_q,), mask.k_len // mask.block_k)
    if mask.causal:
        limit = torch.minimum(limit, torch.arange(n_q) * mask.block_q // mask.block_k)
    unmasked = torch.arange(n_k)[None, :] < limit[:, None]
    expected = (mask.blocks.cpu() & unmasked).sum(-1, dtype=torch.int32)
    assert n_full.dtype == torch.int32 and torch.equal(n_full.cpu(), expected)


def check_pooled_products(shapes, device, precision=None):
    """The products kernel (``precision`` given) or ``pooled_products_gpu`` against float64
    products, for (B, Hq, Hk, nQ, nK, D) shapes: every entry within 2e-5 of the sum of its
    terms' magnitudes. A float32 sum of D <= 256 rounded terms errs by at most about
    (D + 2) * 2^-24 of that sum (1.5e-5 at D256); three TF32 products lose about 2^-21 of
    each term more. An indexing error (a wrong head, row or channel) is of the order of the
    sum itself."""
    from sparge.kernels.select import _products_launch, pooled_products_gpu
    from sparge.predict import BlockStats

    for b, hq, hk, n_q, n_k, d in shapes:
        q_mean = torch.randn(b, hq, n_q, d, device=device) * 3
        k_mean = torch.randn(b, hk, n_k, d, device=device) + torch.randn(b, hk, 1, d,
                                                                        device=device)
        if precision is None:
            got = pooled_products_gpu(BlockStats(q_mean, None), BlockStats(k_mean, None))
        else:
            got = _products_launch(q_mean, k_mean, precision)
        k_rep = k_mean.repeat_interleave(hq // hk, dim=1).double()
        exact = q_mean.double() @ k_rep.transpose(-1, -2)
        magnitude = q_mean.double().abs() @ k_rep.abs().transpose(-1, -2)
        assert got.shape == exact.shape and got.dtype == torch.float32 and got.is_contiguous()
        err = ((got.double() - exact).abs() / magnitude).max().item()
        print(f"{(b, hq, hk, n_q, n_k, d)}: largest error {err:.2e} of the terms' magnitude")
        assert err <= 2e-5


def selections(heads_q, device):
    from sparge.predict import Selection

    per_head = torch.linspace(0.5, 0.95, heads_q, device=device)
    return [
        Selection(0.5, 0.9),
        Selection(-1.0, 0.7, attention_sink=True),  # every block similar: pure CDF rule
        Selection(-1.0, None, 0.3),
        Selection(torch.linspace(-0.5, 0.9, heads_q, device=device), per_head),
        Selection(0.6, None, torch.linspace(0.1, 1.0, heads_q, device=device), True),
    ]


# ------------------------------------------------------------------------------ CPU cases
# Each case_* runs in its own interpreter process (see _interpreted).
SHAPES = [  # (B, Hq, Hk, Lq, Lk, D, block_q, block_k)
    (1, 2, 1, 200, 137, 64, 64, 128),
    (2, 2, 2, 1, 1, 32, 128, 64),
    (1, 4, 2, 130, 300, 17, 64, 64),
    (1, 1, 1, 64, 256, 96, 64, 128),
]


def case_prepare_qkv_matches_quant():
    _fresh_seed()
    _poison_allocations()
    for dtype in (torch.float16, torch.float32):
        for b, hq, hk, lq, lk, d, bq, bk in SHAPES:
            for mode in ("int8_fp8", "int8_fp16"):
                q = torch.randn(b, hq, lq, d).to(dtype) * 3
                k = (torch.randn(b, hk, lk, d) * 2 + torch.randn(b, hk, 1, d) * 5).to(dtype)
                v = torch.randn(b, hk, lk, d).to(dtype) * 4
                check_prepare_qkv(q, k, v, bq, bk, mode)


def _quantize_launches(monkeypatch=None) -> list:
    """Record (jobs, warps) of every launch of the quantization kernel from now on."""
    from sparge.kernels import launcher

    seen, run = [], launcher.run

    def recording(kernel, grid, *args, **meta):
        if kernel.fn.__name__ == "_quantize_kernel":
            jobs = "".join(j for j in "MQKV" if meta[f"HAS_{j}"])
            seen.append((jobs, meta["num_warps"]))
        return run(kernel, grid, *args, **meta)

    if monkeypatch is None:
        launcher.run = recording
    else:
        monkeypatch.setattr(launcher, "run", recording)
    return seen


def check_launch_arrangements(q, k, v, block_q, block_k, launches):
    """With the statistics, a launch of four-warp programs quantizes V and finishes K's channel
    mean (M), and the statistics of Q and K run in a second launch, of one-warp programs, which
    reads that mean. Without them, head dims up to 64 take the same two launches (the second of
    four-warp programs) and larger ones one launch of Q, K and V. Both give the same bits.
    ``launches``: the list :func:`_quantize_launches` fills."""
    from sparge.kernels.prepass import prepare_qkv

    launches.clear()
    with_stats = prepare_qkv(q, k, v, block_q=block_q, block_k=block_k, mode="int8_fp8",
                             with_stats=True)[0]
    assert launches == [("MV", 4), ("QK", 1)], launches
    launches.clear()
    without = prepare_qkv(q, k, v, block_q=block_q, block_k=block_k, mode="int8_fp8",
                          with_stats=False)[0]
    expected = [("MV", 4), ("QK", 4)] if q.shape[3] <= 64 else [("QKV", 4)]
    assert launches == expected, launches
    for name in ("q", "q_scale", "k", "k_scale", "v_scale", "k_scale_max"):
        assert torch.equal(getattr(without, name), getattr(with_stats, name)), name
    assert torch.equal(without.v.view(torch.uint8), with_stats.v.view(torch.uint8))


def case_launch_arrangements():
    """See :func:`check_launch_arrangements`; every other shape also against the reference."""
    _fresh_seed()
    _poison_allocations()
    launches = _quantize_launches()
    for i, (b, hq, hk, lq, lk, d, bq, bk) in enumerate(SHAPES):
        q = torch.randn(b, hq, lq, d) * 3
        k = torch.randn(b, hk, lk, d) * 2 + torch.randn(b, hk, 1, d) * 5
        v = torch.randn(b, hk, lk, d) * 4
        if i % 2 == 0:
            check_prepare_qkv(q, k, v, bq, bk, "int8_fp8")
        check_launch_arrangements(q, k, v, bq, bk, launches)


def case_prepare_qkv_strides_zeros_and_large_values():
    _fresh_seed()
    _poison_allocations()
    b, h, length, d = 2, 3, 150, 40
    # NHD storage read through HND views (non-contiguous), zero rows and a zero block.
    q = (torch.randn(b, length, h, d) * 1e4).half().transpose(1, 2)
    k = torch.randn(b, length, h, d).half().transpose(1, 2)
    v = torch.randn(b, length, h, d).half().transpose(1, 2)
    q[:, :, 3] = 0
    q[0, 1, 64:128] = 0
    k[1, 0] = 0  # a whole head of zeros: smoothed K is zero, scales 1, similarity 0
    v[0, 2, :, 5] = 0  # a zero channel: V scale 1
    for mode in ("int8_fp8", "int8_fp16"):
        check_prepare_qkv(q, k, v, 64, 128, mode)
    from sparge.kernels.prepass import prepare_qkv

    got, qs, ks = prepare_qkv(q, k, v, block_q=64, block_k=64, mode="int8_fp8", with_stats=True)
    assert got.q_scale[0, 1, 1] == 1.0 and qs.similarity[0, 1, 1] == 0.0
    assert (got.k_scale[1, 0] == 1.0).all() and (ks.similarity[1, 0] == 0).all()
    assert got.v_scale[0, 2, 5] == 1.0
    assert not any(t.isnan().any() for t in (qs.mean, qs.similarity, ks.mean, ks.similarity))


def case_channel_stats_in_chunks():
    """The channel statistics as a split reduction over several chunks (the last one partial),
    with GQA, D 256 and chunks longer than the minimum; a zero and a constant K channel, a zero V
    channel; a second run gives the same bits."""
    _fresh_seed()
    _poison_allocations()
    from sparge.kernels import prepass
    from sparge.kernels.prepass import _chunking, _dim_pad, prepare_qkv

    prepass._ROWS_PER_PARTIAL = 64  # K and V programs of several blocks / tiles at these lengths
    for (b, hq, hk, lq, lk, d, bq, bk), programs, chunking in (
            ((1, 4, 2, 300, 1000, 64, 64, 128), 1024, (256, 4)),
            ((1, 2, 1, 129, 520, 256, 64, 128), 1024, (256, 3)),
            # few programs for the statistics (as with many heads): chunks of 3 tiles of 256
            ((2, 4, 1, 70, 2600, 16, 64, 128), 8, (768, 4))):
        prepass._STATS_PROGRAMS = programs
        assert _chunking(lk, b * hk, _dim_pad(d)) == chunking
        q = torch.randn(b, hq, lq, d).half() * 3
        k = (torch.randn(b, hk, lk, d) * 2 + torch.randn(b, hk, 1, d) * 5).half()
        v = torch.randn(b, hk, lk, d).half() * 4
        k[0, -1, :, 0] = 0
        k[0, 0, :, 1] = 2.5  # mean exactly 2.5: the smoothed channel is zero
        v[0, -1, :, 2] = 0
        for mode in ("int8_fp8", "int8_fp16"):
            check_prepare_qkv(q, k, v, bq, bk, mode)
        runs = [prepare_qkv(q, k, v, block_q=bq, block_k=bk, mode="int8_fp8", with_stats=True)
                for _ in range(2)]
        (first, qs, ks), (again, qs2, ks2) = runs
        assert first.v_scale[0, -1, 2] == 1.0
        assert (first.k[0, 0, :, 1] == 0).all()
        for x, y in ((first.q, again.q), (first.q_scale, again.q_scale), (first.k, again.k),
                     (first.k_scale, again.k_scale), (first.v.view(torch.uint8),
                                                      again.v.view(torch.uint8)),
                     (first.v_scale, again.v_scale), (qs.mean, qs2.mean),
                     (qs.similarity, qs2.similarity), (ks.mean, ks2.mean),
                     (ks.similarity, ks2.similarity)):
            assert torch.equal(x, y)


def check_rounding_ties(device):
    """Values on exact rounding ties: INT8 (x.5) and FP8 (midpoints of the e4m3 grid, normal
    and subnormal, both signs) round half-to-even like torch.round and torch's FP8 cast (on the
    GPU, V's conversion is the hardware's; in the interpreter, a rounding in float32 first)."""
    from sparge.kernels.layout import fp8_v_natural
    from sparge.kernels.prepass import prepare_qkv
    from sparge.quant import quantize_qkv

    # Q block with amax 127 -> scale 1: entries k + 0.5 are exact ties, every one of them here.
    ties = torch.arange(-126, 126, dtype=torch.float32) + 0.5
    q = ties[torch.randperm(ties.numel())].repeat(17)[:64 * 64].reshape(1, 1, 64, 64)
    q[..., 0, 0] = 127.0
    q = q.half()
    # V channel with amax 448 -> scale 1: midpoints between neighbouring e4m3 values.
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) / 2
    col = torch.cat([mids, -mids, torch.tensor([448.0, -0.0, 0.0, -2.0 ** -10])])
    v = col[torch.randperm(col.numel())][:, None].repeat(1, 64)
    v[0] = 448.0
    v = v.reshape(1, 1, -1, 64).half().float()
    length = v.shape[2]
    k = torch.randn(1, 1, length, 64).half()
    got, _, _ = prepare_qkv(q.to(device), k.to(device), v.to(device), block_q=64, block_k=64,
                            mode="int8_fp8", with_stats=False)
    ref = quantize_qkv(q, k, v, block_q=64, block_k=64, mode="int8_fp8")
    assert torch.equal(got.q.cpu(), ref.q)
    assert torch.equal(fp8_v_natural(got.v, length).cpu().view(torch.uint8),
                       ref.v.view(torch.uint8))
    # and the ties were real: half of them went down
    assert torch.equal(got.q.cpu().float(), torch.round(q.float()))


def case_rounding_ties_to_even():
    _fresh_seed()
    _poison_allocations()
    check_rounding_ties("cpu")


def check_extreme_scales(device):
    """INT8 blocks whose scales leave the reciprocal's range (sparge.quant.RECIPROCAL_MIN and
    RECIPROCAL_MAX, 2^-90 and 2^90), where values are divided by the scale: tiny and huge
    magnitudes, and subnormal scales, whose rounding lets quotients pass 127.5 before the clamp.
    float32 inputs; no zero values (where a scale underflows to zero, 0 / 0 is NaN, whose INT8
    value no specification fixes)."""
    from sparge.kernels.prepass import prepare_qkv
    from sparge.quant import quantize_int8_per_block

    magnitudes = [1.0, 1e-30, 1e30, 1e-39]
    x = torch.randn(1, 1, 64 * len(magnitudes), 16)
    x = x.sign() * (x.abs() + 0.1)
    # and a block of subnormals k * 2^-149, 1 <= |k| <= 180: its scale, 180 / 127 units rounded,
    # is one unit, so its quotients reach 180
    units = torch.randint(1, 181, (1, 1, 64, 16)) * (torch.randint(0, 2, (1, 1, 64, 16)) * 2 - 1)
    units[0, 0, 0, 0] = 180
    q = torch.cat([b * m for b, m in zip(x.split(64, dim=2), magnitudes, strict=True)]
                  + [units.float() * 2.0 ** -149], dim=2)
    k, v = (torch.randn_like(q) for _ in range(2))
    got, _, _ = prepare_qkv(q.to(device), k.to(device), v.to(device), block_q=64, block_k=64,
                            mode="int8_fp8", with_stats=False)
    values, scales = quantize_int8_per_block(q, 64)
    assert torch.equal(got.q_scale.cpu(), scales)
    assert torch.equal(got.q.cpu(), values)
    # the cases were real: scales below 2^-90 and above 2^90, and a block the clamp saturates
    assert scales.min() < 2.0 ** -90 and scales.max() > 2.0 ** 90
    assert (q[:, :, 256:] / scales[..., 4]).abs().max() > 127.5


def check_times_reciprocal(device, per_scale):
    """The kernels' division by a scale (sparge.kernels.rounding: reciprocal, times_reciprocal
    for FP8's float32 quotients, to_int8) against its specification (sparge.quant: reciprocal,
    times_reciprocal, int8_values), bit for bit: on values at and next to the rounding points
    (half-integers, midpoints of the e4m3 grid), random quotients and signed zeros, for scales
    across the reciprocal's range, at its edges and outside it (IEEE division there), one scale
    per row and one per channel (all in the range, or some out of it). ``per_scale``: values per
    scale, a multiple of 1024."""
    import triton
    import triton.language as tl

    from sparge import quant
    from sparge.kernels.rounding import reciprocal, times_reciprocal, to_int8
    from sparge.quant import FP8_DTYPE

    # A jit function finds the functions it calls among its module's globals.
    globals().update(reciprocal=reciprocal, times_reciprocal=times_reciprocal, to_int8=to_int8)

    @triton.jit
    def scalar_scale(x_ptr, s_ptr, out_ptr, int8_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = row * n + tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        s = tl.load(s_ptr + row)
        r = reciprocal(s)
        x = tl.load(x_ptr + offs)
        tl.store(out_ptr + offs, times_reciprocal(x, s, r, r > 0))
        tl.store(int8_ptr + offs, to_int8(x, s, r))

    @triton.jit
    def channel_scales(x_ptr, s_ptr, out_ptr, N: tl.constexpr, C: tl.constexpr):
        offs = (tl.program_id(0) * N + tl.arange(0, N))[:, None] * C + tl.arange(0, C)[None, :]
        s = tl.load(s_ptr + tl.arange(0, C))
        r = reciprocal(s)
        out = times_reciprocal(tl.load(x_ptr + offs), s[None, :], r[None, :], tl.min(r, 0) > 0)
        tl.store(out_ptr + offs, out)

    gen = torch.Generator().manual_seed(_fresh_seed())
    exps = torch.cat([torch.randint(-95, 96, (44,), generator=gen).float(),
                      torch.tensor([-90.0, 90.0, -91.0, 91.0])])
    scales = (torch.rand(48, generator=gen) + 1) * 2.0 ** exps  # in [2^e, 2^(e+1))
    scales[:4] = torch.tensor([1.0, quant.RECIPROCAL_MIN, quant.RECIPROCAL_MAX, 3.0])
    n = per_scale
    # quotients: random in [-127, 127], half-integers and e4m3 midpoints, tiny ones
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).float()
    points = torch.cat([torch.arange(-127, 127) + 0.5, (grid[:-1] + grid[1:]) / 2])
    pick = points[torch.randint(0, points.numel(), (n // 2,), generator=gen)]
    quotients = torch.cat([(torch.rand(n // 4, generator=gen) * 2 - 1) * 127, pick,
                           (torch.rand(n - n // 4 - n // 2, generator=gen) - 0.5) * 2.0 ** -9])
    x = quotients[None, :] * scales[:, None]  # rounded products: quotients at and near the points
    steps = torch.randint(-3, 4, x.shape, generator=gen, dtype=torch.int32)
    x = (x.view(torch.int32) + steps).view(torch.float32)  # and a few ulps either side
    x[:, 0], x[:, 1] = 0.0, -0.0  # signed zeros keep their sign (FP8 has both)
    got = torch.full_like(x, float("nan"), device=device)
    got8 = torch.full(x.shape, -128, dtype=torch.int8, device=device)
    scalar_scale[(x.shape[0], n // 1024)](x.to(device), scales.to(device), got, got8, n,
                                          BLOCK=1024)
    assert torch.equal(got.cpu().view(torch.int32),
                       quant.times_reciprocal(x, scales[:, None]).view(torch.int32))
    # to_int8's domain: the magnitudes of a block whose scale is its amax / 127 (the e4m3
    # midpoints reach 432)
    domain = (x / scales[:, None]).abs() <= 127
    assert domain.float().mean() > 0.8
    assert torch.equal(got8.cpu()[domain],
                       quant.int8_values(x, scales[:, None]).to(torch.int8)[domain])
    in_range = (scales >= quant.RECIPROCAL_MIN) & (scales <= quant.RECIPROCAL_MAX)
    assert in_range.any() and not in_range.all()
    # the cases were real: the INT8 rounding of the float32 product would differ (the exact
    # product is rounded, once)
    twice = torch.round(x * quant.reciprocal(scales)[:, None]).clamp(-127, 127)
    assert ((twice != quant.int8_values(x, scales[:, None])) & domain).any()
    # the product is not the quotient everywhere: the specification is not a division
    assert not torch.equal(quant.times_reciprocal(x, scales[:, None])[in_range],
                           (x / scales[:, None])[in_range])

    # the same quotients with one scale per channel: every scale in the range, or some out of it
    c = 16
    xc_quotients = quotients[: n - n % c].view(-1, c)
    mixed = scales[-c:]  # ends with 2^-90, 2^90, 2^-91 and 2^91 times [1, 2)
    assert (quant.reciprocal(mixed) == 0).any() and (quant.reciprocal(mixed) > 0).any()
    for chan_scales in (scales[4:4 + c].clamp(quant.RECIPROCAL_MIN, quant.RECIPROCAL_MAX),
                        mixed):
        xc = xc_quotients * chan_scales
        xc = (xc.view(torch.int32) + steps[0, : xc.numel()].view_as(xc)).view(torch.float32)
        got_c = torch.full_like(xc, float("nan"), device=device)
        channel_scales[(xc.shape[0] // 64,)](xc.to(device), chan_scales.to(device), got_c,
                                             N=64, C=c)
        assert torch.equal(got_c.cpu().view(torch.int32),
                           quant.times_reciprocal(xc, chan_scales).view(torch.int32))


def case_extreme_scales():
    _fresh_seed()
    _poison_allocations()
    check_extreme_scales("cpu")


def case_division_by_a_scale_as_specified():
    check_times_reciprocal("cpu", per_scale=1024)


def case_interpreted_fma_rounds_once():
    """sparge.kernels.rounding.fma under the interpreter (float64 arithmetic, for Triton versions
    whose interpreted tl.fma rounds the product first) equals a b + c computed exactly and rounded
    once to float32, ties to even: on random triples, on near-cancellations, and on products of
    13-bit factors that land on float32 midpoints, nudged either way by tiny addends or not."""
    from fractions import Fraction

    import numpy as np
    import triton
    import triton.language as tl

    from sparge.kernels.rounding import fma

    globals().update(fma=fma)

    @triton.jit
    def fused(a_ptr, b_ptr, c_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, fma(tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i)))

    def rounded_once(a, b, c):
        out = []
        for x, y, z in zip(a.tolist(), b.tolist(), c.tolist(), strict=True):
            exact = Fraction(x) * Fraction(y) + Fraction(z)
            near = np.float32(float(exact))
            candidates = (np.nextafter(near, np.float32(-np.inf)), near,
                          np.nextafter(near, np.float32(np.inf)))
            out.append(float(min(candidates, key=lambda w: (
                abs(Fraction(float(w)) - exact),
                int(np.array(w, dtype=np.float32).view(np.int32)) & 1))))  # ties to even
        return torch.tensor(out, dtype=torch.float32)

    _fresh_seed()
    n = 2048
    a, b = torch.randn(n), torch.randn(n)
    ka = 1 + torch.randint(0, 4096, (n,)).float() * 2.0 ** -12
    kb = 1 + torch.randint(0, 4096, (n,)).float() * 2.0 ** -12
    steps = torch.randint(-2, 3, (n,)).float()
    signs = torch.randint(0, 2, (n,)).float() * 2 - 1
    cases = {"random": (a, b, torch.randn(n)),
             "cancellation": (a, b, -(a * b) + torch.randn(n) * 1e-6),
             # a nudge the float64 sum holds, and one below its last bit (only TwoSum's error
             # term then tells which way a midpoint goes)
             "midpoints, nudged": (ka, -kb, steps * 2.0 ** -40),
             "midpoints, nudged below float64's precision": (ka, kb * signs, steps * 2.0 ** -60),
             "midpoints, no addend": (ka, kb, torch.zeros(n))}
    for name, (x, y, z) in cases.items():
        got = torch.full((n,), float("nan"))
        fused[(1,)](x, y, z, got, N=n)
        assert torch.equal(got, rounded_once(x, y, z)), name


def case_fp8_v_key_slots():
    """The FP8 V buffer's key slots (sparge.kernels.layout): a permutation within each aligned
    group of 16 keys that puts the four keys a P.V operand thread holds (2q, 2q + 1, 2q + 8,
    2q + 9) in consecutive slots; the kernel's in-register reordering of P, its bitwise slot
    formula and the torch twin agree."""
    import triton
    import triton.language as tl

    from sparge.kernels.layout import fp8_v_natural, pv_slot, pv_slots, to_pv_order

    # A jit function finds the functions it calls among its module's globals.
    globals().update(pv_slot=pv_slot, to_pv_order=to_pv_order)
    slots = pv_slots(64)
    groups = slots.view(4, 16) - torch.arange(0, 64, 16)[:, None]
    assert all(torch.equal(g.sort().values, torch.arange(16)) for g in groups)
    for q in range(4):
        held = torch.tensor([2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9])
        assert torch.equal(slots[held], torch.arange(4 * q, 4 * q + 4))

    @triton.jit
    def reorder(x_ptr, y_ptr, slot_ptr, M: tl.constexpr, N: tl.constexpr):
        rows = tl.arange(0, M)[:, None]
        cols = tl.arange(0, N)
        x = tl.load(x_ptr + rows * N + cols[None, :])
        tl.store(y_ptr + rows * N + cols[None, :], to_pv_order(x))
        tl.store(slot_ptr + cols, pv_slot(cols))

    x = torch.randn(16, 128)
    y = torch.full_like(x, float("nan"))
    got_slots = torch.full((128,), -1, dtype=torch.int32)
    reorder[(1,)](x, y, got_slots, M=16, N=128)
    assert torch.equal(got_slots.long(), pv_slots(128))
    expected = torch.empty_like(x)
    expected[:, pv_slots(128)] = x  # column n lands in slot pv_slot(n)
    assert torch.equal(y, expected)

    # The attention launcher takes FP8 V only as that buffer: a (B, Hk, Lk, D) tensor in key
    # order is refused, not read in the wrong order.
    from sparge.kernels import launch, prepare_qkv

    q, k, v = (torch.randn(1, 1, 100, 32) for _ in range(3))
    quant, _, _ = prepare_qkv(q, k, v, block_q=64, block_k=64, mode="int8_fp8", with_stats=False)
    operands = dict(q=quant.q, k=quant.k, q_scale=quant.q_scale, k_scale=quant.k_scale,
                    v_scale=quant.v_scale, out=torch.empty(1, 1, 100, 32), table=None,
                    block_q=64, block_k=64, causal=False, scale=1.0,
                    pv_threshold=torch.full((1,), math.inf), mode="int8_fp8")
    with pytest.raises(ValueError, match="pre-pass's contiguous FP8 buffer"):
        launch(v=fp8_v_natural(quant.v, 100), **operands)
    launch(v=quant.v, **operands)
    assert torch.isfinite(operands["out"]).all()


def case_stats_only_pass():
    _fresh_seed()
    _poison_allocations()
    from sparge.kernels.prepass import block_stats_gpu
    from sparge.predict import block_stats, smooth_k

    for length, block, d in ((1, 64, 8), (100, 64, 64), (257, 128, 24)):
        x = _smooth_tokens(2, 2, length, d, dtype=torch.float16)
        x[0, 0, 0] = 0
        for smooth in (False, True):
            got = block_stats_gpu(x, block, smooth=smooth)
            ref = block_stats(smooth_k(x) if smooth else x, block)
            torch.testing.assert_close(got.mean, ref.mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.similarity, ref.similarity, rtol=1e-5, atol=1e-5)


def case_selection_matches_reference():
    _fresh_seed()
    _poison_allocations()
    for b, hq, hk, lq, lk, d, bq, bk in ((1, 4, 2, 300, 517, 32, 64, 128),
                                         (2, 2, 1, 64, 700, 16, 64, 64),
                                         (1, 2, 2, 400, 200, 24, 128, 64)):
        q = _smooth_tokens(b, hq, lq, d)
        k = _smooth_tokens(b, hk, lk, d)
        q[0, 0, :64] = 0  # a zero query block: dissimilar, its whole row is forced on
        for sel in selections(hq, "cpu"):
            for causal in (False, True):
                check_selection_matches(q, k, sel, bq, bk, causal)


def case_causal_selection_over_the_rows_prefix():
    """Under causal masking the kernel selects each row over 16, 32 or 64 of its 40 key blocks
    (NKP 64), by where the diagonal ends the row, and writes the blocks after them as dropped:
    the same blocks as the reference, for both rules and per-head thresholds."""
    _fresh_seed()
    _poison_allocations()
    q = _smooth_tokens(1, 2, 2560, 16)
    k = _smooth_tokens(1, 1, 2530, 16)
    for sel in selections(2, "cpu")[2:4]:
        check_selection_matches(q, k, sel, 128, 64, causal=True)


def case_causal_selection_keeps_rows_with_non_finite_scores():
    """A NaN or an infinity among a row's pooled scores keeps every causally valid block of the
    row, as in the reference, wherever the value lies: before the diagonal, after it within the
    16 or 32 blocks the kernel selects the row over, or past them. The value sits in one pooled
    product alone (an overflow of two finite means), and the same rows without it drop
    blocks."""
    from sparge.kernels.select import select_blocks_gpu
    from sparge.predict import BlockStats, Selection, select_blocks

    _fresh_seed()
    _poison_allocations()
    n, d = 40, 16  # 40 key blocks: rows over 16, 32 or 64 (NKP) of them
    kw = dict(q_len=n * 64, k_len=n * 64, block_q=64, block_k=64, causal=True)
    ones = torch.ones(1, 1, n)
    sel = Selection(0.5, 0.3)
    # (row, column): past the row's 16 blocks; after the diagonal within 32; before it
    for row, column in ((10, 30), (20, 25), (35, 20)):
        for value in (math.inf, math.nan):
            q_mean, k_mean = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
            plain = select_blocks_gpu(BlockStats(q_mean, ones), BlockStats(k_mean, ones), sel,
                                      **kw).blocks[0, 0, row, :row + 1]
            assert not plain.all()  # the row drops blocks when its scores are finite
            q_mean[0, 0, row, :2] = 1e30
            k_mean[0, 0, column, :2] = 1e30 if value == math.inf else torch.tensor([1e30, -1e30])
            qs, ks = BlockStats(q_mean, ones), BlockStats(k_mean, ones)
            got = select_blocks_gpu(qs, ks, sel, **kw).blocks
            ref = select_blocks(qs, ks, sel, **kw).blocks
            assert torch.equal(got, ref), (row, column, value)
            assert got[0, 0, row, :row + 1].all() and not got[0, 0, row, row + 1:].any()


def check_cdf_threshold_one(device):
    """cdf_threshold=1 keeps every block of every row, in the kernel as in the reference, although
    many rows' float32 cumulative sums end above 1 (rows of 2 to 9 blocks with random scores:
    query block i scores key block j by k_mean[j, i]); as a number and as a per-head tensor."""
    from sparge.kernels.select import select_blocks_gpu
    from sparge.predict import BlockStats, Selection, select_blocks

    n_q = 16
    q_mean = torch.zeros(1, 1, n_q, n_q, device=device)
    q_mean[0, 0, range(n_q), range(n_q)] = math.sqrt(n_q)
    q_stats = BlockStats(q_mean, torch.ones(1, 1, n_q, device=device))
    above_one = 0
    for _ in range(20):  # fresh scores until a row's sum rounds above 1 (most draws have one)
        for n_k in (2, 3, 5, 9):
            k_mean = torch.randn(1, 1, n_k, n_q, device=device)
            k_stats = BlockStats(k_mean, torch.ones(1, 1, n_k, device=device))
            probs = torch.softmax(k_mean[0, 0].T, dim=-1).sort(dim=-1, descending=True).values
            above_one += int((probs.cumsum(-1)[:, -1] > 1.0).sum())
            kw = dict(q_len=n_q * 64, k_len=n_k * 64, block_q=64, block_k=64)
            for tau in (1.0, torch.ones(1, device=device)):
                for select in (select_blocks, select_blocks_gpu):
                    mask = select(q_stats, k_stats, Selection(0.0, tau), **kw)
                    assert bool(mask.blocks.all()), (select.__name__, n_k, mask.blocks)
        if above_one:
            break
    assert above_one > 0  # the rounding this guards against did occur


def case_cdf_threshold_one_keeps_every_block():
    _fresh_seed()
    check_cdf_threshold_one("cpu")


def check_selection_long_rows(n_k, device):
    """One row of n_k key blocks as the reference selects it. The leading blocks (300, or half
    of a shorter row) share the top score, so both rules cut inside the tie, where the rank by
    index decides."""
    from sparge.kernels.select import select_blocks_gpu
    from sparge.predict import BlockStats, Selection, select_blocks

    q_mean = torch.randn(1, 1, 1, 16, device=device)
    q_stats = BlockStats(q_mean, torch.rand(1, 1, 1, device=device))
    k_mean = torch.randn(1, 1, n_k, 16, device=device) * 0.1
    k_mean[..., :min(300, n_k // 2), :] = q_mean[0, 0, 0]
    k_stats = BlockStats(k_mean, torch.rand(1, 1, n_k, device=device))
    kw = dict(q_len=64, k_len=n_k * 64, block_q=64, block_k=64)
    for sel in (Selection(0.2, 0.6), Selection(0.2, None, 0.01, True)):
        got = select_blocks_gpu(q_stats, k_stats, sel, **kw)
        ref = select_blocks(q_stats, k_stats, sel, **kw)
        assert torch.equal(got.blocks, ref.blocks)


def case_pooled_products_kernel():
    """The pooled products' kernel (IEEE float32 in the interpreter): odd block counts, GQA, a
    head dimension that is not a power of two, one of 256 (four steps over D), and one query
    block; its output poisoned before it writes."""
    _fresh_seed()
    _poison_allocations()
    check_pooled_products([(2, 4, 2, 5, 70, 96), (1, 2, 2, 130, 9, 64), (1, 3, 1, 1, 3, 256)],
                          "cpu", "ieee")


def case_selection_long_rows():
    """Rows of 100 key blocks (the top-k cut by a sort) and of 1000 (by bisection) in the kernel;
    rows past the kernel's limit (lowered here) take the reference's path."""
    _fresh_seed()
    from sparge.kernels import select

    for n_k in (100, 1000):
        check_selection_long_rows(n_k, "cpu")
    select._MAX_SORTED_BLOCKS = 512
    check_selection_long_rows(1000, "cpu")


def case_selection_is_not_trivial():
    """The structured data exercises the rule: some blocks are dropped, some kept."""
    _fresh_seed()
    from sparge.kernels.select import predict_mask_gpu
    from sparge.predict import Selection

    q, k = _smooth_tokens(1, 2, 1024, 32), _smooth_tokens(1, 2, 1024, 32)
    mask = predict_mask_gpu(q, k, Selection(0.5, 0.5), block_q=64, block_k=64)
    assert 0.2 < mask.sparsity() < 0.99


def case_lookup_table():
    _fresh_seed()
    _poison_allocations()
    for shape, p in (((2, 3, 5, 37), 0.3), ((1, 2, 4, 1), 0.5), ((1, 1, 3, 16), 0.9),
                     ((1, 2, 2, 300), 0.05)):
        blocks = torch.rand(shape) < p
        blocks[0, 0, 0] = False  # an empty row
        blocks[0, -1, -1] = True  # a full row
        check_lut(blocks)
        check_lut(blocks.to(torch.int32) * 3)  # integer maps: non-zero = kept
    # broadcast (stride 0) and transposed views
    row = torch.rand(1, 1, 4, 20) < 0.4
    check_lut(row.expand(2, 3, 4, 20))
    check_lut((torch.rand(1, 2, 20, 6) < 0.5).transpose(2, 3))
    from sparge.mask import SparseMask, num_blocks

    # the attention kernel's table, with partial last key blocks, causal or not, block sizes apart
    for bq, bk, lq, lk, causal in ((64, 128, 300, 333, False), (64, 128, 300, 333, True),
                                   (128, 64, 500, 256, True), (64, 64, 64, 1, True)):
        blocks = torch.rand(2, 3, num_blocks(lq, bq), num_blocks(lk, bk)) < 0.6
        check_mask_table(SparseMask(blocks, bq, bk, lq, lk, causal))


def case_custom_op_and_compile():
    """The custom op equals the reference pipeline, passes opcheck, and compiles without a graph
    break (aot_eager: no C++ compiler needed)."""
    _fresh_seed()
    from sparge import quant
    from sparge.kernels import ops
    from sparge.kernels.prepass import channel_mean
    from sparge.predict import Selection, per_head, predict_mask_reference
    from sparge.reference import attention_reference

    b, hq, hk, length, d = 1, 2, 1, 150, 32
    q, k, v = (torch.randn(b, h, length, d) for h in (hq, hk, hk))
    lam = per_head(50.0, hq, q.device)
    sim, rule = per_head(-1.0, hq, q.device), per_head(0.5, hq, q.device)
    args = (q, k, v, lam, sim, rule, None, False, False, True, d ** -0.5, 64, 64, "int8_fp16",
            "HND", torch.float32)
    out = ops.sparse_attention(*args)
    mask = predict_mask_reference(q, k, Selection(-1.0, 0.5), block_q=64, block_k=64,
                                  causal=True)
    # The reference smooths K by the kernels' channel mean (smooth_k's up to float32 rounding,
    # which check_prepare_qkv covers), so that both sides hold the same INT8 K.
    quant.smooth_k = lambda x: x.float() - channel_mean(x)[:, :, None, :]
    ref = attention_reference(q, k, v, mask, scale=d ** -0.5, pv_threshold=lam,
                              mode="int8_fp16")
    # FP16 P: the last bit of exp2 (numpy's in the interpreter vs torch's) now and then moves
    # one P across an fp16 rounding midpoint, which moves its row by up to ~2**-11 of the
    # output's scale (seen: 1.2e-4 to 2.5e-4); any indexing or masking error is O(1).
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.library.opcheck(torch.ops.sparge.sparse_attention.default, args)

    def fn(q, k, v):
        return torch.ops.sparge.sparse_attention(q * 1.0, k, v, *args[3:]) + 1.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), out + 1.0, rtol=1e-5, atol=1e-5)
    # NHD layout and a given block mask through the same op
    blocks = mask.blocks.clone()
    nhd = ops.sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lam,
                               None, None, blocks, False, False, True, d ** -0.5, 64, 64,
                               "int8_fp16", "NHD", torch.float32)
    assert nhd.shape == (b, length, hq, d)
    torch.testing.assert_close(nhd.transpose(1, 2), out, rtol=0, atol=0)  # same arithmetic


CPU_CASES = sorted(name for name in dict(globals()) if name.startswith("case_"))


@pytest.mark.parametrize("case", CPU_CASES)
def test_interpreted(case):
    pytest.importorskip("triton")
    _interpreted(case)


def test_v_launch_pipelines_its_tiles_on_hopper_only():
    """V's launch of its own software-pipelines its FP8 tile loop on Hopper, where it was
    measured faster, and nowhere else (the interpreter included); the other launches never."""
    pytest.importorskip("triton")
    from sparge.kernels.prepass import _launch_shape

    assert _launch_shape(False, False, (9, 0)).v_stages == 3
    for capability in (None, (8, 0), (8, 9), (10, 0), (12, 0)):
        assert _launch_shape(False, False, capability).v_stages == 1, capability
    for stats in (False, True):
        assert _launch_shape(stats, True, (9, 0)).v_stages == 1


# ------------------------------------------------------------------------------ GPU tests
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [
    (2, 8, 2, 4096 + 37, 3000, 128, 64, 128),
    (1, 4, 4, 1031, 1031, 96, 128, 64),
    (1, 2, 1, 777, 2049, 256, 64, 64),
    (1, 3, 1, 1, 5, 64, 64, 128),
])
def test_prepare_qkv_gpu(dtype, shape, monkeypatch):
    _fresh_seed()
    _poison_allocations(monkeypatch)
    launches = _quantize_launches(monkeypatch)
    b, hq, hk, lq, lk, d, bq, bk = shape
    q = torch.randn(b, lq, hq, d, device="cuda").to(dtype).transpose(1, 2) * 3
    k = (torch.randn(b, hk, lk, d, device="cuda") + torch.randn(b, hk, 1, d, device="cuda") * 4)
    k = k.to(dtype)
    v = torch.randn(b, hk, lk, d, device="cuda").to(dtype)
    q[:, :, :min(lq, bq)] = 0  # a zero block
    v[..., 0] = 0  # a zero channel
    for mode in ("int8_fp8", "int8_fp16"):
        launches.clear()
        check_prepare_qkv(q, k, v, bq, bk, mode)
        if mode == "int8_fp8" or dtype != torch.float16:  # a V job: quantize, or cast
            assert launches[:2] == [("MV", 4), ("QK", 1)], launches
        else:  # float16 V for FP16 P.V: no V job; K's mean in a launch of its own, then Q and K
            assert launches == [("M", 4), ("QK", 1)], launches


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dim", [64, 128])
def test_launch_arrangements_gpu(dim, monkeypatch):
    _fresh_seed()
    _poison_allocations(monkeypatch)
    q, k, v = (torch.randn(2, h, 3000 + 17, dim, device="cuda", dtype=torch.bfloat16)
               for h in (8, 2, 2))
    check_launch_arrangements(q, k * 2 + 5, v, 64, 128, _quantize_launches(monkeypatch))


@pytest.mark.gpu
@gpu
def test_mask_table_gpu(monkeypatch):
    _fresh_seed()
    _poison_allocations(monkeypatch)
    from sparge.mask import SparseMask, num_blocks

    for causal in (False, True):
        lq, lk = 4096 + 77, 8192 + 5
        blocks = torch.rand(2, 4, num_blocks(lq, 64), num_blocks(lk, 128), device="cuda") < 0.3
        check_mask_table(SparseMask(blocks, 64, 128, lq, lk, causal))


@pytest.mark.gpu
@gpu
def test_rounding_ties_gpu(monkeypatch):
    _fresh_seed()
    _poison_allocations(monkeypatch)
    check_rounding_ties("cuda")


@pytest.mark.gpu
@gpu
def test_extreme_scales_gpu(monkeypatch):
    _fresh_seed()
    _poison_allocations(monkeypatch)
    check_extreme_scales("cuda")


@pytest.mark.gpu
@gpu
def test_division_by_a_scale_gpu():
    check_times_reciprocal("cuda", per_scale=1 << 16)


@pytest.mark.gpu
@gpu
def test_prepare_qkv_gpu_large_values():
    _fresh_seed()
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(1, 2, 333, 128, device="cuda").mul(1e4).to(dtype)
                   for _ in range(3))
        from sparge.kernels.prepass import prepare_qkv

        got, qs, ks = prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8",
                                  with_stats=True)
        for t in (got.q_scale, got.k_scale, got.v_scale, got.v.float(), qs.mean, qs.similarity,
                  ks.mean, ks.similarity):
            assert torch.isfinite(t).all()
        check_prepare_qkv(q, k, v, 64, 128, "int8_fp8")


@pytest.mark.gpu
@gpu
def test_prepare_qkv_gpu_deterministic():
    """The split reductions have no atomics: a second run gives the same bits."""
    from sparge.kernels.prepass import prepare_qkv

    q = torch.randn(1, 8, 20000, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 20000, 128, device="cuda", dtype=torch.bfloat16) + 1
            for _ in range(2))
    runs = [prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8", with_stats=True)
            for _ in range(2)]
    (a, qa, ka), (b, qb, kb) = runs
    for x, y in ((a.q, b.q), (a.q_scale, b.q_scale), (a.k, b.k), (a.k_scale, b.k_scale),
                 (a.v.view(torch.uint8), b.v.view(torch.uint8)), (a.v_scale, b.v_scale),
                 (qa.mean, qb.mean), (qa.similarity, qb.similarity), (ka.mean, kb.mean),
                 (ka.similarity, kb.similarity)):
        assert torch.equal(x, y)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_selection_gpu(causal, monkeypatch):
    _fresh_seed()
    _poison_allocations(monkeypatch)
    for b, hq, hk, lq, lk, d, bq, bk in ((2, 8, 2, 4096 + 37, 3000, 128, 64, 128),
                                         (1, 4, 1, 1000, 8192, 96, 128, 64)):
        q = _smooth_tokens(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
        k = _smooth_tokens(b, hk, lk, d, device="cuda", dtype=torch.bfloat16)
        q[0, 0, :bq] = 0
        for sel in selections(hq, "cuda"):
            check_selection_matches(q, k, sel, bq, bk, causal, max_diff=1e-3)


@pytest.mark.gpu
@gpu
def test_pooled_products_gpu(monkeypatch):
    """The products kernel at the pipeline's sizes (L32768 at block_q 64 and block_k 128,
    GQA, D 64 to 256), and its shorter edge cases."""
    _fresh_seed()
    _poison_allocations(monkeypatch)
    check_pooled_products([(1, 8, 2, 512, 256, 128), (2, 4, 4, 129, 33, 96),
                           (1, 2, 1, 64, 512, 256), (1, 3, 3, 1, 1, 64)], "cuda")


@pytest.mark.gpu
@gpu
def test_cdf_threshold_one_keeps_every_block_gpu():
    _fresh_seed()
    check_cdf_threshold_one("cuda")


@pytest.mark.gpu
@gpu
def test_selection_gpu_long_rows():
    """Rows of 600 to 4096 key blocks (two, four and eight warps a program; shorter rows, in one
    warp, are the other selection tests'; 4096 is the longest row the kernel sorts) and of 4097,
    the reference's path."""
    _fresh_seed()
    for n_k in (600, 1000, 2000, 4096, 4097):
        check_selection_long_rows(n_k, "cuda")


@pytest.mark.gpu
@gpu
def test_lookup_table_gpu(monkeypatch):
    _fresh_seed()
    _poison_allocations(monkeypatch)
    for p in (0.0, 0.1, 0.5, 1.0):
        blocks = torch.rand(2, 8, 512, 256, device="cuda") < p
        blocks[:, :, 7] = False
        check_lut(blocks)
    for n_k in (1000, 2000, 4000):  # two, four and eight warps a program
        check_lut(torch.rand(1, 2, 16, n_k, device="cuda") < 0.3)


@pytest.mark.gpu
@gpu
def test_prepass_and_selection_do_not_synchronise():
    from sparge.kernels.prepass import prepare_qkv
    from sparge.kernels.select import block_map_to_lut, predict_mask_gpu, select_blocks_gpu

    q, k, v = (_smooth_tokens(1, 4, 2000, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    sel = selections(4, "cuda")
    for warm in (True, False):  # the first call compiles (which may synchronise)
        if not warm:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for s in sel:
                quant, qs, ks = prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8",
                                            with_stats=True)
                mask = select_blocks_gpu(qs, ks, s, q_len=2000, k_len=2000, block_q=64,
                                         block_k=128, causal=True)
                block_map_to_lut(mask.blocks)
                predict_mask_gpu(q, k, s, block_q=64, block_k=128)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
def test_prepass_selection_lut_capture():
    """Pre-pass + selection + lookup table in a CUDA graph: replay on new inputs equals eager."""
    from sparge.kernels.prepass import prepare_qkv
    from sparge.kernels.select import block_map_to_lut, select_blocks_gpu
    from sparge.predict import Selection

    shape = (1, 4, 3000, 128)
    static = [_smooth_tokens(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    sel = Selection(0.5, torch.full((4,), 0.9, device="cuda"))

    def pipeline():
        quant, qs, ks = prepare_qkv(*static, block_q=64, block_k=128, mode="int8_fp8",
                                    with_stats=True)
        mask = select_blocks_gpu(qs, ks, sel, q_len=3000, k_len=3000, block_q=64, block_k=128)
        return (quant.q, quant.q_scale, quant.k, quant.k_scale, quant.v, quant.v_scale,
                mask.blocks, *block_map_to_lut(mask.blocks))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pipeline()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = pipeline()
    for t, new in zip(static, (_smooth_tokens(*shape, device="cuda", dtype=torch.bfloat16)
                               for _ in range(3)), strict=True):
        t.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = pipeline()
    for a, b in zip(outs, eager, strict=True):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_attn_cuda_graph_capture(causal):
    """The whole public pipeline (sparse_attn, return_stats=False) captures and replays."""
    import sparge

    shape = (1, 8, 4000, 128)
    q, k, v = (_smooth_tokens(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kw = dict(sim_threshold=0.5, cdf_threshold=torch.full((8,), 0.9, device="cuda"),
              is_causal=causal)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sparge.sparse_attn(q, k, v, **kw)  # compiles and tunes outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparge.sparse_attn(q, k, v, **kw)
    for t in (q, k, v):
        t.copy_(_smooth_tokens(*shape, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    eager = sparge.sparse_attn(q, k, v, **kw)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    # and it is the right attention: close to the reference path on the same inputs
    ref = sparge.sparse_attn(q, k, v, backend="reference", **kw)
    assert (out.float() - ref.float()).abs().sum() / ref.float().abs().sum() < 0.02


@pytest.mark.gpu
@gpu
def test_torch_compile_fullgraph_gpu():
    from sparge.kernels import ops
    from sparge.predict import per_head

    b, hq, hk, length, d = 1, 8, 2, 2000, 128
    q, k, v = (_smooth_tokens(b, h, length, d, device="cuda", dtype=torch.bfloat16)
               for h in (hq, hk, hk))
    lam = per_head(50.0, hq, q.device)
    sim, rule = per_head(0.5, hq, q.device), per_head(0.9, hq, q.device)

    def fn(q, k, v):
        o = torch.ops.sparge.sparse_attention(q, k, v, lam, sim, rule, None, False, False, True,
                                              d ** -0.5, 64, 128, "int8_fp8", "HND",
                                              torch.bfloat16)
        return o * 2.0

    eager = ops.sparse_attention(q, k, v, lam, sim, rule, None, False, False, True, d ** -0.5, 64,
                                 128, "int8_fp8", "HND", torch.bfloat16) * 2.0
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=0)
    assert math.isfinite(float(eager.float().abs().sum()))
