"""Error-budget mode: the user gives a relative-L1 budget, the layer finds its own thresholds.

Each call of an :class:`ErrorBudgetAttention` layer

1. runs :func:`sparge.sparse_attn` with the current per-head thresholds;
2. estimates the relative L1 error of that output from a few query rows computed exactly
   (:func:`estimate_error`: one random row in each of ``sample_rows`` equal slices of the sequence,
   exact attention for those rows only, O(rows * Lk * D));
3. optionally recomputes exactly the heads whose estimated error is over the budget (so a bad
   threshold costs time, not quality);
4. moves each head's threshold for the next call: towards more sparsity while the estimated error is
   below ``margin * budget``, back when it is above.

Diffusion transformers call every layer once (or twice, with classifier-free guidance) per step and
consecutive steps look alike, so the feedback from one step serves the next.

The threshold a head moves is its "level": the attention mass the CDF rule may drop
(``cdf_threshold = 1 - level``), or with ``rule="topk"`` the fraction of key blocks dropped
(``topk = 1 - level``). Level 0 is dense attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _inputs as checks
from ..api import sparse_attn
from ._common import exact_attention, exact_rows, from_hnd, sample_rows, to_hnd

DENSE_SIM = 1.0  # self-similarity is never above 1: every block forced on, i.e. dense


@torch.no_grad()
def estimate_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
                   rows: int | torch.Tensor = 64, is_causal: bool = False,
                   scale: float | None = None, tensor_layout: str = "HND",
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate, per head, the relative L1 error of an attention output from sampled rows.

    Args:
        q, k, v: the attention inputs (layout ``tensor_layout``, GQA allowed).
        out: the output to judge (same layout as q).
        rows: how many query rows to sample (stratified over the sequence), or the row indices.
        is_causal, scale: as for the attention call that produced ``out``.
        generator: random generator for the row sample.

    Returns:
        ``(estimate, numerator, denominator)``: float32 (H,) on q's device: the estimated
        relative L1 error per head, and the sums sum|out - exact| and sum|exact| over the sampled
        rows it is the ratio of (sum them over heads for a layer-wide estimate).
    """
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if (rows < 1) if isinstance(rows, int) else rows.dim() != 1 or rows.numel() == 0:
        raise ValueError(f"rows must be a count >= 1 or a non-empty 1-D tensor of row indices, "
                         f"got {rows!r}")
    qh, kh, vh, oh = (to_hnd(t, tensor_layout) for t in (q, k, v, out))
    if isinstance(rows, int):
        rows = sample_rows(qh.shape[2], rows, generator, qh.device)
    ref = exact_rows(qh, kh, vh, rows, is_causal=is_causal, scale=scale)
    got = oh.index_select(2, rows).float()
    num = (got - ref).abs().sum(dim=(0, 2, 3))
    den = ref.abs().sum(dim=(0, 2, 3))
    return num / den.clamp_min(torch.finfo(torch.float32).tiny), num, den


@dataclass
class HeadReport:
    """Running statistics of one layer (all its heads), as lists over heads."""

    calls: int = 0
    level: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    mean_sparsity: list[float] = field(default_factory=list)
    est_error: list[float] = field(default_factory=list)
    mean_est_error: list[float] = field(default_factory=list)
    max_est_error: list[float] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)


