"""sparge for diffusers transformers: one call on, one call off.

:func:`enable_sparge` wraps the attention processor of each chosen attention module (through the
module's own ``set_processor``, diffusers' processor mechanism) in a :class:`SpargeAttnProcessor`.
The wrapper runs the original processor unchanged; while it runs, a
:class:`torch.overrides.TorchFunctionMode` routes that processor's
``torch.nn.functional.scaled_dot_product_attention`` call to a sparge layer module
(:class:`~sparge.tuning.ErrorBudgetAttention`, :class:`~sparge.tuning.SparseAttentionMeansim` or
fixed thresholds). Projections, norms, rotary embeddings and the output projection stay diffusers'
own code, so every processor that ends in SDPA works: Wan, HunyuanVideo, CogVideoX, Flux, LTX-Video,
Mochi and others. The processors must use the ``native`` attention backend (the default); a
processor set to another diffusers backend is refused.

Which calls run sparse:

- layers: by default the self-attention (or joint text+video attention) module of every transformer
  block (:data:`FAMILY_LAYERS`), minus the first ``dense_layers`` of them;
- steps: the denoising step is counted from the ``timestep`` argument of the transformer's forward
  (a new value = a new step; a value above the previous one = a new generation), and the first
  ``dense_steps`` steps run dense;
- calls: an SDPA call with dropout, or with an attention mask that is not a plain key-padding
  prefix mask, or with fewer than ``min_tokens`` queries or keys, runs dense (and is counted in the
  report).

:func:`disable_sparge` restores the original processors; :func:`sparge_report` returns what each
layer did.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..api import sparse_attn
from ..mask import DeferredSparsity
from ..tuning import ErrorBudgetAttention, SparseAttentionMeansim, load_tuning
from ..tuning.budget import HeadReport

_DOUBLE_SINGLE = r"^(transformer_blocks|single_transformer_blocks)\.\d+\.attn$"

#: Default sparse layers per model class: a regular expression on module names.
FAMILY_LAYERS: dict[str, str] = {
    "WanTransformer3DModel": r"^blocks\.\d+\.attn1$",
    "WanVACETransformer3DModel": r"^blocks\.\d+\.attn1$",
    "HunyuanVideoTransformer3DModel": _DOUBLE_SINGLE,
    "HunyuanVideoFramepackTransformer3DModel": _DOUBLE_SINGLE,
    "CogVideoXTransformer3DModel": r"^transformer_blocks\.\d+\.attn1$",
    "FluxTransformer2DModel": _DOUBLE_SINGLE,
    "LTXVideoTransformer3DModel": r"^transformer_blocks\.\d+\.attn1$",
    "MochiTransformer3DModel": r"^transformer_blocks\.\d+\.attn1$",
}
#: Fallback for other models: self-attention modules of numbered blocks, no refiner blocks.
GENERIC_LAYERS = r"^(?!.*refiner).*blocks\.\d+\.(attn|attn1|self_attn)$"

MODES = ("budget", "calibrate", "tuned", "fixed", "dense")
#: The :func:`sparge.sparse_attn` arguments ``sparse_kwargs`` may set in "fixed" mode.
FIXED_KWARGS = tuple(name for name in inspect.signature(sparse_attn).parameters
                     if name not in ("q", "k", "v", "is_causal", "scale", "attn_mask", "dropout_p",
                                     "return_stats"))


class _SparsityField:
    """A float dataclass field that may be set to a :class:`~sparge.mask.DeferredSparsity`
    instead (a count on the GPU): it is read back on the field's first read, and kept."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: object | None, owner: type | None = None) -> float:
        if obj is None:
            return 0.0  # the field's default
        value = obj.__dict__[self.slot]
        if isinstance(value, DeferredSparsity):
            value = obj.__dict__[self.slot] = float(value)
        return value

    def __set__(self, obj: object, value: float | DeferredSparsity) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class LayerStats:
    """What one wrapped layer did: calls run sparse, run dense (and why), the block sparsity of
    the last sparse call (mean over heads; in calibration the mean tuned sparsity), and the report
    of its sparse module (error-budget layers).

    ``last_sparsity`` is read back when read, not on every call: in "fixed" and calibrated modes
    each call counts its kept blocks on the GPU, and reading the field reads that count.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    dense_reasons: dict[str, int] = field(default_factory=dict)
    last_sparsity: float = _SparsityField()  # type: ignore[assignment]
    budget: HeadReport | None = None


class _SDPARoute(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls made while a processor runs to a wrapper."""

    def __init__(self, processor: SpargeAttnProcessor) -> None:
        super().__init__()
        self.processor = processor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.processor._attention(func, args, kwargs)
        return func(*args, **kwargs)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")


