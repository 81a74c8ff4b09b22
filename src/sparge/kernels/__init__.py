"""Triton kernels: the GPU execution path of :mod:`sparge.api`.

The public API uses two functions here (see docs/ARCHITECTURE.md, "Kernel contract"); its
attention calls reach :func:`attention` through :mod:`sparge.kernels.ops`:

- :func:`attention` writes ``out`` in place: with ``mask`` it runs that mask, with ``selection`` it
  runs the fused pipeline (pre-pass, block selection, lookup table, attention) and returns the
  predicted mask, with neither it runs every (causally valid) block.
- :func:`predict_mask` runs the predictor alone.

The pre-pass (statistics + quantization) and the block selection come from
:mod:`sparge.kernels.prepass` and :mod:`sparge.kernels.select`.
"""

from __future__ import annotations

import contextlib

import torch

from .. import settings
from ..mask import SparseMask
from ..predict import Selection
from ..quant import EXACT
from .attention import BlockTable, KernelConfig, block_table, launch
from .graphs import MASK
from .prepass import prepare_qkv
from .select import predict_mask_gpu, select_with_table


def _current(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made the current CUDA device for the block, where it is not: Triton launches
    on the current device, and a model spread over GPUs calls with tensors on any of them."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def predict_mask(q: torch.Tensor, k: torch.Tensor, selection: Selection, *, block_q: int,
                 block_k: int, causal: bool) -> SparseMask:
    """The predicted block mask for q (B, Hq, Lq, D), k (B, Hk, Lk, D) (layout HND)."""
    with _current(q.device):
        return predict_mask_gpu(q, k, selection, block_q=block_q, block_k=block_k,
                                causal=causal)


def _tile_skip_enabled() -> bool:
    """Whether to leave out the P.V product of tiles whose rows all skip (SPARGE_PV_TILE_SKIP=1).

    Off by default: the branch around the product stops Triton from software-pipelining the K/V
    loads (measured on an H100 with Triton 3.6: 24.6 ms instead of 17.9 ms at L32768 D128 with
    nothing skipped), which costs more than the skipped products save unless thresholds are small.
    The per-row rule holds either way: skipped rows contribute exactly nothing.
    """
    return settings.PV_TILE_SKIP.enabled()


# ------------------------------------------------------------------------------ the contract
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: SparseMask | None,
              selection: Selection | None, block_q: int, block_k: int, causal: bool,
              scale: float, pv_threshold: torch.Tensor, mode: str, out: torch.Tensor,
              addresses: torch.Tensor | None = None) -> SparseMask | None:
    """Attention into ``out`` (B, Hq, Lq, D), any strides, in its dtype.

    q (B, Hq, Lq, D), k and v (B, Hk, Lk, D) in layout HND, any strides. With ``mask``, the blocks
    it keeps (its ``causal`` flag decides causal masking); with ``selection``, the predicted mask,
    which is returned; with neither, every (causally valid) block without a lookup table.
    ``pv_threshold`` float32 (Hq,) on the device; ``mode`` ``"int8_fp8"``, ``"int8_fp16"`` or
    ``"none"``. ``addresses``, for a call replayed as a CUDA graph: an int64 device buffer with
    the addresses of q, k, v, out and, with ``mask``, the mask's blocks in the slots of
    :mod:`sparge.kernels.graphs`, where the kernels then read and write (the tensors give only
    their shapes, strides and dtypes); quantized modes only.
    """
    if mask is not None and selection is not None:
        raise ValueError("give mask or selection, not both")
    if addresses is not None and mode == EXACT:
        raise ValueError("addresses are read by the quantized modes only")
    if addresses is not None and mask is not None and addresses.numel() <= MASK:
        raise ValueError("a mask read through addresses needs its slot in the buffer")
    q_len, k_len = q.shape[2], k.shape[2]
    table = None
    if mask is not None:
        causal = mask.causal
        block_q, block_k = mask.block_q, mask.block_k
    with _current(q.device):
        if mode == EXACT:
            if selection is not None:
                mask = predict_mask(q, k, selection, block_q=block_q, block_k=block_k,
                                    causal=causal)
            quant = None
        else:
            quant, q_stats, k_stats = prepare_qkv(q, k, v, block_q=block_q, block_k=block_k,
                                                  mode=mode, with_stats=selection is not None,
                                                  addresses=addresses)
            if selection is not None:
                # the selection's programs write the lookup table too (one launch)
                mask, (indices, counts, n_full) = select_with_table(
                    q_stats, k_stats, selection, q_len=q_len, k_len=k_len, block_q=block_q,
                    block_k=block_k, causal=causal)
                table = BlockTable(counts, n_full, indices)

        if table is None and mask is not None:
            table = block_table(mask, addresses)
        if quant is None:
            operands = dict(q=q, k=k, v=v, q_scale=None, k_scale=None, v_scale=None)
        else:
            operands = dict(q=quant.q, k=quant.k, v=quant.v, q_scale=quant.q_scale,
                            k_scale=quant.k_scale, v_scale=quant.v_scale,
                            k_scale_max=quant.k_scale_max)
        launch(**operands, out=out, table=table, block_q=block_q, block_k=block_k,
               causal=causal, scale=scale, pv_threshold=pv_threshold, mode=mode,
               pv_skip=_tile_skip_enabled(), addresses=addresses)
        return mask


__all__ = ["BlockTable", "KernelConfig", "attention", "block_table", "launch", "predict_mask"]
