"""The predicted-mask pipeline's launches before the attention kernel, each timed alone (CUDA).

    PYTHONPATH=src python3 bench/prepass_stages.py [--shapes 4096:128,8192:64] [--variants]

For B1 H24 bf16 random inputs, each stage is captured in a CUDA graph of its own (so no host
time enters) and timed with ``triton.testing.do_bench`` (median; L2 flushed before every replay),
rotating over three input sets:

- ``channel stats``: K's channel sums and V's channel abs-maxima (``prepass._channel_stats``);
- ``V + K mean``: V's FP8 job and K's mean finished (the launch before the statistics launch);
- ``Q, K + stats``: the one-warp launch of Q's and K's quantization with the block statistics;
- ``Q, K, V``: one quantization launch of the three jobs without statistics;
- ``V + K mean, then Q, K``: the same work in two launches (V's apart, as the statistics path
  runs it; ``quantized_attn``'s at head dims up to 64);
- ``selection``: pooled products, block selection and lookup table (``select_with_table``);
- ``pre-pass + stats`` and ``pre-pass``: ``prepare_qkv`` with and without the statistics.

Each stage's line gives the bytes it must move to and from memory at the least (inputs read
once, outputs written once; the second reads of a block, meant to hit the cache, not counted)
and the bandwidth that makes. Three plain torch operations with known traffic, timed the same
way, give the card's bandwidth to compare with: a sum over K and V (reads), K cast to int8
(reads 2 bytes, writes 1 per element, as quantization does) and a copy of K.

``--variants`` also times the channel statistics with other chunk sizes, the statistics launch
with other tile shapes, the one quantization launch with fewer rows per combined partial, and
the two launches with other shapes of the second, each against the library's constants in the
same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sparge.kernels import prepass  # noqa: E402
from sparge.kernels.select import select_with_table  # noqa: E402
from sparge.predict import Selection  # noqa: E402

HEADS = 24
SETS = 3
BLOCK_Q, BLOCK_K = 64, 128  # the library's default blocks


def graph_time(make_step) -> float:
    """Median microseconds of one replay of a CUDA graph of ``make_step(i)`` (a callable that
    launches the stage on input set i), rotating over the sets."""
    graphs = []
    for i in range(SETS):
        step = make_step(i)
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graphs.append(graph)
    state = {"i": 0}

    def replay():
        graphs[state["i"] % SETS].replay()
        state["i"] += 1

    return triton.testing.do_bench(replay, warmup=25, rep=200, return_mode="median") * 1e3


def stages(length: int, dim: int) -> dict[str, object]:
    """name -> make_step for every stage at one shape."""
    gen = torch.Generator(device="cuda").manual_seed(length + dim)
    sets = [tuple(torch.randn(1, HEADS, length, dim, device="cuda", dtype=torch.bfloat16,
                              generator=gen) for _ in range(3)) for _ in range(SETS)]
    kw = dict(block_q=BLOCK_Q, block_k=BLOCK_K, quant=True)

    def prepared(i):
        q, k, v = sets[i]
        kmax = torch.zeros(1, HEADS, device="cuda")
        ksum, vmax = prepass._channel_stats(k, v, kmax)
        k_mean = torch.empty(1, HEADS, dim, device="cuda")
        prepass._launch(None, k, v, ksum, vmax, k_mean, jobs="MV", stats=False, **kw)
        q_out, k_out, _ = prepass._launch(q, k, None, None, None, k_mean, jobs="QK", stats=True,
                                          k_scale_max=kmax, **kw)
        return q, k, v, kmax, ksum, vmax, k_mean, q_out.stats, k_out.stats

    inputs = [prepared(i) for i in range(SETS)]

    def channel_stats(i):
        q, k, v, kmax, *_ = inputs[i]
        return lambda: prepass._channel_stats(k, v, kmax)

    def v_and_mean(i):
        q, k, v, kmax, ksum, vmax, k_mean, *_ = inputs[i]
        return lambda: prepass._launch(None, k, v, ksum, vmax, k_mean, jobs="MV", stats=False,
                                       **kw)

    def qk_stats(i):
        q, k, v, kmax, ksum, vmax, k_mean, *_ = inputs[i]
        return lambda: prepass._launch(q, k, None, None, None, k_mean, jobs="QK", stats=True,
                                       k_scale_max=kmax, **kw)

    def qkv(i):
        q, k, v, kmax, ksum, vmax, *_ = inputs[i]
        return lambda: prepass._launch(q, k, v, ksum, vmax, None, jobs="QKV", stats=False,
                                       k_scale_max=kmax, **kw)

    def split(i):
        q, k, v, kmax, ksum, vmax, k_mean, *_ = inputs[i]

        def step():
            prepass._launch(None, k, v, ksum, vmax, k_mean, jobs="MV", stats=False, **kw)
            prepass._launch(q, k, None, None, None, k_mean, jobs="QK", stats=False,
                            k_scale_max=kmax, **kw)
        return step

    def selection(i):
        q_stats, k_stats = inputs[i][7:]
        return lambda: select_with_table(q_stats, k_stats, Selection(), q_len=length,
                                         k_len=length, block_q=BLOCK_Q, block_k=BLOCK_K,
                                         causal=False)

    def whole(stats):
        def make(i):
            q, k, v = sets[i]
            return lambda: prepass.prepare_qkv(q, k, v, block_q=BLOCK_Q, block_k=BLOCK_K,
                                               mode="int8_fp8", with_stats=stats)
        return make

    return {"channel stats": channel_stats, "V + K mean": v_and_mean, "Q, K + stats": qk_stats,
            "Q, K, V": qkv, "V + K mean, then Q, K": split, "selection": selection,
            "pre-pass + stats": whole(True), "pre-pass": whole(False),
            "torch: sum of K and of V": lambda i: lambda: (sets[i][1].sum(), sets[i][2].sum()),
            "torch: K cast to int8": lambda i: lambda: sets[i][1].to(torch.int8),
            "torch: copy of K": lambda i: lambda: sets[i][1].clone()}


def least_bytes(length: int, dim: int) -> dict[str, int]:
    """Bytes a stage must move at the least (B1 H24, bf16 inputs, 8-bit outputs), by name."""
    x = HEADS * length * dim * 2  # one bf16 input
    quantized = x + x // 2  # one input read, its 8-bit values written
    channel = 2 * x  # K and V read
    blocks = HEADS * (length // BLOCK_Q + length // BLOCK_K) * (dim + 2) * 4  # scales, stats
    qk = 2 * quantized + blocks
    qkv = 3 * quantized
    return {"channel stats": channel, "V + K mean": quantized, "Q, K + stats": qk,
            "Q, K, V": qkv, "V + K mean, then Q, K": qkv,
            "pre-pass + stats": channel + quantized + qk, "pre-pass": channel + qkv,
            "torch: sum of K and of V": channel, "torch: K cast to int8": quantized,
            "torch: copy of K": 2 * x}


def variants(length: int, dim: int, make: dict[str, object]) -> None:
    """Other launch constants of the channel statistics and of the statistics launch, each
    timed beside the library's."""
    library = (prepass._CHUNK_ROWS, prepass._STATS_PROGRAMS, prepass._WITH_STATS,
               prepass._ROWS_PER_PARTIAL, prepass._QUANTIZE)
    rows = []
    try:
        for chunk_rows, programs in ((256, 1024), (128, 1024), (128, 2048), (64, 2048)):
            prepass._CHUNK_ROWS, prepass._STATS_PROGRAMS = chunk_rows, programs
            rows.append((f"channel stats, chunks of {chunk_rows}+ rows, ~{programs} programs",
                         graph_time(make["channel stats"])))
        prepass._CHUNK_ROWS, prepass._STATS_PROGRAMS = library[:2]
        for shape in (library[2], prepass._LaunchShape(1024, 1, None),
                      prepass._LaunchShape(4096, 1, None),
                      prepass._LaunchShape(4096, 2, None), prepass._LaunchShape(2048, 2, None),
                      prepass._LaunchShape(8192, 4, None)):
            prepass._WITH_STATS = shape
            rows.append((f"Q, K + stats, {shape.tile_elems} elements, {shape.num_warps} warps",
                         graph_time(make["Q, K + stats"])))
        prepass._WITH_STATS = library[2]
        for rows_per_partial in (8, 4):
            prepass._ROWS_PER_PARTIAL = rows_per_partial
            rows.append((f"Q, K, V, {rows_per_partial} rows a partial",
                         graph_time(make["Q, K, V"])))
        prepass._ROWS_PER_PARTIAL = library[3]
        for shape in (prepass._LaunchShape(2048, 1, None), prepass._LaunchShape(4096, 4, None)):
            prepass._QUANTIZE = shape
            rows.append((f"V + K mean, then Q, K in {shape.tile_elems} elements, "
                         f"{shape.num_warps} warps", graph_time(make["V + K mean, then Q, K"])))
    finally:
        (prepass._CHUNK_ROWS, prepass._STATS_PROGRAMS, prepass._WITH_STATS,
         prepass._ROWS_PER_PARTIAL, prepass._QUANTIZE) = library
    for name, us in rows:
        print(f"  {us:8.1f} us  {name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096:64,4096:128,8192:128,32768:128",
                        help="L:D pairs")
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; B1 H{HEADS} bf16, CUDA graphs, L2 flushed", flush=True)
    for pair in args.shapes.split(","):
        length, dim = (int(x) for x in pair.split(":"))
        make = stages(length, dim)
        moved = least_bytes(length, dim)
        print(f"\nL{length} D{dim}", flush=True)
        for name, step in make.items():
            us = graph_time(step)
            traffic = (f"{moved[name] / 1e6:7.0f} MB {moved[name] / us / 1e6:5.2f} TB/s"
                       if name in moved else " " * 21)
            print(f"  {us:8.1f} us {traffic}  {name}", flush=True)
        if args.variants:
            variants(length, dim, make)


if __name__ == "__main__":
    main()
