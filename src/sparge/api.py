"""The public entry points: sparse attention with a predicted mask, block-sparse attention with a
given mask, dense quantized attention, and the mask predictor on its own.

All take q (B, Hq, Lq, D), k and v (B, Hk, Lk, D) in layout "HND" (or (B, L, H, D) with
``layout="NHD"``), float16, bfloat16 or float32, Hq a multiple of Hk, any lengths >= 1, head dim up
to 256, and return the output in the same layout, in q's dtype unless ``out_dtype`` says otherwise.
:func:`sparse_attn` and :func:`quantized_attn` take SDPA's arguments as SDPA takes them, and
in layout "HND" also SDPA's (N, L, D) and (N, ..., H, L, D) shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from . import _inputs as checks
from .backend import choose_backend, choose_quant
from .mask import SparseMask
from .predict import Selection, per_head, predict_mask_reference
from .reference import attention_reference

Threshold = float | torch.Tensor


@dataclass(frozen=True)
class AttentionStats:
    """What a call did.

    Returning the stats reads nothing back: the sparsities are computed from ``mask`` when first
    read (then kept), which reads the mask back to the host (a synchronisation on a GPU).

    Attributes:
        mask: the block mask that was computed (None for dense quantized attention).
        backend: ``"triton"`` or ``"reference"``.
        quant: ``"int8_fp8"``, ``"int8_fp16"`` or ``"none"``.
        heads: the number of query heads H.
    """

    mask: SparseMask | None
    backend: str
    quant: str
    heads: int

    @cached_property
    def sparsity(self) -> float:
        """1 - kept blocks / blocks the dense (or causal) computation visits, all heads (0.0
        without a mask)."""
        return 0.0 if self.mask is None else self.mask.sparsity()

    @cached_property
    def per_head_sparsity(self) -> torch.Tensor:
        """Float32 CPU tensor (H,): the same per query head, counted over the batch."""
        if self.mask is None:
            return torch.zeros(self.heads)
        return self.mask.per_head_sparsity().cpu()


class _NoBackward(torch.autograd.Function):
    """Passes an output computed without autograd through; its backward raises."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return out

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> None:
        raise NotImplementedError(
            "sparge's attention functions have no backward pass (they are inference kernels): "
            "call them under torch.no_grad() or torch.inference_mode(), or on detached inputs; "
            "for training use torch.nn.functional.scaled_dot_product_attention")


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_stats: bool,
         **options: Any) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """Common tail of every attention entry point (arguments already validated).

    With inputs that require grad (outside ``torch.compile``) the output is computed without
    autograd and says so when backpropagated through, rather than giving wrong gradients (the
    reference path's roundings have zero gradient) or none.
    """
    if (not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v))
            or torch.compiler.is_compiling()):
        return _attend(q, k, v, return_stats=return_stats, **options)
    with torch.no_grad():
        result = _attend(q, k, v, return_stats=return_stats, **options)
    if not return_stats:
        return _NoBackward.apply(result, q, k, v)
    return _NoBackward.apply(result[0], q, k, v), result[1]


