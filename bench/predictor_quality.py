"""The predictor's sparsity and error by threshold: ``sparse_attn`` on the benchmark's structured
local data (``bench_attention.local_inputs``) and on random data, causal and not, against float64
attention on sampled query rows. Runs on the GPU if there is one, else on the CPU reference path.

``--quant none`` (the default) keeps the predicted masks with exact arithmetic, so the error is
the prediction's alone; ``--quant auto`` adds the quantization's.

    python bench/predictor_quality.py --lengths 4096 --dims 128 --heads 2
    python bench/predictor_quality.py --lengths 4096,32768 --out bench/results/predictor.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import (  # noqa: E402
    exact_rows,
    local_inputs,
    random_inputs,
    rel_l1_rows,
    sample_rows,
)

import sparge  # noqa: E402  (bench_attention puts src/ on the path)

# name: sparse_attn keyword arguments
SETTINGS = {
    "default (cdf 0.98, sim 0.6)": {},
    "cdf 0.995": dict(cdf_threshold=0.995),
    "cdf 0.999": dict(cdf_threshold=0.999),
    "topk 0.05": dict(topk=0.05),
    "topk 0.1": dict(topk=0.1),
    "topk 0.2": dict(topk=0.2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--dims", default="128")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=512, help="sampled query rows")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--data", default="local,random", help="local, random or both")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"# Predictor sparsity and error by threshold ({device.type}, "
             f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'reference path'})",
             "",
             f"torch {torch.__version__}; B1 H{args.heads}, bf16 inputs, quant={args.quant!r}; "
             f"rel L1 on {args.rows} sampled rows against float64 attention (dense, or "
             "causal); sparsity = skipped / visitable blocks (block_q 64, block_k 128).", "",
             "| data | L | D | causal | setting | sparsity | rel L1 |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for length in map(int, args.lengths.split(",")):
        for dim in map(int, args.dims.split(",")):
            for data in args.data.split(","):
                make = {"local": local_inputs, "random": random_inputs}[data]
                gen = torch.Generator(device=device).manual_seed(length + dim)
                q, k, v = make(1, args.heads, length, dim, gen)
                rows = sample_rows(1, args.heads, length, args.rows,
                                   torch.Generator().manual_seed(7)).to(device)
                for causal in (False, True):
                    exact = exact_rows(q, k, v, rows, None, causal, 1 / math.sqrt(dim))
                    for name, kwargs in SETTINGS.items():
                        start = time.perf_counter()
                        out, stats = sparge.sparse_attn(q, k, v, is_causal=causal,
                                                        quant=args.quant, return_stats=True,
                                                        **kwargs)
                        line = (f"| {data} | {length} | {dim} | {'yes' if causal else 'no'} | "
                                f"{name} | {stats.sparsity:.3f} | "
                                f"{rel_l1_rows(out, rows, exact):.4f} |")
                        lines.append(line)
                        print(line, flush=True)
                        print(f"  {time.perf_counter() - start:.1f} s", file=sys.stderr,
                              flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
