"""The one-warp statistics launch split into its Q and K jobs, with 2048- or 4096-element tiles.

    PYTHONPATH=src python3 bench/stats_launch_split.py

For B1 H24 bf16 random inputs at L32768 D128, L32768 D64 and L8192 D128, times (each variant
captured in a CUDA graph, L2 flushed, medians, three alternating rounds; see
``prepass_stages.graph_time``) the library's launch of both jobs, each job alone with either tile
size, and the two jobs as two launches in a row. What each job costs alone, and whether the K
job's larger tiles (fewer of its second reads missing L2, fewer programs per SM) pay when it has
a launch of its own.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepass_stages import BLOCK_K, BLOCK_Q, HEADS, SETS, graph_time  # noqa: E402

from sparge.kernels import prepass  # noqa: E402

SHAPES = ((32768, 128), (32768, 64), (8192, 128))
# the library's one-warp launch shape with each tile size
TILES = {t: dataclasses.replace(prepass._WITH_STATS, tile_elems=t) for t in (2048, 4096)}
# variant name -> launches in order: (jobs, launch shape)
PLANS = {"QK 2048 (library)": [("QK", TILES[2048])], "K 2048": [("K", TILES[2048])],
         "Q 2048": [("Q", TILES[2048])], "K 4096": [("K", TILES[4096])],
         "Q 4096": [("Q", TILES[4096])],
         "K 4096, then Q 2048": [("K", TILES[4096]), ("Q", TILES[2048])],
         "K 2048, then Q 2048": [("K", TILES[2048]), ("Q", TILES[2048])]}


def input_sets(length: int, dim: int) -> list[tuple[torch.Tensor, ...]]:
    """SETS of (q, k, K's largest-scale buffer, K's channel mean), the mean as the launch
    before the statistics launch leaves it."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    sets = []
    for _ in range(SETS):
        q, k, v = (torch.randn(1, HEADS, length, dim, device="cuda", dtype=torch.bfloat16,
                               generator=gen) for _ in range(3))
        k_max = torch.zeros(1, HEADS, device="cuda")
        k_sum, v_max = prepass._channel_stats(k, v, k_max)
        k_mean = torch.empty(1, HEADS, dim, device="cuda")
        prepass._launch(None, k, v, k_sum, v_max, k_mean, jobs="MV", stats=False,
                        block_q=BLOCK_Q, block_k=BLOCK_K, quant=True)
        sets.append((q, k, k_max, k_mean))
    return sets


def run_plan(q, k, k_max, k_mean, plan):
    """The statistics launches of ``plan`` ((jobs, launch shape) in order, each shape in place
    of ``prepass._WITH_STATS``); returns the Q and K outputs by job letter (the last launch of
    each job)."""
    library = prepass._WITH_STATS
    out = {}
    try:
        for jobs, shape in plan:
            prepass._WITH_STATS = shape
            q_out, k_out, _ = prepass._launch(q, k, None, None, None, k_mean, jobs=jobs,
                                              stats=True, k_scale_max=k_max, block_q=BLOCK_Q,
                                              block_k=BLOCK_K, quant=True)
            out.update({"Q": q_out} if "Q" in jobs else {})
            out.update({"K": k_out} if "K" in jobs else {})
    finally:
        prepass._WITH_STATS = library
    return out


def make_step(sets, plan):
    """make_step for graph_time: the launches of ``plan`` on input set i."""
    return lambda i: (lambda: run_plan(*sets[i], plan))


def alternating_rounds(label: str, makes: dict, rounds: int = 3) -> None:
    """Print ``rounds`` rounds of ``graph_time`` of every variant (name -> make_step), in the
    given order in even rounds and reversed in odd ones, one line per round."""
    for round_ in range(rounds):
        names = list(makes) if round_ % 2 == 0 else list(reversed(makes))
        times = {name: graph_time(makes[name]) for name in names}
        print(f"{label} round {round_}: "
              + ", ".join(f"{name} {times[name]:.1f}" for name in makes), flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for length, dim in SHAPES:
        sets = input_sets(length, dim)
        alternating_rounds(f"L{length} D{dim}",
                           {name: make_step(sets, plan) for name, plan in PLANS.items()})


if __name__ == "__main__":
    main()
