"""Short lengths: each public call issued eagerly and replayed from a CUDA graph, against SDPA.

At short lengths a call's host time can exceed its GPU time; a CUDA graph captured once per
shape replays the whole call (pre-pass, selection, lookup table, attention) without it. This
times both, with SDPA's cuDNN backend eagerly and replayed, on one card in one run.

    python bench/graph_replay.py --shapes 4096:64:0,4096:128:1 --out FILE
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


def run_shape(length: int, dim: int, causal: bool, heads: int) -> list[str]:
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
    lines = [f"## L{length} D{dim} {'causal' if causal else 'non-causal'}", "",
             "| call | eager ms | graph replay ms | eager x cuDNN | replay x cuDNN eager |",
             "| --- | ---: | ---: | ---: | ---: |"]
    base = None
    for name, fn in calls.items():
        eager = triton.testing.do_bench(lambda fn=fn: fn(q, k, v), return_mode="median")
        base = base or eager
        try:
            replay = triton.testing.do_bench(graphed(fn, (q, k, v)), return_mode="median")
        except RuntimeError as error:  # a call that cannot be captured: say so, go on
            print(f"{name}: no CUDA graph ({error})", flush=True)
            lines.append(f"| {name} | {eager:.3f} | - | {base / eager:.2f} | - |")
            continue
        lines.append(f"| {name} | {eager:.3f} | {replay:.3f} | {base / eager:.2f} | "
                     f"{base / replay:.2f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096:64:0,4096:64:1,4096:128:0,4096:128:1",
                        help="comma list of L:D:causal (causal 0/1)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    lines = [f"# Eager calls and CUDA graph replays: {card_name()}", "",
             f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads}, bf16 "
             "random inputs; medians of do_bench. block_sparse_attn runs a top-10 % predicted "
             "mask (every block eligible); sparse_attn the default thresholds. Ratios divide "
             "cuDNN's eager time.", ""]
    for length, dim, causal in parse_shapes(args.shapes, [], [], []):
        lines += run_shape(length, dim, causal, args.heads)
        if args.out:  # after every shape, so that a cut-off run keeps what it measured
            Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
