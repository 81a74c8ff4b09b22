"""The statistics launch with each block read once, by a program of several warps.

    PYTHONPATH=src python3 bench/stats_launch_warps.py

The library's statistics launch runs one-warp programs that read each K block (128 rows) in
16-row parts twice: once for its amax and column sums, once to quantize it. With a tile of a
whole block (16384 elements at D128) a program reads its block once and keeps it in registers,
but its reductions across rows then cross warps (shared memory and barriers). Compiled offline
(sm_90, Triton 3.9) the K job takes 128 registers in 16 warps (one program per SM), 186 in 8
(128 under a cap, 120 bytes of stack: two programs per SM).

For B1 H24 bf16 random inputs at L32768 D128, L32768 D64 and L8192 D128 it checks that every
variant gives the library's INT8 values and scales (bit for bit) and statistics (within float32
rounding: the sums run in another order), then times (each variant captured in a CUDA graph, L2
flushed, medians, three alternating rounds; see ``prepass_stages.graph_time``) the library's
launch, each variant of it, and the K job in a variant followed by Q's job in the library's
one-warp launch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats_launch_split import (  # noqa: E402
    SHAPES,
    alternating_rounds,
    input_sets,
    make_step,
    run_plan,
)

from sparge.kernels import prepass  # noqa: E402

LIBRARY = prepass._WITH_STATS
WHOLE = {"16384 x 8 warps, cap 128": prepass._LaunchShape(16384, 8, 128),
         "16384 x 16 warps": prepass._LaunchShape(16384, 16, None),
         "16384 x 8 warps": prepass._LaunchShape(16384, 8, None),
         "8192 x 8 warps, cap 128": prepass._LaunchShape(8192, 8, 128)}
# variant name -> launches in order: (jobs, launch shape)
PLANS = {"QK library": [("QK", LIBRARY)]}
PLANS.update({f"QK {name}": [("QK", shape)] for name, shape in WHOLE.items()})
PLANS.update({f"K {name}, then Q library": [("K", shape), ("Q", LIBRARY)]
              for name, shape in WHOLE.items()})


def check(sets, plan) -> str:
    """How the plan's outputs on the first set differ from the library's: "ok" when the INT8
    values and scales are equal and the statistics agree within float32 rounding (relative to
    each statistic's largest magnitude)."""
    q, k, k_max, k_mean = sets[0]
    k_max.zero_()
    ref = run_plan(q, k, k_max, k_mean, PLANS["QK library"])
    ref_max = k_max.clone()
    k_max.zero_()
    got = run_plan(q, k, k_max, k_mean, plan)
    worst = 0.0
    for job in "QK":
        a, b = ref[job], got[job]
        if not (torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales)):
            return f"{job} values or scales differ"
        for x, y in ((a.stats.mean, b.stats.mean), (a.stats.similarity, b.stats.similarity)):
            worst = max(worst, ((x - y).abs().max() / x.abs().max()).item())
    if not torch.equal(ref_max, k_max):
        return "largest K scale differs"
    return "ok" if worst < 1e-4 else f"statistics differ by {worst:.2e}"


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for length, dim in SHAPES:
        sets = input_sets(length, dim)
        for name, plan in PLANS.items():
            print(f"L{length} D{dim} {name}: {check(sets, plan)}", flush=True)

        alternating_rounds(f"L{length} D{dim}",
                           {name: make_step(sets, plan) for name, plan in PLANS.items()})


if __name__ == "__main__":
    main()
