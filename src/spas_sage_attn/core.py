"""The upstream ``spas_sage_attn`` attention functions, implemented on :mod:`sparge`.

Same names, argument names, defaults and return conventions as the SpargeAttn package, so code
written for it runs unchanged, on any GPU Triton supports and on the CPU. Where sparge behaves
differently it is on purpose and documented here:

- Fixed mask granularity. The predicting functions always use query blocks of 128 and key blocks of
  64 rows (upstream's granularity on every GPU but Hopper, and that of its Triton kernel), so a call
  gives the same mask on every device. :func:`block_sparse_sage2_attn_cuda` accepts ``mask_id`` at
  either upstream granularity and infers it from the shape.
- No length or head-dim limits (upstream asserts L >= 128 and D in {64, 128}); Lq != Lk works;
  causal masking is exact per element, top-left aligned like SDPA.
- Output dtype follows the input dtype (upstream's kernels write q's dtype, or float16 for float32
  input). ``output_dtype`` left at its default ``torch.float16`` means exactly that; any other
  dtype is honoured.
- ``return_sparsity`` reports 1 - kept blocks / blocks the dense (or causal) computation visits,
  counted exactly. Upstream approximates the causal count with (nK + 2) // 2 blocks per row, and
  :func:`block_sparse_sage2_attn_cuda` upstream always uses that causal count although it is never
  causal (a dense mask reports about -1 there); sparge reports 0 for a dense mask.
- Arguments upstream accepts and ignores are either honoured or refused with a clear error:
  ``attn_mask`` (must be None), ``dropout_p`` (must be 0), ``smooth_k=False`` (sparge always
  smooths K), ``return_lse=True`` (not available), ``attention_sink`` of the block-sparse function
  (honoured: key block 0 is kept for every query block).
"""

from __future__ import annotations

import torch

import sparge
from sparge._inputs import check_block_mask_dtype, check_unsupported

from .utils import hyperparameter_check

#: (query block, key block) the predicting functions use on every device.
PREDICT_BLOCKS = (128, 64)
#: The two mask_id granularities upstream uses: (128, 64) on most GPUs, (64, 128) on Hopper.
MASK_GRANULARITIES = ((128, 64), (64, 128))

_UPSTREAM_OUTPUT_DTYPE = torch.float16

Threshold = float | torch.Tensor


def get_cuda_arch_versions() -> list[str]:
    """Compute capability of each visible CUDA device as ``"sm<major><minor>"`` (empty on CPU)."""
    archs = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        archs.append(f"sm{major}{minor}")
    return archs


# ------------------------------------------------------------------------------------ checks
def _out_dtype(output_dtype: torch.dtype | None) -> torch.dtype | None:
    """sparge's ``out_dtype`` for upstream's ``output_dtype`` (see the module docstring)."""
    if output_dtype is None or output_dtype == _UPSTREAM_OUTPUT_DTYPE:
        return None  # follow the input dtype, as upstream's kernels do
    if not isinstance(output_dtype, torch.dtype):
        raise TypeError(f"output_dtype must be a torch.dtype, got {type(output_dtype).__name__}")
    return output_dtype


def _refuse_unsupported(smooth_k: bool, return_lse: bool) -> None:
    if not smooth_k:
        raise NotImplementedError(
            "smooth_k=False is not supported: sparge always subtracts K's per-channel mean before "
            "pooling and quantizing (softmax is unchanged by it; it only lowers the error). "
            "Use smooth_k=True.")
    if return_lse:
        raise NotImplementedError(
            "return_lse=True is not supported: sparge's attention functions do not return the "
            "log-sum-exp. Use return_lse=False.")


def _check_layout(tensor_layout: str) -> None:
    if tensor_layout not in ("HND", "NHD"):
        raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")


def _heads(q: torch.Tensor, tensor_layout: str) -> int:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 4-D tensor, got {shape}")
    return q.shape[1] if tensor_layout == "HND" else q.shape[2]


def _per_head(name: str, value: Threshold | None, heads: int,
              device: torch.device) -> Threshold | None:
    """A hyperparameter checked like upstream's: a Python number stays a float (no tensor, no
    device round trip); a tensor becomes float32 (H,) on ``device``."""
    if value is None:
        return None
    if type(value) in (float, int):
        return float(value)
    try:
        return hyperparameter_check(value, heads, device).float()
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


