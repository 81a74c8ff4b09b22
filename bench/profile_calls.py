"""Where the GPU time of one public-API call goes: each launched kernel's device time.

    PYTHONPATH=src python3 bench/profile_calls.py [--seq-len 32768] [--head-dim 128]
    PYTHONPATH=src python3 bench/profile_calls.py --quant int8_fp16

For ``quantized_attn``, ``block_sparse_attn`` on a random mask with 90 % of the blocks skipped,
``sparse_attn`` on random and on structured local data, and ``block_sparse_attn`` and the
attention kernel alone (pre-quantized inputs) on the mask ``sparse_attn`` predicts for the local
data (B1 H24, bf16), runs the call a few times under ``torch.profiler`` and prints, per call,
every kernel's device time (mean over the profiled calls) and their sum, next to the call's
CUDA-event time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import local_inputs, pipeline_pair, random_inputs  # noqa: E402

import sparge  # noqa: E402
from sparge.backend import choose_quant  # noqa: E402
from sparge.mask import SparseMask, num_blocks  # noqa: E402


def kernel_times(fn, calls: int) -> list[tuple[str, float]]:
    """(kernel name, mean device microseconds per call), largest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us > 0:
            rows.append((event.key, device_us / calls))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--quant", default="auto", help="the calls' quantization mode")
    args = parser.parse_args()
    length, dim, heads = args.seq_len, args.head_dim, args.heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = random_inputs(1, heads, length, dim, gen)
    local = local_inputs(1, heads, length, dim, gen)
    n_q, n_k = num_blocks(length, 64), num_blocks(length, 128)
    blocks = torch.rand(1, heads, n_q, n_k, device="cuda", generator=gen) >= 0.9
    mask = SparseMask(blocks, 64, 128, length, length, args.causal)
    causal, quant = args.causal, args.quant
    local_pair = pipeline_pair([local], causal=causal, mode=choose_quant(quant, local[0].device),
                               pv_threshold=torch.full((heads,), 50.0, device="cuda"),
                               out=torch.empty_like(local[0]))
    calls = {
        "quantized_attn": lambda: sparge.quantized_attn(*data, is_causal=causal, quant=quant),
        "block_sparse_attn, 90 % skipped": lambda: sparge.block_sparse_attn(*data, mask,
                                                                            quant=quant),
        "sparse_attn, random data": lambda: sparge.sparse_attn(*data, is_causal=causal,
                                                               quant=quant),
        "sparse_attn, local data": lambda: sparge.sparse_attn(*local, is_causal=causal,
                                                              quant=quant),
        "block_sparse_attn, local data's predicted mask": lambda: local_pair.block_sparse(0),
        "kernel alone, local data's predicted mask": lambda: local_pair.kernel(0),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; B1 H{heads} L{length} D{dim}"
          f"{' causal' if causal else ''}, bf16, quant={quant}")
    for name, fn in calls.items():
        fn()  # compile and autotune outside the profile
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        rows = kernel_times(fn, args.calls)
        total = sum(us for _, us in rows)
        print(f"\n{name}: {ms:.3f} ms per call (CUDA events); kernels sum to {total / 1e3:.3f} ms")
        for key, us in rows:
            print(f"  {us:9.1f} us  {key[:110]}")


if __name__ == "__main__":
    main()
