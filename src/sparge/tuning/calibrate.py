"""Per-layer calibration, compatible with upstream ``spas_sage_attn.autotune``.

A :class:`SparseAttentionMeansim` replaces one attention call site. In tune mode (``tune_mode=True``
or the environment variable ``TUNE_MODE`` set) it returns exact attention and, on the side, searches
per head the predictor's self-similarity threshold, the CDF threshold (or top-k fraction) and the PV
threshold so that the relative L1 error of the sparse output stays under ``l1`` (``pv_l1`` once PV
skipping is added), keeping the setting with the highest sparsity. Several calibration calls combine
conservatively (per similarity threshold, the largest CDF and PV thresholds any call needed). Heads
whose best sparsity stays below ``min_sparsity`` run dense. Outside tune mode it runs
:func:`sparge.sparse_attn` with the tuned values.

The tuned values are parameters with upstream's names (``is_sparse``, ``cdfthreshd``,
``simthreshd1``, ``simthreshd2``, ``pvthreshd``), so :func:`extract_sparse_attention_state_dict`
and :func:`load_sparse_attention_state_dict` exchange state dicts with upstream code;
:func:`save_tuning` and :func:`load_tuning` write a whole model's values (JSON or safetensors, keyed
by the model's module names) including what a resumed calibration needs, and :func:`calibration`
runs a resumable calibration with progress per layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _inputs as checks
from ..api import sparse_attn
from ..mask import DeferredSparsity
from ._common import exact_attention, from_hnd, rel_l1, rel_l1_per_head, to_hnd
from .budget import DENSE_SIM, ErrorBudgetAttention

PV_MAX = 50.0
UPSTREAM_KEYS = ("is_sparse", "cdfthreshd", "simthreshd1", "simthreshd2", "pvthreshd")
FORMAT = "sparge-tuning"


def _env_tune_mode() -> bool:
    return os.environ.get("TUNE_MODE", "") != ""


class SparseAttentionMeansim(nn.Module):
    """One attention call site with per-head tuned thresholds (upstream-compatible).

    Args (upstream's, same names and defaults):
        sim_rule: ``"l1"`` (relative L1 < ``l1``), ``"cosine"`` (cosine similarity > ``cos_sim``)
            or ``"rmse"`` (RMSE < ``rmse``): what "accurate enough" means for the CDF search.
        l1: relative L1 target of the block selection.
        pv_l1: relative L1 target once PV skipping is added (must exceed ``l1``).
        cos_sim, rmse: targets of the other rules.
        rearrange_kwargs: accepted for compatibility; unused.
        tune_pv: also tune the PV threshold (else it stays at 20, as upstream).

    Keyword-only additions:
        rule: ``"cdf"`` (tune the CDF threshold) or ``"topk"`` (tune the kept fraction, stored in
            the ``topk`` parameter).
        granularity: similarity thresholds tried are ``-1 + i / granularity`` for i < 2 *
            granularity (upstream: 16).
        cdf_tol: bisection tolerance of the CDF search, on log10 of the dropped mass 1 - tau
            (0.1: a factor 1.26), or of the top-k search on the kept fraction.
        pv_tol: bisection tolerance of the PV threshold search.
        min_sparsity: heads whose best sparsity is not above this stay dense (upstream: 0.1).
        attention_sink: keep key block 0 (upstream turns it on at inference; here tuning and
            inference use the same setting, so the tuned error is the error one gets).
        quant, backend, block_q, block_k: passed to :func:`sparge.sparse_attn`.
        verbose: print the tuned values after each tuning call (upstream always does).

    Attributes:
        record_sparsity: when True, each call outside tune mode keeps its block sparsity in
            ``last_sparsity``, counted on the device (``float()`` reads it back; the call
            itself does not). Off by default: without it a call computes no statistics (with it,
            each call also counts its kept blocks, and a replayed call copies its mask).
        last_sparsity: the :class:`sparge.mask.DeferredSparsity` of the last call outside tune
            mode while ``record_sparsity`` is on, else None.
    """

    def __init__(self, sim_rule: str = "l1", l1: float = 0.07, pv_l1: float = 0.08,
                 cos_sim: float = 0.98, rmse: float = 0.07, rearrange_kwargs: dict | None = None,
                 tune_pv: bool = True, *, rule: str = "cdf", granularity: int = 16,
                 cdf_tol: float = 0.1, pv_tol: float = 0.1, min_sparsity: float = 0.1,
                 attention_sink: bool = True, quant: str = "auto", backend: str = "auto",
                 block_q: int = 64, block_k: int = 128, verbose: bool = False) -> None:
        super().__init__()
        if not (l1 >= 0 and cos_sim <= 1 and rmse >= 0):
            raise ValueError("l1, cos_sim, rmse should be legal")
        if tune_pv and not pv_l1 > l1:
            raise ValueError("pv_l1 must be greater than l1")
        if sim_rule not in ("l1", "cosine", "rmse"):
            raise ValueError("sim_rule should be one of ['cosine', 'rmse', 'l1']")
        if rule not in ("cdf", "topk"):
            raise ValueError(f"rule must be 'cdf' or 'topk', got {rule!r}")
        if granularity < 1:
            raise ValueError("granularity must be >= 1")
        if not (cdf_tol > 0 and pv_tol > 0):  # the bisections would never end
            raise ValueError(f"cdf_tol and pv_tol must be > 0, got {cdf_tol!r} and {pv_tol!r}")
        checks.check_choice("quant", quant, checks.QUANT_CHOICES)
        checks.check_choice("backend", backend, checks.BACKENDS)
        checks.check_block_sizes(block_q, block_k)
        self.sim_rule, self.l1, self.pv_l1, self.cos_sim, self.rmse = sim_rule, l1, pv_l1, \
            cos_sim, rmse
        self.rearrange_kwargs = dict(rearrange_kwargs or {})
        self.tune_pv, self.rule, self.granularity = tune_pv, rule, granularity
        self.cdf_tol, self.pv_tol, self.min_sparsity = cdf_tol, pv_tol, min_sparsity
        self.attention_sink, self.quant, self.backend = attention_sink, quant, backend
        self.block_q, self.block_k, self.verbose = block_q, block_k, verbose
        self.head_num: int | None = None
        for name in (*UPSTREAM_KEYS, "topk"):
            self.register_parameter(name, None)
        self.tuning_sparsity: torch.Tensor | None = None
        self.record_sparsity = False
        self.last_sparsity: DeferredSparsity | None = None
        self.num_data_passed = 0
        self._table: dict[str, torch.Tensor] | None = None
        # what inference_args() returns, kept while its sources are unchanged: (the parameters
        # read, their version counters and attention_sink, the arguments)
        self._cached_args: tuple[tuple, tuple, dict] | None = None

    # ----------------------------------------------------------------------------- state
    @property
    def sims(self) -> torch.Tensor:
        """The similarity thresholds the search tries, ascending."""
        g = self.granularity
        return torch.arange(-g, g, dtype=torch.float32) / g

    def init_hyperparams(self, head_num: int, device: torch.device | str | None = None) -> None:
        """Start from scratch for ``head_num`` heads (upstream's initial values)."""
        self.head_num = head_num

        def param(value: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(value.to(device), requires_grad=False)

        self.is_sparse = param(torch.ones(head_num, dtype=torch.bool))
        self.cdfthreshd = param(torch.full((head_num,), 0.1))
        self.simthreshd1 = param(torch.full((head_num,), -1.0))
        self.simthreshd2 = param(torch.zeros(head_num))
        self.pvthreshd = param(torch.full((head_num,), 20.0))
        self.topk = param(torch.full((head_num,), 0.5)) if self.rule == "topk" else None
        self._cached_args = None
        self.tuning_sparsity = torch.zeros(head_num)
        self.num_data_passed = 0
        n = len(self.sims)
        self._table = {"tau": torch.zeros(head_num, n), "pv": torch.zeros(head_num, n),
                       "sparsity_sum": torch.zeros(head_num, n),
                       "count": torch.zeros(head_num, n)}

    @property
    def is_tuned(self) -> bool:
        """Whether tuned values are present (from tuning or from a loaded state)."""
        return self.cdfthreshd is not None

    def tuning_state(self) -> dict[str, torch.Tensor]:
        """Everything :func:`save_tuning` writes: the upstream parameters, the candidate table
        (which lets calibration resume) and the number of tuning calls seen."""
        if not self.is_tuned:
            return {}
        state = {name: getattr(self, name).detach().cpu() for name in UPSTREAM_KEYS}
        if self.topk is not None:
            state["topk"] = self.topk.detach().cpu()
        if self.tuning_sparsity is not None:
            state["tuning_sparsity"] = self.tuning_sparsity.cpu()
        if self._table is not None:
            state.update({f"table.{k}": v.cpu() for k, v in self._table.items()})
        state["num_data_passed"] = torch.tensor(self.num_data_passed)
        return state

    def load_tuning_state(self, state: dict[str, torch.Tensor],
                          device: torch.device | str | None = None) -> None:
        """Restore what :meth:`tuning_state` returned (or an upstream state, without table)."""
        heads = state["cdfthreshd"].numel()
        self.init_hyperparams(heads, device)
        for name in (*UPSTREAM_KEYS, "topk"):
            if name in state:
                dtype = torch.bool if name == "is_sparse" else torch.float32
                setattr(self, name, nn.Parameter(state[name].to(device=device, dtype=dtype),
                                                 requires_grad=False))
        if "tuning_sparsity" in state:
            self.tuning_sparsity = state["tuning_sparsity"].float().cpu()
        table = {k[len("table."):]: v.float().cpu() for k, v in state.items()
                 if k.startswith("table.")}
        if table and table["tau"].shape == self._table["tau"].shape:
            self._table = table
        self.num_data_passed = int(state.get("num_data_passed", torch.tensor(0)))
        self._cached_args = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Let ``load_state_dict`` fill parameters that are still None before tuning."""
        key = prefix + "cdfthreshd"
        if key in state_dict and not self.is_tuned:
            self.init_hyperparams(state_dict[key].numel(), state_dict[key].device)
            if prefix + "topk" not in state_dict:
                self.topk = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._cached_args = None

    def _apply(self, *args: Any, **kwargs: Any) -> SparseAttentionMeansim:
        """Under ``.to()``, ``.cuda()``, ``.half()``...: parameters change through ``.data``."""
        self._cached_args = None
        return super()._apply(*args, **kwargs)

    # ----------------------------------------------------------------------------- search
    def _accurate(self, out: torch.Tensor, ref: torch.Tensor, target: float) -> torch.Tensor:
        """Bool (H,): whether each head meets the accuracy rule (``target`` for the L1 rule)."""
        if self.sim_rule == "l1":
            return rel_l1_per_head(out, ref) < target
        o, r = out.float().transpose(0, 1).flatten(1), ref.float().transpose(0, 1).flatten(1)
        if self.sim_rule == "cosine":
            return torch.nn.functional.cosine_similarity(o, r, dim=1) > self.cos_sim
        return (o - r).pow(2).mean(dim=1).sqrt() < self.rmse

    def _run(self, q, k, v, *, sim, keep, pv, is_causal, scale):
        """One sparse call with per-head thresholds; returns (output, per-head sparsity)."""
        sel = {"cdf_threshold": keep} if self.rule == "cdf" else {"topk": keep}
        out, stats = sparse_attn(q, k, v, sim_threshold=sim, pv_threshold=pv, **sel,
                                 attention_sink=self.attention_sink, is_causal=is_causal,
                                 scale=scale, block_q=self.block_q, block_k=self.block_k,
                                 quant=self.quant, backend=self.backend, return_stats=True)
        return out, stats.per_head_sparsity.float().cpu()

    def _keep_from(self, x: torch.Tensor) -> torch.Tensor:
        """The CDF threshold (1 - 10^x) or kept fraction (x) for search variable x."""
        return (1.0 - torch.pow(10.0, x)).clamp_min(1e-6) if self.rule == "cdf" else x

    def _search_keep(self, q, k, v, ref, sim, *, is_causal, scale):
        """Per head, the sparsest CDF threshold (or kept fraction) meeting the accuracy rule at
        similarity thresholds ``sim``, by bisection; returns (keep, sparsity at keep).

        The CDF search runs on log10 of the dropped mass, in [-5, 0]: useful CDF thresholds sit
        close to 1 (0.99 to 0.99999), where a linear search cannot tell them apart.
        """
        heads, dev = q.shape[1], q.device
        if self.rule == "cdf":
            lo, hi, tol = torch.full((heads,), -5.0), torch.zeros(heads), self.cdf_tol
        else:
            n_k = -(-k.shape[2] // self.block_k)
            lo, hi, tol = torch.ones(heads), torch.full((heads,), 0.5 / n_k), self.cdf_tol
        # lo: accurate side (assumed), hi: sparse side; find the sparsest accurate value
        pv_off = torch.full((heads,), PV_MAX, device=dev)
        best, sparsity = None, torch.zeros(heads)
        feasible = torch.zeros(heads, dtype=torch.bool)
        while bool(((hi - lo).abs() > tol).any()):
            mid = (lo + hi) / 2
            out, sp = self._run(q, k, v, sim=sim.to(dev), keep=self._keep_from(mid).to(dev),
                                pv=pv_off, is_causal=is_causal, scale=scale)
            ok = self._accurate(out, ref, self.l1).cpu()
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
            best = torch.where(ok, mid, lo if best is None else best)
            sparsity = torch.where(ok, sp, sparsity)
            feasible |= ok
        if best is None:
            best = lo
        keep = torch.where(feasible, self._keep_from(best), torch.ones(heads))
        if not bool(feasible.all()):
            # no tried value was accurate: keep everything the rule allows, measure its sparsity
            _, sp = self._run(q, k, v, sim=sim.to(dev), keep=keep.to(dev), pv=pv_off,
                              is_causal=is_causal, scale=scale)
            sparsity = torch.where(feasible, sparsity, sp)
        return keep, sparsity

    @torch.no_grad()
    def _tune(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor, *,
              is_causal: bool, scale: float | None) -> None:
        """One calibration call: search every active head at once (thresholds are per head)."""
        heads, dev = q.shape[1], q.device
        active = self.is_sparse.detach().cpu().clone()
        table = self._table
        for s_idx, sim_value in enumerate(self.sims.tolist()):
            if not bool(active.any()):
                break
            sim = torch.where(active, torch.tensor(sim_value), torch.tensor(DENSE_SIM))
            keep, sparsity = self._search_keep(q, k, v, ref, sim, is_causal=is_causal,
                                               scale=scale)
            pv_value = torch.full((heads,), 20.0)
            if self.tune_pv:
                lo, hi = torch.zeros(heads), torch.full((heads,), PV_MAX)
                while bool(((hi - lo) > self.pv_tol).any()):
                    mid = (lo + hi) / 2
                    out, _ = self._run(q, k, v, sim=sim.to(dev), keep=keep.to(dev),
                                       pv=mid.to(dev), is_causal=is_causal, scale=scale)
                    ok = (rel_l1_per_head(out, ref) < self.pv_l1).cpu()
                    hi = torch.where(ok, mid, hi)
                    lo = torch.where(ok, lo, mid)
                pv_value = hi
            upd = active
            table["tau"][upd, s_idx] = torch.maximum(table["tau"][upd, s_idx], keep[upd])
            table["pv"][upd, s_idx] = torch.maximum(table["pv"][upd, s_idx], pv_value[upd])
            table["sparsity_sum"][upd, s_idx] += sparsity[upd]
            table["count"][upd, s_idx] += 1
            # raising the similarity threshold only makes heads denser: stop where it no longer pays
            active &= sparsity >= self.min_sparsity
        self.num_data_passed += 1
        self._choose()

    def _choose(self) -> None:
        """Per head, the similarity threshold with the best mean sparsity over calibration calls
        (ties: the higher threshold), with its most conservative CDF and PV thresholds."""
        table = self._table
        mean = table["sparsity_sum"] / table["count"].clamp_min(1)
        mean = torch.where(table["count"] > 0, mean, torch.full_like(mean, -1.0))
        n = mean.shape[1]
        # argmax with ties to the last (highest similarity threshold)
        best = n - 1 - torch.argmax(mean.flip(1), dim=1)
        rows = torch.arange(mean.shape[0])
        best_sparsity = mean[rows, best]
        sparse = self.is_sparse.detach().cpu() & (best_sparsity > self.min_sparsity)
        sim = torch.where(sparse, self.sims[best], torch.tensor(DENSE_SIM))
        keep = torch.where(sparse, table["tau"][rows, best], torch.ones_like(best_sparsity))
        pv = torch.where(sparse, table["pv"][rows, best], self.pvthreshd.detach().cpu().float())
        dev = self.cdfthreshd.device
        self.is_sparse.data.copy_(sparse.to(dev))
        self.simthreshd1.data.copy_(sim.to(dev))
        if self.rule == "cdf":
            self.cdfthreshd.data.copy_(keep.to(dev))
        else:
            self.topk.data.copy_(keep.to(dev))
            self.cdfthreshd.data.copy_(torch.where(sparse, 0.0, 1.0).float().to(dev))
        self.pvthreshd.data.copy_(pv.to(dev))
        self._cached_args = None  # writes through .data leave the version counters as they were
        self.tuning_sparsity = torch.where(sparse, best_sparsity, torch.zeros_like(best_sparsity))

    # ----------------------------------------------------------------------------- forward
    def inference_args(self) -> dict[str, torch.Tensor | bool]:
        """The per-head arguments :func:`sparge.sparse_attn` gets outside tune mode.

        The same tensor objects on every call while their sources are unchanged, so that
        :func:`sparge.sparse_attn` reads their values back once rather than on every call. They
        are made anew after the module writes its parameters (tuning, loading, ``.to()``), after
        a parameter is replaced or modified in place through PyTorch operations (its version
        counter changes), or after ``attention_sink`` changes. Outside writes through ``.data``
        are not seen.
        """
        if not self.is_tuned:
            raise RuntimeError("attention hyperparameters should be tuned first")
        params = (self.simthreshd1, self.pvthreshd,
                  self.cdfthreshd if self.topk is None else self.topk)
        if torch.compiler.is_compiling() or any(p.is_inference() for p in params):
            return self._make_inference_args()  # tracing, or no version counter to compare
        state = (*(p._version for p in params), self.attention_sink)
        cached = self._cached_args
        if (cached is None or cached[1] != state
                or any(a is not b for a, b in zip(cached[0], params, strict=True))):
            self._cached_args = (params, state, self._make_inference_args())
        return dict(self._cached_args[2])

    def _make_inference_args(self) -> dict[str, torch.Tensor | bool]:
        """New arguments; never inference tensors, which ``check_threshold`` reads every call."""
        with torch.inference_mode(False):
            args: dict[str, torch.Tensor | bool] = {
                "sim_threshold": self.simthreshd1.detach().float(),
                "pv_threshold": self.pvthreshd.detach().float(),
                "attention_sink": self.attention_sink}
            if self.topk is not None:
                args["topk"] = self.topk.detach().float()
            else:
                args["cdf_threshold"] = self.cdfthreshd.detach().float().clamp(1e-6, 1.0)
        return args

    @torch.no_grad()
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                scale: float | None = None, tensor_layout: str = "HND", tune_mode: bool = False,
                smooth_k: bool = True, return_sparsity: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Exact attention plus tuning in tune mode, tuned sparse attention otherwise.

        ``mask`` must be None (sparge computes block-sparse attention; use ``is_causal`` for causal
        masking). ``smooth_k`` must be True: the predictor and the INT8 quantization of K always
        subtract K's per-channel mean. With ``return_sparsity`` returns ``(out, sparsity)``: the
        mean tuned sparsity in tune mode, else the call's block sparsity, read back from the mask
        (a synchronisation on a GPU, which a call without it does not make).
        """
        if q.dim() != 4:
            raise ValueError("q should be 4-d tensor with B, H, L, D")
        if mask is not None:
            raise NotImplementedError("an attention mask is not supported; use is_causal for "
                                      "causal masking")
        if not smooth_k:
            raise NotImplementedError("smooth_k=False is not supported: sparge always smooths K")
        checks.check_layout(tensor_layout, "tensor_layout")
        tuning = tune_mode or _env_tune_mode()
        if tuning:  # outside tune mode sparse_attn checks the inputs
            checks.check_qkv(q, k, v, tensor_layout)
        qh, kh, vh = (to_hnd(t, tensor_layout) for t in (q, k, v))
        if tuning and (not self.is_tuned or self._table is None):
            self.init_hyperparams(qh.shape[1], q.device)
        if self.is_tuned and self.cdfthreshd.numel() != qh.shape[1]:
            raise ValueError(f"this layer was tuned for {self.cdfthreshd.numel()} heads, got "
                             f"{qh.shape[1]}")
        if tuning:
            ref = exact_attention(qh, kh, vh, is_causal=is_causal, scale=scale)
            self._tune(qh, kh, vh, ref, is_causal=is_causal, scale=scale)
            if self.verbose:
                print(f"cdfthreshd={self.cdfthreshd.tolist()} simthreshd1="
                      f"{self.simthreshd1.tolist()} pvthreshd={self.pvthreshd.tolist()} "
                      f"is_sparse={self.is_sparse.tolist()} mean sparsity="
                      f"{float(self.tuning_sparsity.mean()):.3f}")
            self.last_sparsity = None
            out = from_hnd(ref.to(q.dtype), tensor_layout)
            return (out, float(self.tuning_sparsity.mean())) if return_sparsity else out
        with_stats = bool(return_sparsity or self.record_sparsity)
        result = sparse_attn(qh, kh, vh, **self.inference_args(), is_causal=is_causal,
                             scale=scale, block_q=self.block_q, block_k=self.block_k,
                             quant=self.quant, backend=self.backend, return_stats=with_stats)
        if not with_stats:
            return from_hnd(result, tensor_layout)
        out, stats = from_hnd(result[0], tensor_layout), result[1]
        self.last_sparsity = stats.mask.deferred_sparsity() if self.record_sparsity else None
        return (out, stats.sparsity) if return_sparsity else out

    def extra_repr(self) -> str:
        return (f"sim_rule={self.sim_rule!r}, l1={self.l1}, pv_l1={self.pv_l1}, "
                f"rule={self.rule!r}, heads={self.head_num}, tuned_calls={self.num_data_passed}")


# --------------------------------------------------------------------------------- upstream names
def extract_sparse_attention_state_dict(model: nn.Module, verbose: bool = False
                                        ) -> dict[str, torch.Tensor]:
    """The tuned parameters of every :class:`SparseAttentionMeansim` in ``model``, keyed like
    ``model.state_dict()`` (upstream's function)."""
    saved: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseAttentionMeansim) and module.is_tuned:
            if verbose:
                print(name, "is an instance of SparseAttentionMeansim")
            for key in (*UPSTREAM_KEYS, "topk"):
                value = getattr(module, key)
                if value is not None:
                    saved[f"{name}.{key}" if name else key] = value.detach()
    return saved


def load_sparse_attention_state_dict(model: nn.Module, saved_state_dict: dict[str, torch.Tensor],
                                     multigpu: bool = False, verbose: bool = False) -> nn.Module:
    """Load what :func:`extract_sparse_attention_state_dict` returned into the
    :class:`SparseAttentionMeansim` modules of ``model`` with the same names (upstream's
    function). Keys are matched exactly (module name + "." + parameter name); thresholds are kept
    in float32 and ``is_sparse`` as bool. Returns ``model``."""
    for name, module in model.named_modules():
        if not isinstance(module, SparseAttentionMeansim):
            continue
        prefix = f"{name}." if name else ""
        state = {key[len(prefix):]: value for key, value in saved_state_dict.items()
                 if key.startswith(prefix) and "." not in key[len(prefix):]}
        if "cdfthreshd" not in state:
            continue
        if verbose:
            print(f"loading {sorted(state)} into {name}")
        device = _module_device(model) if not multigpu else state["cdfthreshd"].device
        module.load_tuning_state(state, device)
    return model


def _module_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------- whole model
def tuning_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every :class:`SparseAttentionMeansim` and :class:`ErrorBudgetAttention` in ``model``."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (SparseAttentionMeansim, ErrorBudgetAttention))}


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(module, SparseAttentionMeansim):
        return module.tuning_state()
    if module.level is None:
        return {}
    return {"level": module.level.detach().float().cpu()}


def save_tuning(model: nn.Module, path: str | os.PathLike) -> dict[str, dict]:
    """Write the tuned values of every tuning module of ``model`` to ``path``.

    ``.safetensors`` writes a safetensors file (keys ``<module name>/<value>``, needs the
    ``safetensors`` package); any other suffix writes JSON. The file is replaced atomically.
    Returns the saved values as ``{module name: {value name: list}}``.
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    for name, module in tuning_modules(model).items():
        state = _module_state(module)
        if state:
            layers[name] = state
            kinds[name] = type(module).__name__
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{name}/{key}": value.contiguous() for name, state in layers.items()
                for key, value in state.items()}
        save_file(flat, str(tmp), metadata={"format": FORMAT, "kinds": json.dumps(kinds)})
    else:
        doc = {"format": FORMAT, "version": 1,
               "layers": {name: {"kind": kinds[name],
                                 "values": {key: {"dtype": str(value.dtype).split(".")[-1],
                                                  "shape": list(value.shape),
                                                  "data": value.flatten().tolist()}
                                            for key, value in state.items()}}
                          for name, state in layers.items()}}
        tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return {name: {k: v.tolist() for k, v in state.items()} for name, state in layers.items()}


def read_tuning(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The per-layer values a :func:`save_tuning` file holds: ``{module name: {name: tensor}}``."""
    path = Path(path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        for key, value in load_file(str(path)).items():
            name, _, field = key.rpartition("/")
            layers.setdefault(name, {})[field] = value
        return layers
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sparge tuning file")
    for name, layer in doc["layers"].items():
        layers[name] = {key: torch.tensor(entry["data"], dtype=getattr(torch, entry["dtype"]))
                        .reshape(entry["shape"]) for key, entry in layer["values"].items()}
    return layers


def load_tuning(model: nn.Module, path_or_values: str | os.PathLike | dict,
                strict: bool = True) -> list[str]:
    """Load tuned values (a :func:`save_tuning` file or :func:`read_tuning`'s dict) into the
    tuning modules of ``model`` with the same names. Returns the names loaded; with ``strict``,
    a saved layer that the model lacks raises ``KeyError``."""
    values = path_or_values if isinstance(path_or_values, dict) else read_tuning(path_or_values)
    modules = tuning_modules(model)
    missing = [name for name in values if name not in modules]
    if strict and missing:
        raise KeyError(f"the model has no tuning module named {missing[:5]}")
    loaded = []
    for name, state in values.items():
        module = modules.get(name)
        if module is None:
            continue
        if isinstance(module, SparseAttentionMeansim):
            module.load_tuning_state(state, _module_device(model))
        else:
            module.load_state_dict({"level": state["level"]}, strict=False)
        loaded.append(name)
    return loaded


# --------------------------------------------------------------------------------- calibration
class _Progress:
    """tqdm when installed, plain prints otherwise."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.bar = total, done, None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=done, desc="sparge calibration", unit="layer-call")

    def step(self, name: str, module: SparseAttentionMeansim) -> None:
        self.done += 1
        if not self.enabled:
            return
        sparsity = float(module.tuning_sparsity.mean()) if module.tuning_sparsity is not None \
            else 0.0
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name}: sparsity {sparsity:.2f}")
            self.bar.update(1)
        else:
            print(f"[sparge calibration {self.done}/{self.total}] {name} call "
                  f"{module.num_data_passed}: mean sparsity {sparsity:.3f}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Calibration:
    """State of a running :func:`calibration`: which layers still tune, progress, checkpoints."""

    def __init__(self, model: nn.Module, path: str | os.PathLike | None, calls: int,
                 progress: bool) -> None:
        self.model, self.calls = model, calls
        self.path = None if path is None else Path(path)
        self.modules = {name: m for name, m in tuning_modules(model).items()
                        if isinstance(m, SparseAttentionMeansim)}
        if not self.modules:
            raise ValueError("the model holds no SparseAttentionMeansim module to calibrate")
        self.resumed: list[str] = []
        if self.path is not None and self.path.exists():
            values = {n: s for n, s in read_tuning(self.path).items() if n in self.modules}
            self.resumed = load_tuning(model, values, strict=False)
        done = sum(min(m.num_data_passed, calls) for m in self.modules.values())
        self.progress = _Progress(calls * len(self.modules), done, progress)
        self._hooks = []

    def needs_tuning(self, module: SparseAttentionMeansim) -> bool:
        return module.num_data_passed < self.calls

    @property
    def finished(self) -> bool:
        """Whether every layer has tuned on ``calls`` calls."""
        return all(not self.needs_tuning(m) for m in self.modules.values())

    def _after(self, name: str, module: SparseAttentionMeansim) -> None:
        self.progress.step(name, module)
        if self.path is not None:
            save_tuning(self.model, self.path)

    def close(self) -> None:
        self.progress.close()
        if self.path is not None:
            save_tuning(self.model, self.path)


@contextlib.contextmanager
def calibration(model: nn.Module, path: str | os.PathLike | None = None, *, calls: int = 1,
                progress: bool = True) -> Iterator[Calibration]:
    """Calibrate every :class:`SparseAttentionMeansim` of ``model`` on its next ``calls`` calls.

    Inside the block each such layer, until it has tuned on ``calls`` calls, returns exact
    attention and tunes; layers that are done run sparse with their tuned values. After every
    tuning call the model's values are saved to ``path`` (if given), so an interrupted calibration
    restarted with the same ``path`` keeps the layers (and calls) already tuned. Progress is shown
    per layer call (tqdm if installed, else lines on stderr).

    Example::

        with calibration(model, "tuned.json", calls=2) as cal:
            while not cal.finished:
                run_model_once()
    """
    cal = Calibration(model, path, calls, progress)
    hooks = []
    for name, module in cal.modules.items():
        def pre(mod, args, kwargs, _name=name):
            tune = cal.needs_tuning(mod)
            kwargs["tune_mode"] = tune
            mod._sparge_tuning_now = tune
            return args, kwargs

        def post(mod, args, kwargs, output, _name=name):
            if getattr(mod, "_sparge_tuning_now", False):
                mod._sparge_tuning_now = False
                cal._after(_name, mod)

        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield cal
    finally:
        for hook in hooks:
            hook.remove()
        cal.close()


def tuned_error(module: SparseAttentionMeansim, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, *, is_causal: bool = False, scale: float | None = None,
                tensor_layout: str = "HND") -> tuple[float, float]:
    """(relative L1 error, sparsity) of a tuned module's output on (q, k, v) against exact
    attention: a check of tuned values on data of one's choice."""
    out, sparsity = module(q, k, v, is_causal=is_causal, scale=scale, tensor_layout=tensor_layout,
                           return_sparsity=True)
    ref = exact_attention(*(to_hnd(t, tensor_layout) for t in (q, k, v)), is_causal=is_causal,
                          scale=scale)
    return rel_l1(to_hnd(out, tensor_layout), ref), sparsity
