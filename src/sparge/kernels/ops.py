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

from ..mask import SparseMask
from ..predict import Selection, per_head


def _hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "HND" else x.transpose(1, 2)


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
    from .. import kernels  # the package's entry point (imported late: it imports this module)

    qh, kh, vh = _hnd(q, layout), _hnd(k, layout), _hnd(v, layout)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    selection = mask = None
    if sim_threshold is not None:
        if rule is None:
            raise ValueError("a selection needs its rule threshold (CDF or top-k)")
        selection = Selection(sim_threshold, None if rule_is_topk else rule,
                              rule if rule_is_topk else None, attention_sink)
    elif blocks is not None:
        mask = SparseMask(blocks, block_q, block_k, qh.shape[2], kh.shape[2], causal)
    kernels.attention(qh, kh, vh, mask=mask, selection=selection, block_q=block_q, block_k=block_k,
              causal=causal, scale=scale, pv_threshold=pv_threshold, mode=mode,
              out=_hnd(out, layout))
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
                          out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`sparse_attention` from the public API's arguments (validated, ``mode`` and
    ``scale`` resolved): thresholds become (Hq,) device tensors by fills, a mask its block
    tensor.

    Under ``torch.compile`` the call goes through the registered operator; in eager mode it calls
    the same implementation directly, since the operator's dispatch costs about a millisecond of
    host time per call (measured on an H200 with torch 2.11), more than the whole kernel at short
    lengths. CUDA graph capture works either way.
    """
    heads_q = _hnd(q, layout).shape[1]

    def on_device(value: float | torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else per_head(value, heads_q, q.device)

    sim = rule = None
    topk = sink = False
    if selection is not None:
        topk = selection.topk is not None
        sim = on_device(selection.sim_threshold)
        rule = on_device(selection.topk if topk else selection.cdf_threshold)
        sink = selection.attention_sink
    if mask is not None:
        causal, block_q, block_k = mask.causal, mask.block_q, mask.block_k
    op = sparse_attention if torch.compiler.is_compiling() else _sparse_attention_impl
    return op(q, k, v, on_device(pv_threshold), sim, rule,
                            mask.blocks if mask is not None else None, topk, sink, causal,
                            float(scale), block_q, block_k, mode, layout, out_dtype)


__all__ = ["sparse_attention", "sparse_attention_call"]
