"""Tiny randomly initialised diffusers transformers and inputs, for tests and example smoke runs.

No weights are downloaded. :func:`tiny_transformer` builds a small model of a family (about 10^5
parameters, 2 heads) whose sparse attention layers see 512 to 768 tokens; :func:`tiny_inputs` makes
the keyword arguments of one forward call, with latents that are smooth in space and time (a
"locality-structured" input: neighbouring tokens are alike, as in real video latents), so that
attention concentrates near the diagonal the way it does in video models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("wan", "hunyuan", "cogvideox", "flux", "ltx", "mochi")


def smooth_field(shape: tuple[int, ...], *, seed: int = 0, coarse: int = 4,
                 noise: float = 0.1) -> torch.Tensor:
    """A random field (B, C, F, H, W) that varies slowly over F, H and W: trilinear upsampling of
    coarse noise (``coarse`` times fewer points per axis, at least 1), plus a little white noise."""
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = shape
    low = torch.randn(b, c, max(f // coarse, 1) + 1, max(h // coarse, 1) + 1,
                      max(w // coarse, 1) + 1, generator=g)
    field = F.interpolate(low, size=(f, h, w), mode="trilinear", align_corners=True)
    field = field / field.std().clamp_min(1e-6)
    return field + noise * torch.randn(shape, generator=g)


def _import(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise RuntimeError(f"the installed diffusers {diffusers.__version__} has no {name}")
    return cls


def available_families() -> list[str]:
    """The families of :data:`FAMILIES` whose model class the installed diffusers provides."""
    import diffusers

    names = {"wan": "WanTransformer3DModel", "hunyuan": "HunyuanVideoTransformer3DModel",
             "cogvideox": "CogVideoXTransformer3DModel", "flux": "FluxTransformer2DModel",
             "ltx": "LTXVideoTransformer3DModel", "mochi": "MochiTransformer3DModel"}
    return [f for f in FAMILIES if hasattr(diffusers, names[f])]


@torch.no_grad()
def make_attention_local(model: nn.Module, sharpness: float = 6.0) -> nn.Module:
    """Give a randomly initialised model the local attention of a trained video model.

    With random weights, queries and keys are unrelated and attention is close to uniform, so no
    block is negligible. Here every attention module with ``to_q`` and ``to_k`` of the same shape
    gets ``to_k = to_q`` (a token's query then matches the keys of tokens like it, i.e. its
    neighbours on a smooth input) and queries ``sharpness`` times larger (through ``norm_q``'s
    weight when there is one, so that the QK normalisation does not undo it).
    """
    for module in model.modules():
        to_q, to_k = getattr(module, "to_q", None), getattr(module, "to_k", None)
        if not isinstance(to_q, nn.Linear) or not isinstance(to_k, nn.Linear):
            continue
        if to_q.weight.shape != to_k.weight.shape:
            continue
        to_k.weight.copy_(to_q.weight)
        if to_q.bias is not None and to_k.bias is not None:
            to_k.bias.copy_(to_q.bias)
        norm_q = getattr(module, "norm_q", None)
        weight = getattr(norm_q, "weight", None)
        if isinstance(weight, torch.Tensor):
            weight.mul_(sharpness)
        else:
            to_q.weight.mul_(sharpness)
            if to_q.bias is not None:
                to_q.bias.mul_(sharpness)
    return model


def tiny_transformer(family: str, *, seed: int = 0, layers: int = 2, heads: int = 2,
                     head_dim: int = 32, local: bool = True, sharpness: float = 6.0) -> nn.Module:
    """A tiny randomly initialised transformer of ``family`` (see :data:`FAMILIES`), in eval mode.

    ``layers`` transformer blocks (for Flux and HunyuanVideo: that many double-stream blocks and
    as many single-stream blocks), ``heads`` heads of ``head_dim`` channels. With ``local``, its
    attention is made local by :func:`make_attention_local`.
    """
    torch.manual_seed(seed)
    if family == "wan":
        model = _import("WanTransformer3DModel")(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
            in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64,
            num_layers=layers, rope_max_seq_len=64)
    elif family == "hunyuan":
        rope = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)
        model = _import("HunyuanVideoTransformer3DModel")(
            in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim,
            num_layers=layers, num_single_layers=layers, num_refiner_layers=1, patch_size=2,
            patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=rope)
    elif family == "cogvideox":
        model = _import("CogVideoXTransformer3DModel")(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
            out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=layers,
            sample_width=32, sample_height=32, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=8)
    elif family == "flux":
        rope = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)
        model = _import("FluxTransformer2DModel")(
            patch_size=1, in_channels=4, num_layers=layers, num_single_layers=layers,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=16,
            pooled_projection_dim=8, axes_dims_rope=rope)
    elif family == "ltx":
        model = _import("LTXVideoTransformer3DModel")(
            in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim,
            cross_attention_dim=heads * head_dim, num_layers=layers, caption_channels=16)
    elif family == "mochi":
        model = _import("MochiTransformer3DModel")(
            patch_size=2, num_attention_heads=heads, attention_head_dim=head_dim,
            num_layers=layers, pooled_projection_dim=16, in_channels=4, text_embed_dim=16,
            time_embed_dim=4, max_sequence_length=8)
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if local:
        make_attention_local(model, sharpness)
    return model.eval()


def tiny_inputs(family: str, *, timestep: float = 500.0, seed: int = 0, batch: int = 1,
                noise: float = 0.1, frames: int = 2, width: int = 32) -> dict:
    """Keyword arguments of one forward call of :func:`tiny_transformer` (``return_dict=False``
    included). ``timestep`` is on the 0-1000 scale (Flux gets ``timestep / 1000``). ``frames``:
    latent frames of Wan, HunyuanVideo and Mochi, ``width`` their latent width (height 32; a
    frame holds 16 * width / 2 tokens)."""
    g = torch.Generator().manual_seed(seed + 1000)
    text = torch.randn(batch, 8, 16, generator=g)
    t = torch.full((batch,), float(timestep))
    if family in ("wan", "hunyuan", "mochi"):
        latents = smooth_field((batch, 4, frames, 32, width), seed=seed, noise=noise)
        kwargs = {"hidden_states": latents, "timestep": t, "encoder_hidden_states": text}
        if family == "hunyuan":
            kwargs.update(encoder_attention_mask=torch.ones(batch, 8),
                          pooled_projections=torch.randn(batch, 8, generator=g),
                          guidance=torch.full((batch,), 3.0))
        if family == "mochi":
            kwargs["encoder_attention_mask"] = torch.ones(batch, 8)
    elif family == "cogvideox":
        latents = smooth_field((batch, 4, 3, 32, 32), seed=seed, noise=noise).transpose(1, 2)
        kwargs = {"hidden_states": latents.contiguous(), "timestep": t,
                  "encoder_hidden_states": text}
    elif family == "flux":
        latents = smooth_field((batch, 4, 1, 16, 32), seed=seed, noise=noise)
        tokens = latents.flatten(2).transpose(1, 2).contiguous()  # (B, 512, 4), row-major
        hh, ww = torch.meshgrid(torch.arange(16), torch.arange(32), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(hh), hh, ww], dim=-1).reshape(-1, 3).float()
        kwargs = {"hidden_states": tokens, "encoder_hidden_states": text,
                  "pooled_projections": torch.randn(batch, 8, generator=g),
                  "timestep": t / 1000.0, "img_ids": img_ids, "txt_ids": torch.zeros(8, 3)}
    elif family == "ltx":
        latents = smooth_field((batch, 4, 2, 16, 16), seed=seed, noise=noise)
        tokens = latents.flatten(2).transpose(1, 2).contiguous()  # (B, 512, 4), (f, h, w) order
        kwargs = {"hidden_states": tokens, "encoder_hidden_states": text, "timestep": t,
                  "encoder_attention_mask": torch.ones(batch, 8), "num_frames": 2, "height": 16,
                  "width": 16}
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    kwargs["return_dict"] = False
    return kwargs