class ErrorBudgetAttention(nn.Module):
    """Sparse attention that keeps its own estimated relative L1 error under ``budget``.

    Args:
        budget: relative L1 error allowed per call, sum|o - o_exact| / sum|o_exact| (e.g. 0.05).
            It covers everything: dropped blocks, PV skipping and quantization.
        sample_rows: query rows computed exactly per call for the estimate.
        margin: the controller aims at ``margin * budget``, leaving room for estimate noise and for
            the drift from one call to the next.
        rule: ``"cdf"`` (moves the CDF threshold) or ``"topk"`` (moves the kept fraction).
        sim_threshold: self-similarity threshold of the predictor (fixed; a float or (H,) tensor).
        pv_threshold: PV threshold (fixed; 50 never skips).
        init_level: dropped mass (or fraction) the first call starts from.
        min_level, max_level: range of the level while sparse; a head that exceeds its target even
            at ``min_level`` runs dense for ``dense_backoff`` calls, then tries ``min_level`` again.
        step_limit: the level changes at most by this factor per call (it halves at least when
            the estimated error is over budget).
        ceiling_margin, ceiling_relax: after a level gave an error over budget the head stays
            below ``ceiling_margin`` times that level; the ceiling rises by ``ceiling_relax`` per
            call.
        recompute: recompute exactly the heads whose estimated error is over ``budget``.
        quant, backend, block_q, block_k, attention_sink: passed to :func:`sparge.sparse_attn`.
        seed: seed of the row sampler (each layer draws fresh rows every call).

    Forward: ``forward(q, k, v, is_causal=False, scale=None, tensor_layout="HND")``.
    Statistics: :meth:`report`. The per-head levels are a buffer (``level``) once the first call
    has fixed the head count, so ``state_dict`` keeps what the controller learned.
    """

    def __init__(self, budget: float = 0.05, *, sample_rows: int = 128, margin: float = 0.7,
                 rule: str = "cdf", sim_threshold: float | torch.Tensor = 0.0,
                 pv_threshold: float | torch.Tensor = 50.0, init_level: float = 0.05,
                 min_level: float = 1e-5, max_level: float = 0.6, step_limit: float = 1.25,
                 ceiling_margin: float = 0.8, ceiling_relax: float = 1.02,
                 dense_backoff: int = 4, recompute: bool = True, quant: str = "auto",
                 backend: str = "auto", block_q: int = 64, block_k: int = 128,
                 attention_sink: bool = False, seed: int = 0) -> None:
        super().__init__()
        if not 0 < budget < 1:
            raise ValueError(f"budget must be in (0, 1), got {budget}")
        if rule not in ("cdf", "topk"):
            raise ValueError(f"rule must be 'cdf' or 'topk', got {rule!r}")
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        if not 0 < min_level <= init_level <= max_level < 1:
            raise ValueError("need 0 < min_level <= init_level <= max_level < 1")
        if sample_rows < 1 or step_limit <= 1:
            raise ValueError("sample_rows must be >= 1 and step_limit > 1")
        checks.check_choice("quant", quant, checks.QUANT_CHOICES)
        checks.check_choice("backend", backend, checks.BACKENDS)
        checks.check_block_sizes(block_q, block_k)
        for name, value, low in (("sim_threshold", sim_threshold, None),
                                 ("pv_threshold", pv_threshold, 0.0)):
            if not isinstance(value, torch.Tensor):  # tensors: checked per call, with the heads
                checks.check_threshold(name, value, 1, low=low, allow_inf=low is not None)
        self.budget, self.margin, self.rule = float(budget), float(margin), rule
        self.sample_rows = int(sample_rows)
        self.sim_threshold, self.pv_threshold = sim_threshold, pv_threshold
        self.init_level, self.min_level, self.max_level = init_level, min_level, max_level
        self.step_limit, self.dense_backoff, self.recompute = step_limit, dense_backoff, recompute
        self.ceiling_margin, self.ceiling_relax = ceiling_margin, ceiling_relax
        self.quant, self.backend = quant, backend
        self.block_q, self.block_k, self.attention_sink = block_q, block_k, attention_sink
        self._generator = torch.Generator().manual_seed(seed)
        self.register_buffer("level", None, persistent=True)
        self._reset_stats(0)

    # ----------------------------------------------------------------------------- state
    def _init_heads(self, heads: int) -> None:
        self.level = torch.full((heads,), self.init_level)
        self._reset_stats(heads)

    def _reset_stats(self, heads: int) -> None:
        self._dense_left = torch.zeros(heads, dtype=torch.long)
        self._ceiling = torch.full((heads,), self.max_level)
        self._calls = 0
        self._sum_sparsity = torch.zeros(heads, dtype=torch.float64)
        self._sum_err = torch.zeros(heads, dtype=torch.float64)
        self._max_err = torch.zeros(heads, dtype=torch.float64)
        self._last_sparsity = torch.zeros(heads)
        self._last_err = torch.zeros(heads)
        self._recomputed = torch.zeros(heads, dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # noqa: D401
        """Accept a ``level`` buffer before the first call has fixed the head count."""
        key = prefix + "level"
        if key in state_dict and self.level is None:
            self._init_heads(state_dict[key].numel())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def reset_statistics(self) -> None:
        """Forget the running statistics (keeps the learned levels and ceilings)."""
        ceiling, dense_left = self._ceiling, self._dense_left
        self._reset_stats(0 if self.level is None else self.level.numel())
        self._ceiling, self._dense_left = ceiling, dense_left

    # ----------------------------------------------------------------------------- thresholds
    def thresholds(self) -> dict[str, torch.Tensor]:
        """The per-head arguments the next call passes to :func:`sparge.sparse_attn`."""
        if self.level is None:
            raise RuntimeError("the head count is known after the first call")
        level = self.level.float().cpu()
        dense = (self._dense_left > 0) | (level <= 0)
        sim = torch.as_tensor(self.sim_threshold, dtype=torch.float32).expand_as(level).clone()
        sim[dense] = DENSE_SIM
        keep = (1.0 - level).clamp(min=1e-6, max=1.0)
        args = {"sim_threshold": sim,
                "pv_threshold": torch.as_tensor(self.pv_threshold,
                                                dtype=torch.float32).expand_as(level).clone()}
        args["cdf_threshold" if self.rule == "cdf" else "topk"] = keep
        return args

    def _update(self, err: torch.Tensor, was_dense: torch.Tensor) -> None:
        """Move each head's level for the next call from its estimated error on this call.

        Below target the level grows by at most ``step_limit`` (scaled by sqrt(target / error));
        between target and budget it shrinks in the same way; over budget it is multiplied by
        (target / error)^2, between 0.01 and 0.5, and the level
        that failed becomes a ceiling the head stays under (the ceiling relaxes by
        ``ceiling_relax`` per call), since error can jump when a level crosses a block boundary.
        """
        level = self.level.float().cpu()
        target = self.margin * self.budget
        ratio = target / err.clamp_min(1e-12)
        factor = ratio.sqrt().clamp(1.0 / self.step_limit, self.step_limit)
        over = (err > self.budget) & ~was_dense
        # over budget: at least halve, and faster the further over (error ~ level^p, p >= 1/2)
        factor = torch.where(over, ratio.pow(2).clamp(0.01, 0.5), factor)
        self._ceiling = torch.where(over, torch.minimum(self._ceiling, level), self._ceiling)
        new = torch.minimum(level * factor, self._ceiling * self.ceiling_margin)
        self._ceiling = (self._ceiling * self.ceiling_relax).clamp(max=self.max_level)
        too_low = (new < self.min_level) & ~was_dense
        new = new.clamp(self.min_level, self.max_level)
        backoff = self._dense_left.clone()
        backoff[was_dense] -= 1
        # a head that misses its target even at the minimum level goes dense for a while
        backoff[too_low] = self.dense_backoff
        new[was_dense] = level[was_dense]  # a dense call says nothing about the level
        self._dense_left = backoff.clamp_min(0)
        self.level.copy_(new.to(self.level.device, self.level.dtype))

    # ----------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                scale: float | None = None, tensor_layout: str = "HND") -> torch.Tensor:
        qh, kh, vh = (to_hnd(t, tensor_layout) for t in (q, k, v))
        heads = qh.shape[1]
        if self.level is None:
            self._init_heads(heads)
            self.level = self.level.to(q.device)
        elif self.level.numel() != heads:
            raise ValueError(f"this layer was set up for {self.level.numel()} heads, got {heads}")
        checks.check_threshold("sim_threshold", self.sim_threshold, heads)
        checks.check_threshold("pv_threshold", self.pv_threshold, heads, low=0.0, allow_inf=True)
        args = self.thresholds()
        was_dense = args["sim_threshold"] >= DENSE_SIM
        args = {name: t.to(q.device) for name, t in args.items()}
        out, stats = sparse_attn(qh, kh, vh, **args, is_causal=is_causal, scale=scale,
                                 block_q=self.block_q, block_k=self.block_k, quant=self.quant,
                                 backend=self.backend, attention_sink=self.attention_sink,
                                 return_stats=True)
        est, _, _ = estimate_error(qh, kh, vh, out, rows=self.sample_rows, is_causal=is_causal,
                                   scale=scale, generator=self._generator)
        est = est.float().cpu()
        sparsity = stats.per_head_sparsity.float().cpu()
        over = est > self.budget
        if self.recompute and bool(over.any()):
            idx = over.nonzero().squeeze(1).to(q.device)
            group = heads // kh.shape[1]
            exact = exact_attention(qh.index_select(1, idx), kh.index_select(1, idx // group),
                                    vh.index_select(1, idx // group), is_causal=is_causal,
                                    scale=scale)
            out.index_copy_(1, idx, exact.to(out.dtype))
            self._recomputed += over.long()
            sparsity = torch.where(over, torch.zeros_like(sparsity), sparsity)
        self._calls += 1
        self._sum_sparsity += sparsity.double()
        self._sum_err += est.double()
        self._max_err = torch.maximum(self._max_err, est.double())
        self._last_sparsity, self._last_err = sparsity, est
        self._update(est, was_dense)
        return from_hnd(out, tensor_layout)

    # ----------------------------------------------------------------------------- report
    def report(self) -> HeadReport:
        """Per head: level, last and mean sparsity, last, mean and max estimated error, and how
        many calls were recomputed exactly (sparsity of a recomputed call counts as 0)."""
        n = max(self._calls, 1)
        level = [] if self.level is None else self.level.float().cpu().tolist()
        return HeadReport(self._calls, level, self._last_sparsity.tolist(),
                          (self._sum_sparsity / n).tolist(), self._last_err.tolist(),
                          (self._sum_err / n).tolist(), self._max_err.tolist(),
                          self._recomputed.tolist())

    def extra_repr(self) -> str:
        return (f"budget={self.budget}, rule={self.rule!r}, sample_rows={self.sample_rows}, "
                f"margin={self.margin}")


def summarize(reports: dict[str, HeadReport]) -> str:
    """A table of per-layer results: mean sparsity and mean / max estimated error."""
    lines = [f"{'layer':<48} {'calls':>5} {'sparsity':>8} {'est.err':>8} {'max err':>8} "
             f"{'recomp':>6}"]
    for name, rep in reports.items():
        heads = max(len(rep.mean_sparsity), 1)
        sp = sum(rep.mean_sparsity) / heads
        er = sum(rep.mean_est_error) / heads
        mx = max(rep.max_est_error, default=math.nan)
        lines.append(f"{name:<48} {rep.calls:>5} {sp:>8.3f} {er:>8.4f} {mx:>8.4f} "
                     f"{sum(rep.recomputed):>6}")
    return "\n".join(lines)
