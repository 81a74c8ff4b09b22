"""Launch variants of the pre-pass's channel-statistics kernel on one card (CUDA).

    PYTHONPATH=src python3 bench/channel_stats_sweep.py

For B1 H24 bf16 K and V at L32768 D128, L32768 D64 and L8192 D128, times the library's launch
(``prepass._channel_stats``) and the kernel under every combination of: about 1024 or 2048
programs, the library's tile rows or twice as many, 4 or 8 warps, and 1 to 3 software-pipeline
stages of its loop (``triton.testing.do_bench`` medians, rotating over 3 input sets). Prints the
eight fastest and the variant with the library's constants but one stage (no pipelining).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sparge.kernels import prepass  # noqa: E402

HEADS = 24


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; B1 H{HEADS} bf16", flush=True)
    for length, dim in ((32768, 128), (32768, 64), (8192, 128)):
        sets = [tuple(torch.randn(1, HEADS, length, dim, device="cuda", dtype=torch.bfloat16)
                      for _ in range(2)) for _ in range(3)]
        state = {"i": 0}

        def timed(fn, sets=sets, state=state):
            def step():
                fn(*sets[state["i"] % len(sets)])
                state["i"] += 1
            return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median") * 1e3

        library = timed(lambda k, v: prepass._channel_stats(k, v))
        print(f"L{length} D{dim}: the library's launch {library:.1f} us", flush=True)
        library_rows = min(prepass._CHUNK_ROWS, prepass._STATS_TILE_ELEMS // dim)
        results = []
        for programs in (1024, 2048):
            chunk, n = prepass._chunking(length, HEADS, dim, programs=programs)
            ksum = torch.empty(1, HEADS, n, dim, device="cuda")
            vmax = torch.empty_like(ksum)
            for rows in (library_rows, 2 * library_rows):
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        def run(k, v, rows=rows, warps=warps, stages=stages, n=n, chunk=chunk,
                                ksum=ksum, vmax=vmax):
                            prepass._channel_stats_kernel[(HEADS, n)](
                                k, *k.stride(), v, *v.stride(), ksum, vmax, ksum, ksum, HEADS,
                                k.shape[2], k.shape[3], chunk, n, ROWS=rows, DP=k.shape[3],
                                V_MAX=True, ZERO_KMAX=False, INDIRECT=False, PDL=False,
                                STAGES=stages, num_warps=warps, enable_fp_fusion=True)
                        results.append((timed(run), programs, n * HEADS, rows, warps, stages))
        results.sort()
        for us, programs, grid, rows, warps, stages in results[:8]:
            print(f"  {us:7.1f} us  programs ~{programs} ({grid})  rows {rows}  warps {warps}  "
                  f"stages {stages}", flush=True)
        unpipelined = [r[0] for r in results
                       if r[1] == 1024 and r[3] == library_rows and r[4] == 4 and r[5] == 1]
        print(f"  the library's constants in one stage: {unpipelined[0]:.1f} us", flush=True)


if __name__ == "__main__":
    main()
