"""Choosing thresholds: upstream-style per-layer calibration and the error-budget controller.

- :class:`SparseAttentionMeansim`, :func:`extract_sparse_attention_state_dict`,
  :func:`load_sparse_attention_state_dict`: upstream ``spas_sage_attn.autotune`` names.
- :func:`calibration`, :func:`save_tuning`, :func:`load_tuning`: resumable calibration of a whole
  model and its tuned values, keyed by module names (JSON or safetensors).
- :class:`ErrorBudgetAttention`, :func:`estimate_error`: the error-budget mode.
"""

from .budget import ErrorBudgetAttention, HeadReport, estimate_error, summarize
from .calibrate import (
    SparseAttentionMeansim,
    calibration,
    extract_sparse_attention_state_dict,
    load_sparse_attention_state_dict,
    load_tuning,
    read_tuning,
    save_tuning,
    tuned_error,
    tuning_modules,
)

__all__ = ["ErrorBudgetAttention", "HeadReport", "SparseAttentionMeansim", "calibration",
           "estimate_error", "extract_sparse_attention_state_dict",
           "load_sparse_attention_state_dict", "load_tuning", "read_tuning", "save_tuning",
           "summarize", "tuned_error", "tuning_modules"]
