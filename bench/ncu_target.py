"""One call under Nsight Compute: only the call after the warm-up is profiled.

    ncu --clock-control none --profile-from-start off --target-processes all \
        --section SpeedOfLight --section MemoryWorkloadAnalysis ... \
        python3 bench/ncu_target.py {prepass,prepass_nostats,dense} [L] [D]
            [--stats-tile-elems N]

``prepass``: ``prepare_qkv`` with the block statistics (int8_fp8, block_q 64, block_k 128);
``prepass_nostats``: without them; ``dense``: ``quantized_attn``. B1 H24, bf16 random inputs.
``--stats-tile-elems`` gives the one-warp statistics launch tiles of N elements instead of the
library's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sparge  # noqa: E402
from sparge.kernels import prepass  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("call", choices=("prepass", "prepass_nostats", "dense"))
    parser.add_argument("seq_len", type=int, nargs="?", default=32768)
    parser.add_argument("head_dim", type=int, nargs="?", default=128)
    parser.add_argument("--stats-tile-elems", type=int)
    args = parser.parse_args()
    if args.stats_tile_elems is not None:
        prepass._WITH_STATS = dataclasses.replace(prepass._WITH_STATS,
                                                  tile_elems=args.stats_tile_elems)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 24, args.seq_len, args.head_dim, device="cuda",
                           dtype=torch.bfloat16, generator=gen) for _ in range(3))
    if args.call == "dense":
        def call():
            return sparge.quantized_attn(q, k, v)
    else:
        def call():
            return prepass.prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8",
                                       with_stats=args.call == "prepass")
    for _ in range(3):  # compile, autotune, warm up
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
