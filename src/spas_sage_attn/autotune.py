"""Upstream ``spas_sage_attn.autotune``: per-layer, per-head hyperparameter calibration.

The tuning module and its state-dict helpers live in :mod:`sparge.tuning`; this module gives them
their upstream import path.
"""

from sparge.tuning import (
    SparseAttentionMeansim,
    extract_sparse_attention_state_dict,
    load_sparse_attention_state_dict,
)

__all__ = ["SparseAttentionMeansim", "extract_sparse_attention_state_dict",
           "load_sparse_attention_state_dict"]
