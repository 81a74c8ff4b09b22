"""Launch shapes of V's quantization launch in the pre-pass with statistics (CUDA).

    PYTHONPATH=src python3 bench/v_launch_sweep.py

With the block statistics at long lengths, V's FP8 job and the finishing of K's channel mean run in
a launch of their own (``jobs="MV"``) under ``prepass._V_ALONE`` (elements per tile, at most 128
rows a tile, warps, register cap). For B1 H24 bf16 K and V at L32768 D128, L32768 D64 and L8192
D128, this times that launch alone under the library's shape, the shape it had before (that of
quantization alone, 4096 elements, 4 warps, 96 registers) and every combination of 4096 to 16384
elements per tile, 4 or 8 warps, no cap or a 128-register cap and 1 to 3 software-pipelining
stages of the tile loop (1: none; ``--stages``; the library pipelines it on Hopper only, so
elsewhere every variant runs at 1 stage), each variant captured in a CUDA
graph and timed by ``do_bench`` (median) over 3 input sets in turn, in three alternating rounds.
Prints each variant's median over the rounds, fastest first, with the library's shape marked.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepass_head_chunks import graphed  # noqa: E402

from sparge.kernels import prepass  # noqa: E402

HEADS = 24
SETS = 3
TILES = (4096, 8192, 16384)
WARPS = (4, 8)
CAPS = (None, 128)
STAGES = (1,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", default=",".join(map(str, TILES)))
    parser.add_argument("--warps", default=",".join(map(str, WARPS)))
    parser.add_argument("--caps", default="-,128", help="register caps, - for none")
    parser.add_argument("--stages", default=",".join(map(str, STAGES)))
    args = parser.parse_args()
    ints = [[int(x) for x in a.split(",")] for a in (args.tiles, args.warps, args.stages)]
    caps = [None if c == "-" else int(c) for c in args.caps.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; B1 H{HEADS} bf16", flush=True)
    # whether the library runs a variant's stages on this GPU, asked of its own rule
    staged = prepass._launch_shape(False, False,
                                   torch.cuda.get_device_capability()) is prepass._V_ALONE
    if not staged:
        print("not a Hopper GPU: the library runs V's tile loop at 1 stage here, whatever the "
              "variant asks", flush=True)
        ints[2] = [1]
    library = prepass._V_ALONE
    shapes = [library, prepass._LaunchShape(4096, 4, 96),
              *(prepass._LaunchShape(tile, warps, cap, library.max_rows, stages)
                for tile, warps, cap, stages in itertools.product(ints[0], ints[1], caps, ints[2]))]
    for length, dim in ((32768, 128), (32768, 64), (8192, 128)):
        gen = torch.Generator(device="cuda").manual_seed(length + dim)
        sets = []
        for _ in range(SETS):
            k, v = (torch.randn(1, HEADS, length, dim, device="cuda", dtype=torch.bfloat16,
                                generator=gen) for _ in range(2))
            ksum, vmax = prepass._channel_stats(k, v)
            k_mean = torch.empty(1, HEADS, dim, device="cuda")
            sets.append((k, v, ksum, vmax, k_mean))
        variants = {}
        for shape in shapes:
            prepass._V_ALONE = shape
            try:
                replays = [graphed(lambda s=s: prepass._launch(
                    None, s[0], s[1], s[2], s[3], s[4], jobs="MV", block_q=64, block_k=128,
                    quant=True, stats=False)) for s in sets]
            finally:
                prepass._V_ALONE = library
            variants[shape] = replays
        times = {key: [] for key in variants}
        for _ in range(3):
            for key, replays in variants.items():
                state = {"i": 0}

                def step(replays=replays, state=state):
                    replays[state["i"] % SETS]()
                    state["i"] += 1

                times[key].append(triton.testing.do_bench(step, warmup=10, rep=60,
                                                          return_mode="median"))
        print(f"\nL{length} D{dim}: V's launch (with K's mean), median of 3 rounds, us")
        ranked = sorted(times, key=lambda key: statistics.median(times[key]))
        for shape in ranked:
            mark = "  <- library" if shape is library else ""
            print(f"  tile {shape.tile_rows(prepass._dim_pad(dim)):4d} rows  warps "
                  f"{shape.num_warps}  cap {shape.maxnreg or '-':>4}  "
                  f"stages {shape.v_stages if staged else 1}  "
                  f"{1e3 * statistics.median(times[shape]):7.1f}{mark}", flush=True)


if __name__ == "__main__":
    main()