def _in_shape(result: torch.Tensor | tuple[torch.Tensor, AttentionStats],
              shape: torch.Size | None) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """The output of a call made on :func:`sparge._inputs.as_4d`'s views, in q's shape."""
    if shape is None:
        return result
    if isinstance(result, tuple):
        return result[0].reshape(shape), result[1]
    return result.reshape(shape)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
            mask: SparseMask | None, selection: Selection | None, block_q: int, block_k: int,
            causal: bool, scale: float | None, pv_threshold: Threshold, quant: str,
            out_dtype: torch.dtype | None, backend: str,
            return_stats: bool) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """The attention call itself (see :func:`_run`)."""
    qh, kh, vh = (checks.to_hnd(t, layout) for t in (q, k, v))
    heads_q = qh.shape[1]
    checks.check_threshold("pv_threshold", pv_threshold, heads_q, low=0.0, allow_inf=True)
    scale = checks.resolve_scale(scale, qh.shape[3])
    backend = choose_backend(backend, q.device)
    mode = choose_quant(quant, q.device)
    if backend == "triton" and not (return_stats and torch.compiler.is_compiling()):
        # one custom op under torch.compile; CUDA-graph replay of repeated eager calls
        from .kernels.ops import sparse_attention_call

        result = sparse_attention_call(q, k, v, layout=layout, mask=mask, selection=selection,
                                       block_q=block_q, block_k=block_k, causal=causal,
                                       scale=scale, pv_threshold=pv_threshold, mode=mode,
                                       out_dtype=out_dtype or q.dtype, with_mask=return_stats)
        if not return_stats:
            return result
        out, predicted = result
        return out, AttentionStats(mask if selection is None else predicted, backend, mode,
                                   heads_q)
    lam = per_head(pv_threshold, heads_q, q.device)
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)  # caller's layout
    out_hnd = checks.to_hnd(out, layout)

    if backend == "triton":
        from . import kernels

        mask = kernels.attention(qh, kh, vh, mask=mask, selection=selection, block_q=block_q,
                                 block_k=block_k, causal=causal, scale=scale, pv_threshold=lam,
                                 mode=mode, out=out_hnd)
    else:
        if selection is not None:
            mask = predict_mask_reference(qh, kh, selection, block_q=block_q, block_k=block_k,
                                          causal=causal)
        run_mask = mask or SparseMask.full(qh.shape[0], heads_q, qh.shape[2], kh.shape[2],
                                           block_q, block_k, causal, q.device)
        out_hnd.copy_(attention_reference(qh, kh, vh, run_mask, scale=scale, pv_threshold=lam,
                                          mode=mode, out_dtype=out.dtype))
    if not return_stats:
        return out
    return out, AttentionStats(mask, backend, mode, heads_q)


def sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: None = None,
                dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                enable_gqa: bool | None = None, sim_threshold: Threshold = 0.6,
                cdf_threshold: Threshold | None = None, topk: Threshold | None = None,
                pv_threshold: Threshold = 50.0, attention_sink: bool = False,
                layout: str = "HND", block_q: int = 64, block_k: int = 128, quant: str = "auto",
                out_dtype: torch.dtype | None = None, backend: str = "auto",
                return_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """Sparse attention with a predicted block mask: a drop-in for
    ``scaled_dot_product_attention`` on long sequences.

    The predictor mean-pools each block of ``block_q`` queries and ``block_k`` keys, scores pooled
    queries against pooled keys and keeps, per query block, the key blocks carrying most of the
    attention mass; blocks whose tokens are not alike (self-similarity <= ``sim_threshold``) are
    always computed. The kernel then visits only the kept blocks, with INT8 QK and FP8 (or FP16)
    PV unless ``quant="none"``.

    The arguments up to ``enable_gqa`` are SDPA's, taken as SDPA takes them (``attn_mask``,
    ``dropout_p`` and ``is_causal`` by position or by name, ``scale`` and ``enable_gqa`` by name);
    the others are sparge's, by name only.

    Args:
        q: (B, Hq, Lq, D) for layout "HND", (B, Lq, Hq, D) for "NHD". In layout "HND" also
            SDPA's other shapes: (N, ..., Hq, Lq, D), the leading dimensions acting as B (the
            mask's batch is their product), and (N, Lq, D), one head.
        k, v: (B, Hk, Lk, D) or (B, Lk, Hk, D), or shaped as q; Hq a multiple of Hk
            (grouped-query attention).
        attn_mask, dropout_p: accepted for SDPA compatibility; anything but the defaults raises.
        is_causal: causal masking, exact per element, top-left aligned like SDPA.
        scale: softmax scale; 1 / sqrt(D) when None.
        enable_gqa: as SDPA's; None (the default) and True accept Hq a multiple of Hk, False
            requires Hq == Hk.
        sim_threshold: self-similarity above which a block may be summarised by its mean; a
            negative value makes every block eligible.
        cdf_threshold: CDF rule: keep the top blocks whose cumulative pooled mass is <= this
            (0 < tau <= 1; 1 keeps every block, whatever the rounding of the sums). The default
            rule, with tau = 0.98, when neither rule is given.
        topk: top-k rule: keep this fraction of the key blocks (0 < f <= 1) per query block.
        pv_threshold: skip a key block's contribution to a row when its scores are more than this
            many base-2 units below the row's running maximum (>= 0; the default 50 never skips
            in practice).
        attention_sink: always keep the first key block.
        block_q, block_k: mask granularity, 64 or 128 each. The same call gives the same mask on
            every device.
        quant: ``"auto"`` (INT8 QK, FP8 PV where the GPU has FP8 tensor cores, else FP16 PV),
            ``"int8_fp8"``, ``"int8_fp16"`` or ``"none"`` (no quantization: the error of sparsity
            alone).
        out_dtype: output dtype; q's dtype when None.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see :mod:`sparge.backend`).
        return_stats: also return :class:`AttentionStats` (reading its sparsities reads the
            mask back to the host; returning them does not).

    Every threshold is a float or a tensor of shape (Hq,), one value per query head.

    Returns:
        The attention output in the layout of q, or ``(output, stats)``.
    """
    checks.check_unsupported(attn_mask, dropout_p)
    q, k, v, shape = checks.as_4d(q, k, v, layout)
    checks.check_attention_call(q, k, v, layout, quant=quant, backend=backend,
                                out_dtype=out_dtype)
    checks.check_block_sizes(block_q, block_k)
    checks.check_flags(attention_sink=attention_sink, is_causal=is_causal,
                       return_stats=return_stats)
    heads_q = checks.to_hnd(q, layout).shape[1]
    checks.check_gqa(enable_gqa, heads_q, checks.to_hnd(k, layout).shape[1])
    cdf_threshold, topk = checks.check_selection(sim_threshold, cdf_threshold, topk, heads_q)
    selection = Selection(sim_threshold, cdf_threshold, topk, bool(attention_sink))
    return _in_shape(_run(q, k, v, layout=layout, mask=None, selection=selection,
                          block_q=block_q, block_k=block_k, causal=bool(is_causal), scale=scale,
                          pv_threshold=pv_threshold, quant=quant, out_dtype=out_dtype,
                          backend=backend, return_stats=return_stats), shape)


