"""Each dense call timed run after run, with the SM clock and the power it ran at (CUDA).

    PYTHONPATH=src python3 bench/clock_regimes.py --shapes 32768:64,32768:128 --out FILE

For B1 H24 bf16 random inputs, SDPA's cuDNN backend, the dense sparge kernel on pre-quantized
inputs (launched eagerly, and replayed from a CUDA graph as ``bench_attention.py``'s kernel rows
are) and ``sparge.quantized_attn`` each run alone for ``--seconds`` under
``triton.testing.do_bench`` (median, L2 flushed, rotating over three input sets), in turn, for
``--rounds`` rounds. ``nvidia-smi`` samples the SM clock and the power every 20 ms meanwhile;
each row gives the mean clock and power over its window, less its first 200 ms. Run after run
the clock settles where each kernel's power draw lets a capped card run it, which is what a
do_bench row measures; ``run_length.py`` compares the kernels call by call at a common clock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import bench, card_name, graphed  # noqa: E402
from paired import dense_calls  # noqa: E402

SKIP_S = 0.2  # the start of each window, while the clock moves to the new load


def samples(log: Path) -> list[tuple[dt.datetime, float, float]]:
    """(time, SM MHz, W) of every sample in an nvidia-smi csv log."""
    rows = []
    for line in log.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[1].endswith("MHz"):
            continue
        when = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
        rows.append((when, float(parts[1].split()[0]), float(parts[2].split()[0])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32768:64,32768:128", help="L:D pairs")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "clocks.csv"
    windows: list[tuple[str, str, float, dt.datetime, dt.datetime]] = []
    with open(log, "w") as sink:
        sampler = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv",
             "-lms", "20"], stdout=sink, stderr=subprocess.STDOUT)
        try:
            for pair in args.shapes.split(","):
                length, dim = (int(x) for x in pair.split(":"))
                gen = torch.Generator(device="cuda").manual_seed(length + dim)
                calls = dense_calls(length, dim, args.heads, args.sets, gen)
                fns = dict(calls.fns)
                fns["sparge dense kernel, graph replays"] = graphed(calls.kernel, args.sets)
                for fn in fns.values():  # compile and autotune outside the timing
                    fn(0)
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        torch.cuda.synchronize()
                        start = dt.datetime.now()
                        ms = bench(fn, args.sets, 25, args.seconds * 1e3)
                        torch.cuda.synchronize()
                        windows.append((f"L{length} D{dim}", name, ms, start,
                                        dt.datetime.now()))
                        print(f"L{length} D{dim} {name}: {ms:.3f} ms", flush=True)
        finally:
            sampler.terminate()
            sampler.wait()
    points = samples(log)
    lines = [f"# Dense calls run after run, with clock and power: {card_name()}", "",
             f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads}, bf16 "
             f"random inputs, {args.sets} input sets; each row one do_bench window of "
             f"{args.seconds:g} s (median ms), the functions in turn, {args.rounds} rounds; SM "
             f"clock and power: means of nvidia-smi samples every 20 ms over the window less its "
             f"first {SKIP_S:g} s.", "",
             "| shape | function | ms | x cuDNN (same round) | SM MHz | W | samples |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    cudnn_ms = {}
    for shape, name, ms, start, end in windows:
        if name == "sdpa cudnn bf16":
            cudnn_ms[shape] = ms
        inside = [(mhz, w) for when, mhz, w in points
                  if start + dt.timedelta(seconds=SKIP_S) <= when <= end]
        mhz = statistics.mean(m for m, _ in inside) if inside else float("nan")
        watts = statistics.mean(w for _, w in inside) if inside else float("nan")
        lines.append(f"| {shape} | {name} | {ms:.3f} | {cudnn_ms[shape] / ms:.3f} | {mhz:.0f} | "
                     f"{watts:.0f} | {len(inside)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