# ------------------------------------------------------------------------------ attention
def _meansim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: object,
             dropout_p: float, is_causal: bool, scale: float | None, smooth_k: bool,
             simthreshd1: Threshold, cdfthreshd: Threshold | None, topk: Threshold | None,
             pvthreshd: Threshold, attention_sink: bool, tensor_layout: str,
             output_dtype: torch.dtype | None, return_sparsity: bool, return_lse: bool,
             quant: str) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Predicted-mask attention through :func:`sparge.sparse_attn`."""
    _refuse_unsupported(smooth_k, return_lse)
    _check_layout(tensor_layout)
    if (cdfthreshd is None) == (topk is None):
        raise ValueError("exactly one of cdfthreshd and topk must be set, got "
                         f"cdfthreshd={cdfthreshd!r}, topk={topk!r}")
    heads = _heads(q, tensor_layout)
    result = sparge.sparse_attn(
        q, k, v,
        sim_threshold=_per_head("simthreshd1", simthreshd1, heads, q.device),
        cdf_threshold=_per_head("cdfthreshd", cdfthreshd, heads, q.device),
        topk=_per_head("topk", topk, heads, q.device),
        pv_threshold=_per_head("pvthreshd", pvthreshd, heads, q.device),
        attention_sink=bool(attention_sink), is_causal=bool(is_causal), scale=scale,
        layout=tensor_layout, block_q=PREDICT_BLOCKS[0], block_k=PREDICT_BLOCKS[1], quant=quant,
        out_dtype=_out_dtype(output_dtype), attn_mask=attn_mask, dropout_p=dropout_p,
        return_stats=bool(return_sparsity))
    if return_sparsity:
        out, stats = result
        return out, stats.sparsity
    return result


def spas_sage2_attn_meansim_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 smooth_k: bool = True, simthreshd1: Threshold = 0.6,
                                 cdfthreshd: Threshold = 0.98, pvthreshd: Threshold = 50,
                                 attention_sink: bool = False, tensor_layout: str = "HND",
                                 output_dtype: torch.dtype = torch.float16,
                                 return_sparsity: bool = False, return_lse: bool = False
                                 ) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Sparse attention with a mask predicted by the CDF rule (SpargeAttn's plug-and-play API).

    Args:
        q: (B, Hq, Lq, D) for ``tensor_layout="HND"``, (B, Lq, Hq, D) for ``"NHD"``; float16,
            bfloat16 or float32.
        k, v: (B, Hk, Lk, D) or (B, Lk, Hk, D), Hq a multiple of Hk.
        attn_mask, dropout_p: must be None and 0 (anything else raises).
        is_causal: exact causal masking, top-left aligned like SDPA.
        scale: softmax scale, 1 / sqrt(D) when None.
        smooth_k: must be True (sparge always smooths K).
        simthreshd1: self-similarity threshold; float or (Hq,) tensor.
        cdfthreshd: keep the key blocks holding this much pooled attention mass (0, 1].
        pvthreshd: PV-skipping threshold, base-2 score units (>= 0).
        attention_sink: always keep the first key block.
        output_dtype: the default float16 means "q's dtype"; another dtype is honoured.
        return_sparsity: also return the block sparsity as a Python float.
        return_lse: must be False.

    Returns:
        The output in q's layout, or ``(output, sparsity)``.
    """
    return _meansim(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, smooth_k=smooth_k, simthreshd1=simthreshd1,
                    cdfthreshd=cdfthreshd, topk=None, pvthreshd=pvthreshd,
                    attention_sink=attention_sink, tensor_layout=tensor_layout,
                    output_dtype=output_dtype, return_sparsity=return_sparsity,
                    return_lse=return_lse, quant="auto")


def spas_sage2_attn_meansim_topk_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      attn_mask: None = None, dropout_p: float = 0.0,
                                      is_causal: bool = False, scale: float | None = None,
                                      smooth_k: bool = True, simthreshd1: Threshold = -0.1,
                                      cdfthreshd: Threshold | None = None,
                                      topk: Threshold | None = 0.5, pvthreshd: Threshold = 50,
                                      attention_sink: bool = False, tensor_layout: str = "HND",
                                      output_dtype: torch.dtype = torch.float16,
                                      return_sparsity: bool = False, return_lse: bool = False
                                      ) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Sparse attention keeping a fixed fraction ``topk`` of the key blocks per query block.

    Arguments as in :func:`spas_sage2_attn_meansim_cuda`; ``topk`` in (0, 1] (float or (Hq,)
    tensor). Give ``cdfthreshd`` with ``topk=None`` to use the CDF rule instead; both is an error.
    The default ``simthreshd1=-0.1`` makes every block eligible for skipping.
    """
    return _meansim(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, smooth_k=smooth_k, simthreshd1=simthreshd1,
                    cdfthreshd=cdfthreshd, topk=topk, pvthreshd=pvthreshd,
                    attention_sink=attention_sink, tensor_layout=tensor_layout,
                    output_dtype=output_dtype, return_sparsity=return_sparsity,
                    return_lse=return_lse, quant="auto")


def spas_sage_attn_meansim_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  attn_mask: None = None, dropout_p: float = 0.0,
                                  is_causal: bool = False, scale: float | None = None,
                                  smooth_k: bool = True, simthreshd1: Threshold = 0.6,
                                  cdfthreshd: Threshold = 0.98, pvthreshd: Threshold = 50,
                                  attention_sink: bool = False, tensor_layout: str = "HND",
                                  output_dtype: torch.dtype = torch.float16,
                                  return_sparsity: bool = False
                                  ) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Upstream's Triton variant (for GPUs older than Ampere): the CDF rule with INT8 QK and FP16
    PV on every device. Arguments as in :func:`spas_sage2_attn_meansim_cuda`."""
    return _meansim(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, smooth_k=smooth_k, simthreshd1=simthreshd1,
                    cdfthreshd=cdfthreshd, topk=None, pvthreshd=pvthreshd,
                    attention_sink=attention_sink, tensor_layout=tensor_layout,
                    output_dtype=output_dtype, return_sparsity=return_sparsity,
                    return_lse=False, quant="int8_fp16")


