"""Short lengths: each public call issued eagerly and replayed from a CUDA graph, against SDPA.

At short lengths a call's host time can exceed its GPU time; a CUDA graph captured once per
shape replays the whole call (pre-pass, selection, lookup table, attention) without it. This
times both, with SDPA's cuDNN backend eagerly and replayed, on one card in one run. With
``--compile`` it also times each call under ``torch.compile(mode="reduce-overhead")``, whose CUDA
graphs record the call on its first runs and replay it after.

    python bench/graph_replay.py --shapes 4096:64:0,4096:128:1 --out FILE
    python bench/graph_replay.py --shapes 4096:64:0 --compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import card_name, parse_shapes, random_inputs  # noqa: E402

import sparge  # noqa: E402


def graphed(fn, inputs):
    """A CUDA graph of ``fn(*inputs)`` (warmed up eagerly first) and its replay function."""
    fn(*inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*inputs)
    return graph.replay


def compiled(fn, inputs):
    """``fn`` under ``torch.compile(mode="reduce-overhead")``, run until its CUDA graph replays,
    and the function that calls it."""
    run = torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    for _ in range(3):  # warm-up, recording, a first replay
        run(*inputs)
    return lambda: run(*inputs)


def run_shape(length: int, dim: int, causal: bool, heads: int, compile_too: bool) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gen = torch.Generator(device="cuda").manual_seed(length + dim)
    q, k, v = random_inputs(1, heads, length, dim, gen)
    # every block eligible (sim_threshold -1): the top-10 % rule alone, 90 % of the blocks skipped
    mask = sparge.predict_mask(q, k, topk=0.1, sim_threshold=-1.0, is_causal=causal)

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(q, k, v, is_causal=causal)

    calls = {
        "sdpa cudnn bf16": cudnn,
        "sparge.quantized_attn": lambda q, k, v: sparge.quantized_attn(q, k, v, is_causal=causal),
        "sparge.block_sparse_attn 90%": lambda q, k, v: sparge.block_sparse_attn(q, k, v, mask),
        "sparge.sparse_attn": lambda q, k, v: sparge.sparse_attn(q, k, v, is_causal=causal),
    }
    header = "| call | eager ms | graph replay ms | eager x cuDNN | replay x cuDNN eager |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    if compile_too:
        header += " reduce-overhead ms | reduce-overhead x cuDNN eager |"
        rule += " ---: | ---: |"
    lines = [f"## L{length} D{dim} {'causal' if causal else 'non-causal'}", "", header, rule]
    base = None
    for name, fn in calls.items():
        eager = triton.testing.do_bench(lambda fn=fn: fn(q, k, v), return_mode="median")
        base = base or eager
        row = f"| {name} | {eager:.3f} |"
        try:
            replay = triton.testing.do_bench(graphed(fn, (q, k, v)), return_mode="median")
            row += f" {replay:.3f} | {base / eager:.2f} | {base / replay:.2f} |"
        except RuntimeError as error:  # a call that cannot be captured: say so, go on
            print(f"{name}: no CUDA graph ({error})", flush=True)
            row += f" - | {base / eager:.2f} | - |"
        if compile_too:
            try:
                reduced = triton.testing.do_bench(compiled(fn, (q, k, v)), return_mode="median")
                row += f" {reduced:.3f} | {base / reduced:.2f} |"
            except Exception as error:  # noqa: BLE001 - a call that does not compile: say so
                print(f"{name}: torch.compile failed ({type(error).__name__}: {error})",
                      flush=True)
                row += " - | - |"
        lines.append(row)
        print(row, flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096:64:0,4096:64:1,4096:128:0,4096:128:1",
                        help="comma list of L:D:causal (causal 0/1)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--compile", action="store_true",
                        help='also time each call under torch.compile(mode="reduce-overhead")')
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    lines = [f"# Eager calls and CUDA graph replays: {card_name()}", "",
             f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads}, bf16 "
             "random inputs; medians of do_bench. block_sparse_attn runs a top-10 % predicted "
             "mask (every block eligible); sparse_attn the default thresholds. Ratios divide "
             "cuDNN's eager time.", ""]
    for length, dim, causal in parse_shapes(args.shapes, [], [], []):
        lines += run_shape(length, dim, causal, args.heads, args.compile)
        if args.out:  # after every shape, so that a cut-off run keeps what it measured
            Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
