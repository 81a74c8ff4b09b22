"""Launch arrangements of the pre-pass without statistics (``quantized_attn``,
``block_sparse_attn``) (CUDA).

    PYTHONPATH=src python3 bench/quantize_launch_sweep.py

Without the block statistics, the channel-statistics launch is followed by one launch of
``_quantize_kernel`` that runs the Q, K and V jobs under ``prepass._QUANTIZE`` (4096-element
tiles, 4 warps, 96 registers: 32 rows of V a tile at D128). For B1 H24 bf16 Q, K and V at L32768
D128, L32768 D64 and L8192 D128 this times the whole pre-pass (both launches, captured in a CUDA
graph, ``do_bench`` median over 3 input sets in turn, three alternating rounds) under:

- the library's arrangement;
- one launch with V in tiles of 64 or 128 rows, under the 96- or a 128-register cap;
- V in a launch of its own (``prepass._V_ALONE``: 128-row tiles) beside a launch of Q and K.

Every variant's quantized Q, K and V are checked bit for bit against the library's first.
Prints each variant's median over the rounds, fastest first.
"""

from __future__ import annotations

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
BLOCK_Q, BLOCK_K = 64, 128


def one_launch(shape: prepass._LaunchShape):
    """The pre-pass with the Q, K and V jobs in one launch of ``shape``."""
    def run(q, k, v):
        k_scale_max = torch.empty(1, HEADS, device="cuda")
        ksum, vmax = prepass._channel_stats(k, v, k_scale_max)
        saved = prepass._QUANTIZE
        prepass._QUANTIZE = shape
        try:
            return prepass._launch(q, k, v, ksum, vmax, None, jobs="QKV", block_q=BLOCK_Q,
                                   block_k=BLOCK_K, quant=True, stats=False,
                                   k_scale_max=k_scale_max)
        finally:
            prepass._QUANTIZE = saved
    return run


def v_apart(q, k, v):
    """The pre-pass with V's job in a launch of its own (``_V_ALONE``), then Q's and K's."""
    k_scale_max = torch.empty(1, HEADS, device="cuda")
    ksum, vmax = prepass._channel_stats(k, v, k_scale_max)
    v_out = prepass._launch(None, k, v, ksum, vmax, None, jobs="V", block_q=BLOCK_Q,
                            block_k=BLOCK_K, quant=True, stats=False)[2]
    q_out, k_out, _ = prepass._launch(q, k, None, ksum, None, None, jobs="QK", block_q=BLOCK_Q,
                                      block_k=BLOCK_K, quant=True, stats=False,
                                      k_scale_max=k_scale_max)
    return q_out, k_out, v_out


def flat(outputs) -> list[torch.Tensor]:
    q_out, k_out, (v_values, v_scales) = outputs
    return [q_out.values, q_out.scales, k_out.values, k_out.scales, v_values.view(torch.uint8),
            v_scales]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; B1 H{HEADS} bf16, block_q {BLOCK_Q}, block_k {BLOCK_K}",
          flush=True)
    library = prepass._QUANTIZE
    variants = {"library (V tile = the tile's rows)": one_launch(library)}
    for cap in (96, 128):
        for rows in (64, 128):
            variants[f"one launch, V {rows} rows, cap {cap}"] = one_launch(
                prepass._LaunchShape(library.tile_elems, library.num_warps, cap, v_rows=rows))
    variants["V apart (128 rows), then Q and K"] = v_apart
    for length, dim in ((32768, 128), (32768, 64), (8192, 128)):
        gen = torch.Generator(device="cuda").manual_seed(length + dim)
        sets = [[torch.randn(1, HEADS, length, dim, device="cuda", dtype=torch.bfloat16,
                             generator=gen) for _ in range(3)] for _ in range(SETS)]
        reference = [t.clone() for t in flat(variants["library (V tile = the tile's rows)"](
            *sets[0]))]
        replays = {}
        for name, fn in variants.items():
            got = flat(fn(*sets[0]))
            same = all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
            if not same:
                raise AssertionError(f"L{length} D{dim}: {name} differs from the library")
            replays[name] = [graphed(lambda s=s, fn=fn: fn(*s)) for s in sets]
        times = {name: [] for name in replays}
        for _ in range(3):
            for name, graphs in replays.items():
                state = {"i": 0}

                def step(graphs=graphs, state=state):
                    graphs[state["i"] % SETS]()
                    state["i"] += 1

                times[name].append(triton.testing.do_bench(step, warmup=10, rep=60,
                                                           return_mode="median"))
        print(f"\nL{length} D{dim}: pre-pass without statistics, median of 3 rounds "
              "(the rounds' range), us; same bits as the library in every variant")
        for name in sorted(times, key=lambda name: statistics.median(times[name])):
            t = times[name]
            print(f"  {name:40s} {1e3 * statistics.median(t):7.1f}  "
                  f"({1e3 * min(t):.1f} to {1e3 * max(t):.1f})", flush=True)


if __name__ == "__main__":
    main()
