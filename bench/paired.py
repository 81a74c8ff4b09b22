"""Speed ratios measured in alternation, so that clock drift cancels.

Dense (default): for each shape, SDPA's cuDNN backend, the dense attention kernel on
pre-quantized inputs (the autotuned configuration, and each configuration of ``--configs``) and
``sparge.quantized_attn`` are timed in turn, round after round; each round's ratio compares
timings taken seconds apart. Reports the median time of each and the median, lowest and highest
per-round ratio to cuDNN; with ``--pairs N`` also the ratio within each of N steps (below).

Pipeline (``--pipeline``): for each shape and for random and structured local data, the kernel
alone on the pipeline's own mask (pre-quantized inputs), ``sparge.block_sparse_attn`` on that mask
(quantization and kernel) and ``sparge.sparse_attn`` (prediction, quantization and kernel) in
turn; reports the median, lowest and highest per-round overhead of the pipeline over each.

``--pairs N`` also times the calls one after another, N times, each call on its own (CUDA
events, L2 flushed before it as do_bench flushes it, the order rotating), and reports the median
and quartiles of the ratio within each step: calls milliseconds apart, so that neither clock
drift nor the seconds between rounds enter the ratio.

    python bench/paired.py --shapes 32768:128,32768:64,8192:128 --rounds 7 --out FILE
    python bench/paired.py --shapes 32768:128 --configs 64:4:3:168,64:4:2:168
    python bench/paired.py --pipeline --shapes 32768:128:1,32768:64:1 --rounds 5 --out FILE
    python bench/paired.py --pipeline --shapes 32768:128:1 --rounds 3 --pairs 200 --out FILE
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import (  # noqa: E402
    bench,
    card_name,
    launch_quantized,
    local_inputs,
    pipeline_pair,
    random_inputs,
)

import sparge  # noqa: E402
from sparge.kernels import prepare_qkv  # noqa: E402
from sparge.kernels.attention import KernelConfig, tuned_configs  # noqa: E402


def interleaved(fns: dict[str, Callable[[int], object]], n_sets: int, steps: int,
                run: int = 1) -> dict[str, list[list[float]]]:
    """Per function, per step, the milliseconds of its calls: ``steps`` steps, each giving every
    function one turn of ``run`` calls in a row (input set ``(step * run + i) % n_sets``, the
    order of the functions rotating from step to step), each call timed by CUDA events after a
    256 MB write that flushes L2 (as ``do_bench`` does). Calls are queued without waiting for
    the GPU; the times are read once at the end."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    names = list(fns)
    events: dict[str, list[list[tuple[torch.cuda.Event, torch.cuda.Event]]]] = {
        name: [] for name in names}
    for step in range(steps):
        turn = step % len(names)
        for name in names[turn:] + names[:turn]:
            calls = []
            for i in range(run):
                flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]((step * run + i) % n_sets)
                end.record()
                calls.append((start, end))
            events[name].append(calls)
    torch.cuda.synchronize()
    return {name: [[s.elapsed_time(e) for s, e in calls] for calls in per_step]
            for name, per_step in events.items()}


def per_step_ratios(ms: dict[str, list[list[float]]], numerator: str,
                    denominator: str) -> list[float]:
    """The ratio of the two functions' median times within each step of :func:`interleaved`."""
    return [statistics.median(n) / statistics.median(d)
            for n, d in zip(ms[numerator], ms[denominator], strict=True)]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


@dataclass
class DenseCalls:
    """Dense calls on ``n_sets`` random input sets, each ``f(i)`` running on set i: cuDNN, the
    kernel on pre-quantized inputs (``kernel(i, config)`` forces a launch configuration) and
    ``quantized_attn``, under their table names in ``fns``; ``sparse_kernel(i, table)`` runs the
    kernel on a lookup table."""

    sets: list
    fns: dict[str, Callable[[int], object]]
    kernel: Callable[..., object]
    sparse_kernel: Callable[[int, object], object]


