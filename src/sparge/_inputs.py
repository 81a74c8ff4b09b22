"""Argument checking shared by the public entry points: every bad input gets a clear error."""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict

import torch

from . import settings
from .mask import check_block_sizes as check_block_sizes  # the entry points' checks, here too
from .quant import EXACT, PV_FP8, PV_FP16

LAYOUTS = ("HND", "NHD")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
QUANT_CHOICES = ("auto", PV_FP8, PV_FP16, EXACT)
BACKENDS = ("auto", "triton", "reference")

Threshold = float | torch.Tensor


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of x in (B, H, L, D) order."""
    return x if layout == "HND" else x.transpose(1, 2)


def as_4d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Size | None]:
    """SDPA's other shapes, in layout "HND", as (B, H, L, D): (N, L, D) without a head
    dimension as (N, 1, L, D), and (N, ..., H, L, D) with the leading dimensions (the same for
    q, k and v) flattened into B. Returns the three tensors and q's shape, None when nothing
    changed (4-D inputs, other layouts, shapes the checks refuse)."""
    if layout != "HND" or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return q, k, v, None
    dim = q.dim()
    if dim < 3 or dim == 4 or k.dim() != dim or v.dim() != dim:
        return q, k, v, None
    if dim == 3:
        return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), q.shape
    lead = q.shape[:-3]
    if k.shape[:-3] != lead or v.shape[:-3] != lead:
        raise ValueError(f"q, k and v must share their leading dimensions (N, ...), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    batch = math.prod(lead)
    return (q.reshape(batch, *q.shape[-3:]), k.reshape(batch, *k.shape[-3:]),
            v.reshape(batch, *v.shape[-3:]), q.shape)


def check_layout(layout: str, name: str = "layout") -> None:
    """``layout`` (the argument ``name``) is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")


def check_qk(q: torch.Tensor, k: torch.Tensor, layout: str) -> None:
    """Validate q and k (the mask predictor's inputs), as :func:`check_qkv` does."""
    _check_tensors(("q", "k"), (q, k), layout)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """Validate q, k and v: rank, dtypes, devices and shapes, in the given layout."""
    _check_tensors(("q", "k", "v"), (q, k, v), layout)


def check_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, *,
                         quant: str, backend: str, out_dtype: torch.dtype | None) -> None:
    """The checks every attention entry point makes: q, k and v in their layout (and, with
    ``SPARGE_CHECK_FINITE=1``, their values), then the quantization mode, the backend and the
    output dtype."""
    check_qkv(q, k, v, layout)
    if settings.CHECK_FINITE.enabled():
        check_finite(q=q, k=k, v=v)
    check_choice("quant", quant, QUANT_CHOICES)
    check_choice("backend", backend, BACKENDS)
    check_out_dtype(out_dtype)


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise ValueError if a tensor holds NaN or an infinity. Reads one flag per tensor back
    from its device, so it cannot run where nothing may be read back: under ``torch.compile``
    or while a CUDA graph is being captured, where it raises RuntimeError instead."""
    if torch.compiler.is_compiling() or (torch.cuda.is_available()
                                         and torch.cuda.is_current_stream_capturing()):
        raise RuntimeError(
            f"{settings.CHECK_FINITE.name}=1 checks the inputs' values, which cannot be read "
            "back under torch.compile or during CUDA graph capture: unset it there")
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ValueError(f"{name} holds {nan} NaN and {inf} infinite values "
                             f"({settings.CHECK_FINITE.name}=1)")


def _check_tensors(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...],
                   layout: str) -> None:
    """The checks of :func:`check_qk` and :func:`check_qkv`, ``names`` naming ``tensors``."""
    check_layout(layout)
    q, k = tensors[:2]
    v = tensors[2] if len(tensors) > 2 else None
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            order = "(B, H, L, D)" if layout == "HND" else "(B, L, H, D)"
            raise ValueError(f"{name} must be 4-D {order} for layout {layout!r}, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must share a dtype, got {q.dtype} and {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {name} are on different devices: {q.device} and {t.device}")
    qh, kh = to_hnd(q, layout), to_hnd(k, layout)
    batch, heads_q, q_len, dim = qh.shape
    _, heads_k, k_len, _ = kh.shape
    if kh.shape[0] != batch:
        raise ValueError(f"q and k differ in batch size: {batch} vs {kh.shape[0]}")
    if kh.shape[3] != dim:
        raise ValueError(f"q and k differ in head dim: {dim} vs {kh.shape[3]}")
    if v is not None:
        vh = to_hnd(v, layout)
        if vh.shape[:3] == kh.shape[:3] and vh.shape[3] != dim:
            hint = (" A smaller v can be padded with zeros to that head dim: the first "
                    f"{vh.shape[3]} channels of the output are then its attention."
                    if vh.shape[3] < dim else "")
            raise NotImplementedError(
                f"v's head dim ({vh.shape[3]}) differs from q's and k's ({dim}): sparge takes "
                f"one head dim for q, k and v (SDPA's Ev != E is not supported).{hint}")
        if vh.shape != kh.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
    if q_len < 1 or k_len < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Lq={q_len}, Lk={k_len}")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    if heads_q < 1 or heads_k < 1 or heads_q % heads_k:
        raise ValueError(f"query heads ({heads_q}) must be a positive multiple of key/value "
                         f"heads ({heads_k})")


def check_flags(**flags: bool) -> None:
    """Boolean switches are bools, as SDPA's ``is_causal`` is: a string such as "False" would
    otherwise be taken as True."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def check_block_mask_dtype(name: str, mask: torch.Tensor) -> None:
    """A block mask is bool or integer (non-zero = kept), never floating point: an additive
    float mask (0 = keep, -inf = drop) would be read the other way round."""
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be a bool or integer block mask (non-zero = kept), got "
                        f"dtype {mask.dtype}: pass {name} != 0 for a 0/1 mask, {name} == 0 for "
                        "an additive one (0 = keep, -inf = drop)")


