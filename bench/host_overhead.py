"""Where the host time of one public-API call goes, for short sequences where it shows.

    PYTHONPATH=src python3 bench/host_overhead.py [--seq-len 4096] [--breakdown]

Times each entry point (the public calls with number thresholds, with (H,) threshold tensors, with
``return_stats``, and a tuned :class:`sparge.tuning.SparseAttentionMeansim` layer) with CUDA events
(median of do_bench) and with a host clock around calls issued back to back. ``--breakdown`` also
times each step of a call on its own (the pre-pass, the attention launch, the selection, the lookup
table, the torch operations between them) at a length short enough (L256) that the GPU never holds
the host back, ``--split`` divides a ``sparse_attn`` call at L256 into its kernel launches (each
timed through the library's launcher, its cache key alone and the compiled kernel called directly)
and the rest (the call with every launch left out), and ``--profile`` prints cProfile's top
functions by own and by cumulative time for ``sparse_attn``, causal and not.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import triton
import triton.language as tl

import sparge
from sparge.kernels import launcher
from sparge.kernels.attention import block_table, launch
from sparge.kernels.prepass import prepare_qkv
from sparge.kernels.select import select_blocks_gpu
from sparge.mask import SparseMask
from sparge.predict import Selection, per_head, pooled_scores
from sparge.tuning import SparseAttentionMeansim


def host_us(fn, n: int = 200) -> float:
    """Median host time per call in microseconds, over 5 rounds of n calls issued without waiting
    for the GPU."""
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - start) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


@triton.jit
def _fill_kernel(x_ptr, n, value, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, value, mask=offs < n)


def tuned_layer(heads: int, device: torch.device) -> SparseAttentionMeansim:
    """A layer holding per-head parameter tensors as a tuned one does (upstream's initial values,
    without running the search)."""
    layer = SparseAttentionMeansim()
    layer.init_hyperparams(heads, device)
    return layer


def end_to_end(q, k, v, mask) -> dict:
    heads = q.shape[1]
    sim, cdf, pv = (torch.full((heads,), x, device=q.device) for x in (0.6, 0.98, 50.0))
    layer = tuned_layer(heads, q.device)
    return {
        "quantized_attn": lambda: sparge.quantized_attn(q, k, v),
        "block_sparse_attn 90%": lambda: sparge.block_sparse_attn(q, k, v, mask),
        "block_sparse_attn 90% causal": lambda: sparge.block_sparse_attn(q, k, v, mask,
                                                                         is_causal=True),
        "sparse_attn": lambda: sparge.sparse_attn(q, k, v),
        "sparse_attn causal": lambda: sparge.sparse_attn(q, k, v, is_causal=True),
        "sparse_attn (H,) thresholds": lambda: sparge.sparse_attn(
            q, k, v, sim_threshold=sim, cdf_threshold=cdf, pv_threshold=pv),
        "sparse_attn return_stats": lambda: sparge.sparse_attn(q, k, v, return_stats=True),
        "tuned layer": lambda: layer(q, k, v),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }


def steps(q, k, v) -> dict:
    """Each step of a call, on its own (quantized FP8 mode, default block sizes)."""
    heads = q.shape[1]
    quant, q_stats, k_stats = prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8",
                                          with_stats=True)
    selection = Selection(0.6, 0.98)
    mask = select_blocks_gpu(q_stats, k_stats, selection, q_len=q.shape[2], k_len=k.shape[2],
                             block_q=64, block_k=128)
    table = block_table(mask)
    lam = per_head(50.0, heads, q.device)
    out = torch.empty_like(q)

    def attend(tab):
        return lambda: launch(quant.q, quant.k, quant.v, out=out, q_scale=quant.q_scale,
                              k_scale=quant.k_scale, v_scale=quant.v_scale, table=tab, block_q=64,
                              block_k=128, causal=False, scale=q.shape[3] ** -0.5,
                              pv_threshold=lam, mode="int8_fp8")

    small = torch.empty(heads, device=q.device)
    compiled = _fill_kernel[(1,)](small, heads, 1.0, BLOCK=32)
    return {
        "Triton launch, 3 arguments": lambda: _fill_kernel[(1,)](small, heads, 1.0, BLOCK=32),
        "compiled kernel, 3 arguments": lambda: compiled[(1, 1, 1)](small, heads, 1.0, 32),
        "torch.empty (B, H, L, D)": lambda: torch.empty_like(q),
        "torch.full (H,)": lambda: torch.full((heads,), 50.0, device=q.device),
        "per_head(float)": lambda: per_head(50.0, heads, q.device),
        "K scales amax": lambda: quant.k_scale.amax(dim=-1),
        "prepare_qkv, no statistics": lambda: prepare_qkv(q, k, v, block_q=64, block_k=128,
                                                          mode="int8_fp8", with_stats=False),
        "prepare_qkv, statistics": lambda: prepare_qkv(q, k, v, block_q=64, block_k=128,
                                                       mode="int8_fp8", with_stats=True),
        "pooled_scores": lambda: pooled_scores(q_stats, k_stats),
        "select_blocks_gpu": lambda: select_blocks_gpu(
            q_stats, k_stats, selection, q_len=q.shape[2], k_len=k.shape[2], block_q=64,
            block_k=128),
        "SparseMask(causal)": lambda: SparseMask(mask.blocks, 64, 128, q.shape[2], k.shape[2],
                                                 True),
        "block_table": lambda: block_table(mask),
        "attention launch, dense": attend(None),
        "attention launch, table": attend(table),
    }


def launch_times(run, kernel, grid, args, meta) -> tuple[float, float, float]:
    """Host microseconds of one recorded launch: through ``run`` (the library's launcher), its
    cache key alone, and the compiled kernel called directly."""
    handle, constexprs = launcher._CACHE[launcher._key(kernel, args, meta)]
    full = (*grid, 1, 1)[:3]
    return (host_us(lambda: run(kernel, grid, *args, **meta)),
            host_us(lambda: launcher._key(kernel, args, meta)),
            host_us(lambda: handle[full](*args, *constexprs)))


def split_launches(q, k, v, causal: bool) -> None:
    """``sparse_attn``'s host time: each launch on its own, and the call without launches."""
    def call():
        return sparge.sparse_attn(q, k, v, is_causal=causal)

    call()
    print(f"\nsparse_attn{' causal' if causal else ''}, L{q.shape[2]}: {host_us(call):.1f} us "
          "per call")
    seen, run = [], launcher.run

    def recording(kernel, grid, *args, **meta):
        seen.append((kernel, grid, args, meta))
        return run(kernel, grid, *args, **meta)

    launcher.run = recording
    try:
        call()
    finally:
        launcher.run = run
    totals = [0.0, 0.0, 0.0]
    for kernel, grid, args, meta in seen:
        times = launch_times(run, kernel, grid, args, meta)
        totals = [t + u for t, u in zip(totals, times, strict=True)]
        print(f"  {kernel.fn.__name__:24s} {len(args):3d} arguments: launcher {times[0]:6.1f} us, "
              f"its key {times[1]:5.1f}, the compiled kernel called directly {times[2]:6.1f}")
    print(f"  all launches: launcher {totals[0]:.1f} us (keys {totals[1]:.1f}, compiled kernels "
          f"{totals[2]:.1f})")
    launcher.run = lambda *args, **meta: None
    try:
        print(f"  the call with every launch left out: {host_us(call):.1f} us")
    finally:
        launcher.run = run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    def inputs(length: int):
        shape = (1, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        # every block eligible (sim_threshold -1): the top-10 % rule alone, 90 % skipped
        return q, k, v, sparge.predict_mask(q, k, topk=0.1, sim_threshold=-1.0)

    q, k, v, mask = inputs(args.seq_len)
    print(f"B1 H{args.heads} L{args.seq_len} D{args.head_dim} bf16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    for name, fn in end_to_end(q, k, v, mask).items():
        fn()
        gpu_ms = triton.testing.do_bench(fn, return_mode="median")
        print(f"{name:28s} do_bench {gpu_ms * 1e3:8.1f} us   host {host_us(fn):8.1f} us per call")
    if args.breakdown:
        q, k, v, mask = inputs(256)
        print("\nhost time per step, L256 (the GPU keeps up):")
        for name, fn in {**end_to_end(q, k, v, mask), **steps(q, k, v)}.items():
            try:
                fn()
            except Exception as error:  # noqa: BLE001 - report the step and go on
                print(f"{name:28s} failed: {type(error).__name__}: {error}")
                continue
            print(f"{name:28s} host {host_us(fn):8.1f} us")
    if args.split:
        q, k, v, _ = inputs(256)
        for causal in (False, True):
            split_launches(q, k, v, causal)
    if args.profile:
        for name, causal in (("sparse_attn", False), ("sparse_attn causal", True)):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(100):
                sparge.sparse_attn(q, k, v, is_causal=causal)
            profile.disable()
            torch.cuda.synchronize()
            print(f"\ncProfile, 100 calls of {name}, L{q.shape[2]}:")
            stats = pstats.Stats(profile)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
