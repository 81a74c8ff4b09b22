"""Drop-in replacement for the ``spas_sage_attn`` package (SpargeAttn), built on :mod:`sparge`.

Code written for SpargeAttn keeps working unchanged, without a CUDA build step, on any GPU Triton
supports and on the CPU::

    from spas_sage_attn import spas_sage2_attn_meansim_cuda, block_sparse_sage2_attn_cuda

Same function names, argument names, defaults and return conventions; the documented differences
(exact sparsity, fixed mask granularity, refused arguments) are listed in
:mod:`spas_sage_attn.core`. The tuning module is in :mod:`spas_sage_attn.autotune` and the helpers
in :mod:`spas_sage_attn.utils`.
"""

from .core import (
    block_sparse_sage2_attn_cuda,
    spas_sage2_attn_meansim_cuda,
    spas_sage2_attn_meansim_topk_cuda,
    spas_sage_attn_meansim,
    spas_sage_attn_meansim_cuda,
    spas_sage_attn_meansim_topk_cuda,
    spas_sage_attn_meansim_triton,
)

__all__ = [
    "block_sparse_sage2_attn_cuda",
    "spas_sage2_attn_meansim_cuda",
    "spas_sage2_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim",
    "spas_sage_attn_meansim_cuda",
    "spas_sage_attn_meansim_topk_cuda",
    "spas_sage_attn_meansim_triton",
]
