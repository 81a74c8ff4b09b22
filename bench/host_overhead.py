"""Where the host time of one public-API call goes, for short sequences where it shows.

    PYTHONPATH=src python3 bench/host_overhead.py [--seq-len 4096]

Times each entry point with CUDA events (median of do_bench) and with a host clock around calls
issued back to back, then prints cProfile's top functions by own time for `sparse_attn`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import triton

import sparge


def host_us(fn, n: int = 200) -> float:
    """Mean host time per call, in microseconds, for calls issued without waiting for the GPU."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    shape = (1, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = sparge.predict_mask(q, k, topk=0.1)
    calls = {
        "quantized_attn": lambda: sparge.quantized_attn(q, k, v),
        "block_sparse_attn 90%": lambda: sparge.block_sparse_attn(q, k, v, mask),
        "sparse_attn": lambda: sparge.sparse_attn(q, k, v),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    print(f"B1 H{args.heads} L{args.seq_len} D{args.head_dim} bf16, {torch.cuda.get_device_name()}")
    for name, fn in calls.items():
        fn()
        gpu_ms = triton.testing.do_bench(fn, return_mode="median")
        print(f"{name:24s} do_bench {gpu_ms * 1e3:8.1f} us   host {host_us(fn):8.1f} us per call")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(100):
        calls["sparse_attn"]()
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
