"""The pre-pass, ``quantized_attn`` and ``sparse_attn`` of two (or more) source trees, timed on
one card in alternation: one subprocess per tree and round, so that each imports its own
``sparge``.

    git archive COMMIT src | tar -x -C /tmp/base
    python bench/ab_trees.py --tree /tmp/base/src:base --tree src:new --quant int8_fp16

Each subprocess times, with do_bench medians (25 ms warm-up, 300 ms), ``prepare_qkv`` without and
with the block statistics (called, and replayed from a CUDA graph, which leaves out the host
time), ``sparge.quantized_attn`` (causal and not), ``sparge.block_sparse_attn`` on a random
mask keeping 10 % of the blocks, and causal ``sparge.sparse_attn``, on the same seeded B1 H24
bf16 random inputs. The attention kernel runs its first candidate configuration
(``SPARGE_AUTOTUNE=0``), so that both trees launch the same configuration.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def measure(args) -> str:
    import torch
    import triton

    import sparge
    from sparge.kernels import prepare_qkv

    tree = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]).resolve()
    if not Path(sparge.__file__).resolve().is_relative_to(tree):
        raise RuntimeError(f"imported {sparge.__file__}, not the tree {tree}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.length, args.dim, device="cuda",
                           dtype=torch.bfloat16, generator=gen) for _ in range(3))

    def prepass(stats: bool):
        return lambda: prepare_qkv(q, k, v, block_q=64, block_k=128, mode=args.quant,
                                   with_stats=stats)

    def graphed(fn):
        fn()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    n_q, n_k = -(-args.length // 64), -(-args.length // 128)
    blocks = torch.rand(1, args.heads, n_q, n_k, device="cuda", generator=gen) >= 0.9
    mask = sparge.SparseMask(blocks, 64, 128, args.length, args.length, False)
    steps = {"prepare_qkv": prepass(False), "prepare_qkv+stats": prepass(True),
             "prepare_qkv graph": graphed(prepass(False)),
             "prepare_qkv+stats graph": graphed(prepass(True)),
             "quantized_attn": lambda: sparge.quantized_attn(q, k, v, quant=args.quant),
             "quantized_attn causal": lambda: sparge.quantized_attn(q, k, v, is_causal=True,
                                                                    quant=args.quant),
             "block_sparse_attn 90%": lambda: sparge.block_sparse_attn(q, k, v, mask,
                                                                       quant=args.quant),
             "sparse_attn causal": lambda: sparge.sparse_attn(q, k, v, is_causal=True,
                                                              quant=args.quant)}
    times = []
    for name, fn in steps.items():
        fn()
        ms = triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median")
        times.append(f"{name} {ms:.3f} ms")
    return "  ".join(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[],
                        help="PATH:LABEL, a source tree (the folder holding the sparge package)")
    parser.add_argument("--quant", default="int8_fp8", choices=("int8_fp8", "int8_fp16"))
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(measure(args), flush=True)
        return
    if len(args.tree) < 2:
        parser.error("give at least two --tree")
    forwarded = ["--quant", args.quant, "--length", str(args.length), "--dim", str(args.dim),
                 "--heads", str(args.heads), "--measure"]
    for round_ in range(1, args.rounds + 1):
        for item in args.tree:
            path, label = item.rsplit(":", 1)
            env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()), SPARGE_AUTOTUNE="0")
            proc = subprocess.run([sys.executable, __file__, *forwarded], env=env,
                                  capture_output=True, text=True)
            result = proc.stdout.strip() if proc.returncode == 0 else \
                f"failed: {proc.stderr.strip()[-500:]}"
            print(f"round {round_} {label}: {result}", flush=True)


if __name__ == "__main__":
    main()