def dense_calls(length: int, dim: int, heads: int, n_sets: int,
                gen: torch.Generator) -> DenseCalls:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    sets = [random_inputs(1, heads, length, dim, gen) for _ in range(n_sets)]
    quant = [prepare_qkv(*s, block_q=64, block_k=128, mode="int8_fp8", with_stats=False)[0]
             for s in sets]
    out = torch.empty_like(sets[0][0])
    lam = torch.full((heads,), float("inf"), device="cuda")

    def cudnn(i):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa(*sets[i])

    def sparse_kernel(i, table, config=None):
        launch_quantized(quant[i], out=out, table=table, block_q=64, block_k=128, causal=False,
                         scale=dim ** -0.5, pv_threshold=lam, mode="int8_fp8", config=config)

    def kernel(i, config=None):
        sparse_kernel(i, None, config)

    def public(i):
        sparge.quantized_attn(*sets[i], quant="int8_fp8")

    return DenseCalls(sets, {"sdpa cudnn bf16": cudnn, "sparge dense kernel": kernel,
                             "sparge.quantized_attn": public}, kernel, sparse_kernel)


def run_shape(length: int, dim: int, args) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(length + dim)
    calls = dense_calls(length, dim, args.heads, args.sets, gen)
    fns, kernel = dict(calls.fns), calls.kernel
    cudnn = fns["sdpa cudnn bf16"]
    for cfg in args.configs:
        label = (f"kernel M{cfg.block_m} {cfg.num_warps}w {cfg.num_stages}s "
                 f"{cfg.max_registers or '-'}r")
        fns[label] = lambda i, cfg=cfg: kernel(i, cfg)
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
    steps = interleaved(fns, args.sets, args.pairs) if args.pairs else None
    lines = [f"## L{length} D{dim} non-causal", "", f"Configurations: {', '.join(configs)}", "",
             "| what | median ms | TOPS | x cuDNN (median) | lowest | highest |"
             + (" per step: x cuDNN, median [quartiles] |" if steps else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if steps else "")]
    base = times["sdpa cudnn bf16"]
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts, strict=True)]
        ms = statistics.median(ts)
        row = (f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
               f"{statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")
        if steps:
            q1, median, q3 = quartiles(per_step_ratios(steps, "sdpa cudnn bf16", name))
            row += f" {median:.3f} [{q1:.3f}, {q3:.3f}] |"
        lines.append(row)
        print(f"  {name:<24} {ms:8.3f} ms  x{statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}]", flush=True)
    return lines + [""]


