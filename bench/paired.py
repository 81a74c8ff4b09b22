"""Dense speed against cuDNN, measured in alternation so that clock drift cancels.

For each shape, SDPA's cuDNN backend, the dense attention kernel on pre-quantized inputs (the
autotuned configuration) and ``sparge.quantized_attn`` are timed in turn, round after round; each
round's ratio compares timings taken seconds apart. Reports the median time of each and the
median, lowest and highest per-round ratio to cuDNN.

    python bench/paired.py --shapes 32768:128,32768:64,8192:128 --rounds 7 --out FILE
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import bench, card_name, launch_quantized, random_inputs  # noqa: E402

import sparge  # noqa: E402
from sparge.kernels import prepare_qkv  # noqa: E402
from sparge.kernels.attention import tuned_configs  # noqa: E402


def run_shape(length: int, dim: int, args) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gen = torch.Generator(device="cuda").manual_seed(length + dim)
    sets = [random_inputs(1, args.heads, length, dim, gen) for _ in range(args.sets)]
    quant = [prepare_qkv(*s, block_q=64, block_k=128, mode="int8_fp8", with_stats=False)[0]
             for s in sets]
    out = torch.empty_like(sets[0][0])
    lam = torch.full((args.heads,), float("inf"), device="cuda")

    def cudnn(i):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa(*sets[i])

    def kernel(i):
        launch_quantized(quant[i], out=out, table=None, block_q=64, block_k=128, causal=False,
                         scale=dim ** -0.5, pv_threshold=lam, mode="int8_fp8")

    def public(i):
        sparge.quantized_attn(*sets[i], quant="int8_fp8")

    fns = {"sdpa cudnn bf16": cudnn, "sparge dense kernel": kernel,
           "sparge.quantized_attn": public}
    for fn in fns.values():  # compile and autotune outside the rounds
        fn(0)
    bench(cudnn, args.sets, 25, 1000)  # a steady clock at full load
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(bench(fn, args.sets, 10, args.rep))
    flops = 4.0 * args.heads * length * length * dim
    bucket = 1 << (length - 1).bit_length()  # the autotuner's shape class of this length
    configs = sorted({str(c) for k, c in tuned_configs().items()
                      if k[3] == dim and k[9] == bucket})
    lines = [f"## L{length} D{dim} non-causal", "", f"Configurations: {', '.join(configs)}", "",
             "| what | median ms | TOPS | x cuDNN (median) | lowest | highest |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    base = times["sdpa cudnn bf16"]
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts, strict=True)]
        ms = statistics.median(ts)
        lines.append(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                     f"{statistics.median(ratios):.3f} | {min(ratios):.3f} | "
                     f"{max(ratios):.3f} |")
        print(f"  {name:<24} {ms:8.3f} ms  x{statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}]", flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32768:128,32768:64,8192:128")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rep", type=int, default=150, help="do_bench time per timing, ms")
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = [f"# Dense speed against cuDNN, alternating: {card_name()}", "",
             f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads}, bf16 "
             f"random inputs; {args.rounds} rounds, each timing cuDNN, the kernel and "
             f"quantized_attn in turn (do_bench medians over {args.sets} rotated input sets).",
             ""]
    for item in args.shapes.split(","):
        length, dim = (int(x) for x in item.split(":"))
        print(f"L{length} D{dim}", flush=True)
        lines += run_shape(length, dim, args)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
