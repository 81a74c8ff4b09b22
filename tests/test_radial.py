"""RadialAttention masks against an independent encoding of the upstream definition, and the radial
attention entry points against exact attention under the token-level mask."""

from __future__ import annotations

import pytest
import torch

from conftest import exact_attention, rel_l1
from sparge.patterns import regrid, to_flex_block_mask
from sparge.radial import MaskMap, RadialAttention, radial_attn, radial_block_mask, radial_mask


# --------------------------------------------------------------- upstream definition, re-encoded
def upstream_window(dist, tpf, block, decay, model):
    """The spatial window of a frame pair, as radial-attention's get_window_width defines it."""
    if model == "wan" and dist == 0:
        return tpf
    if model == "wan" and dist == 1:
        return tpf // 2
    if model == "hunyuan" and dist <= 1:
        return tpf
    length = 2 ** tpf.bit_length() / 2 ** dist.bit_length() * decay
    return length if length >= block else block


def upstream_split(dist, tpf):
    """get_diagonal_split_mask: whether the frame pair is computed (threshold 128, fixed)."""
    length = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
    if length >= 128:
        return True
    return dist % int(128 / length) == 0


def upstream_mask(seq_len, video_len, frames, block, decay, model):
    """The block mask built the way upstream builds it: a token-level mask per frame pair, padded
    to its block offsets, shrunk by column densities, OR-ed in; text blocks dense. Blocks that would
    land past the end of the mask are cut (upstream raises there). Returns (ceil(S/b),) * 2, the
    rows and columns from S // b on dense."""
    tpf = video_len // frames
    k = -(-tpf // block)
    n = seq_len // block
    out = torch.zeros(n + k, n + k, dtype=torch.bool)
    r = torch.arange(tpf)[:, None]
    c = torch.arange(tpf)[None, :]
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if model == "wan" and j == 0:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                local = (torch.abs(c - r) <= upstream_window(dist, tpf, block, decay, model))
                local = local & upstream_split(dist, tpf)
            off_r, off_c = (i * tpf) % block, (j * tpf) % block
            padded = torch.zeros(off_r + k * block, off_c + k * block, dtype=torch.bool)
            padded[off_r:off_r + tpf, off_c:off_c + tpf] = local
            cut = padded[:k * block, :k * block].reshape(k, block, k, block)
            density = cut.sum(dim=1) / block  # (k, k, block): per column, fraction of rows
            frac = (density > 1 / 3).sum(-1) / ((density > 0).sum(-1) + 1e-9)
            r0, c0 = (i * tpf) // block, (j * tpf) // block
            out[r0:r0 + k, c0:c0 + k] |= frac > 0.6
    border = video_len // block
    out[border:, :] = True
    out[:, border:] = True
    full = torch.ones(-(-seq_len // block), -(-seq_len // block), dtype=torch.bool)
    full[:n, :n] = out[:n, :n]
    return full


SHAPES = [  # (seq_len, video_len, frames, block, decay, model)
    (1024, 1024, 8, 128, 1.0, "hunyuan"),  # one block per frame
    (8 * 300 + 70, 8 * 300, 8, 64, 1.0, "wan"),  # frames straddle blocks, text tail
    (6 * 130 + 100, 6 * 130, 6, 128, 2.0, "wan"),  # frame content cut at K * b rows
    (400, 400, 10, 64, 1.0, "hunyuan"),  # frames smaller than a block
    (12 * 200 + 33, 12 * 200, 12, 128, 0.5, "wan"),
    (5 * 1000 + 256, 5 * 1000, 5, 128, 0.3, "hunyuan"),  # float window
    (7 * 333 + 5, 7 * 333 + 5, 7, 64, 1.0, "wan"),  # video_len not a multiple of frames
    (16 * 256, 16 * 256, 16, 128, 1.0, "wan"),
    (16 * 256, 16 * 256, 16, 64, 0.7, "hunyuan"),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_radial_mask_matches_upstream_definition(shape):
    assert torch.equal(radial_block_mask(*shape), upstream_mask(*shape))


def test_hand_computed_hunyuan_mask():
    # HunyuanVideo, 128 tokens per frame and 128-token blocks: one block per frame. Windows are
    # at least one block wide, so a frame pair is kept iff the split rule keeps its distance:
    # d <= 1 always; 2 ** bit_length(128) = 256, so d = 2, 3 have 256 / 4 = 64 < 128 and split
    # factor 2 (keep d = 2), d = 4..7 have 32 and split factor 4 (keep d = 4).
    mask = radial_block_mask(8 * 128, 8 * 128, 8, 128, 1.0, "hunyuan")
    d = (torch.arange(8)[:, None] - torch.arange(8)[None, :]).abs()
    expected = (d <= 2) | (d == 4)
    assert torch.equal(mask, expected)
    # Wan adds the first-frame sink; at d = 1 its window is tpf // 2 = 64 (>1/3 of 128 rows in
    # more than 60 % of the columns: kept).
    wan = radial_block_mask(8 * 128, 8 * 128, 8, 128, 1.0, "wan")
    expected[:, 0] = True
    assert torch.equal(wan, expected)


@pytest.mark.parametrize("model", ["wan", "hunyuan"])
def test_radial_mask_properties(model):
    tpf, frames, block, text = 384, 9, 128, 77
    video = tpf * frames
    mask = radial_block_mask(video + text, video, frames, block, 1.0, model)
    n, border = -(-(video + text) // block), video // block
    assert mask.shape == (n, n)
    assert bool(mask[border:].all()) and bool(mask[:, border:].all())  # text is dense
    assert bool(mask.diagonal().all())
    per_frame = tpf // block
    frame_of = torch.arange(border) // per_frame
    full_window = (frame_of[:, None] - frame_of[None, :]).abs() <= (1 if model == "hunyuan" else 0)
    assert bool(mask[:border, :border][full_window].all())  # d <= 1 (Hunyuan), d = 0 (Wan)
    assert bool(mask[:border, :per_frame].all()) == (model == "wan")  # the sink
    assert 0.2 < 1 - mask.float().mean() < 0.9


def test_cache_returns_copies():
    shape = (2000, 1920, 6, 64, 1.0, "wan")
    first = radial_block_mask(*shape)
    first.fill_(False)
    again = radial_block_mask(*shape)
    assert torch.equal(again, upstream_mask(*shape))
    assert again.data_ptr() != radial_block_mask(*shape).data_ptr()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="model_type"):
        radial_block_mask(1024, 1024, 8, 128, 1.0, "cogvideo")
    with pytest.raises(ValueError, match="block_size"):
        radial_block_mask(1024, 1024, 8, 256)
    with pytest.raises(ValueError, match="seq_len"):
        radial_block_mask(1000, 1024, 8)
    with pytest.raises(ValueError, match="decay_factor"):
        radial_block_mask(1024, 1024, 8, decay_factor=0.0)


@pytest.mark.parametrize("block_size", [128, 64])
def test_kernel_granularities(block_size):
    shape = dict(seq_len=5 * 300 + 50, video_len=1500, num_frames=5, block_size=block_size,
                 model_type="hunyuan")
    base = radial_mask(**shape)
    assert (base.block_q, base.block_k) == (block_size, block_size)
    tokens = base.to_token_mask()
    for bq, bk in [(64, 128), (128, 128), (64, 64), (128, 64)]:
        mask = radial_mask(**shape, block_q=bq, block_k=bk)
        converted = mask.to_token_mask()
        if bq <= block_size and bk <= block_size:  # refining: the same token pairs
            assert torch.equal(converted, tokens)
        else:  # coarsening from 64: covering
            assert bool((converted >= tokens).all())
            assert torch.equal(mask.blocks, regrid(base, bq, bk).blocks)


def test_kv_len_drops_padded_keys():
    mask = radial_mask(1000, 800, 4, block_size=64, kv_len=900, model_type="hunyuan")
    assert (mask.q_len, mask.k_len) == (1000, 900)
    full = radial_mask(1000, 800, 4, block_size=64, model_type="hunyuan")
    assert torch.equal(mask.to_token_mask(), full.to_token_mask()[..., :900])


# ---------------------------------------------------------------------------------- attention
def nhd(x):
    return x.transpose(1, 2)


@pytest.mark.parametrize("model,video,frames,text,kv_len,block_size", [
    ("wan", 6 * 200, 6, 0, None, 64),
    ("hunyuan", 4 * 200, 4, 90, 850, 128),
    ("hunyuan", 5 * 100, 5, 30, None, 64),
])
def test_radial_attn_matches_masked_attention(rng, model, video, frames, text, kv_len,
                                              block_size):
    seq = video + text
    q, k, v = (torch.randn(2, seq, 2, 32, generator=rng) for _ in range(3))
    out, stats = radial_attn(q, k, v, video_len=video, num_frames=frames, model_type=model,
                             kv_len=kv_len, block_size=block_size, quant="none",
                             backend="reference", return_stats=True)
    mask = radial_mask(seq, video, frames, block_size=block_size, model_type=model,
                       kv_len=kv_len)
    kv = kv_len or seq
    expected = exact_attention(nhd(q), nhd(k[:, :kv]), nhd(v[:, :kv]),
                               token_mask=mask.to_token_mask())
    assert out.shape == q.shape
    torch.testing.assert_close(nhd(out).double(), expected, atol=3e-5, rtol=1e-4)
    assert 0 < mask.sparsity() == pytest.approx(stats.sparsity)  # something is skipped
    # Quantized (INT8 QK, FP16 PV on the CPU): close to the exact result.
    quantized = radial_attn(q.half(), k.half(), v.half(), video_len=video, num_frames=frames,
                            model_type=model, kv_len=kv_len, block_size=block_size,
                            backend="reference")
    assert rel_l1(nhd(quantized), expected) < 0.02


def test_radial_attn_flex_block_mask_agrees(rng):
    import warnings

    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    seq, video, frames = 900, 800, 4
    q, k, v = (torch.randn(1, 2, seq, 32, generator=rng) for _ in range(3))
    mask = radial_mask(seq, video, frames, model_type="wan", block_q=64, block_k=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out_flex = flex.flex_attention(q, k, v, block_mask=to_flex_block_mask(mask))
    out = radial_attn(q, k, v, video_len=video, num_frames=frames, layout="HND", quant="none",
                      backend="reference")
    torch.testing.assert_close(out, out_flex, atol=3e-5, rtol=1e-4)


def test_radial_attention_upstream_signature_wan(rng):
    video, frames = 6 * 128, 6
    q, k, v = (torch.randn(video, 3, 64, generator=rng) for _ in range(3))
    out = RadialAttention(q, k, v, mask_map=MaskMap(video, frames), sparsity_type="radial",
                          block_size=128, decay_factor=1, model_type="wan",
                          pre_defined_mask=None, backend="reference")
    mask = radial_mask(video, video, frames, model_type="wan")
    expected = exact_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                               v.transpose(0, 1)[None], token_mask=mask.to_token_mask())
    assert out.shape == q.shape
    torch.testing.assert_close(out.transpose(0, 1)[None].double(), expected, atol=3e-5,
                               rtol=1e-4)
    dense = RadialAttention(q, k, v, mask_map=MaskMap(video, frames), sparsity_type="dense",
                            model_type="wan", backend="reference")
    torch.testing.assert_close(dense.transpose(0, 1)[None].double(),
                               exact_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None]), atol=3e-5, rtol=1e-4)


def test_radial_attention_upstream_signature_hunyuan(rng):
    video, frames, text, valid_text = 4 * 256, 4, 100, 37
    seq = video + text
    q, k, v = (torch.randn(seq, 2, 32, generator=rng) for _ in range(3))
    key_valid = torch.zeros(1, 1, 1, seq, dtype=torch.bool)
    key_valid[..., :video + valid_text] = True
    pre_defined_mask = key_valid[0, 0].expand(seq, seq)  # as upstream's Hunyuan processor
    out = RadialAttention(q, k, v, mask_map=MaskMap(video, frames), block_size=128,
                          model_type="hunyuan", pre_defined_mask=pre_defined_mask,
                          backend="reference")
    mask = radial_mask(seq, video, frames, model_type="hunyuan")
    tokens = mask.to_token_mask() & key_valid[0]
    expected = exact_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                               v.transpose(0, 1)[None], token_mask=tokens)
    assert out.shape == q.shape
    torch.testing.assert_close(out.transpose(0, 1)[None].double(), expected, atol=3e-5,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="key-padding"):
        RadialAttention(q, k, v, mask_map=MaskMap(video, frames), model_type="hunyuan",
                        pre_defined_mask=~pre_defined_mask)


# ----------------------------------------------------------- spas_sage_attn, as RadialAttention
def convert_like_radial(mask: torch.Tensor, block_size: int, arch: str) -> torch.Tensor:
    """sparge_mask_convert of the RadialAttention integrations (ComfyUI-RadialAttn): a square
    block mask to (128 x 64) blocks, or to (64 x 128) blocks on sm90."""
    if block_size == 128:
        return mask.repeat_interleave(2, dim=0 if arch == "sm90" else 1)
    n_row, n_col = mask.shape
    if arch == "sm90":
        return mask.view(n_row, n_col // 2, 2).amax(dim=2)
    return mask.view(n_row // 2, 2, n_col).amax(dim=1)


@pytest.mark.parametrize("block_size", [128, 64])
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_spas_sage_attn_with_radial_mask_id(rng, block_size, arch):
    spas = pytest.importorskip("spas_sage_attn")
    video, frames, heads = 8 * 128, 8, 2  # Wan self-attention: video tokens only
    video_mask = radial_block_mask(video, video, frames, block_size, 1.0, "wan")
    converted = convert_like_radial(video_mask, block_size, arch)
    mask_id = converted[None, None].expand(1, heads, *converted.shape).to(torch.int8)
    q, k, v = (torch.randn(1, heads, video, 64, generator=rng, dtype=torch.float16)
               for _ in range(3))
    out = spas.block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask_id, tensor_layout="HND")
    bq, bk = (64, 128) if arch == "sm90" else (128, 64)
    tokens = converted.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:video, :video]
    if block_size == 128:  # the conversion is exact: the radial token mask itself
        assert torch.equal(tokens, radial_mask(video, video, frames).to_token_mask()[0, 0])
    expected = exact_attention(q, k, v, token_mask=tokens)
    assert out.shape == q.shape
    assert rel_l1(out, expected) < 0.02
