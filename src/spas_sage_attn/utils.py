"""Upstream ``spas_sage_attn.utils`` helpers that callers use, implemented on :mod:`sparge`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sparge


def precision_metric(quant_o: torch.Tensor, fa2_o: torch.Tensor, verbose: bool = True,
                     round_num: int = 4) -> dict[str, float]:
    """How close an output is to a reference output, as upstream's tuner measures it.

    Args:
        quant_o: the output under test, any shape.
        fa2_o: the reference output, same shape.
        verbose: print the three numbers.
        round_num: decimals each number is rounded to.

    Returns:
        ``{"Cossim": cosine similarity of the flattened tensors, "L1": sum|x - ref| / sum|ref|,
        "RMSE": sqrt(mean((x - ref)^2))}``, computed in float32.
    """
    if quant_o.shape != fa2_o.shape:
        raise ValueError(f"shapes differ: {tuple(quant_o.shape)} and {tuple(fa2_o.shape)}")
    x, ref = quant_o.float(), fa2_o.float()
    sim = F.cosine_similarity(x.reshape(1, -1), ref.reshape(1, -1)).item()
    l1 = ((x - ref).abs().sum() / ref.abs().sum()).item()
    rmse = torch.sqrt(torch.mean((x - ref) ** 2)).item()
    sim, l1, rmse = (round(value, round_num) for value in (sim, l1, rmse))
    if verbose:
        print(f"Cossim: {sim:.6f}, L1: {l1:.6f}, RMSE:{rmse:.6f}")
    return {"Cossim": sim, "L1": l1, "RMSE": rmse}


def hyperparameter_check(hyper: float | int | torch.Tensor, H: int,
                         device: torch.device | str) -> torch.Tensor:
    """A per-head hyperparameter as a tensor of shape (H,) on ``device``.

    Accepts a Python float or int (broadcast), a 0-d tensor (broadcast) or a 1-D tensor of H
    elements (moved to ``device``, dtype kept).
    """
    if type(hyper) in (float, int):
        return torch.full((H,), float(hyper), device=device)
    if isinstance(hyper, torch.Tensor):
        if hyper.dim() > 1:
            raise ValueError(f"a hyperparameter tensor must be 0-D or 1-D, got shape "
                             f"{tuple(hyper.shape)}")
        if hyper.dim() == 0:
            return torch.full((H,), hyper.item(), device=device)
        if hyper.numel() != H:
            raise ValueError(f"a hyperparameter tensor must have {H} elements (one per head), "
                             f"got {hyper.numel()}")
        return hyper.to(device)
    raise TypeError(f"a hyperparameter must be a float or a tensor, got {type(hyper).__name__}")


def block_map_lut_triton(block_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The upstream lookup table of a block map.

    Args:
        block_map: (B, H, nQ, nK), bool or integer (non-zero = kept).

    Returns:
        ``(lut, valid_block_num)``: int32 (B, H, nQ, nK) with, per row, the kept key-block indices
        delta-encoded (the first entry is the index itself, then the step from the previous kept
        block), zeros after the last one; and int32 (B, H, nQ), the kept blocks per row. Computed
        with PyTorch on the map's device.
    """
    if not isinstance(block_map, torch.Tensor) or block_map.dim() != 4:
        shape = tuple(block_map.shape) if isinstance(block_map, torch.Tensor) else block_map
        raise ValueError(f"block_map must be a 4-D tensor (B, H, nQ, nK), got {shape!r}")
    n_q, n_k = block_map.shape[2], block_map.shape[3]
    if n_q == 0 or n_k == 0:
        raise ValueError(f"block_map has no blocks: shape {tuple(block_map.shape)}")
    # The table depends on the blocks only; 64-row blocks are a placeholder geometry.
    mask = sparge.SparseMask(block_map != 0, 64, 64, n_q * 64, n_k * 64)
    return mask.to_lut()


def get_block_map_meansim(q: torch.Tensor, k: torch.Tensor, is_causal: bool = False,
                          BLKQ: int = 128, BLKK: int = 64,  # noqa: N803 (upstream names)
                          simthreshd1: float | torch.Tensor = 0.1,
                          cdfthreshd: float | torch.Tensor | None = 0.9,
                          topk: float | torch.Tensor | None = None, is_sparse: bool = True,
                          return_lut: bool = False, attention_sink: bool = False
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The mask predictor with upstream's names, via :func:`sparge.predict_mask`.

    Args:
        q: (B, Hq, Lq, D); k: (B, Hk, Lk, D) (layout HND).
        is_causal: drop the blocks above the (top-left) diagonal.
        BLKQ, BLKK: block sizes, 64 or 128 each.
        simthreshd1, cdfthreshd, topk: as in the attention functions; exactly one of cdfthreshd and
            topk is set. Floats or (Hq,) tensors.
        is_sparse: False returns the dense (or causal) mask.
        return_lut: return the lookup table (see :func:`block_map_lut_triton`) instead of the map.
        attention_sink: always keep key block 0.

    Returns:
        bool (B, Hq, ceil(Lq/BLKQ), ceil(Lk/BLKK)), or ``(lut, valid_block_num)``.

    K is smoothed (its per-channel mean subtracted) before its block statistics are taken, as in
    the attention functions; upstream takes them from k as passed, which gives the same map when
    the caller smooths K first, as upstream's own callers do.
    """
    if (cdfthreshd is None) == (topk is None):
        raise ValueError("exactly one of cdfthreshd and topk must be set, got "
                         f"cdfthreshd={cdfthreshd!r}, topk={topk!r}")
    mask = sparge.predict_mask(q, k, sim_threshold=simthreshd1, cdf_threshold=cdfthreshd,
                               topk=topk, attention_sink=bool(attention_sink),
                               is_causal=bool(is_causal), layout="HND", block_q=BLKQ,
                               block_k=BLKK)
    if not is_sparse:
        batch, heads = mask.shape[:2]
        mask = sparge.SparseMask.full(batch, heads, mask.q_len, mask.k_len, BLKQ, BLKK,
                                      bool(is_causal), mask.device)
    if return_lut:
        return mask.to_lut()
    return mask.blocks


__all__ = ["block_map_lut_triton", "get_block_map_meansim", "hyperparameter_check",
           "precision_metric"]