def run_pipeline_shape(length: int, dim: int, causal: bool, args) -> list[str]:
    """Alternating rounds of the kernel alone on the pipeline's mask, ``block_sparse_attn`` on that
    mask (the kernel with its quantization) and the whole pipeline."""
    gen = torch.Generator(device="cuda").manual_seed(length + dim + causal)
    lam = torch.full((args.heads,), 50.0, device="cuda")  # sparse_attn's default pv_threshold
    name = f"L{length} D{dim} {'causal' if causal else 'non-causal'}"
    lines = [f"## {name}", "",
             "| data | sparsity | kernel ms | block_sparse_attn ms | pipeline ms "
             "| over kernel: median [lowest, highest] "
             "| over block_sparse_attn: median [lowest, highest] |"
             + (" per step, over kernel: median [quartiles] | per step, over block_sparse_attn |"
                if args.pairs else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: | ---: |" if args.pairs else "")]

    def spread(over: list[float]) -> str:
        return (f"{100 * statistics.median(over):+.1f} % "
                f"[{100 * min(over):+.1f}, {100 * max(over):+.1f}]")

    for data_name, make in (("random", random_inputs), ("local", local_inputs)):
        sets = [make(1, args.heads, length, dim, gen) for _ in range(args.sets)]
        pair = pipeline_pair(sets, causal=causal, mode="int8_fp8", pv_threshold=lam,
                             out=torch.empty_like(sets[0][0]))
        pair.kernel(0)
        pair.block_sparse(0)
        pair.pipeline(0)
        bench(pair.pipeline, args.sets, 25, 500)  # a steady clock at full load
        k_ms, b_ms, p_ms = [], [], []
        for _ in range(args.rounds):
            k_ms.append(bench(pair.kernel, args.sets, 10, args.rep))
            b_ms.append(bench(pair.block_sparse, args.sets, 10, args.rep))
            p_ms.append(bench(pair.pipeline, args.sets, 10, args.rep))
        over_k = [p / k - 1 for k, p in zip(k_ms, p_ms, strict=True)]
        over_b = [p / b - 1 for b, p in zip(b_ms, p_ms, strict=True)]
        row = (f"| {data_name} | {pair.sparsity():.3f} | {statistics.median(k_ms):.3f} | "
               f"{statistics.median(b_ms):.3f} | {statistics.median(p_ms):.3f} | "
               f"{spread(over_k)} | {spread(over_b)} |")
        if args.pairs:
            ms = interleaved({"kernel": pair.kernel, "block": pair.block_sparse,
                              "pipeline": pair.pipeline}, args.sets, args.pairs)
            for base in ("kernel", "block"):
                over = [r - 1 for r in per_step_ratios(ms, "pipeline", base)]
                q1, median, q3 = (100 * x for x in quartiles(over))
                row += f" {median:+.1f} % [{q1:+.1f}, {q3:+.1f}] |"
        lines.append(row)
        print(f"  {name} {row}", flush=True)
        del sets, pair
        torch.cuda.empty_cache()
    return lines + [""]


def parse_configs(text: str) -> list[KernelConfig]:
    configs = []
    for item in text.split(","):
        block_m, warps, stages, registers = (int(x) for x in item.split(":"))
        configs.append(KernelConfig(block_m, warps, stages, registers or None))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32768:128,32768:64,8192:128")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rep", type=int, default=150, help="do_bench time per timing, ms")
    parser.add_argument("--pipeline", action="store_true",
                        help="pipeline overhead over the kernel; shapes are L:D:causal")
    parser.add_argument("--pairs", type=int, default=0,
                        help="also this many steps timing the calls one after another (see the "
                             "module docstring)")
    parser.add_argument("--configs", type=parse_configs, default=[],
                        help="dense: kernel configurations to time beside the autotuned one, "
                             "block_m:warps:stages:registers (0 = no cap), comma-separated")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.pipeline:
        lines = [f"# Pipeline overhead over the kernel alone, alternating: {card_name()}", "",
                 f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads}, bf16, "
                 f"int8_fp8, sparse_attn defaults; {args.rounds} rounds, each timing the kernel "
                 "on the pipeline's masks (pre-quantized inputs, each set's own mask), "
                 "block_sparse_attn on those masks and the pipeline "
                 f"in turn (do_bench medians over {args.sets} rotated input sets)."
                 + (f" Per step: {args.pairs} steps, each timing the three calls one after "
                    "another (CUDA events, L2 flushed before each call, the order rotating); "
                    "the overhead within each step, median and quartiles over the steps."
                    if args.pairs else ""), ""]
        for item in args.shapes.split(","):
            length, dim, causal = (int(x) for x in item.split(":"))
            lines += run_pipeline_shape(length, dim, bool(causal), args)
            if args.out:
                Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    lines = [f"# Dense speed against cuDNN, alternating: {card_name()}", "",
             f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads}, bf16 "
             f"random inputs; {args.rounds} rounds, each timing cuDNN, the kernel and "
             f"quantized_attn in turn (do_bench medians over {args.sets} rotated input sets)."
             + (f" Per step: {args.pairs} steps, each timing every call once, one after another "
                "(CUDA events, L2 flushed before each call, the order rotating); the ratio "
                "within each step, median and quartiles over the steps." if args.pairs else ""),
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