def check_unsupported(attn_mask: object, dropout_p: float) -> None:
    """Refuse SDPA arguments the kernels cannot honour instead of ignoring them."""
    if attn_mask is not None:
        raise NotImplementedError(
            "an arbitrary attn_mask is not supported: sparge computes block-sparse attention. "
            "Describe a static pattern as a sparge.SparseMask and call sparge.block_sparse_attn, "
            "or use is_causal=True for causal masking.")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout is not supported (got dropout_p={dropout_p!r}); "
                                  "sparge is an inference kernel")


def check_gqa(enable_gqa: object, heads_q: int, heads_k: int) -> None:
    """SDPA's ``enable_gqa``: None (sparge's default) and True let Hq be a multiple of Hk; False
    requires Hq == Hk, as SDPA does."""
    if enable_gqa is not None and not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool or None, got {enable_gqa!r}")
    if enable_gqa is False and heads_q != heads_k:
        raise ValueError(f"enable_gqa=False needs as many query heads as key heads (as SDPA), got "
                         f"Hq={heads_q} and Hk={heads_k}: pass enable_gqa=True, or leave it out, "
                         "for grouped-query attention")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return float(scale)


# Tensor thresholds whose values passed a check: (id, check parameters) -> (weak reference,
# version counter at the check). Oldest entries go first; dead tensors' entries simply age out.
_CHECKED: OrderedDict[tuple, tuple[weakref.ref, int]] = OrderedDict()
_CHECKED_MAX = 1024


def _read_back(value: torch.Tensor) -> list[float]:
    """A tensor's values on the host (on a GPU, this waits for the device)."""
    return [float(x) for x in value.detach().double().cpu().reshape(-1)]


def check_threshold(name: str, value: Threshold | None, heads: int, *, low: float | None = None,
                    high: float | None = None, low_open: bool = False,
                    allow_inf: bool = False, optional: bool = False) -> None:
    """A hyperparameter is a real number or a (heads,) tensor, not NaN, within [low, high]
    (or None, where ``optional``).

    Numbers are checked in plain Python (no tensor is made, so this costs no device work and
    traces under ``torch.compile``). A tensor's values are read back and checked the first time
    the tensor object is seen, and again whenever it has been modified in place through PyTorch
    operations since it passed (its version counter, shared with its views, has changed); until
    then a tensor that passed is not read back again, so repeated calls with the same tensor do
    not synchronise with the device. Writes that bypass the version counter (through ``.data``,
    or by custom kernels) are not seen. Inference tensors (made under ``torch.inference_mode``)
    have no version counter and are read back on every call. Nothing is read back during CUDA
    graph capture or compilation, where reading back is impossible.
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape ({heads},), "
                        f"got {type(value).__name__}")
    key = None
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != heads):
            raise ValueError(f"{name} must be a scalar or have shape ({heads},) (one per query "
                             f"head), got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a tensor of real numbers (floating point or "
                            f"integer), got dtype {value.dtype}")
        if torch.compiler.is_compiling() or (value.is_cuda
                                             and torch.cuda.is_current_stream_capturing()):
            return
        if not value.is_inference():
            key = (id(value), name, heads, low, high, low_open, allow_inf)
            seen = _CHECKED.get(key)
            if seen is not None and seen[0]() is value and seen[1] == value._version:
                return
        values = _read_back(value)
    else:
        values = [float(value)]
    if any(math.isnan(x) for x in values):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    if not allow_inf and any(math.isinf(x) for x in values):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and any(x <= low if low_open else x < low for x in values):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    if high is not None and any(x > high for x in values):
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    if key is not None:
        _CHECKED.pop(key, None)
        _CHECKED[key] = (weakref.ref(value), value._version)
        if len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)


def check_selection(sim_threshold: Threshold, cdf_threshold: Threshold | None,
                    topk: Threshold | None,
                    heads: int) -> tuple[Threshold | None, Threshold | None]:
    """Validate the predictor's thresholds; returns (cdf_threshold, topk) with the CDF default."""
    if cdf_threshold is not None and topk is not None:
        raise ValueError("give cdf_threshold or topk, not both: they are two selection rules")
    if cdf_threshold is None and topk is None:
        cdf_threshold = 0.98
    check_threshold("sim_threshold", sim_threshold, heads)
    check_threshold("cdf_threshold", cdf_threshold, heads, low=0.0, high=1.0, low_open=True,
                    optional=True)
    check_threshold("topk", topk, heads, low=0.0, high=1.0, low_open=True, optional=True)
    return cdf_threshold, topk


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_out_dtype(out_dtype: torch.dtype | None) -> None:
    if out_dtype is not None and out_dtype not in INPUT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