def _key_prefix_length(mask: torch.Tensor, q_len: int, k_len: int) -> int | None:
    """If ``mask`` only hides a common tail of the keys (a key-padding mask broadcast over
    queries and heads), the number of keys it keeps; else None."""
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        if bool((mask > 0).any()) or bool(((mask < 0) & (mask > -1e4)).any()):
            return None  # an additive bias, not a mask
        keep = mask == 0
    else:
        return None
    if keep.dim() < 2 or keep.shape[-1] != k_len:
        return None
    keep = keep.reshape(-1, keep.shape[-2], k_len)
    cols = keep[:, 0]
    if not bool((keep == cols[:, None]).all()):
        return None  # depends on the query
    if not bool((cols == cols[:1]).all()):
        return None  # differs across batch or heads
    col = cols[0]
    n = int(col.sum())
    if n == 0 or not bool(col[:n].all()):
        return None
    return n


class SpargeAttnProcessor(nn.Module):
    """An attention processor that runs another one with its SDPA call made sparse.

    Args:
        inner: the original processor (restored by :func:`disable_sparge`).
        sparse: the sparge layer module (registered as the child ``sparse``, so its tuned values
            appear in the model's ``state_dict`` and in ``named_modules``), or None for "fixed" and
            "dense" modes. A :class:`~sparge.tuning.SparseAttentionMeansim` is set to record
            its sparsity (for :class:`LayerStats`).
        controller: the :class:`SpargeController` deciding steps and layers.
        name: the attention module's name in the model.
        fixed: keyword arguments of :func:`sparge.sparse_attn` for "fixed" mode.
    """

    def __init__(self, inner: Callable, sparse: nn.Module | None, controller: SpargeController,
                 name: str, layer_index: int, fixed: dict | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.sparse = sparse
        if isinstance(sparse, SparseAttentionMeansim):
            sparse.record_sparsity = True
        self.name, self.layer_index = name, layer_index
        self.fixed = dict(fixed or {})
        self.stats = LayerStats()
        object.__setattr__(self, "_controller", controller)  # not a child module
        self.__class__ = _signature_class(type(inner))

    # diffusers sets these on the processor (set_attention_backend, context parallelism)
    @property
    def _attention_backend(self):
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value) -> None:
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value) -> None:
        self.inner._parallel_config = value

    def __call__(self, attn: nn.Module, *args, **kwargs):
        if not self._controller.layer_is_sparse_now(self):
            self.stats.dense_calls += 1
            self._count("dense step or layer")
            return self.inner(attn, *args, **kwargs)
        backend = self._attention_backend
        if backend is not None and str(getattr(backend, "value", backend)) != "native":
            raise RuntimeError(f"{self.name}: sparge needs the 'native' diffusers attention "
                               f"backend, the processor is set to {backend}")
        with _SDPARoute(self):
            return self.inner(attn, *args, **kwargs)

    def _count(self, reason: str) -> None:
        self.stats.dense_reasons[reason] = self.stats.dense_reasons.get(reason, 0) + 1

    def _attention(self, sdpa: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        """One intercepted SDPA call: sparse when possible, else the original call."""
        call = dict(zip(_SDPA_ARGS, args, strict=False))
        call.update(kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        mask = call.get("attn_mask")
        why = None
        if call.get("dropout_p", 0.0):
            why = "dropout"
        elif q.dim() != 4:
            why = "not 4-D"
        elif min(q.shape[2], k.shape[2]) < self._controller.min_tokens:
            why = "short sequence"
        elif q.shape[1] != k.shape[1] and not call.get("enable_gqa", False):
            why = "head counts differ"
        elif v.shape[-1] != q.shape[-1]:
            why = "value head dim differs"
        if why is None and mask is not None:
            n = _key_prefix_length(mask, q.shape[2], k.shape[2])
            if n is None:
                why = "attention mask"
            else:
                k, v = k[:, :, :n], v[:, :, :n]
        if why is not None:
            self._count(why)
            self.stats.dense_calls += 1
            return sdpa(*args, **kwargs)
        self.stats.sparse_calls += 1
        return self._sparse(q, k, v, bool(call.get("is_causal", False)), call.get("scale"))

    def _sparse(self, q, k, v, is_causal: bool, scale: float | None) -> torch.Tensor:
        mode = self._controller.mode
        if mode == "dense":
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        if mode == "fixed":
            out, stats = sparse_attn(q, k, v, is_causal=is_causal, scale=scale,
                                     return_stats=True, **self.fixed)
            self.stats.last_sparsity = stats.mask.deferred_sparsity()
            return out
        out = self.sparse(q, k, v, is_causal=is_causal, scale=scale)
        if isinstance(self.sparse, SparseAttentionMeansim):
            deferred = self.sparse.last_sparsity  # None after a tuning call
            self.stats.last_sparsity = (float(self.sparse.tuning_sparsity.mean())
                                        if deferred is None else deferred)
        else:  # a CPU tensor: the budget layer synchronises by design (it steers by error)
            self.stats.last_sparsity = float(self.sparse._last_sparsity.mean())
        return out


@functools.cache
def _signature_class(inner_type: type) -> type:
    """A subclass of :class:`SpargeAttnProcessor` whose ``__call__`` shows the signature of
    ``inner_type.__call__``: diffusers' attention modules drop the keyword arguments that their
    processor's signature does not name."""
    try:
        signature = inspect.signature(inner_type.__call__)
    except (TypeError, ValueError):
        return SpargeAttnProcessor

    def __call__(self, attn, *args, **kwargs):
        return SpargeAttnProcessor.__call__(self, attn, *args, **kwargs)

    __call__.__signature__ = signature
    return type(f"Sparge{inner_type.__name__}", (SpargeAttnProcessor,), {"__call__": __call__})


class SpargeController:
    """Holds the settings of :func:`enable_sparge` and the step counter."""

    def __init__(self, mode: str, dense_steps: int, min_tokens: int) -> None:
        self.mode, self.dense_steps, self.min_tokens = mode, dense_steps, min_tokens
        self.step = -1
        self._last_t: float | None = None
        self.processors: dict[str, SpargeAttnProcessor] = {}
        self.originals: dict[str, Callable] = {}
        self.hook = None

    def observe_timestep(self, timestep) -> None:
        """Advance the step counter from a transformer call's ``timestep``."""
        if timestep is None:
            self.step += 1
            return
        t = float(torch.as_tensor(timestep).flatten()[0]) if not isinstance(timestep, float) \
            else timestep
        if self._last_t is None or t > self._last_t:
            self.step = 0  # first call, or a new generation (timesteps decrease within one)
        elif t < self._last_t:
            self.step += 1
        self._last_t = t

    def reset_steps(self) -> None:
        """Start counting steps afresh (the next transformer call is step 0)."""
        self.step, self._last_t = -1, None

    def layer_is_sparse_now(self, processor: SpargeAttnProcessor) -> bool:
        return self.step < 0 or self.step >= self.dense_steps


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "processor") and not isinstance(m, SpargeAttnProcessor)}