def as_sparse_mask(mask: SparseMask | torch.Tensor, *, batch: int, heads: int, q_len: int,
                   k_len: int, block_q: int | None, block_k: int | None,
                   causal: bool) -> SparseMask:
    """A :class:`SparseMask` for (batch, heads) from a mask object or a block tensor.

    A tensor is (B or 1, H or 1, nQ, nK), bool or integer (non-zero = kept); its block sizes must be
    given. ``causal`` adds causal masking to the mask's own.
    """
    if isinstance(mask, torch.Tensor):
        if block_q is None or block_k is None:
            raise ValueError("a block-mask tensor needs block_q and block_k")
        checks.check_block_sizes(block_q, block_k)
        if mask.dim() != 4:
            raise ValueError(f"a block-mask tensor must be 4-D (B, H, nQ, nK), got shape "
                             f"{tuple(mask.shape)}")
        checks.check_block_mask_dtype("mask", mask)
        blocks = mask if mask.dtype == torch.bool else mask != 0
        mask = SparseMask(blocks, block_q, block_k, q_len, k_len, causal)
    elif isinstance(mask, SparseMask):
        given, own = (block_q, block_k), (mask.block_q, mask.block_k)
        if any(g is not None and g != m for g, m in zip(given, own, strict=True)):
            raise ValueError(f"block sizes {given} contradict the mask's "
                             f"({mask.block_q}, {mask.block_k})")
        if (mask.q_len, mask.k_len) != (q_len, k_len):
            raise ValueError(f"the mask was made for Lq={mask.q_len}, Lk={mask.k_len}, "
                             f"the inputs have Lq={q_len}, Lk={k_len}")
        if causal and not mask.causal:
            mask = SparseMask(mask.blocks, mask.block_q, mask.block_k, q_len, k_len, True)
    else:
        raise TypeError(f"mask must be a SparseMask or a tensor, got {type(mask).__name__}")
    return mask.expand(batch, heads)


