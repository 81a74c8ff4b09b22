"""Dense speed against cuDNN as a function of how many calls in a row each function gets.

    PYTHONPATH=src python3 bench/run_length.py --shapes 32768:128,8192:128 --out FILE

cuDNN, the dense attention kernel on pre-quantized inputs and ``sparge.quantized_attn`` (with
``--skip F``, also the kernel and ``sparge.block_sparse_attn`` on random block masks with a
fraction F of the blocks skipped) take turns; each turn is ``run`` consecutive calls of one
function (CUDA events around each call, L2 flushed before it as ``do_bench`` flushes it, the order
of the functions rotating from step to step). For each run length the table gives each function's
median time and the median and quartiles, over the steps, of the ratio of the medians within a
step. A ratio that moves with the run length comes from the card's clock following the power each
kernel draws: run after run of one kernel lets the clock settle where that kernel's power puts it,
while alternating call by call holds every kernel at one common clock.
``--clocks FILE`` logs the SM clock, power and temperature every 20 ms through ``nvidia-smi`` while
the steps run (each run length's steps are marked in the log by host timestamps).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import card_name, random_block_mask  # noqa: E402
from paired import dense_calls, interleaved, per_step_ratios, quartiles  # noqa: E402

import sparge  # noqa: E402
from sparge.kernels import block_table  # noqa: E402

RUNS = (1, 4, 16, 48)
CALL_BUDGET_MS = 12000  # per run length and shape: steps = budget / (run * calls per step)


def run_shape(length: int, dim: int, args, mark) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(length + dim)
    calls = dense_calls(length, dim, args.heads, args.sets, gen)
    fns = dict(calls.fns)
    cudnn = fns["sdpa cudnn bf16"]
    if args.skip:
        masks = [random_block_mask(1, args.heads, length, length, False, args.skip, gen)
                 for _ in calls.sets]
        tables = [block_table(m) for m in masks]

        def sparse_public(i):
            sparge.block_sparse_attn(*calls.sets[i], masks[i], quant="int8_fp8")

        fns[f"kernel, {args.skip:.0%} skipped"] = lambda i: calls.sparse_kernel(i, tables[i])
        fns[f"block_sparse_attn, {args.skip:.0%} skipped"] = sparse_public
    for fn in fns.values():  # compile and autotune outside the timing
        fn(0)
    torch.cuda.synchronize()
    call_ms = triton.testing.do_bench(lambda: cudnn(0), warmup=25, rep=1000,
                                      return_mode="median")  # also a steady clock at full load
    others = [name for name in fns if name != "sdpa cudnn bf16"]
    lines = [f"## L{length} D{dim} non-causal", "",
             "| calls in a row | steps | cuDNN ms | "
             + " | ".join(f"{name}: ms, x cuDNN median [quartiles]" for name in others) + " |",
             "| ---: | ---: | ---: |" + " ---: |" * len(others)]
    for run in args.runs:
        steps = max(3, int(CALL_BUDGET_MS / (call_ms * run * len(fns))))
        mark(f"L{length} D{dim} run {run} start")
        ms = interleaved(fns, args.sets, steps, run)
        mark(f"L{length} D{dim} run {run} end")
        overall = {name: statistics.median([t for calls in per_step for t in calls])
                   for name, per_step in ms.items()}
        cells = []
        for name in others:
            q1, median, q3 = quartiles(per_step_ratios(ms, "sdpa cudnn bf16", name))
            cells.append(f"{overall[name]:.3f}, {median:.3f} [{q1:.3f}, {q3:.3f}]")
        row = f"| {run} | {steps} | {overall['sdpa cudnn bf16']:.3f} | " + " | ".join(cells) + " |"
        lines.append(row)
        print(row, flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32768:128,8192:128")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--runs", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(RUNS))
    parser.add_argument("--skip", type=float, default=0.0,
                        help="also the kernel and block_sparse_attn on random masks with this "
                             "fraction of the blocks skipped")
    parser.add_argument("--clocks", help="nvidia-smi log of clock, power and temperature")
    parser.add_argument("--out")
    args = parser.parse_args()
    sampler = None
    log = None
    if args.clocks:
        log = open(args.clocks, "w")  # noqa: SIM115 - held open while the sampler writes
        sampler = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
             "--format=csv", "-lms", "20"], stdout=log, stderr=subprocess.STDOUT)

    def mark(text: str) -> None:
        torch.cuda.synchronize()
        if log is not None:
            log.write(f"# {dt.datetime.now().strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]} {text}\n")
            log.flush()

    lines = [f"# Dense speed against cuDNN by calls in a row: {card_name()}", "",
             f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads}, bf16 "
             f"random inputs, {args.sets} input sets; per run length, steps of one turn of each "
             "function, each turn that many calls in a row (CUDA events, L2 flushed before each "
             "call); ratios of the within-step medians, median and quartiles over the steps.", ""]
    try:
        for item in args.shapes.split(","):
            length, dim = (int(x) for x in item.split(":"))
            lines += run_shape(length, dim, args, mark)
            if args.out:
                Path(args.out).write_text("\n".join(lines) + "\n")
    finally:
        if sampler is not None:
            sampler.terminate()
            sampler.wait()
            log.close()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
