"""Time the PyTorch reference path on one long input on the CPU and report its peak memory.

    python bench/cpu_reference_long.py --seq-len 32768 --heads 24 --head-dim 128

The reference path never materialises an Lq x Lk score matrix, so a B1 H24 L32768 D128 call fits
in a few GiB; this script proves it and records how long it takes.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

import sparge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=float, default=None,
                        help="top-k fraction (default: the CDF rule with its defaults)")
    args = parser.parse_args()
    shape = (1, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16) for _ in range(3))
    print(f"sparse_attn on CPU, B1 H{args.heads} L{args.seq_len} D{args.head_dim} bf16, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    start = time.perf_counter()
    out, stats = sparge.sparse_attn(q, k, v, topk=args.topk, return_stats=True)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"time {seconds:.1f} s, sparsity {stats.sparsity:.3f}, quant {stats.quant}, "
          f"peak RSS {peak_gib:.2f} GiB, finite {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
