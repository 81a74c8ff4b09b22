"""sparge: training-free sparse + quantized attention.

A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on long sequences: it predicts
which key blocks matter, then runs INT8-QK / FP8-PV block-sparse kernels written in Triton (or a
plain PyTorch reference path where Triton cannot run).

Public surface:
    sparse_attn        attention with a predicted block mask
    block_sparse_attn  attention with a caller-given block mask
    quantized_attn     dense attention with quantization only
    predict_mask       the mask predictor on its own
    SparseMask         a block mask (block sizes, sparsity, token-level and lookup-table forms)
    AttentionStats     what a call did (sparsity, mask, backend, quantization)
"""

from .api import AttentionStats, block_sparse_attn, predict_mask, quantized_attn, sparse_attn
from .mask import SparseMask

__version__ = "0.1.0"

__all__ = ["AttentionStats", "SparseMask", "block_sparse_attn", "predict_mask", "quantized_attn",
           "sparse_attn", "__version__"]
