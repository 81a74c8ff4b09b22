"""Pre-pass benchmark: ``prepare_qkv`` (int8_fp8) against the memory floor, on one card (CUDA).

For B1 H24, L in {8192, 32768}, D in {64, 128}, bf16 random inputs, times ``prepare_qkv`` with and
without the block statistics (``triton.testing.do_bench``, median, rotating over 3 input sets so
that L2 does not serve a repeated input). The bytes counted are the floor: Q read once, K and V
read twice (once for their channel statistics, once to quantize), every output written once (INT8
Q and K, FP8 V with its padding rows, the scales and, with statistics, the pooled means and
similarities). Achieved bandwidth is set against a device-to-device copy (``clone`` of a 1 GiB
tensor, bytes read + written over time), measured once. ``--kernels`` also times the two
launches apart (the channel statistics: K and V read once; the quantization: the rest).

    PYTHONPATH=src python bench/bench_prepass.py [--kernels] [--out results/prepass.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_attention import bench  # noqa: E402

from sparge.kernels import prepass  # noqa: E402
from sparge.kernels.prepass import prepare_qkv  # noqa: E402
from sparge.mask import num_blocks  # noqa: E402

BQ, BK = 64, 128
DEVICE = "cuda"


def copy_bandwidth(warmup: int, rep: int) -> float:
    """GB/s of ``clone`` of a 1 GiB tensor (bytes read + written)."""
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=DEVICE)
    ms = triton.testing.do_bench(x.clone, warmup=warmup, rep=rep, return_mode="median")
    return 2 * x.numel() / ms / 1e6


def floor_bytes(b: int, h: int, length: int, d: int, stats: bool, elem: int = 2) -> int:
    """Bytes the pre-pass must move at least (see the module docstring)."""
    n_q, n_k = num_blocks(length, BQ), num_blocks(length, BK)
    padded = n_k * BK
    reads = 5 * b * h * length * d * elem  # Q once, K and V twice
    writes = 2 * b * h * length * d + b * h * d * padded  # INT8 Q, K; FP8 V (K-major, padded)
    writes += 4 * b * h * (n_q + n_k + d)  # scales
    if stats:
        writes += 4 * b * h * (n_q + n_k) * (d + 1)  # pooled means and similarities
    return reads + writes


def kernel_times(sets: list, stats: bool, moved: int, copy_gbs: float,
                 args: argparse.Namespace) -> str:
    """The channel statistics and the quantization (one launch, or two with the block
    statistics) of prepare_qkv timed apart, each against its share of the floor."""
    b, h, length, d = sets[0][0].shape
    stats_bytes = 2 * b * h * length * d * sets[0][0].element_size()  # K and V read once
    partials = [prepass._channel_stats(k, v) for _, k, v in sets]
    ms_stats = bench(lambda i: prepass._channel_stats(*sets[i][1:]), args.sets, args.warmup,
                     args.rep)
    ms_quant = bench(lambda i: prepass._quantize(*sets[i], *partials[i], block_q=BQ, block_k=BK,
                                                 quant=True, stats=stats),
                     args.sets, args.warmup, args.rep)
    parts = []
    for name, ms, nbytes in (("channel stats", ms_stats, stats_bytes),
                             ("quantize", ms_quant, moved - stats_bytes)):
        gbs = nbytes / ms / 1e6
        parts.append(f"{name} {ms:.3f} ms, {gbs:.0f} GB/s ({gbs / copy_gbs:.2f} x copy)")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated while timing")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--kernels", action="store_true", help="also time the steps apart")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args()

    copy_gbs = copy_bandwidth(args.warmup, args.rep)
    card = torch.cuda.get_device_name()
    header = (f"{card}, torch {torch.__version__}, Triton {triton.__version__}; "
              f"B{args.batch} H{args.heads} bf16, block_q {BQ}, block_k {BK}; "
              f"copy (clone of 1 GiB): {copy_gbs:.0f} GB/s")
    print(header)
    columns = ("L", "D", "stats", "ms", "MB moved", "GB/s", "x copy")
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    b, h = args.batch, args.heads
    for length in (int(x) for x in args.lengths.split(",")):
        for d in (int(x) for x in args.dims.split(",")):
            sets = [tuple(torch.randn(b, h, length, d, generator=gen, device=DEVICE,
                                      dtype=torch.bfloat16) for _ in range(3))
                    for _ in range(args.sets)]
            for stats in (False, True):
                def run(i, stats=stats, sets=sets):
                    prepare_qkv(*sets[i], block_q=BQ, block_k=BK, mode="int8_fp8",
                                with_stats=stats)

                ms = bench(run, args.sets, args.warmup, args.rep)
                moved = floor_bytes(b, h, length, d, stats)
                gbs = moved / ms / 1e6
                row = (length, d, "yes" if stats else "no", f"{ms:.3f}", f"{moved / 1e6:.0f}",
                       f"{gbs:.0f}", f"{gbs / copy_gbs:.2f}")
                rows.append(row)
                print("  ".join(f"{name} {value}" for name, value in zip(columns, row,
                                                                         strict=True)),
                      flush=True)
                if args.kernels:
                    print("    " + kernel_times(sets, stats, moved, copy_gbs, args), flush=True)
            del sets
            torch.cuda.empty_cache()

    if args.out:
        lines = [f"# prepare_qkv (int8_fp8): {header}", "",
                 "| " + " | ".join(columns) + " |",
                 "| " + " | ".join("---:" for _ in columns) + " |"]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
