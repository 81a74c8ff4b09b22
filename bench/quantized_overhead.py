"""Where the time of one ``sparge.quantized_attn`` call goes, beside its parts timed alone.

Times (medians of ``do_bench`` over rotated input sets) the pre-pass, the attention kernel on
pre-quantized inputs, the two together through ``sparge.kernels.attention``, and the public call.
``profile_calls.py`` lists each call's kernels with their device times.

    python bench/quantized_overhead.py --length 32768 --dim 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import bench, launch_quantized, random_inputs  # noqa: E402

import sparge  # noqa: E402
from sparge import kernels  # noqa: E402
from sparge.kernels import prepare_qkv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = [random_inputs(1, args.heads, args.length, args.dim, gen) for _ in range(args.sets)]
    scale = args.dim ** -0.5
    lam = torch.full((args.heads,), float("inf"), device="cuda")
    out = torch.empty_like(sets[0][0])
    quant = [prepare_qkv(*s, block_q=64, block_k=128, mode="int8_fp8", with_stats=False)[0]
             for s in sets]

    def kernel(i):
        launch_quantized(quant[i], out=out, table=None, block_q=64, block_k=128, causal=False,
                         scale=scale, pv_threshold=lam, mode="int8_fp8")

    def both(i):
        kernels.attention(*sets[i], mask=None, selection=None, block_q=64, block_k=128,
                          causal=False, scale=scale, pv_threshold=lam, mode="int8_fp8", out=out)

    rows = [
        ("prepare_qkv", lambda i: prepare_qkv(*sets[i], block_q=64, block_k=128,
                                              mode="int8_fp8", with_stats=False)),
        ("kernel on pre-quantized inputs", kernel),
        ("kernels.attention (pre-pass + kernel)", both),
        ("sparge.quantized_attn", lambda i: sparge.quantized_attn(*sets[i], quant="int8_fp8")),
    ]
    print(f"{torch.cuda.get_device_name()} L{args.length} D{args.dim} H{args.heads}")
    for name, fn in rows:
        fn(0)
        torch.cuda.synchronize()
        print(f"  {name:<40} {bench(fn, args.sets, 25, 100):8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
