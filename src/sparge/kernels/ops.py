"""The GPU pipeline as a PyTorch custom operator, ``torch.ops.sparge.sparse_attention``.

``torch.compile`` cannot trace into Triton launches that build Python objects (masks, selections)
on the way, and must not try: registering the whole pipeline (pre-pass, selection, lookup table,
attention) as one opaque operator with a fake implementation lets a compiled graph hold it without
a graph break. The operator returns a fresh output tensor and mutates nothing.

One operator covers the three entry points:

- ``sim_threshold`` and ``rule`` given: the predicted mask (:func:`sparge.sparse_attn`); ``rule``
  holds the CDF threshold, or the top-k fraction when ``rule_is_topk``.
- ``blocks`` given: that block mask (:func:`sparge.block_sparse_attn`).
- neither: dense quantized attention (:func:`sparge.quantized_attn`).

Every threshold is a float32 tensor of shape (Hq,) on the inputs' device (build it with
:func:`sparge.predict.per_head`, which fills rather than copies, so a CUDA graph can
capture it).
"""

from typing import Optional

import torch

from .._constants import current_stream
from ..mask import SparseMask
from ..predict import Selection, per_head
from ..quant import PV_FP8, PV_FP16
from . import graphs


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            pv_threshold: torch.Tensor, sim_threshold: torch.Tensor | None,
            rule: torch.Tensor | None, blocks: torch.Tensor | None, rule_is_topk: bool,
            attention_sink: bool, causal: bool, scale: float, block_q: int, block_k: int,
            mode: str, layout: str, addresses: torch.Tensor | None = None) -> SparseMask | None:
    """Attention through :func:`sparge.kernels.attention` into ``out`` (q's shape and layout);
    ``addresses`` as that function takes them. ``blocks`` must be causally valid when
    ``addresses`` are given (a :class:`SparseMask`'s are): the mask is then read, not ANDed.
    Returns the predicted mask with a selection, else None."""
    from .. import kernels  # the package's entry point (imported late: it imports this module)

    qh, kh, vh = _hnd(q, layout), _hnd(k, layout), _hnd(v, layout)
    selection = mask = None
    if sim_threshold is not None:
        if rule is None:
            raise ValueError("a selection needs its rule threshold (CDF or top-k)")
        selection = Selection(sim_threshold, None if rule_is_topk else rule,
                              rule if rule_is_topk else None, attention_sink)
    elif blocks is not None:
        sizes = (block_q, block_k, qh.shape[2], kh.shape[2], causal)
        mask = (SparseMask(blocks, *sizes) if addresses is None
                else SparseMask._of_valid_blocks(blocks, *sizes))
    used = kernels.attention(qh, kh, vh, mask=mask, selection=selection, block_q=block_q,
                             block_k=block_k, causal=causal, scale=scale,
                             pv_threshold=pv_threshold, mode=mode, out=_hnd(out, layout),
                             addresses=addresses)
    return used if selection is not None else None


def _sparse_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           pv_threshold: torch.Tensor,
                           sim_threshold: Optional[torch.Tensor],  # noqa: UP045 - schema
                           rule: Optional[torch.Tensor],  # noqa: UP045
                           blocks: Optional[torch.Tensor],  # noqa: UP045
                           rule_is_topk: bool, attention_sink: bool, causal: bool, scale: float,
                           block_q: int, block_k: int, mode: str, layout: str,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """Attention through :func:`sparge.kernels.attention`; returns the output in the layout of q
    (``"HND"`` (B, Hq, Lq, D) or ``"NHD"`` (B, Lq, Hq, D)), contiguous, of dtype ``out_dtype``."""
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    _attend(q, k, v, out, pv_threshold, sim_threshold, rule, blocks, rule_is_topk,
            attention_sink, causal, scale, block_q, block_k, mode, layout)
    return out


sparse_attention = torch.library.custom_op("sparge::sparse_attention",
                                           mutates_args=())(_sparse_attention_impl)


@sparse_attention.register_fake
def _(q, k, v, pv_threshold, sim_threshold, rule, blocks, rule_is_topk, attention_sink, causal,
      scale, block_q, block_k, mode, layout, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype)


