"""Programmatic dependent launch on and off, and the pooled products' kernel against cuBLAS.

    PYTHONPATH=src python3 bench/dependent_launch.py --rounds 5 --out FILE

Part 1 times the public calls with ``SPARGE_DEPENDENT_LAUNCH`` on and off in alternation, round
after round (do_bench medians over three rotated input sets; the CUDA graphs of the replayed
calls are dropped at each switch, so each setting replays graphs of its own launches), and
reports each setting's median and the median, lowest and highest per-round ratio off / on.

Part 2 times the pooled scores' product at the pipeline's sizes (B1 H24, block_q 64,
block_k 128): the reference's ``torch.matmul`` (cuBLAS, float32) against the library's Triton
kernel (three TF32 products), each one launch replayed from a CUDA graph, so that the GPU time
is measured and not the host's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import bench, card_name, local_inputs, random_inputs  # noqa: E402

import sparge  # noqa: E402
from sparge.kernels import graphs  # noqa: E402
from sparge.kernels.select import pooled_products_gpu  # noqa: E402
from sparge.predict import BlockStats, pooled_products  # noqa: E402

SETTING = "SPARGE_DEPENDENT_LAUNCH"


def calls(length: int, dim: int, gen: torch.Generator) -> dict:
    """name -> (function of the set index, number of sets) for one shape."""
    random = [random_inputs(1, 24, length, dim, gen) for _ in range(3)]
    local = [local_inputs(1, 24, length, dim, gen) for _ in range(3)]
    return {
        "quantized_attn": lambda i: sparge.quantized_attn(*random[i]),
        "sparse_attn causal, local data": lambda i: sparge.sparse_attn(*local[i],
                                                                        is_causal=True),
        "sparse_attn, random data": lambda i: sparge.sparse_attn(*random[i]),
    }


def switched(fn, on: bool):
    """``fn`` with dependent launch turned on or off, and the graphs of the other setting
    dropped."""
    os.environ[SETTING] = "1" if on else "0"
    graphs.clear()
    return fn


def part_dependent_launch(shapes, rounds: int, lines: list[str]) -> None:
    lines += ["## Dependent launch on and off, alternating", "",
              "| shape | call | on ms | off ms | off / on: median [lowest, highest] |",
              "| --- | --- | ---: | ---: | ---: |"]
    for length, dim in shapes:
        gen = torch.Generator(device="cuda").manual_seed(length + dim)
        for name, fn in calls(length, dim, gen).items():
            for on in (True, False):
                bench(switched(fn, on), 3, 25, 100)  # compile, tune, capture
            on_ms, off_ms = [], []
            for r in range(rounds):
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    t = bench(switched(fn, on), 3, 20, 150)
                    (on_ms if on else off_ms).append(t)
            ratio = [b / a for a, b in zip(on_ms, off_ms, strict=True)]
            med = statistics.median
            line = (f"| L{length} D{dim} | {name} | {med(on_ms):.4f} | {med(off_ms):.4f} | "
                    f"{med(ratio):.3f} [{min(ratio):.3f}, {max(ratio):.3f}] |")
            print(line, flush=True)
            lines.append(line)
        torch.cuda.empty_cache()
    os.environ[SETTING] = "1"
    graphs.clear()


def part_products(lines: list[str]) -> None:
    lines += ["", "## Pooled products: cuBLAS float32 against the Triton kernel (3xTF32)", "",
              "| L | D | blocks (nQ x nK) | cuBLAS us | kernel us | largest difference / "
              "magnitude |", "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for length, dim in ((32768, 128), (32768, 64), (8192, 128), (65536, 128)):
        n_q, n_k = length // 64, length // 128
        q_stats = BlockStats(torch.randn(1, 24, n_q, dim, device="cuda"), None)
        k_stats = BlockStats(torch.randn(1, 24, n_k, dim, device="cuda"), None)
        times = []
        for product in (pooled_products, pooled_products_gpu):
            def fn(product=product, q_stats=q_stats, k_stats=k_stats):
                return product(q_stats, k_stats)
            fn()
            times.append(1000 * triton.testing.do_bench_cudagraph(fn, rep=200,
                                                                  return_mode="median"))
        exact = q_stats.mean.double() @ k_stats.mean.double().transpose(-1, -2)
        magnitude = q_stats.mean.double().abs() @ k_stats.mean.double().abs().transpose(-1, -2)
        diff = ((pooled_products_gpu(q_stats, k_stats).double() - exact).abs()
                / magnitude).max().item()
        line = (f"| {length} | {dim} | {n_q} x {n_k} | {times[0]:.1f} | {times[1]:.1f} | "
                f"{diff:.1e} |")
        print(line, flush=True)
        lines.append(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096:128,8192:128,32768:128")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    lines = [f"# Dependent launch and the products kernel: {card_name()}", "",
             f"torch {torch.__version__}, Triton {triton.__version__}; B1 H24, bf16, "
             f"{args.rounds} rounds", ""]
    part_products(lines)
    lines.append("")
    part_dependent_launch(shapes, args.rounds, lines)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