def spas_sage_attn_meansim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object,
                           **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Upstream's dispatcher: calls :func:`spas_sage2_attn_meansim_cuda` with the same arguments.

    Upstream picks its Triton kernel on Volta/Turing and its CUDA kernels elsewhere; in sparge the
    choice of execution path and PV precision is made by :mod:`sparge.backend` on every call.
    """
    return spas_sage2_attn_meansim_cuda(q, k, v, *args, **kwargs)


# ------------------------------------------------------------------------------ block-sparse
def infer_mask_granularity(mask_shape: tuple[int, ...], q_len: int,
                           k_len: int) -> tuple[int, int]:
    """The (query block, key block) sizes of an upstream ``mask_id`` from its shape.

    ``mask_id`` is (B, H, ceil(Lq/128), ceil(Lk/64)) on most GPUs and (B, H, ceil(Lq/64),
    ceil(Lk/128)) on Hopper. The two shapes coincide only when Lq <= 64 and Lk <= 64; then the mask
    is a single block covering every token and both readings give the same result: (128, 64) is
    returned.

    Raises:
        ValueError: the shape matches neither granularity.
    """
    if len(mask_shape) != 4:
        raise ValueError(f"mask_id must be 4-D (B, H, nQ, nK), got shape {tuple(mask_shape)}")
    found = tuple(mask_shape[2:])
    for block_q, block_k in MASK_GRANULARITIES:
        if found == (-(-q_len // block_q), -(-k_len // block_k)):
            return block_q, block_k
    expected = " or ".join(f"{(-(-q_len // bq), -(-k_len // bk))} for blocks of {bq}x{bk}"
                           for bq, bk in MASK_GRANULARITIES)
    raise ValueError(f"mask_id has (nQ, nK) = {found}, but Lq={q_len}, Lk={k_len} need {expected} "
                     "(ceil(L / block) blocks on each side)")


def block_sparse_sage2_attn_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask_id: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 scale: float | None = None, smooth_k: bool = True,
                                 pvthreshd: Threshold = 50, attention_sink: bool = False,
                                 tensor_layout: str = "HND",
                                 output_dtype: torch.dtype = torch.float16,
                                 return_sparsity: bool = False, return_lse: bool = False
                                 ) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Attention over the blocks of a caller-given mask (the API RadialAttention builds on).

    Args:
        q, k, v: as in :func:`spas_sage2_attn_meansim_cuda`.
        mask_id: (B or 1, Hq or 1, nQ, nK), bool or integer (non-zero = computed), at either
            upstream granularity: (ceil(Lq/128), ceil(Lk/64)) or (ceil(Lq/64), ceil(Lk/128)),
            inferred from the shape (see :func:`infer_mask_granularity`). A query row whose blocks
            are all zero returns zeros.
        dropout_p: must be 0.
        scale, smooth_k, pvthreshd, tensor_layout, output_dtype, return_sparsity, return_lse: as
            in :func:`spas_sage2_attn_meansim_cuda`.
        attention_sink: also compute key block 0 for every query block.

    Returns:
        The output in q's layout, or ``(output, sparsity)``; never causal.
    """
    _refuse_unsupported(smooth_k, return_lse)
    _check_layout(tensor_layout)
    check_unsupported(None, dropout_p)
    if mask_id is None:
        raise ValueError("mask_id is required: a (B, H, nQ, nK) block mask")
    if not isinstance(mask_id, torch.Tensor):
        raise TypeError(f"mask_id must be a torch.Tensor, got {type(mask_id).__name__}")
    check_block_mask_dtype("mask_id", mask_id)
    heads = _heads(q, tensor_layout)
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError("k must be a 4-D tensor")
    seq_dim = 2 if tensor_layout == "HND" else 1
    block_q, block_k = infer_mask_granularity(tuple(mask_id.shape), q.shape[seq_dim],
                                              k.shape[seq_dim])
    blocks = mask_id != 0
    if attention_sink:
        blocks = blocks.clone()
        blocks[..., 0] = True
    result = sparge.block_sparse_attn(
        q, k, v, blocks, block_q=block_q, block_k=block_k, is_causal=False,
        pv_threshold=_per_head("pvthreshd", pvthreshd, heads, q.device), scale=scale,
        layout=tensor_layout, quant="auto", out_dtype=_out_dtype(output_dtype),
        return_stats=bool(return_sparsity))
    if return_sparsity:
        out, stats = result
        return out, stats.sparsity
    return result


# Upstream keeps these names for code written against its first version.
spas_sage_attn_meansim_cuda = spas_sage2_attn_meansim_cuda
spas_sage_attn_meansim_topk_cuda = spas_sage2_attn_meansim_topk_cuda

__all__ = [
    "block_sparse_sage2_attn_cuda",
    "get_cuda_arch_versions",
    "infer_mask_granularity",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_triton",
]