def sparse_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
                          mask: SparseMask | None, selection: Selection | None, block_q: int,
                          block_k: int, causal: bool, scale: float,
                          pv_threshold: float | torch.Tensor, mode: str,
                          out_dtype: torch.dtype, with_mask: bool = False
                          ) -> torch.Tensor | tuple[torch.Tensor, SparseMask | None]:
    """:func:`sparse_attention` from the public API's arguments (validated, ``mode`` and
    ``scale`` resolved): thresholds become (Hq,) device tensors by fills, a mask its block
    tensor. With ``with_mask`` (not under ``torch.compile``) returns ``(out, predicted)``: the
    mask a selection predicted, the caller's own (None without a selection).

    Under ``torch.compile`` the call goes through the registered operator; in eager mode it calls
    the same implementation directly, since the operator's dispatch costs about a millisecond of
    host time per call (measured on an H200 with torch 2.11), more than the whole kernel at short
    lengths. Repeated eager calls that :func:`_replayable` accepts replay a CUDA graph
    (:mod:`sparge.kernels.graphs`). CUDA graph capture by the caller works either way.
    """
    heads_q = _hnd(q, layout).shape[1]

    def on_device(value: float | torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else per_head(value, heads_q, q.device)

    sim = rule = None
    topk = sink = False
    if selection is not None:
        topk = selection.topk is not None
        sim = selection.sim_threshold
        rule = selection.topk if topk else selection.cdf_threshold
        sink = selection.attention_sink
    if mask is not None:
        causal, block_q, block_k = mask.causal, mask.block_q, mask.block_k
    flags = (topk, sink, causal, float(scale), block_q, block_k, mode, layout)
    blocks = None if mask is None else mask.blocks
    if torch.compiler.is_compiling():
        if with_mask:
            raise ValueError("the predicted mask cannot be returned under torch.compile")
        return sparse_attention(q, k, v, on_device(pv_threshold), on_device(sim), on_device(rule),
                                blocks, *flags, out_dtype)
    thresholds = (pv_threshold, sim, rule)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    kind = "predicted" if selection is not None else ("given" if mask is not None else None)
    held = graphs.held_bytes(_hnd(q, layout), _hnd(k, layout), v,
                             v_bytes=2 if mode == PV_FP16 else 1, block_q=block_q,
                             block_k=block_k, mask=kind)
    if _replayable(q, k, v, blocks, mode, held):
        # threshold tensors by value, as (Hq,) float32 device tensors the graph copies
        values = tuple(on_device(t).detach().contiguous() for t in thresholds
                       if isinstance(t, torch.Tensor))

        # number thresholds as device tensors, made by call's first run (eager): a capture
        # reads them without a fill node each, and the graph keeps them
        numbers: dict[int, torch.Tensor | None] = {}

        def number(i: int) -> torch.Tensor | None:
            if i not in numbers:
                numbers[i] = on_device(thresholds[i])
            return numbers[i]

        def call(addresses: torch.Tensor | None, given: tuple[torch.Tensor, ...]
                 ) -> SparseMask | None:
            tensor = iter(given)
            pv, s, r = (next(tensor) if isinstance(t, torch.Tensor) else number(i)
                        for i, t in enumerate(thresholds))
            return _attend(q, k, v, out, pv, s, r, blocks, *flags, addresses=addresses)

        index = q.device.index
        tensors = (q, k, v, out) if blocks is None else (q, k, v, out, blocks)
        key = (index, current_stream(index), *_layout_key(q), *_layout_key(k), *_layout_key(v),
               None if blocks is None else _layout_key(blocks), out_dtype,
               *(torch.Tensor if isinstance(t, torch.Tensor) else t for t in thresholds), *flags)
        predicted = graphs.run(key, tensors, call, values, numbers)
        if predicted is not None and with_mask:  # a replay's mask is the graph's own: copied
            predicted = SparseMask._of_valid_blocks(predicted.blocks.clone(), predicted.block_q,
                                                    predicted.block_k, predicted.q_len,
                                                    predicted.k_len, predicted.causal)
    else:
        predicted = _attend(q, k, v, out, on_device(pv_threshold), on_device(sim),
                            on_device(rule), blocks, *flags)
    return (out, predicted) if with_mask else out


def _layout_key(x: torch.Tensor) -> tuple:
    return x.shape, x.stride(), x.dtype


def _replayable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor | None,
                mode: str, held: int) -> bool:
    """Whether an eager call may be replayed as a CUDA graph: on a GPU, not during the caller's
    own capture, in a quantized mode that reads q, k and v only in the pre-pass (not a float16 V
    in ``int8_fp16`` mode, which the attention kernel reads as it is), the inputs and a given
    mask's ``blocks`` 16-byte aligned, and the graph's memory (``held`` bytes, as
    :func:`sparge.kernels.graphs.held_bytes` counts it) within
    :data:`sparge.kernels.graphs.MAX_HELD_BYTES`. Thresholds may be numbers or tensors (a
    tensor's values are copied into the graph's own copy before each replay)."""
    if not graphs.enabled() or not q.is_cuda or mode not in (PV_FP8, PV_FP16):
        return False
    if mode == PV_FP16 and v.dtype == torch.float16:
        return False
    given = () if blocks is None else (blocks,)
    return (held <= graphs.MAX_HELD_BYTES and graphs.aligned(q, k, v, *given)
            and not torch.cuda.is_current_stream_capturing())


__all__ = ["sparse_attention", "sparse_attention_call"]