def block_sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: SparseMask | torch.Tensor, *, block_q: int | None = None,
                      block_k: int | None = None, is_causal: bool = False,
                      pv_threshold: Threshold = 50.0, scale: float | None = None,
                      layout: str = "HND", quant: str = "auto",
                      out_dtype: torch.dtype | None = None, backend: str = "auto",
                      return_stats: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """Attention over the blocks of a caller-given mask.

    Args:
        q, k, v: as in :func:`sparse_attn`.
        mask: a :class:`SparseMask`, or a tensor (B or 1, Hq or 1, nQ, nK), bool or integer
            (non-zero = kept) with ``block_q`` and ``block_k`` given. A token attends exactly the
            keys of its kept blocks (and, if causal, only keys at or before its position); a row
            with no kept key returns zeros.
        is_causal: add exact causal masking (a causal SparseMask is causal already).
        pv_threshold, scale, layout, quant, out_dtype, backend, return_stats: as in
            :func:`sparse_attn`.
    """
    checks.check_attention_call(q, k, v, layout, quant=quant, backend=backend,
                                out_dtype=out_dtype)
    checks.check_flags(is_causal=is_causal, return_stats=return_stats)
    qh, kh = checks.to_hnd(q, layout), checks.to_hnd(k, layout)
    if isinstance(mask, torch.Tensor) and mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    mask = as_sparse_mask(mask, batch=qh.shape[0], heads=qh.shape[1], q_len=qh.shape[2],
                          k_len=kh.shape[2], block_q=block_q, block_k=block_k,
                          causal=bool(is_causal))
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    return _run(q, k, v, layout=layout, mask=mask, selection=None, block_q=mask.block_q,
                block_k=mask.block_k, causal=mask.causal, scale=scale,
                pv_threshold=pv_threshold, quant=quant, out_dtype=out_dtype, backend=backend,
                return_stats=return_stats)


def quantized_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, *,
                   scale: float | None = None, enable_gqa: bool | None = None,
                   layout: str = "HND", block_q: int = 64,
                   block_k: int = 128, quant: str = "auto", out_dtype: torch.dtype | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Dense attention with quantization only (every block computed, no mask, no lookup table).

    Arguments as in :func:`sparse_attn` (SDPA's first, as SDPA takes them); ``block_q`` and
    ``block_k`` set the quantization granularity (one INT8 scale per block of rows).
    """
    checks.check_unsupported(attn_mask, dropout_p)
    q, k, v, shape = checks.as_4d(q, k, v, layout)
    checks.check_attention_call(q, k, v, layout, quant=quant, backend=backend,
                                out_dtype=out_dtype)
    checks.check_block_sizes(block_q, block_k)
    checks.check_flags(is_causal=is_causal)
    checks.check_gqa(enable_gqa, checks.to_hnd(q, layout).shape[1],
                     checks.to_hnd(k, layout).shape[1])
    return _in_shape(_run(q, k, v, layout=layout, mask=None, selection=None, block_q=block_q,
                          block_k=block_k, causal=bool(is_causal), scale=scale,
                          pv_threshold=float("inf"), quant=quant, out_dtype=out_dtype,
                          backend=backend, return_stats=False), shape)


def predict_mask(q: torch.Tensor, k: torch.Tensor, *, sim_threshold: Threshold = 0.6,
                 cdf_threshold: Threshold | None = None, topk: Threshold | None = None,
                 attention_sink: bool = False, is_causal: bool = False, layout: str = "HND",
                 block_q: int = 64, block_k: int = 128, backend: str = "auto") -> SparseMask:
    """The mask predictor on its own; arguments as in :func:`sparse_attn`.

    Returns a :class:`SparseMask` of shape (B, Hq, ceil(Lq / block_q), ceil(Lk / block_k)).
    """
    checks.check_qk(q, k, layout)
    checks.check_block_sizes(block_q, block_k)
    checks.check_choice("backend", backend, checks.BACKENDS)
    checks.check_flags(attention_sink=attention_sink, is_causal=is_causal)
    qh, kh = checks.to_hnd(q, layout), checks.to_hnd(k, layout)
    cdf_threshold, topk = checks.check_selection(sim_threshold, cdf_threshold, topk, qh.shape[1])
    selection = Selection(sim_threshold, cdf_threshold, topk, bool(attention_sink))
    if choose_backend(backend, q.device) == "triton":
        from . import kernels

        return kernels.predict_mask(qh, kh, selection, block_q=block_q, block_k=block_k,
                                    causal=bool(is_causal))
    return predict_mask_reference(qh, kh, selection, block_q=block_q, block_k=block_k,
                                  causal=bool(is_causal))
