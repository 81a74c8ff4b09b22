"""The pre-pass at L32768 as one call and as calls over chunks of the heads.

    PYTHONPATH=src python3 bench/prepass_head_chunks.py

Run per few heads, the channel statistics and the quantization of a chunk would read its K and V
the second time from L2 (two heads' K and V at D128 take 32 MB). Each variant is captured in a
CUDA graph (no host time) and timed by do_bench (median, ms); "chstats" is the channel statistics
launch alone. The result is ``bench/results/prepass-head-chunks-H100-2026-11-27.log``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparge.kernels import prepass  # noqa: E402

HEADS = 24
CHUNKS = (1, 2, 3, 4, 6, 8, 12)


def graphed(fn):
    """fn captured in a CUDA graph (after one eager call that compiles it); returns the replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    for length, dim in ((32768, 128), (32768, 64)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, length, dim, device="cuda", dtype=torch.bfloat16,
                               generator=gen) for _ in range(3))
        for stats in (True, False):
            def chunked(size, stats=stats, q=q, k=k, v=v):
                def run():
                    for h in range(0, HEADS, size):
                        heads = slice(h, h + size)
                        prepass.prepare_qkv(q[:, heads], k[:, heads], v[:, heads], block_q=64,
                                            block_k=128, mode="int8_fp8", with_stats=stats)
                return run

            whole = graphed(chunked(HEADS))
            parts = {size: graphed(chunked(size)) for size in CHUNKS}
            channel_stats = graphed(lambda k=k, v=v: prepass._channel_stats(k, v))
            for round_ in range(3):
                row = [f"whole {median_ms(whole):.3f}"]
                row += [f"h{size} {median_ms(replay):.3f}" for size, replay in parts.items()]
                row.append(f"chstats {median_ms(channel_stats):.3f}")
                print(f"L{length} D{dim} stats={stats} round{round_}: " + "  ".join(row),
                      flush=True)
            del whole, parts, channel_stats
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