def select_layers(model: nn.Module, layers: str | Iterable[str] | Callable[[str], bool] | None
                  = None) -> list[str]:
    """Names of the attention modules that :func:`enable_sparge` would wrap, in model order.

    ``layers`` is a regular expression, a list of names or a predicate on names; None picks the
    model family's default (:data:`FAMILY_LAYERS`, else :data:`GENERIC_LAYERS`).
    """
    names = list(_attention_modules(model))
    if layers is None:
        layers = FAMILY_LAYERS.get(type(model).__name__, GENERIC_LAYERS)
    if isinstance(layers, str):
        pattern = re.compile(layers)
        return [n for n in names if pattern.search(n)]
    if callable(layers):
        return [n for n in names if layers(n)]
    wanted = list(layers)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise KeyError(f"no attention module named {unknown[:5]}")
    return [n for n in names if n in set(wanted)]


def _set_processor(module: nn.Module, processor: Callable) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        if isinstance(getattr(module, "processor", None), nn.Module):
            module._modules.pop("processor", None)
        module.processor = processor


def enable_sparge(transformer: nn.Module, mode: str = "budget", *, budget: float = 0.05,
                  tuned: str | dict | None = None, layers=None, dense_layers: int = 1,
                  dense_steps: int = 2, min_tokens: int = 128,
                  sparse_kwargs: dict | None = None) -> SpargeController:
    """Turn sparge on for a diffusers transformer.

    Args:
        transformer: e.g. ``pipe.transformer`` (Wan, HunyuanVideo, CogVideoX, Flux, LTX-Video,
            Mochi, or another model whose attention processors end in SDPA).
        mode: ``"budget"``: error-budget mode, each layer keeps its estimated relative L1 error
            under ``budget`` by itself (:class:`~sparge.tuning.ErrorBudgetAttention`);
            ``"calibrate"``: upstream-style calibration layers
            (:class:`~sparge.tuning.SparseAttentionMeansim`), to run under
            :func:`sparge.tuning.calibration`; ``"tuned"``: calibrated layers with values loaded
            from ``tuned``; ``"fixed"``: the same thresholds everywhere (``sparse_kwargs`` for
            :func:`sparge.sparse_attn`); ``"dense"``: the wrapping without sparsity (a check).
        budget: relative L1 budget per layer call (``"budget"`` mode).
        tuned: a :func:`sparge.tuning.save_tuning` file or values (``"tuned"``, also accepted by
            ``"budget"`` to start from saved levels and ``"calibrate"`` to resume).
        layers: which attention modules may run sparse (see :func:`select_layers`).
        dense_layers: the first this many of them stay dense.
        dense_steps: the first this many denoising steps run dense.
        min_tokens: SDPA calls with fewer queries or keys run dense.
        sparse_kwargs: keyword arguments of the layer modules (e.g. ``sample_rows``, ``margin``,
            ``quant`` for budget mode; ``l1``, ``granularity`` for calibration) or of
            :func:`sparge.sparse_attn` in ``"fixed"`` mode.

    Returns:
        The :class:`SpargeController` (also at ``transformer._sparge``): ``.step``,
        ``.processors``, ``.reset_steps()``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if getattr(transformer, "_sparge", None) is not None:
        raise RuntimeError("sparge is already enabled on this model; call disable_sparge first")
    if mode == "tuned" and tuned is None:
        raise ValueError("mode='tuned' needs tuned values (a file or a dict)")
    for name, value in (("dense_layers", dense_layers), ("dense_steps", dense_steps),
                        ("min_tokens", min_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    sparse_kwargs = dict(sparse_kwargs or {})
    if tuned is not None and mode in ("fixed", "dense"):
        raise ValueError(f"mode={mode!r} has no tuned values: tuned is for 'tuned', 'budget' "
                         "and 'calibrate'")
    if sparse_kwargs and mode == "dense":
        raise ValueError("mode='dense' uses no sparse_kwargs")
    if mode == "fixed":
        unknown = sorted(set(sparse_kwargs) - set(FIXED_KWARGS))
        if unknown:
            raise TypeError(f"sparse_kwargs {unknown} are not arguments of sparge.sparse_attn "
                            f"that mode='fixed' passes (those are {FIXED_KWARGS}; q, k, v, "
                            "is_causal and scale come from each SDPA call)")
    controller = SpargeController(mode, dense_steps, min_tokens)
    modules = _attention_modules(transformer)
    chosen = select_layers(transformer, layers)[dense_layers:]
    if not chosen:
        raise ValueError("no attention layer selected")
    for index, name in enumerate(chosen):
        module = modules[name]
        if mode == "budget":
            sparse = ErrorBudgetAttention(budget, **sparse_kwargs)
        elif mode in ("calibrate", "tuned"):
            sparse = SparseAttentionMeansim(**sparse_kwargs)
        else:
            sparse = None
        wrapper = SpargeAttnProcessor(module.processor, sparse, controller, name, index,
                                      sparse_kwargs if mode == "fixed" else None)
        controller.originals[name] = module.processor
        controller.processors[name] = wrapper
        _set_processor(module, wrapper)
    transformer._sparge = controller

    def pre_hook(mod, args, kwargs):
        timestep = kwargs.get("timestep")
        if timestep is None and len(args) > 1 and isinstance(args[1], (torch.Tensor, float, int)):
            timestep = args[1]
        controller.observe_timestep(timestep)

    controller.hook = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if tuned is not None:
        load_tuning(transformer, tuned, strict=mode == "tuned")
    return controller


def disable_sparge(transformer: nn.Module) -> dict[str, LayerStats]:
    """Restore the original attention processors; returns the final per-layer statistics."""
    controller: SpargeController | None = getattr(transformer, "_sparge", None)
    if controller is None:
        return {}
    report = sparge_report(transformer)
    modules = _attention_modules(transformer)
    for name, original in controller.originals.items():
        _set_processor(modules[name], original)
    controller.hook.remove()
    del transformer._sparge
    return report


def sparge_report(transformer: nn.Module) -> dict[str, LayerStats]:
    """Per wrapped layer: sparse and dense call counts, last sparsity and, in budget mode, the
    per-head levels, sparsity and estimated errors (:class:`~sparge.tuning.HeadReport`)."""
    controller: SpargeController | None = getattr(transformer, "_sparge", None)
    if controller is None:
        return {}
    out = {}
    for name, proc in controller.processors.items():
        if isinstance(proc.sparse, ErrorBudgetAttention):
            proc.stats.budget = proc.sparse.report()
        out[name] = proc.stats
    return out


def is_enabled(transformer: nn.Module) -> bool:
    """Whether :func:`enable_sparge` is in effect on ``transformer``."""
    return getattr(transformer, "_sparge", None) is not None


__all__ = ["FAMILY_LAYERS", "FIXED_KWARGS", "LayerStats", "SpargeAttnProcessor", "SpargeController",
           "disable_sparge", "enable_sparge", "is_enabled", "select_layers", "sparge_report"]
