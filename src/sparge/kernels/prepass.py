"""The fused pre-pass: quantization of Q, K and V and the predictor's block statistics, in two
kernel launches (three with the statistics or at head dims up to 64).

What it computes is specified by :mod:`sparge.predict` (``block_stats``, ``smooth_k``) and
:mod:`sparge.quant` (``quantize_int8_per_block``, ``quantize_v_fp8``):

- Q, per block of ``block_q`` rows: INT8 values, the float32 scale (amax / 127, 1 for an all-zero
  block) and, on request, the pooled mean and the self-similarity.
- K: its per-channel mean over all tokens, then per block of ``block_k`` rows of the smoothed K
  (k - mean): INT8 values, scale, pooled mean and self-similarity.
- V: FP8 e4m3 with one scale per (batch, head, channel) (amax / 448, 1 for an all-zero channel),
  stored K-major (the FP8 dot of Hopper wants the second operand transposed) with its keys in the
  attention kernel's slots (:mod:`sparge.kernels.layout`); or, for PV in FP16, cast to FP16 in
  its natural layout (no job when V is float16 already).

The launches:

1. ``_channel_stats_kernel`` reads K and V once. Each program reduces one chunk of tokens of one
   (batch, head) to a partial row of K channel sums and one of V channel abs-maxima, stored in
   small float32 (B, Hk, n_chunks, D) buffers: a split reduction without atomics, so the same
   inputs give the same bits on every run.
2. ``_quantize_kernel`` runs its jobs in one grid, told apart by program id: K blocks, V tiles
   and Q blocks. A K program first finishes the channel mean from the partials, a V program the
   channel scales, then each quantizes its rows (and computes the statistics of its blocks).
   The K programs also leave each head's largest K scale, which the attention kernel reads
   (an atomic maximum into a buffer the first launch zeroed: the same bits in any order).
   With the statistics, the Q and K jobs run in a launch of one-warp programs, where the
   statistics' reductions need no barrier between warps. Those programs neither run V's job nor
   finish the mean, which would take their registers: a launch before them does both, V's job
   and a fourth job that finishes each head's channel mean into a small (B, Hk, D) buffer.
   Without the statistics, head dims up to 64 take the same two launches (the second of
   four-warp programs), which is faster there than one launch (``_V_APART_DIM``).

The channel mean is summed in another order than torch's ``mean``: within a chunk, each row slot
of a tile adds its tokens in order and the slots are then added up (Triton's reduction tree); the
chunk sums are added by pairwise halving (chunk i plus chunk i + NC / 2, zero rows padding to a
power of two NC); the total is divided by L (IEEE). It therefore matches ``smooth_k``'s mean to
float32 rounding, not bit for bit; :func:`channel_mean` returns exactly the mean the kernels
subtract.

Every step is a fixed-size kernel launch: no host synchronisation, no allocation that depends on
data, so the pre-pass can be captured in a CUDA graph.

Rounding matches the specification exactly (see :mod:`sparge.kernels.rounding`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..backend import capability_of
from ..mask import num_blocks
from ..predict import BlockStats
from ..quant import FP8_DTYPE, PV_FP8, PV_FP16, QuantizedQKV
from . import launcher
from .graphs import K as SLOT_K
from .graphs import Q as SLOT_Q
from .graphs import V as SLOT_V
from .graphs import caller_pointer
from .launcher import cdiv, next_pow2, wait_for_previous_kernel
from .layout import to_pv_order
from .rounding import (
    fp8_scale,
    int8_scale,
    max_keeping_nan,
    reciprocal,
    round_to_e4m3,
    times_reciprocal,
    to_int8,
)

_FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32

# Split reduction of the channel statistics: about _STATS_PROGRAMS programs in all, chunks of a
# multiple of _CHUNK_ROWS tokens, at most _max_chunks(DP) per (batch, head) (a K or V program of
# the quantization kernel combines the partial rows in registers: _PARTIAL_ELEMS floats at most).
_STATS_PROGRAMS = 1024
_PARTIAL_ELEMS = 8192
_CHUNK_ROWS = 256
# Statistics tiles: _STATS_TILE_ELEMS elements of K and of V per step (32 a thread of 4 warps),
# the loads of the next _STATS_STAGES - 1 steps in flight (software-pipelined through shared
# memory where Triton can: from sm80 on, for loads it can vectorize). At L32768 the launch took
# 107 instead of 127 us at D128 and 61 instead of 72 at D64 on an H200, 150 instead of 162 and 83
# instead of 89 on an H100 (L8192 D128: 40 instead of 53, 50 instead of 60); no other tile size,
# warp or program count was more than 3 % faster (bench/channel_stats_sweep.py,
# bench/results/channel-stats-sweep-*-2026-11-26.log).
_STATS_TILE_ELEMS = 4096
_STATS_STAGES = 3
# A K or V program handles at least _ROWS_PER_PARTIAL rows per chunk partial it combines, so that
# reading the float32 partials (from L2) costs at most 1/8 of reading its 16-bit rows.
_ROWS_PER_PARTIAL = 16


@dataclass(frozen=True)
class _LaunchShape:
    """Launch constants of the quantization kernel: elements per tile (at most ``max_rows`` rows
    a tile when given), warps, register cap, and the software-pipelining stages of V's FP8 tile
    loop (1: none)."""

    tile_elems: int
    num_warps: int
    maxnreg: int | None
    max_rows: int | None = None
    v_stages: int = 1

    def tile_rows(self, dim_pad: int) -> int:
        """Rows per tile for rows of ``dim_pad`` elements."""
        rows = self.tile_elems // dim_pad
        return rows if self.max_rows is None else min(rows, self.max_rows)


# Quantization alone (Q, K and V in one launch): tiles of 4096 elements in 4 warps, 96
# registers (5 programs per SM), the fastest of tiles 4096 / 8192 / 16384, 4 / 8 warps and three
# caps on an H100 (B1 H24, L 8192 and 32768, D 64 and 128; bench/NOTES.md).
_QUANTIZE = _LaunchShape(4096, 4, 96)
# V's job in a launch of its own (beside the one-warp statistics launch below): tiles of 128
# rows, so that each channel's FP8 keys of a tile fill a 128-byte line of the K-major output, in
# 4 warps without a cap. H100, L32768 (bench/v_launch_sweep.py,
# bench/results/v-launch-sweep-H100-2026-11-27.log): D128 131 -> 118 us, D64 85 -> 64 us;
# L8192 D128 43 -> 42 us. On Hopper (sm90) the tile loop keeps the next two tiles' loads in
# flight (3 stages: cp.async through shared memory, 80 KB a program at D128)
# (bench/results/v-launch-sweep-stages-*-2026-11-28.log): L32768 D128 90.6 -> 86.5 us on an
# H200, 114.6 -> 114.0 on an H100; D64 48.4 -> 47.2 and 62.0 -> 60.9; L8192 D128 33.0 -> 30.7
# and 39.0 -> 36.7. Elsewhere no stages (not measured, and some of those GPUs have less than
# half of Hopper's shared memory per SM).
_V_ALONE = _LaunchShape(16384, 4, None, max_rows=128, v_stages=3)
# Q and K with their statistics: one warp per program, so that the statistics' reductions across
# rows and across channels stay inside a warp (no barrier); 2048-element tiles. On an H100 at
# L32768 D128 the Q and K jobs took 0.15 and 0.20 ms instead of 0.22 and 0.36 ms in 4-warp
# programs (8192-element tiles, 168 registers), whose cross-warp reductions were most of the cost;
# on an H200 the whole pre-pass at L4096 D128 (B1 H24) took 79 us instead of 107 us in one launch
# of 4-warp programs, and at L1024 39 us instead of 42 us (bench/NOTES.md). V's job is slow in
# one-warp programs, so it takes a launch of its own (_V_ALONE).
_WITH_STATS = _LaunchShape(2048, 1, None)
# Without the statistics, head dims (padded) up to _V_APART_DIM quantize V and finish K's mean in
# the launch of V's job (_V_ALONE, 128-row tiles), and Q and K in a second launch (_QUANTIZE),
# instead of one launch of the three jobs. H200, each launch in a CUDA graph, L2 flushed
# (bench/prepass_stages.py, bench/results/prepass-stages-H200-2026-11-27-b.log): at D64, L4096
# 29.9 instead of 38.8 us and L8192 49.4 instead of 56.8 us; at D128 slower (L4096 52.2 against
# 46.1 us, L8192 91.2 against 80.2 us).
_V_APART_DIM = 64


def _launch_shape(stats: bool, has_qk: bool, capability: tuple[int, int] | None
                  ) -> _LaunchShape:
    """The launch shape of one quantization launch on a GPU of ``capability`` (None: the
    interpreter): of V's job without Q's or K's (K's mean may be finished beside it), else of
    Q's and K's jobs with or without the statistics."""
    if not has_qk:
        hopper = capability is not None and capability[0] == 9
        return _V_ALONE if hopper else replace(_V_ALONE, v_stages=1)
    return _WITH_STATS if stats else _QUANTIZE


@triton.jit
def _channel_stats_kernel(
        k_ptr, skb, skh, skl, skd,  # (B, H, L, D), any strides
        v_ptr, svb, svh, svl, svd,  # (B, H, L, D), any strides (if V_MAX)
        ksum_ptr, vmax_ptr,  # float32 (B, H, n_chunks, D) contiguous partials
        kmax_ptr,  # float32 (B, H): zeroed here for the quantization kernel (if ZERO_KMAX)
        addresses,  # int64: K's and V's addresses in slots K and V (if INDIRECT)
        H, L, D, chunk, n_chunks,
        ROWS: tl.constexpr, DP: tl.constexpr, V_MAX: tl.constexpr, ZERO_KMAX: tl.constexpr,
        STAGES: tl.constexpr, INDIRECT: tl.constexpr, PDL: tl.constexpr):
    """Partials of tokens [c * chunk, (c + 1) * chunk) of the (batch, head) program_id(0),
    c = program_id(1) (the grid's first axis has no limit of 65535):
    K channel sums (each row slot of a (ROWS, DP) tile adds its tokens in order, then the slots
    are added up) and, if V_MAX, V channel abs-maxima. If ZERO_KMAX, program c = 0 also zeroes
    the head's largest K scale, which the K programs of the quantization kernel then raise.
    With INDIRECT, k_ptr and v_ptr only give the types; the addresses come from ``addresses``
    (:mod:`sparge.kernels.graphs`). PDL: see :func:`launcher.dependent_launch`."""
    wait_for_previous_kernel(PDL)
    if INDIRECT:
        k_ptr = caller_pointer(addresses, SLOT_K, k_ptr)
        if V_MAX:
            v_ptr = caller_pointer(addresses, SLOT_V, v_ptr)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    if ZERO_KMAX:
        if c == 0:
            tl.store(kmax_ptr + bh, 0.0)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, DP)
    cmask = cols < D
    cols64 = cols.to(tl.int64)[None, :]
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh + cols64 * skd
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh + cols64 * svd
    ksum = tl.zeros((ROWS, DP), tl.float32)
    vmax = tl.zeros((ROWS, DP), tl.float32)
    start = c * chunk
    end = tl.minimum(start + chunk, L)
    for r0 in tl.range(start, end, ROWS, num_stages=STAGES):
        rows = (r0 + tl.arange(0, ROWS)).to(tl.int64)[:, None]
        m = (rows < end) & cmask[None, :]
        ksum += tl.load(k_base + rows * skl, mask=m, other=0.0).to(tl.float32)
        if V_MAX:
            x = tl.load(v_base + rows * svl, mask=m, other=0.0).to(tl.float32)
            vmax = tl.maximum(vmax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    out = (bh.to(tl.int64) * n_chunks + c) * D + cols
    tl.store(ksum_ptr + out, tl.sum(ksum, axis=0), mask=cmask)
    if V_MAX:
        tl.store(vmax_ptr + out, max_keeping_nan(vmax, 0), mask=cmask)


@triton.jit
def _combine_partials(part_ptr, n_chunks, D, LOG_NC: tl.constexpr, DP: tl.constexpr,
                      MAX: tl.constexpr):
    """The n_chunks (<= NC = 2^LOG_NC) float32 partial rows of D channels at part_ptr
    combined: their maximum when MAX, else their sum by pairwise halving of the rows padded with
    zeros to NC (row i plus row i + NC / 2, and so on), an order :func:`channel_mean` repeats.
    float32 (DP,), zero past D."""
    NC: tl.constexpr = 1 << LOG_NC
    rows = tl.arange(0, NC)[:, None]
    cols = tl.arange(0, DP)[None, :]
    x = tl.load(part_ptr + rows * D + cols, mask=(rows < n_chunks) & (cols < D), other=0.0)
    if MAX:
        return max_keeping_nan(x, 0)
    for step in tl.static_range(1, LOG_NC + 1):
        x = tl.sum(tl.reshape(x, (2, NC >> step, DP)), axis=0)  # one addition per element
    return tl.reshape(x, (DP,))


@triton.jit
def _channel_mean(part_ptr, n_chunks, L, D, LOG_NC: tl.constexpr, DP: tl.constexpr):
    """The channel mean of one (batch, head) from its n_chunks partial sums at part_ptr:
    float32 (DP,), zero past D."""
    total = _combine_partials(part_ptr, n_chunks, D, LOG_NC, DP, False)
    return tl.math.div_rn(total, L.to(tl.float32))


@triton.jit
def _abs_max(x):
    """The largest magnitude of the 2-D tile x, NaN if it holds a NaN (an infinity gives inf)."""
    return max_keeping_nan(max_keeping_nan(tl.abs(x), 1), 0)


@triton.jit
def _load_part(x_base, sxl, mu, row0, L, D, R: tl.constexpr, DP: tl.constexpr,
               SMOOTH: tl.constexpr, MU_IN_MEMORY: tl.constexpr, EVICT: tl.constexpr):
    """Rows [row0, row0 + R) of x: float32 (R, DP), less the channel mean mu when SMOOTH, zero
    outside x; with their row indices (R, 1) and the mask. mu is float32 (DP,), or with
    MU_IN_MEMORY a pointer to its D floats, loaded again for every part (from cache). EVICT is
    the load's cache eviction policy ("evict_last" for rows read again soon, "evict_first"
    for rows read for the last time)."""
    cols = tl.arange(0, DP)
    rows = (row0 + tl.arange(0, R)).to(tl.int64)[:, None]
    m = (rows < L) & (cols < D)[None, :]
    x = tl.load(x_base + rows * sxl, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if SMOOTH:
        if MU_IN_MEMORY:
            mu = tl.load(mu + cols, mask=cols < D, other=0.0)
        # x - mu in the rows of x (one FMA: x + (-mu) * 1 is x - mu rounded once), zeros past L
        # (0 + (-mu) * 0); mu is zero past D
        x = tl.fma(-mu[None, :], (rows < L).to(tl.float32), x)
    return x, rows, m


@triton.jit
def _finish_part(x, rows, m, scale, inv_scale, xq_base, D, QUANT: tl.constexpr,
                 STATS: tl.constexpr):
    """Store the INT8 values of rows x (R, DP) of a block with the block's scale (if QUANT;
    inv_scale = reciprocal(scale)); return the sum of their directions x / |x|, float32 (DP,) (if
    STATS)."""
    unit_sum = tl.zeros((x.shape[1],), tl.float32)
    if STATS:
        # One IEEE reciprocal per row instead of a division per element: x * (1 / |x|) lies
        # within two ulps of the IEEE quotient, float32 rounding as the statistics' tolerance
        # assumes.
        norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        inv = tl.where(norm > 0, tl.math.div_rn(1.0, tl.maximum(norm, _FLT_MIN)), 0.0)
        unit_sum = tl.sum(x * inv[:, None], axis=0)
    if QUANT:
        tl.store(xq_base + rows * D + tl.arange(0, x.shape[1])[None, :],
                 to_int8(x, scale, inv_scale), mask=m)
    return unit_sum


@triton.jit
def _block_job(
        x_ptr, sxb, sxh, sxl, sxd,  # input (B, H, L, D), any strides
        xq_ptr, scale_ptr,  # int8 (B, H, L, D) contiguous, float32 (B, H, n) (if QUANT)
        mean_ptr, sim_ptr,  # float32 (B, H, n, D), (B, H, n) (if STATS)
        part_ptr, n_chunks,  # float32 (B, H, n_chunks, D) channel sums (if SMOOTH)
        mu_ptr,  # float32 (B, H, D): the channel mean (if SMOOTH)
        scale_max_ptr,  # float32 (B, H), zeroed before: the largest scale (if SCALE_MAX)
        job, H, L, D, per_head, blocks,
        BLOCK: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, LOG_NC: tl.constexpr,
        SMOOTH: tl.constexpr, MEAN_GIVEN: tl.constexpr, QUANT: tl.constexpr,
        STATS: tl.constexpr, SCALE_MAX: tl.constexpr):
    """Program ``job`` of a Q or K job: ``blocks`` consecutive blocks of BLOCK rows of one
    (batch, head) (``per_head`` programs each), less the channel mean when SMOOTH: the mean an
    earlier launch left at mu_ptr when MEAN_GIVEN, else the one the program finishes from the
    partial sums. With SCALE_MAX it raises the head's largest scale to its own blocks' largest
    (an atomic maximum: the same result in any order).

    A given mean is loaded again for every part rather than kept in registers through the
    block's loops: in the one-warp programs of the statistics launch, which take it given, a
    mean kept in registers took about 90 of them (254 registers against 168 at D128, sm_90),
    which left an SM 8 such programs instead of 12. Finishing the mean from a 64 x 128 tile of
    partials would take all of a one-warp program's registers too.

    A tile holds R rows. A block of more rows (S = BLOCK / R parts) is read twice, part by part:
    once for its amax and column sums, once (from cache) to quantize it and sum its row
    directions, so that registers hold one part at a time. The first reads ask the cache to keep
    the rows, the second reads them in reverse order, the part read last first.
    """
    S: tl.constexpr = BLOCK // R
    bh = job // per_head
    b = bh // H
    h = bh % H
    bh = bh.to(tl.int64)
    n_blocks = (L + BLOCK - 1) // BLOCK
    cols = tl.arange(0, DP)
    x_base = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + cols.to(tl.int64)[None, :] * sxd
    xq_base = xq_ptr + bh * L * D
    mu = mu_ptr + bh * D
    if SMOOTH and not MEAN_GIVEN:
        mu = _channel_mean(part_ptr + bh * n_chunks * D, n_chunks, L, D, LOG_NC, DP)
    first = (job % per_head) * blocks
    largest = 0.0
    for blk in range(first, tl.minimum(first + blocks, n_blocks)):
        row0 = blk * BLOCK
        if S == 1:
            x, rows, m = _load_part(x_base, sxl, mu, row0, L, D, R, DP, SMOOTH, MEAN_GIVEN,
                                    "evict_first")
            amax = _abs_max(x)
            col_sum = tl.sum(x, axis=0)
            scale = int8_scale(amax)
            unit_sum = _finish_part(x, rows, m, scale, reciprocal(scale), xq_base, D, QUANT,
                                    STATS)
        else:
            amax = 0.0
            col_sum = tl.zeros((DP,), tl.float32)
            for part in range(S):  # not unrolled: one part in registers at a time
                x, rows, m = _load_part(x_base, sxl, mu, row0 + part * R, L, D, R, DP, SMOOTH,
                                        MEAN_GIVEN, "evict_last")
                amax = tl.maximum(amax, _abs_max(x), propagate_nan=tl.PropagateNan.ALL)
                col_sum += tl.sum(x, axis=0)
            scale = int8_scale(amax)
            inv_scale = reciprocal(scale)
            unit_sum = tl.zeros((DP,), tl.float32)
            for part in range(S - 1, -1, -1):  # the parts read last first: likelier in cache
                x, rows, m = _load_part(x_base, sxl, mu, row0 + part * R, L, D, R, DP, SMOOTH,
                                        MEAN_GIVEN, "evict_first")
                unit_sum += _finish_part(x, rows, m, scale, inv_scale, xq_base, D, QUANT, STATS)
        stat_row = bh * n_blocks + blk
        if STATS:
            # one IEEE reciprocal per block, not a division per channel: exact for full blocks
            # (a power of two rows), within an ulp and a half of the quotient for the last
            inv_count = tl.math.div_rn(1.0, tl.minimum(L - row0, BLOCK).to(tl.float32))
            u = unit_sum * inv_count
            sim = tl.minimum(tl.maximum(tl.sum(u * u, axis=0), 0.0), 1.0)
            tl.store(mean_ptr + stat_row * D + cols, col_sum * inv_count, mask=cols < D)
            tl.store(sim_ptr + stat_row, sim)
        if QUANT:
            tl.store(scale_ptr + stat_row, scale)
        if SCALE_MAX:
            largest = tl.maximum(largest, scale, propagate_nan=tl.PropagateNan.ALL)
    if SCALE_MAX:
        tl.atomic_max(scale_max_ptr + bh, largest)


@triton.jit
def _v_job(
        v_ptr, svb, svh, svl, svd,  # input (B, H, L, D), any strides
        out_ptr, scale_ptr,  # float8_e4m3fn (B, H, D, LP) K-major, float32 (B, H, D) (if FP8)
        part_ptr, n_chunks,  # float32 (B, H, n_chunks, D) channel abs-maxima (if FP8)
        job, H, L, LP, D, per_head, tiles,
        VT: tl.constexpr, DP: tl.constexpr, LOG_NC: tl.constexpr, FP8: tl.constexpr,
        ROUND_FP8: tl.constexpr, STAGES: tl.constexpr):
    """Program ``job`` of the V job: ``tiles`` consecutive tiles of VT rows of one (batch, head).

    FP8: the channel scales, then the tiles in FP8, K-major, each row in its slot (see
    :mod:`sparge.kernels.layout`); rows in [L, LP) are zeros. Else the tiles cast to float16
    into a contiguous (B, H, L, D) ``out_ptr`` (the tiles cover [0, L)).

    The FP8 conversion is the GPU's own (round to nearest even, as PyTorch's), unless ROUND_FP8
    (the interpreter, whose conversion rounds some values wrongly): the values are then rounded
    to the e4m3 grid in float32 first, which makes the conversion exact. The tile is converted
    before it is transposed, so that the transposition moves bytes rather than floats. The FP8
    tile loop is software-pipelined in STAGES stages (1: not at all)."""
    bh = job // per_head
    b = bh // H
    h = bh % H
    bh = bh.to(tl.int64)
    cols = tl.arange(0, DP)
    cmask = cols < D
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh + cols.to(tl.int64)[None, :] * svd
    first = (job % per_head) * tiles
    if not FP8:
        out_base = out_ptr + bh * L * D + cols[None, :]
        for t in range(first, tl.minimum(first + tiles, (L + VT - 1) // VT)):
            rows = (t * VT + tl.arange(0, VT)).to(tl.int64)[:, None]
            m = (rows < L) & cmask[None, :]
            x = tl.load(v_base + rows * svl, mask=m, other=0.0)
            tl.store(out_base + rows * D, x.to(tl.float16), mask=m)
    else:
        amax = _combine_partials(part_ptr + bh * n_chunks * D, n_chunks, D, LOG_NC, DP, True)
        scale = fp8_scale(amax)
        inv_scale = reciprocal(scale)
        in_range = tl.min(inv_scale, 0) > 0  # no channel needs the IEEE division
        # the first program of the (batch, head) stores the scales (the condition folded into the
        # bound: the interpreter cannot AND a scalar into a mask)
        tl.store(scale_ptr + bh * D + cols, scale, mask=cols < tl.where(first == 0, D, 0))
        out_base = out_ptr + bh * D * LP + (cols.to(tl.int64) * LP)[:, None]
        for t in tl.range(first, tl.minimum(first + tiles, (LP + VT - 1) // VT),
                          num_stages=STAGES):
            rows = t * VT + tl.arange(0, VT)
            x = tl.load(v_base + rows.to(tl.int64)[:, None] * svl,
                        mask=(rows < L)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            y = times_reciprocal(x, scale[None, :], inv_scale[None, :], in_range)
            if ROUND_FP8:
                y = round_to_e4m3(y)
            # K-major, the keys reordered into their slots in registers (tiles start at multiples of
            # 16): the tile's slots are its rows' positions, so that the stores stay contiguous
            tl.store(out_base + rows[None, :], to_pv_order(tl.trans(y.to(tl.float8e4nv))),
                     mask=(rows < LP)[None, :] & cmask[:, None])


@triton.jit
def _quantize_kernel(
        q_ptr, sqb, sqh, sql, sqd, q8_ptr, q_scale_ptr, q_mean_ptr, q_sim_ptr,
        k_ptr, skb, skh, skl, skd, k8_ptr, k_scale_ptr, k_mean_ptr, k_sim_ptr, ksum_ptr,
        k_scale_max_ptr, kmu_ptr,
        v_ptr, svb, svh, svl, svd, v8_ptr, v_scale_ptr, vmax_ptr,
        addresses,  # int64: Q's, K's and V's addresses in slots Q, K and V (if INDIRECT)
        n_chunks, HQ, HK, LQ, LK, LP, D,
        m_jobs, k_jobs, v_jobs,  # programs [0, m_jobs) finish K's mean, then K, V, the rest Q
        q_per_head, k_per_head, v_per_head, q_blocks, k_blocks, v_tiles,
        BQ: tl.constexpr, BK: tl.constexpr, RQ: tl.constexpr, RK: tl.constexpr,
        VT: tl.constexpr, DP: tl.constexpr, V_STAGES: tl.constexpr,
        LOG_NC: tl.constexpr, QUANT: tl.constexpr, STATS: tl.constexpr,
        K_SCALE_MAX: tl.constexpr, K_MEAN_GIVEN: tl.constexpr, V_FP8: tl.constexpr,
        ROUND_FP8: tl.constexpr, HAS_M: tl.constexpr, HAS_Q: tl.constexpr, HAS_K: tl.constexpr,
        HAS_V: tl.constexpr, INDIRECT: tl.constexpr, PDL: tl.constexpr):
    """One grid, four jobs (see :func:`_block_job`, :func:`_v_job`): K's channel mean finished
    for a later launch (one program per (batch, head), into ``kmu_ptr`` (B, HK, D)), K blocks,
    V tiles, then Q blocks (the shortest programs, to fill the tail). A job left out (HAS_*
    false, no programs) is not compiled; its pointers are placeholders. With INDIRECT, q_ptr,
    k_ptr and v_ptr only give the types; the addresses come from ``addresses``. PDL: see
    :func:`launcher.dependent_launch`."""
    wait_for_previous_kernel(PDL)
    if INDIRECT:
        if HAS_Q:
            q_ptr = caller_pointer(addresses, SLOT_Q, q_ptr)
        if HAS_K:
            k_ptr = caller_pointer(addresses, SLOT_K, k_ptr)
        if HAS_V:
            v_ptr = caller_pointer(addresses, SLOT_V, v_ptr)
    pid = tl.program_id(0)
    if pid < m_jobs:
        if HAS_M:
            cols = tl.arange(0, DP)
            mean = _channel_mean(ksum_ptr + pid.to(tl.int64) * n_chunks * D, n_chunks, LK, D,
                                 LOG_NC, DP)
            tl.store(kmu_ptr + pid.to(tl.int64) * D + cols, mean, mask=cols < D)
    elif pid < m_jobs + k_jobs:
        if HAS_K:
            _block_job(k_ptr, skb, skh, skl, skd, k8_ptr, k_scale_ptr, k_mean_ptr, k_sim_ptr,
                       ksum_ptr, n_chunks, kmu_ptr, k_scale_max_ptr, pid - m_jobs, HK, LK, D,
                       k_per_head, k_blocks, BK, RK, DP, LOG_NC, True, K_MEAN_GIVEN, QUANT,
                       STATS, K_SCALE_MAX)
    elif pid < m_jobs + k_jobs + v_jobs:
        if HAS_V:
            _v_job(v_ptr, svb, svh, svl, svd, v8_ptr, v_scale_ptr, vmax_ptr, n_chunks,
                   pid - m_jobs - k_jobs, HK, LK, LP, D, v_per_head, v_tiles, VT, DP, LOG_NC,
                   V_FP8, ROUND_FP8, V_STAGES)
    elif HAS_Q:
        _block_job(q_ptr, sqb, sqh, sql, sqd, q8_ptr, q_scale_ptr, q_mean_ptr, q_sim_ptr,
                   q_ptr, n_chunks, q_ptr, q_ptr, pid - m_jobs - k_jobs - v_jobs, HQ, LQ, D,
                   q_per_head, q_blocks, BQ, RQ, DP, LOG_NC, False, False, QUANT, STATS, False)


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison the buffers to prove full coverage)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _dim_pad(dim: int) -> int:
    return max(16, next_pow2(dim))


def _max_chunks(dim_pad: int) -> int:
    """The most chunks per sequence (a power of two) of the channel statistics."""
    return min(64, _PARTIAL_ELEMS // dim_pad)


def _chunking(length: int, heads: int, dim_pad: int,
              programs: int | None = None) -> tuple[int, int]:
    """``(chunk, n_chunks)``: tokens per chunk and chunks per sequence of the channel statistics'
    split reduction over ``heads`` (B * H) sequences of ``length`` tokens, in about ``programs``
    programs (``_STATS_PROGRAMS`` unless given)."""
    if programs is None:
        programs = _STATS_PROGRAMS
    n = min(_max_chunks(dim_pad), cdiv(programs, heads),
            cdiv(length, _CHUNK_ROWS))
    chunk = _CHUNK_ROWS * cdiv(cdiv(length, n), _CHUNK_ROWS)
    return chunk, cdiv(length, chunk)


def _channel_stats(k: torch.Tensor, v: torch.Tensor | None,
                   k_scale_max: torch.Tensor | None = None,
                   addresses: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk partials of k, v (B, H, L, D), any strides: K channel sums and (if v is given) V
    channel abs-maxima, float32 (B, H, n_chunks, D) each; zeroes ``k_scale_max`` (B, H) if
    given. One launch; with ``addresses`` (:mod:`sparge.kernels.graphs`) it reads k and v at
    the addresses found there, k and v giving only their shapes, strides and dtypes."""
    batch, heads, length, dim = k.shape
    dp = _dim_pad(dim)
    chunk, n = _chunking(length, batch * heads, dp)
    ksum = _alloc(batch, heads, n, dim, dtype=torch.float32, device=k.device)
    vmax = None if v is None else _alloc(batch, heads, n, dim, dtype=torch.float32,
                                         device=k.device)
    vv = k if v is None else v
    launcher.run(
        _channel_stats_kernel, (batch * heads, n),
        k, *k.stride(), vv, *vv.stride(), ksum, ksum if vmax is None else vmax,
        ksum if k_scale_max is None else k_scale_max, ksum if addresses is None else addresses,
        heads, length, dim, chunk, n,
        ROWS=min(_CHUNK_ROWS, _STATS_TILE_ELEMS // dp), DP=dp, V_MAX=v is not None,
        ZERO_KMAX=k_scale_max is not None, STAGES=_STATS_STAGES,
        INDIRECT=addresses is not None, **launcher.dependent_launch(k.device), num_warps=4,
        enable_fp_fusion=True)  # as measured; Triton 3.10 stops contracting by default
    return ksum, vmax


@dataclass(frozen=True)
class _Blocks:
    """A Q or K job's outputs: int8 values and float32 scales (if quantized), statistics."""

    values: torch.Tensor | None
    scales: torch.Tensor | None
    stats: BlockStats | None


def _block_outputs(x: torch.Tensor, block: int, quant: bool, stats: bool) -> _Blocks:
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    kw = dict(dtype=torch.float32, device=x.device)
    return _Blocks(
        _alloc(batch, heads, length, dim, dtype=torch.int8, device=x.device) if quant else None,
        _alloc(batch, heads, n, **kw) if quant else None,
        BlockStats(_alloc(batch, heads, n, dim, **kw), _alloc(batch, heads, n, **kw))
        if stats else None)


def _constants(shape: _LaunchShape, dim: int, block_q: int, block_k: int, *, quant: bool,
               stats: bool, k_scale_max: bool, k_mean_given: bool, v_fp8: bool, round_fp8: bool,
               has_m: bool, has_q: bool, has_k: bool, has_v: bool,
               indirect: bool = False) -> dict:
    """The compile-time constants of one ``_quantize_kernel`` launch of this shape
    (``round_fp8``: FP8 values rounded in float32 before the conversion, for the interpreter)."""
    dp = _dim_pad(dim)
    tile_rows = shape.tile_rows(dp)
    return dict(BQ=block_q, BK=block_k, RQ=min(block_q, tile_rows), RK=min(block_k, tile_rows),
                VT=tile_rows, DP=dp, V_STAGES=shape.v_stages,
                LOG_NC=_max_chunks(dp).bit_length() - 1, QUANT=quant,
                STATS=stats, K_SCALE_MAX=k_scale_max, K_MEAN_GIVEN=k_mean_given, V_FP8=v_fp8,
                ROUND_FP8=round_fp8, HAS_M=has_m, HAS_Q=has_q, HAS_K=has_k, HAS_V=has_v,
                INDIRECT=indirect)


def _quantize(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None,
              ksum: torch.Tensor | None, vmax: torch.Tensor | None, *, block_q: int,
              block_k: int, quant: bool, stats: bool, k_scale_max: torch.Tensor | None = None,
              v_fp8: bool = True, addresses: torch.Tensor | None = None
              ) -> tuple[_Blocks | None, _Blocks | None,
                         tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Quantization (and statistics) of the tensors given, in one launch of
    ``_quantize_kernel``, or in two where Q's and K's statistics run in one-warp programs, or
    where V's job runs apart at small head dims (``_V_APART_DIM``).

    q (B, Hq, Lq, D); k (B, Hk, Lk, D) with its partial channel sums ``ksum``; v (B, Hk, Lk, D)
    with its partial abs-maxima ``vmax`` (see :func:`_channel_stats`), or, unless ``v_fp8``,
    without them for the cast to float16. Returns the Q and K outputs and, for V,
    ``(values, scales)`` as :func:`prepare_qkv` documents them (scales None for float16). When K
    is quantized, ``k_scale_max`` (B, Hk), zeroed by :func:`_channel_stats`, receives each head's
    largest K scale.

    With the statistics, Q and K run in one-warp programs (see ``_WITH_STATS``). Those programs
    neither run V's job (slow there) nor combine K's partial sums (a 64 x 128 tile of partials
    takes a one-warp program's registers): the launch before them finishes K's channel mean, with
    V's job if V is given. Without the statistics, head dims up to ``_V_APART_DIM`` take the
    same two launches, the second of ``_QUANTIZE`` programs. With ``addresses``, q, k and v are
    read at the addresses found there (see :func:`_channel_stats`).
    """
    args = dict(block_q=block_q, block_k=block_k, quant=quant, v_fp8=v_fp8, addresses=addresses)
    has_qk = q is not None or k is not None
    one_warp = stats and has_qk
    v_apart = (has_qk and v is not None
               and _dim_pad((q if q is not None else k).shape[3]) <= _V_APART_DIM)
    mean_first = k is not None and ksum is not None
    if (one_warp and (v is not None or mean_first)) or v_apart:
        k_mean = None
        if mean_first:
            k_mean = _alloc(k.shape[0], k.shape[1], k.shape[3], dtype=torch.float32,
                            device=k.device)
        v_out = _launch(None, k, v, ksum, vmax, k_mean, jobs="MV" if mean_first else "V",
                        stats=False, **args)[2]
        q_out, k_out, _ = _launch(q, k, None, None, None, k_mean, jobs="QK", stats=stats,
                                  k_scale_max=k_scale_max, **args)
        return q_out, k_out, v_out
    return _launch(q, k, v, ksum, vmax, None, jobs="QKV", stats=stats, k_scale_max=k_scale_max,
                   **args)


def _launch(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None,
            ksum: torch.Tensor | None, vmax: torch.Tensor | None,
            k_mean: torch.Tensor | None, *, jobs: str, block_q: int, block_k: int, quant: bool,
            stats: bool, k_scale_max: torch.Tensor | None = None, v_fp8: bool = True,
            addresses: torch.Tensor | None = None
            ) -> tuple[_Blocks | None, _Blocks | None,
                       tuple[torch.Tensor, torch.Tensor | None] | None]:
    """One launch of ``_quantize_kernel``: of the ``jobs`` (letters of "MQKV") whose tensors are
    given, as :func:`_quantize` describes them. "M" (which needs ``ksum`` and ``k_mean``)
    finishes K's channel mean from ``ksum`` into ``k_mean`` (B, Hk, D) (k gives the shapes); the
    K job takes the mean from ``k_mean`` when ``ksum`` is None, else finishes it itself, in
    registers."""
    run_m = "M" in jobs
    q = q if "Q" in jobs else None
    v = v if "V" in jobs else None
    kv = k if k is not None else v
    run_k = "K" in jobs and k is not None
    given = next(t for t in (q, kv) if t is not None)
    batch, dim, dev = given.shape[0], given.shape[3], given.device
    dp = _dim_pad(dim)
    shape = _launch_shape(stats, q is not None or run_k,
                          capability_of(dev) if dev.type == "cuda" else None)
    tile_rows = shape.tile_rows(dp)
    partials = ksum if ksum is not None else vmax
    n_chunks = 1 if partials is None else partials.shape[2]
    # rows per program: a tile at least, and for K and V enough to amortise combining the partials
    amortised = max(tile_rows, _ROWS_PER_PARTIAL * n_chunks)
    q_blocks = cdiv(tile_rows, block_q)
    k_blocks = cdiv(amortised, block_k)
    v_tiles = cdiv(amortised, tile_rows)

    q_out = q_per_head = None
    if q is not None:
        q_out = _block_outputs(q, block_q, quant, stats)
        q_per_head = cdiv(num_blocks(q.shape[2], block_q), q_blocks)
    k_out = k_per_head = None
    if run_k:
        k_out = _block_outputs(k, block_k, quant, stats)
        k_per_head = cdiv(num_blocks(k.shape[2], block_k), k_blocks)
    heads_k, k_len = (1, 1) if kv is None else kv.shape[1:3]
    padded = num_blocks(k_len, block_k) * block_k
    v_out = v_per_head = None
    if v is not None and v_fp8:
        v_out = (_alloc(batch, heads_k, dim, padded, dtype=FP8_DTYPE, device=dev),
                 _alloc(batch, heads_k, dim, dtype=torch.float32, device=dev))
        v_per_head = cdiv(cdiv(padded, tile_rows), v_tiles)
    elif v is not None:
        v_out = (_alloc(batch, heads_k, k_len, dim, dtype=torch.float16, device=dev), None)
        v_per_head = cdiv(cdiv(k_len, tile_rows), v_tiles)

    placeholder = (given, 0, 0, 0, 0)  # a pointer and strides for a job left out

    def block_args(x: torch.Tensor | None, out: _Blocks | None) -> tuple:
        if out is None:
            return (*placeholder, given, given, given, given)
        quant_ptrs = (out.values, out.scales) if quant else (given, given)
        stats_ptrs = (out.stats.mean, out.stats.similarity) if stats else (given, given)
        return (x, *x.stride(), *quant_ptrs, *stats_ptrs)

    v_args = ((*placeholder, given, given, given) if v is None
              else (v, *v.stride(), v_out[0], given if v_out[1] is None else v_out[1],
                    given if vmax is None else vmax))
    m_jobs = batch * heads_k if run_m else 0
    k_jobs = batch * heads_k * k_per_head if run_k else 0
    v_jobs = 0 if v is None else batch * heads_k * v_per_head
    q_jobs = 0 if q is None else batch * q.shape[1] * q_per_head
    heads_q, q_len = (1, 1) if q is None else q.shape[1:3]
    launcher.run(
        _quantize_kernel, (m_jobs + k_jobs + v_jobs + q_jobs,),
        *block_args(q, q_out), *block_args(k, k_out), given if ksum is None else ksum,
        given if k_scale_max is None else k_scale_max, given if k_mean is None else k_mean,
        *v_args, given if addresses is None else addresses,
        n_chunks, heads_q, heads_k, q_len, k_len, padded, dim, m_jobs, k_jobs, v_jobs,
        q_per_head or 1, k_per_head or 1, v_per_head or 1, q_blocks, k_blocks, v_tiles,
        **_constants(shape, dim, block_q, block_k, quant=quant, stats=stats,
                     k_scale_max=quant and k_scale_max is not None,
                     k_mean_given=ksum is None, v_fp8=v_fp8, round_fp8=dev.type != "cuda",
                     has_m=run_m, has_q=q is not None,
                     has_k=run_k, has_v=v is not None, indirect=addresses is not None),
        **launcher.dependent_launch(dev), num_warps=shape.num_warps,
        enable_fp_fusion=True,  # as measured; Triton 3.10 stops contracting by default
        **({} if shape.maxnreg is None else {"maxnreg": shape.maxnreg}))
    return q_out, k_out, v_out


def channel_mean(k: torch.Tensor) -> torch.Tensor:
    """float32 (B, H, D): the mean of k (B, H, L, D) over its tokens, bit for bit the one
    :func:`prepare_qkv` subtracts (the statistics kernel's chunk sums, added by pairwise halving
    as the quantization kernel adds them, divided by L); it matches ``k.float().mean(2)`` to
    float32 rounding."""
    partials, _ = _channel_stats(k, None)
    pad = _max_chunks(_dim_pad(k.shape[3])) - partials.shape[2]
    total = torch.nn.functional.pad(partials, (0, 0, 0, pad))
    while total.shape[2] > 1:
        half = total.shape[2] // 2
        total = total[:, :, :half] + total[:, :, half:]
    # a tensor divisor: IEEE division on every device (CUDA divides by a Python scalar through
    # its reciprocal)
    total = total[:, :, 0]
    return total / torch.full_like(total, k.shape[2])


def block_stats_gpu(x: torch.Tensor, block: int, *, smooth: bool = False) -> BlockStats:
    """Pooled mean and self-similarity per block, as :func:`sparge.predict.block_stats` computes
    them (of ``smooth_k(x)`` when ``smooth``), without quantizing. One launch, three if ``smooth``
    (K's channel sums, its mean, then the statistics)."""
    if smooth:
        ksum, _ = _channel_stats(x, None)
        return _quantize(None, x, None, ksum, None, block_q=block, block_k=block, quant=False,
                         stats=True)[1].stats
    return _quantize(x, None, None, None, None, block_q=block, block_k=block, quant=False,
                     stats=True)[0].stats


def prepare_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_q: int, block_k: int,
                mode: str, with_stats: bool, addresses: torch.Tensor | None = None
                ) -> tuple[QuantizedQKV, BlockStats | None, BlockStats | None]:
    """Quantize Q, smoothed K and V for the attention kernel, with the predictor's statistics.

    Two kernel launches, three with the statistics or at head dims up to 64 (see the module
    docstring).

    Args:
        q: (B, Hq, Lq, D); k, v: (B, Hk, Lk, D); layout HND, any strides, float16, bfloat16 or
            float32, any lengths >= 1, D <= 256.
        block_q, block_k: rows per quantization (and statistics) block, powers of two.
        mode: ``"int8_fp8"`` (V in FP8 e4m3, K-major) or ``"int8_fp16"`` (V in FP16).
        with_stats: also return the block statistics of Q and of the smoothed K.
        addresses: int64 device buffer holding the addresses of q, k and v in the slots of
            :mod:`sparge.kernels.graphs`, where the kernels then read them (q, k and v give only
            their shapes, strides and dtypes); not with a float16 V in ``int8_fp16`` mode, which
            is returned as it is.

    Returns:
        ``(quantized, q_stats, k_stats)``. ``quantized.q``/``.k`` are contiguous int8 (B, H, L, D)
        and the scales raw float32 amax / 127 (the softmax scale is not folded in). With
        ``int8_fp8``, ``quantized.v`` is the attention kernel's contiguous (B, Hk, D, LP)
        float8_e4m3fn buffer: K-major, LP a multiple of ``block_k``, key n in slot
        ``pv_slot(n)`` and keys past Lk zeros (:func:`sparge.kernels.layout.fp8_v_natural` gives
        the (B, Hk, Lk, D) values in key order). With ``int8_fp16`` it is ``v`` itself when
        float16, else its contiguous float16 cast (B, Hk, Lk, D). ``quantized.k_scale_max``
        (B, Hk) is each head's largest K scale. The statistics are None unless ``with_stats``.
    """
    if mode not in (PV_FP8, PV_FP16):
        raise ValueError(f"prepare_qkv mode must be {PV_FP8!r} or {PV_FP16!r}, got {mode!r}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError("prepare_qkv wants q (B, Hq, Lq, D) and k, v (B, Hk, Lk, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    fp8 = mode == PV_FP8
    v_job = v if fp8 or v.dtype != torch.float16 else None  # float16 V is used as it is
    if v_job is None and addresses is not None:
        raise ValueError("a float16 V in int8_fp16 mode is used as it is: it cannot be read "
                         "through addresses")
    k_scale_max = _alloc(k.shape[0], k.shape[1], dtype=torch.float32, device=k.device)
    ksum, vmax = _channel_stats(k, v if fp8 else None, k_scale_max, addresses)
    q_out, k_out, v_out = _quantize(q, k, v_job, ksum, vmax, block_q=block_q, block_k=block_k,
                                    quant=True, stats=with_stats, k_scale_max=k_scale_max,
                                    v_fp8=fp8, addresses=addresses)
    v_q, v_scale = v_out if v_job is not None else (v, None)
    quantized = QuantizedQKV(q_out.values, q_out.scales, k_out.values, k_out.scales, v_q, v_scale,
                             k_scale_max)
    return quantized, q_out.stats, k_out.stats


__all__ = ["prepare_qkv", "block_stats_gpu", "channel_mean"]
