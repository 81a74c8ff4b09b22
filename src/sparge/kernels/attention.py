"""Block-sparse attention kernel: INT8 Q.K^T, online softmax in base 2, FP8 / FP16 / exact P.V.

One Triton kernel serves every variant through ``tl.constexpr`` switches:

- ``MODE``: 0 = INT8 Q.K^T with FP8 e4m3 P.V (V stored K-major, one scale per channel),
  1 = INT8 Q.K^T with FP16 P.V, 2 = no quantization (fp16 / bf16 dots, or fp32 with IEEE
  precision).
- ``SPARSE``: visit the key blocks of a lookup table, or every (causally valid) block (dense mode).
- ``CAUSAL``: exact per-element causal masking, top-left aligned.
- ``PV_SKIP``: skip the P.V product of a tile when every row of it skips (see below).
- ``FOLD``: the exponent of the unmasked blocks as one FMA per score (see below; GPU only).

Each program computes ``BLOCK_M`` query rows of one (batch, query head). Key blocks are
``BLOCK_N = block_k`` rows, so one key block is one loop step. Per step it computes the scores
``s = (q_int8 . k_int8) * q_scale * k_scale`` (the kernel multiplies the Q scale by
``softmax_scale * log2(e)``), the row maxima and ``p = exp2(s - m)``, exactly the arithmetic of
:func:`sparge.reference.attention_reference`.

PV threshold, per query row: a key block contributes nothing to a row whose running maximum
``m_old`` is finite when the block's maximum score in that row is below ``m_old - lambda``; under
causal masking the block holding the row's own position always contributes. A skipped row is
dropped by adding -inf to its exponent, which costs nothing per element; with ``PV_SKIP`` the
kernel also leaves out the P.V product of a tile whose rows all skip (a branch that, in Triton 3.6
and 3.9, keeps the loop's loads from being software-pipelined, so it pays only when many tiles
skip).

Scores are shifted by their row maximum before scaling, in integers for the INT8 modes (then
converted exactly without a conversion instruction, see :func:`_offsets_from_max`): the
exponent argument is exact at the maximum for any magnitude of scores, and the per-element work
is an integer add, a float add, one FMA and the exp2. With ``FOLD`` (every score scale of the
program at most 2**-7, as for unit-scale inputs) the float add goes into the FMA, and the
rounding error this leaves in each row's constant is tracked exactly and cancels (see
:func:`_softmax_tile`); larger scales take the exact path for every block.

Lookup table: the kernel reads the mask's :meth:`~sparge.mask.SparseMask.kv_indices` form (per
query block a count and the ascending kept key-block indices) plus, per query block, how many of
the kept blocks lie wholly before the query block and inside the keys (``n_full``). Those run
without any element mask; the rest (the causal diagonal and the last partial key block) run with
it. Dense mode derives the same two ranges from the tile position.

FP8 details: P is scaled into the FP8 range by folding ``log2(448)`` into the exponent's per-row
bias, so the numerator ``p * 448`` costs no multiply; the row sum carries the same factor and
it cancels in the final division. Each key block's FP8 product lands in a fresh fp32 tile that is
then added, which keeps Hopper's FP8 accumulation error from compounding across blocks. V's keys
are stored in the slots of :mod:`sparge.kernels.layout` and P's columns are reordered the same way
(no data moves between threads), so P passes from the Q.K^T accumulator to the FP8 operand
without shuffles.

Loads: from sm90 on (and in the interpreter) the K and V tiles of unmasked blocks come through
host tensor descriptors (TMA); masked blocks and older GPUs use pointer loads.

Row sums (quantized modes): the sum of the rounded P the P.V product uses, computed as one more
small product on the tensor cores (P times a column of ones, or a splat of ones where the tensor
cores take operands from registers: :func:`ones_splat`), which costs less than the BLOCK_N float
adds per row it replaces and makes the weights of the V rows sum to one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import settings
from ..backend import capability_of
from ..mask import SparseMask, num_blocks
from ..quant import EXACT, P_FP8_SCALE, PV_FP8, PV_FP16
from . import launcher
from .graphs import OUT as SLOT_OUT
from .graphs import caller_pointer
from .launcher import cdiv, next_pow2, wait_for_previous_kernel
from .layout import to_pv_order
from .rounding import RINT_MAGIC, round_to_e4m3
from .select import mask_table

LOG2E = math.log2(math.e)
P_SCALE_LOG2 = math.log2(P_FP8_SCALE)

MODE_IDS = {PV_FP8: 0, PV_FP16: 1, EXACT: 2}
MAGIC = RINT_MAGIC  # 1.5 * 2**23: float bits 0x4B400000 + d hold MAGIC + d
# Folding MAGIC into the exponent's FMA rounds its per-row constant by up to 2**-8 (plus 2**-8
# for the product) when the score scale c satisfies MAGIC * c < 2**17, i.e. c <= 2**-7.
FOLD_MAX_SCALE = tl.constexpr(0.0078125)


# ========================================================================================= kernel
@triton.jit
def _scores(q, kt, IEEE_DOT: tl.constexpr, MODE: tl.constexpr):
    """Raw scores of one tile: (BLOCK_M, HEAD_DIM) x (HEAD_DIM, BLOCK_N) -> (M, N).

    INT8 operands give exact int32 sums; float operands float32 sums (IEEE precision for float32
    inputs).
    """
    if MODE == 2:
        if IEEE_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
    else:
        qk = tl.dot(q, kt, out_dtype=tl.int32)
    return qk


@triton.jit
def _offsets_from_max(qk, valid, MODE: tl.constexpr, MASKED: tl.constexpr,
                      FAST_CVT: tl.constexpr, FOLD: tl.constexpr):
    """Row maxima of raw scores and each score's offset from its row maximum.

    qk: int32 or float32 (M, N); valid: bool (M, N), used when MASKED. Returns ``(row_max, d)``:
    float32 (M,) the maximum over valid scores (-inf for a row with none) and float32 (M, N)
    ``qk - row_max`` (meaningless where not valid). For int32 scores the offset is computed in
    integers and converted exactly by the magic-number trick (float bits of 1.5 * 2**23 + d
    for |d| < 2**22, which holds for HEAD_DIM <= 128), so no int-to-float conversion instruction
    runs per element; taking offsets before scaling also keeps ``d * scale`` exact at the row
    maximum however large the scores are. With ``FOLD`` the offsets come back as
    ``MAGIC + d`` (``MAGIC`` = 1.5 * 2**23), the caller folding the subtraction into its FMA.
    """
    if MODE == 2:
        if MASKED:
            row_max = tl.max(tl.where(valid, qk, float("-inf")), 1)
        else:
            row_max = tl.max(qk, 1)
        anchor = tl.where(row_max > float("-inf"), row_max, 0.0)
        d = qk - anchor[:, None]
    else:
        if MASKED:
            m_int = tl.max(tl.where(valid, qk, -(2 ** 30)), 1)
            has_key = m_int > -(2 ** 30)
            m_int = tl.where(has_key, m_int, 0)
            row_max = tl.where(has_key, m_int.to(tl.float32), float("-inf"))
        else:
            m_int = tl.max(qk, 1)
            row_max = m_int.to(tl.float32)
        if FAST_CVT:
            d = (qk + (0x4B400000 - m_int)[:, None]).to(tl.float32, bitcast=True)
            if not FOLD:
                d = d - MAGIC
        else:
            d = qk.to(tl.float32) - m_int.to(tl.float32)[:, None]
    return row_max, d


@triton.jit
def _mul_rn(x, c, INTERPRETED: tl.constexpr):
    """float32 x * c rounded, never contracted with a later add into an FMA.

    The row maximum must be the same rounded number wherever it is used: an FMA would subtract
    the running maximum from the unrounded product, and p at the maximum would no longer be
    exactly 2**bias (with large scores, off by several binades). PTX's ``mul.rn`` is never
    contracted; the interpreter does not contract at all.
    """
    if INTERPRETED:
        return x * c
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r",
                                     [x, tl.zeros_like(x) + c], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _load_kt(k_base, k_desc, k_row, start_n, keys, offs_d, stride_kn, stride_kd, k_len, head_dim,
             MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
    """K^T tile (HEAD_DIM, BLOCK_N) of the given key rows (zeros past ``k_len`` when MASKED).

    With TMA (unmasked blocks only) the tile comes through the descriptor of K's 2-D view
    (B * Hk * Lk, D), whose row ``k_row`` is the head's first key.
    """
    if TMA:
        return k_desc.load([k_row + start_n, 0]).T
    ptrs = k_base + keys[None, :] * stride_kn + offs_d[:, None] * stride_kd
    if MASKED:
        return tl.load(ptrs, mask=(keys[None, :] < k_len) & (offs_d < head_dim)[:, None],
                       other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < head_dim)[:, None], other=0.0)


@triton.jit
def _load_v(v_base, v_desc, v_row, start_n, keys, offs_d, stride_vn, stride_vd, k_len, head_dim,
            MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, MODE: tl.constexpr):
    """V tile (BLOCK_N, HEAD_DIM) of the given key rows (zeros past ``k_len`` when MASKED).

    MODE 0 reads the pre-pass's FP8 buffer, whose rows are the keys' slots (see
    :mod:`sparge.kernels.layout`) and whose padding rows are zeros, so it needs no key mask.
    With TMA (unmasked blocks only) the tile comes through the descriptor of V's 2-D view:
    (B * Hk * D, LP) of the FP8 buffer (row ``v_row`` the head's first channel), else
    (B * Hk * Lk, D) (row ``v_row`` the head's first key).
    """
    if TMA:
        if MODE == 0:
            v = v_desc.load([v_row, start_n]).T
        else:
            v = v_desc.load([v_row + start_n, 0])
    else:
        ptrs = v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED and MODE != 0:
            v = tl.load(ptrs, mask=(keys[:, None] < k_len) & (offs_d < head_dim)[None, :],
                        other=0.0)
        elif EVEN_D:
            v = tl.load(ptrs)
        else:
            v = tl.load(ptrs, mask=(offs_d < head_dim)[None, :], other=0.0)
    return v


@triton.jit
def _softmax_tile(qk, c, m_i, s_i, lam, offs_m, keys, start_n, k_len,
                  BLOCK_N: tl.constexpr, MODE: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, ROUND_FP8: tl.constexpr, FAST_CVT: tl.constexpr,
                  FOLD: tl.constexpr, PV_DTYPE: tl.constexpr):
    """One online-softmax step on raw scores qk (BLOCK_M, BLOCK_N) of one key block.

    c: the block's score scale (base-2 units); m_i: float32 (BLOCK_M,) running row maximum;
    s_i: float32 (BLOCK_M,) the exponent offset of what was accumulated so far (see FOLD).
    Returns ``(p, p_op, m_new, alpha, skip, s_new)``: p float32 (BLOCK_M, BLOCK_N) and p_op the
    P.V operand (PV_DTYPE; relative to m_new, FP8 mode scaled by 448), the new running maximum,
    alpha = exp2(m_i - m_new + s_new - s_i) the factor for what was accumulated so far, the rows
    whose P.V contribution the threshold drops, and this tile's exponent offset.

    ``FOLD`` (integer scores, c <= 2**-7): the exponent ``d * c + bias`` becomes one FMA
    ``(MAGIC + d) * c + K`` with K = bias - MAGIC * c rounded to float32. K's rounding error e is
    computed exactly per row (the product's error by an FMA, the difference's by TwoSum); every
    p of the row is 2**e too large, so the accumulators carry the offset e (``s``) and alpha
    converts between offsets: numerator and denominator share it and it cancels. For a tile
    whose maximum is near the running maximum (the only ones whose P reaches the FP8 limit),
    |e| <= 2**-7, so its largest P is at most 448 * 2**(2**-7) and saturates to 448, an error
    below 0.6 % on that one value. Without FOLD the offset is 0.
    """
    valid = keys[None, :] < k_len
    if CAUSAL:
        valid = valid & (keys[None, :] <= offs_m[:, None])
    raw_max, d = _offsets_from_max(qk, valid, MODE, MASKED, FAST_CVT, FOLD)

    # Row maxima in base-2 units: max(qk) * c equals max(qk * c) exactly since c > 0.
    local = _mul_rn(raw_max, c, ROUND_FP8)
    m_new = tl.maximum(m_i, local)
    skip = (m_i > float("-inf")) & (local - m_i < -lam)
    if MASKED and CAUSAL:
        skip = skip & ((offs_m < start_n) | (offs_m >= start_n + BLOCK_N))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    # p = exp2(qk * c - m_safe) = exp2(d * c + (local - m_safe)); FP8 mode adds log2(448) so
    # that p comes out scaled into the FP8 range. Skipped rows (and rows without a valid key)
    # get -inf: their p is 0 at no per-element cost.
    bias = local - m_safe
    if MODE == 0:
        bias = bias + 8.807354922057604
    no_p = skip | (local == float("-inf"))
    bias = tl.where(no_p, float("-inf"), bias)
    if FOLD:
        big = _mul_rn(c, MAGIC, ROUND_FP8)
        product_err = tl.fma(c, MAGIC, -big)  # MAGIC * c - big, exactly
        k_row = bias - big
        shift = k_row - bias  # TwoSum: the rounding error of k_row, exactly
        sum_err = (bias - (k_row - shift)) + (-big - shift)  # (bias - big) - k_row
        s_new = tl.where(no_p, 0.0, product_err - sum_err)
        p = tl.math.exp2(tl.fma(d, c, k_row[:, None]))
    else:
        s_new = tl.zeros_like(s_i)
        p = tl.math.exp2(d * c + bias[:, None])
    alpha = tl.math.exp2((m_i - m_safe) + (s_new - s_i))
    if MASKED:
        p = tl.where(valid, p, 0.0)
    if MODE == 0:
        if ROUND_FP8:  # the interpreter: its own fp8 conversion rounds some values wrongly
            p_op = round_to_e4m3(p).to(tl.float8e4nv)
        else:
            p_op = p.to(tl.float8e4nv)
        p_op = to_pv_order(p_op)  # V's keys are stored in these slots
    else:
        p_op = p.to(PV_DTYPE)
    return p, p_op, m_new, alpha, skip, s_new


@triton.jit
def _ones_column(BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, FIRST: tl.constexpr,
                 ONES_SPLAT: tl.constexpr):
    """The row sums' operand (see :func:`_row_sums`): (BLOCK_N, 16) DTYPE with ones in column 0
    and zeros elsewhere, or with ``ONES_SPLAT`` ones everywhere.

    Where the tensor cores read the operand from shared memory (wgmma on Hopper, tcgen05 on
    datacenter Blackwell) the one-column operand is stored there once, before the loop. Each of
    the kernel's two loops gets its own copy (``FIRST`` picks one of two equal expressions, which
    the compiler does not merge), and the second loop its own load of the Q tile. Shared buffers
    that live through both loops are placed by Triton's allocator after a 16-byte pipeline
    barrier of the first loop, behind 1008 bytes of alignment padding; scoped to one loop they
    pack without it. At D128 with two pipeline stages the kernel then takes 75,812 bytes of
    shared memory instead of 76,820, and three programs fit on a Hopper SM only at 76,800 bytes
    or less (228 KB, 1 KB reserved per program).

    Where they take it from registers (mma.sync on Ampere, Ada and consumer Blackwell) the
    one-column operand is reloaded from shared memory byte by byte on every key block (64
    ``LDS.U8`` and 48 ``PRMT`` per thread at D128, compiled for sm_89 and sm_120); a splat of ones
    is a constant in registers instead.
    """
    if ONES_SPLAT:
        return tl.full([BLOCK_N, 16], 1.0, tl.float32).to(DTYPE)
    col = tl.arange(0, 16)
    if FIRST:
        first = col == 0
    else:
        first = col < 1
    return tl.where(first[None, :], 1.0, tl.zeros([BLOCK_N, 16], dtype=tl.float32)).to(DTYPE)


@triton.jit
def _row_sums(p, p_op, sum_col, MODE: tl.constexpr, ONES_SPLAT: tl.constexpr):
    """float32 (BLOCK_M,) row sums of one tile's P.

    In the quantized modes, of the rounded P that the P.V product uses, taken on the tensor
    cores (p_op . sum_col, see :func:`_ones_column`) instead of by BLOCK_N float adds per row:
    the output is then a weighted mean of V rows whose weights sum to one. With ones in column
    0 only, the sum of the product's columns is column 0; with ones everywhere every column is
    the same row sum, and their maximum is it.
    """
    if MODE == 2:
        return tl.sum(p, 1)
    if ONES_SPLAT:
        return tl.max(tl.dot(p_op, sum_col), 1)
    return tl.sum(tl.dot(p_op, sum_col), 1)


@triton.jit
def _block_scale(q_scale, ks_base, stride_ks, j, MODE: tl.constexpr):
    """Scale of the raw scores against key block j, in base-2 units."""
    if MODE == 2:
        return q_scale
    return q_scale * tl.load(ks_base + j * stride_ks)


@triton.jit
def _attend_blocks(acc, l_i, m_i, s_i, q, q_scale, offs_m, offs_d,
                   k_base, v_base, k_desc, v_desc, k_row, v_row, ks_base, idx_base, sum_col,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_ks,
                   lo, hi, k_len, head_dim, lam,
                   BLOCK_N: tl.constexpr, MODE: tl.constexpr, MASKED: tl.constexpr,
                   CAUSAL: tl.constexpr, SPARSE: tl.constexpr, PV_SKIP: tl.constexpr,
                   EVEN_D: tl.constexpr, IEEE_DOT: tl.constexpr, ROUND_FP8: tl.constexpr,
                   FAST_CVT: tl.constexpr, FOLD: tl.constexpr, PV_DTYPE: tl.constexpr,
                   TMA: tl.constexpr, ONES_SPLAT: tl.constexpr):
    """Online softmax over the key blocks ``lo <= i < hi`` of one query tile, one block at a time.

    acc: float32 (BLOCK_M, HEAD_DIM); l_i, m_i, s_i: float32 (BLOCK_M,), the running row sum, the
    running row maximum (base-2 units, -inf before the first key) and the accumulators' exponent
    offset (see :func:`_softmax_tile`). ``MASKED`` applies the element mask (keys past ``k_len``,
    and causal ``key <= query``); unmasked ranges must not need it. ``TMA`` (unmasked ranges
    only) loads K and V through the tensor descriptors ``k_desc`` and ``v_desc`` (see
    :func:`_load_kt`, :func:`_load_v`).
    """
    offs_n = tl.arange(0, BLOCK_N)
    for i in range(lo, hi):
        if SPARSE:
            j = tl.load(idx_base + i)
        else:
            j = i
        start_n = j * BLOCK_N
        keys = start_n + offs_n
        kt = _load_kt(k_base, k_desc, k_row, start_n, keys, offs_d, stride_kn, stride_kd, k_len,
                      head_dim, MASKED, EVEN_D, TMA)
        qk = _scores(q, kt, IEEE_DOT, MODE)
        c = _block_scale(q_scale, ks_base, stride_ks, j, MODE)
        p, p_op, m_i, alpha, skip, s_i = _softmax_tile(
            qk, c, m_i, s_i, lam, offs_m, keys, start_n, k_len, BLOCK_N, MODE, MASKED, CAUSAL,
            ROUND_FP8, FAST_CVT, FOLD, PV_DTYPE)
        acc = acc * alpha[:, None]
        v = _load_v(v_base, v_desc, v_row, start_n, keys, offs_d, stride_vn, stride_vd, k_len,
                    head_dim, MASKED, EVEN_D, TMA, MODE)
        if PV_SKIP:
            if tl.max(tl.where(skip, 0, 1), 0) > 0:
                acc = _accumulate_pv(acc, p_op, v, MODE, IEEE_DOT)
        else:
            acc = _accumulate_pv(acc, p_op, v, MODE, IEEE_DOT)
        l_i = l_i * alpha + _row_sums(p, p_op, sum_col, MODE, ONES_SPLAT)
    return acc, l_i, m_i, s_i


@triton.jit
def _accumulate_pv(acc, p, v, MODE: tl.constexpr, IEEE_DOT: tl.constexpr):
    """acc (BLOCK_M, HEAD_DIM) float32 += p (BLOCK_M, BLOCK_N) . v (BLOCK_N, HEAD_DIM)."""
    if MODE == 0:
        acc += tl.dot(p, v)  # fresh fp32 tile per block: Hopper's FP8 accumulator is imprecise
    elif IEEE_DOT:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc)
    return acc


@triton.jit
def _sparse_attn_fwd(
        Q, K, V, Out, QS, KS, KSMax, VS, Lam, Counts, NFull, Indices, KDesc, VDesc, Addresses,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_qsb, stride_qsh, stride_qsm,
        stride_ksb, stride_ksh, stride_ksn,
        stride_kmb, stride_kmh,
        stride_vsb, stride_vsh, stride_vsd,
        stride_cb, stride_ch, stride_cm,
        stride_ib, stride_ih, stride_im,
        heads_q, group, q_len, k_len, head_dim, sm_scale_log2, heads_per_group,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_Q: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
        PV_SKIP: tl.constexpr, EVEN_D: tl.constexpr, IEEE_DOT: tl.constexpr,
        ROUND_FP8: tl.constexpr, FAST_CVT: tl.constexpr, FOLD: tl.constexpr,
        TMA: tl.constexpr, ONES_SPLAT: tl.constexpr, INDIRECT: tl.constexpr,
        PDL: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head).

    Q (B, Hq, Lq, D) int8 (or float for MODE 2); K (B, Hk, Lk, D) int8 / float; V float16 or
    float (B, Hk, Lk, D), or for MODE 0 the pre-pass's float8_e4m3fn buffer (B, Hk, D, LP) with
    keys in slots (:mod:`sparge.kernels.layout`), its strides given in the order (b, h, slot,
    channel); Out (B, Hq, Lq, D) any float dtype. QS (B, Hq, nQ) float32 the Q scales (times
    sm_scale_log2 = softmax scale * log2(e) here); KS (B, Hk, nK); KSMax (B, Hk) the largest of
    each head's KS (read with FOLD); VS (B, Hk, D).
    Lam (Hq,) float32. Counts, NFull (B, Hq, nQ) int32 and Indices (B, Hq, nQ, nK) int32 when
    SPARSE. KDesc, VDesc: tensor descriptors of K's and V's 2-D views when TMA (see
    :func:`_load_kt`, :func:`_load_v`), else None. With INDIRECT, Out gives only the type: the
    output's address is in the int64 Addresses (:mod:`sparge.kernels.graphs`). ONES_SPLAT: the
    row sums' operand (see :func:`_ones_column`, :func:`ones_splat`).
    Grid: (B * Hq * cdiv(Lq, BLOCK_M),), one dimension (no limit of 65535 on either count),
    in groups of ``heads_per_group`` consecutive (batch, head) pairs (see :func:`_head_groups`):
    group after group, and within a group the query tiles from the last (under causal masking
    the heaviest) to the first, the group's heads side by side. PDL: see
    :func:`launcher.dependent_launch`.
    """
    wait_for_previous_kernel(PDL)
    n_tiles = tl.cdiv(q_len, BLOCK_M)
    pid = tl.program_id(0)
    group_programs = n_tiles * heads_per_group
    first_bh = pid // group_programs * heads_per_group
    in_group = pid % group_programs
    group_heads = tl.minimum(heads_per_group, tl.num_programs(0) // n_tiles - first_bh)
    pid_m = n_tiles - 1 - in_group // group_heads
    pid_bh = first_bh + in_group % group_heads
    b = (pid_bh // heads_q).to(tl.int64)
    h = pid_bh % heads_q
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    q_blk = start_m // BLOCK_Q

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm \
        + offs_d[None, :] * stride_qd
    q_mask = row_ok[:, None]
    if not EVEN_D:
        q_mask = q_mask & d_ok[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if MODE == 2:
        q_scale = sm_scale_log2
    else:
        # The reference's order: (q scale * (softmax scale * log2 e)) * k scale, in float32.
        q_scale = tl.load(QS + b * stride_qsb + h * stride_qsh + q_blk * stride_qsm) \
            * sm_scale_log2
    lam = tl.load(Lam + h)
    if MODE == 1:
        pv_dtype: tl.constexpr = tl.float16
    else:
        pv_dtype: tl.constexpr = V.dtype.element_ty

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    ks_base = KS + b * stride_ksb + hk * stride_ksh
    head_k = (b * (heads_q // group) + hk).to(tl.int32)  # the (batch, key head) index
    k_row = head_k * k_len
    if MODE == 0:
        v_row = head_k * HEAD_DIM
    else:
        v_row = k_row

    n_k = tl.cdiv(k_len, BLOCK_N)
    if SPARSE:
        c_off = b * stride_cb + h * stride_ch + q_blk * stride_cm
        hi = tl.load(Counts + c_off)
        mid = tl.load(NFull + c_off)
        idx_base = Indices + b * stride_ib + h * stride_ih + q_blk * stride_im
    else:
        idx_base = Indices
        if CAUSAL:
            last_row = tl.minimum(start_m + BLOCK_M, q_len) - 1
            hi = tl.minimum(last_row // BLOCK_N + 1, n_k)
            mid = tl.minimum(start_m // BLOCK_N, k_len // BLOCK_N)
        else:
            hi = n_k
            mid = k_len // BLOCK_N

    sum_col = _ones_column(BLOCK_N, pv_dtype, True, ONES_SPLAT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if FOLD:
        # The folded exponent needs every score scale of this program <= FOLD_MAX_SCALE; where
        # one is larger (inputs of large magnitude) the exact path takes every block.
        ks_max = tl.load(KSMax + b * stride_kmb + hk * stride_kmh)
        mid = tl.where(q_scale * ks_max <= FOLD_MAX_SCALE, mid, 0)
    # Key blocks wholly before the tile and inside the keys: no element mask.
    acc, l_i, m_i, s_i = _attend_blocks(
        acc, l_i, m_i, s_i, q, q_scale, offs_m, offs_d, k_base, v_base, KDesc, VDesc, k_row,
        v_row, ks_base, idx_base, sum_col, stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn,
        0, mid, k_len, head_dim, lam, BLOCK_N, MODE, False, CAUSAL, SPARSE, PV_SKIP, EVEN_D,
        IEEE_DOT, ROUND_FP8, FAST_CVT, FOLD, pv_dtype, TMA, ONES_SPLAT)
    # The causal diagonal and the last partial key block: element mask on. This loop takes its
    # own copies of the Q tile and the ones column, so that the shared-memory buffers of the
    # first loop's operands end with it (see _ones_column); the Q tile is loaded again with
    # another cache modifier, which keeps the compiler from merging the two loads.
    q = tl.load(q_ptrs, mask=q_mask, other=0.0, cache_modifier=".cg")
    sum_col = _ones_column(BLOCK_N, pv_dtype, False, ONES_SPLAT)
    acc, l_i, m_i, s_i = _attend_blocks(
        acc, l_i, m_i, s_i, q, q_scale, offs_m, offs_d, k_base, v_base, KDesc, VDesc, k_row,
        v_row, ks_base, idx_base, sum_col, stride_kn, stride_kd, stride_vn, stride_vd, stride_ksn,
        mid, hi, k_len, head_dim, lam, BLOCK_N, MODE, True, CAUSAL, SPARSE, PV_SKIP, EVEN_D,
        IEEE_DOT, ROUND_FP8, FAST_CVT, False, pv_dtype, False, ONES_SPLAT)

    # no contributing key: a sum of exactly 0; a NaN sum (a NaN or an infinity in the inputs
    # reached the row) stays NaN, as in the reference
    has_keys = l_i != 0
    inv_l = 1.0 / tl.where(has_keys, l_i, 1.0)
    o = acc * inv_l[:, None]
    if MODE == 0:
        vs = tl.load(VS + b * stride_vsb + hk * stride_vsh + offs_d * stride_vsd, mask=d_ok,
                     other=0.0)
        o = o * vs[None, :]
    o = tl.where(has_keys[:, None], o, 0.0)
    if INDIRECT:
        Out = caller_pointer(Addresses, SLOT_OUT, Out)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om \
        + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ========================================================================================= host
@dataclass(frozen=True)
class BlockTable:
    """The lookup table the kernel reads for a :class:`SparseMask` (all int32, on the device).

    Attributes:
        counts: (B, H, nQ) kept key blocks per query block.
        n_full: (B, H, nQ) how many of the leading kept blocks need no element mask (wholly before
            the query block under causal masking, and not the partial last key block).
        indices: (B, H, nQ, nK) kept key-block indices, ascending, zero-padded.
    """

    counts: torch.Tensor
    n_full: torch.Tensor
    indices: torch.Tensor


def block_table(mask: SparseMask, addresses: torch.Tensor | None = None) -> BlockTable:
    """Build the kernel's lookup table from a mask, on the mask's device, without host sync (one
    kernel launch); with ``addresses``, reading the blocks at the address in slot ``MASK`` of
    :mod:`sparge.kernels.graphs`."""
    indices, counts, n_full = mask_table(mask, addresses)
    return BlockTable(counts, n_full, indices)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters chosen per architecture and shape class."""

    block_m: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # a per-thread register cap (more programs per SM)


def candidate_configs(capability: tuple[int, int], head_dim: int, block_q: int, *,
                      block_k: int = 128, operand_bytes: tuple[int, int, int] = (1, 1, 1),
                      smem_bytes: int = 227 * 1024) -> list[KernelConfig]:
    """Configurations worth timing on a GPU of ``capability``; the first is the default.

    BLOCK_M must divide ``block_q`` (one Q scale and one mask row per tile). ``operand_bytes`` are
    the element sizes of Q, K and V; pipeline stages are capped so that the K and V tiles of every
    stage, plus the Q tile, fit in ``smem_bytes`` of shared memory.
    """
    if (9, 0) <= capability < (10, 0):  # Hopper: wgmma, deep pipelines
        # A 168-register cap and two stages (75.8 KB of shared memory at D128, see
        # _ones_column) let three 4-warp programs share an SM, so one program's softmax can run
        # while another's matrix products do; three stages fit only two.
        cands = [(64, 4, 2, 168), (64, 4, 3, None), (64, 4, 3, 168), (64, 4, 2, None),
                 (128, 8, 3, None), (64, 4, 4, None), (128, 8, 2, None)]
        if head_dim <= 64:  # small tiles: four programs per SM (128 registers) hide most latency
            cands = [(64, 4, 3, 128), (64, 4, 2, 128)] + cands
    else:  # Ampere, Ada, Blackwell
        cands = [(64, 4, 2, None), (64, 4, 3, None), (128, 8, 2, None), (128, 4, 2, None)]
    if head_dim > 128:  # a 128 x 256 fp32 accumulator does not fit the registers
        cands = [c for c in cands if c[0] == 64 and c[3] is None]
    q_bytes, k_bytes, v_bytes = operand_bytes
    per_stage = block_k * head_dim * (k_bytes + v_bytes)
    seen: list[KernelConfig] = []
    for m, w, s, regs in cands:
        room = (smem_bytes - m * head_dim * q_bytes) // per_stage
        cfg = KernelConfig(m, w, max(1, min(s, room)), regs)
        if m <= block_q and block_q % m == 0 and cfg not in seen:
            seen.append(cfg)
    return seen


_TUNED: dict[tuple, KernelConfig] = {}


def _bucket(n: int) -> int:
    """Shape class of a length: the next power of two (lengths within 2x share a config)."""
    return next_pow2(n)


def _autotune_enabled() -> bool:
    return settings.AUTOTUNE.enabled()


def _head_dim_padded(dim: int, quantized: bool) -> int:
    """The kernel's HEAD_DIM for heads of ``dim`` channels: a power of two, at least the
    reduction depth of the tensor cores' Q.K^T (32 for INT8 operands, 16 for 16-bit ones;
    Triton refuses smaller products)."""
    return max(32 if quantized else 16, next_pow2(dim))


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out: torch.Tensor,
           q_scale: torch.Tensor | None, k_scale: torch.Tensor | None,
           v_scale: torch.Tensor | None, table: BlockTable | None, block_q: int, block_k: int,
           causal: bool, scale: float, pv_threshold: torch.Tensor, mode: str,
           pv_skip: bool = False, config: KernelConfig | None = None,
           k_scale_max: torch.Tensor | None = None, addresses: torch.Tensor | None = None):
    """Run the attention kernel, writing ``out`` (B, Hq, Lq, D) in place.

    Args:
        q: int8 (B, Hq, Lq, D) for the quantized modes, else float16/bfloat16/float32.
        k: int8 (B, Hk, Lk, D) (smoothed K) or float; v: for mode ``int8_fp8`` the FP8
            buffer of :func:`~sparge.kernels.prepass.prepare_qkv` (B, Hk, D, LP), contiguous,
            keys in slots (:mod:`sparge.kernels.layout`), LP a multiple of ``block_k``, zeros
            past Lk; else float16 (``int8_fp16``) or float (B, Hk, Lk, D).
        q_scale: float32 (B, Hq, nQ) raw per-block scales (the kernel multiplies them by
            ``scale * log2(e)``); k_scale: float32 (B, Hk, nK); v_scale: float32 (B, Hk, D) for
            FP8.
        table: the lookup table of the mask, or None for dense mode.
        pv_threshold: float32 (Hq,) on the device.
        pv_skip: skip the P.V product of tiles whose rows all skip (worth it when thresholds are
            small enough to skip; costs a reduction per step otherwise).
        config: force a launch configuration (no autotuning).
        k_scale_max: float32 (B, Hk), each head's largest K scale, if the pre-pass gives it
            (else it is computed here).
        addresses: int64 device buffer holding the output's address in slot ``OUT`` of
            :mod:`sparge.kernels.graphs`, where the kernel then writes (``out`` gives only its
            shape, strides and dtype).

    Returns Triton's handle of the launched kernel (``n_regs``, ``n_spills``, ``asm``).
    """
    batch, heads_q, q_len, dim = q.shape
    heads_k, k_len = k.shape[1], k.shape[2]
    mode_id = MODE_IDS[mode]
    device = q.device
    head_dim = _head_dim_padded(dim, mode_id != 2)
    fast_cvt = mode_id != 2 and head_dim <= 128  # integer scores offset without a conversion
    # The folded exponent rounds each score once, at a different point from the reference, and
    # moves more P values across an FP8 / FP16 rounding midpoint than the CPU interpreter cases'
    # flip-level tolerance allows (seen: 1e-4 to 3e-4 rel L1): it runs, and is tested, on the GPU.
    fold = fast_cvt and device.type == "cuda"
    splat = ones_splat(capability_of(device) if device.type == "cuda" else None)

    if mode_id == 2:
        qs = ks = vs = torch.empty(1, 1, 1, dtype=torch.float32, device=device)
        ks_max = qs[0]
    else:
        qs = q_scale
        ks = k_scale
        # Decides, per program, whether the exponent may be folded (read only when folding).
        if not fold:
            ks_max = qs[..., 0]
        else:
            ks_max = ks.amax(dim=-1) if k_scale_max is None else k_scale_max
        vs = v_scale if v_scale is not None else qs  # read in the FP8 mode only
    lam = pv_threshold.to(device=device, dtype=torch.float32).contiguous()
    if table is None:
        dummy = torch.empty(1, 1, 1, dtype=torch.int32, device=device)  # never read
        counts = n_full = indices = dummy
    else:
        counts, n_full, indices = table.counts, table.n_full, table.indices

    if mode_id == 0:
        lp = cdiv(k_len, block_k) * block_k
        if v.shape != (batch, heads_k, dim, lp) or not v.is_contiguous():
            raise ValueError(f"mode {mode!r} takes V as the pre-pass's contiguous FP8 buffer of "
                             f"shape {(batch, heads_k, dim, lp)}, got {tuple(v.shape)} with "
                             f"strides {v.stride()}")
        v_strides = (v.stride(0), v.stride(1), v.stride(3), v.stride(2))
    else:
        v_strides = v.stride()
    descriptors = _tma_descriptors(k, v, block_k, head_dim, mode_id == 0)
    k_desc, v_desc = descriptors if descriptors is not None else (None, None)

    def run(cfg: KernelConfig):
        grid = (cdiv(q_len, cfg.block_m) * batch * heads_q,)
        caps = {} if cfg.max_registers is None else {"maxnreg": cfg.max_registers}
        # Multiply-adds contracted into FMAs (the exponent, the accumulator's rescaling), asked
        # for explicitly: Triton 3.9 warns that its default turns to no contraction in 3.10.
        return launcher.run(
            _sparse_attn_fwd, grid,
            q, k, v, out, qs, ks, ks_max, vs, lam, counts, n_full, indices, k_desc, v_desc,
            out if addresses is None else addresses,
            *q.stride(), *k.stride(), *v_strides, *out.stride(),
            *qs.stride(), *ks.stride(), *ks_max.stride(), *vs.stride(),
            *counts.stride(), *indices.stride()[:3],
            heads_q, heads_q // heads_k, q_len, k_len, dim, scale * LOG2E,
            _head_groups(causal, batch * heads_q, heads_q // heads_k, k_len * dim
                         * (k.element_size() + v.element_size())),
            HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=block_k, BLOCK_Q=block_q,
            MODE=mode_id, CAUSAL=causal, SPARSE=table is not None, PV_SKIP=pv_skip,
            EVEN_D=dim == head_dim, IEEE_DOT=q.dtype == torch.float32,
            ROUND_FP8=device.type != "cuda", FAST_CVT=fast_cvt, FOLD=fold,
            TMA=descriptors is not None, ONES_SPLAT=splat, INDIRECT=addresses is not None,
            **launcher.dependent_launch(device), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            enable_fp_fusion=True, **caps)

    if config is None:
        sizes = (q.element_size(), k.element_size(), v.element_size())
        config = _choose_config(run, device, mode, q.dtype, head_dim, block_q, block_k, causal,
                                table is not None, pv_skip, q_len, k_len, sizes)
    return run(config)


# K and V bytes that the programs of one group of heads read (see _head_groups): well within
# the 50 MB of L2 of an H100 or H200.
_GROUP_BYTES = 16 << 20


def _head_groups(causal: bool, heads: int, group: int, kv_head_bytes: int) -> int:
    """(batch, query head) pairs per group of the attention grid, of ``heads`` in all.

    Without causal masking, 1: the tiles of a head run together and share its K and V in L2.
    Under causal masking the tiles' work grows with their index; at short lengths, head after
    head leaves the heavy tiles of the last heads to start late, and the call waits on them
    (H200, B1 H24 L4096 D64: 0.172 ms against 0.148 ms for the heavy tiles of every head
    first). Every head at once spreads K and V over all heads instead (L32768 D128: 11.6
    against 8.9 ms). So groups of as many heads as the query heads reading ``_GROUP_BYTES`` of
    K and V (``kv_head_bytes`` per key head, shared by ``group`` query heads), evened out."""
    if not causal:
        return 1
    size = max(1, min(heads, _GROUP_BYTES * group // max(1, kv_head_bytes)))
    return cdiv(heads, cdiv(heads, size))


def ones_splat(capability: tuple[int, int] | None) -> bool:
    """Whether the row sums' operand is a splat of ones (see :func:`_ones_column`) on a GPU of
    ``capability`` (None: the CPU interpreter): where the tensor cores take it from registers
    (mma.sync: compute capability 8.x and 12.x), not where they read it from shared memory (9.x
    and 10.x)."""
    return capability is not None and capability[0] in (8, 12)


def _tma_descriptors(k: torch.Tensor, v: torch.Tensor, block_k: int, head_dim: int,
                     fp8_buffer: bool) -> tuple[TensorDescriptor, TensorDescriptor] | None:
    """Tensor descriptors of K and V for the unmasked key blocks (see :func:`_load_kt`,
    :func:`_load_v`), or None where they do not apply.

    K (B, Hk, Lk, D) must be contiguous, seen as (B * Hk * Lk, D); V likewise, or, if
    ``fp8_buffer``, the FP8 buffer (B, Hk, D, LP) seen as (B * Hk * D, LP). D must be the kernel's
    HEAD_DIM (no padding). None also before Hopper (no tensor memory accelerator); the CPU
    interpreter emulates descriptors.
    """
    if k.device.type == "cuda" and capability_of(k.device) < (9, 0):
        return None
    batch, heads_k, k_len, dim = k.shape
    rows = batch * heads_k * k_len
    if (dim != head_dim or not k.is_contiguous() or not v.is_contiguous() or rows >= 2 ** 31
            or any(x.data_ptr() % 16 for x in (k, v))):
        return None
    k_desc = TensorDescriptor(k, [rows, dim], [dim, 1], [block_k, head_dim])
    if fp8_buffer:
        padded = v.shape[3]
        v_desc = TensorDescriptor(v, [batch * heads_k * dim, padded], [padded, 1],
                                  [head_dim, block_k])
    else:
        v_desc = TensorDescriptor(v, [rows, dim], [dim, 1], [block_k, head_dim])
    return k_desc, v_desc


def _choose_config(run, device: torch.device, mode: str, dtype: torch.dtype, head_dim: int,
                   block_q: int, block_k: int, causal: bool, sparse: bool, pv_skip: bool,
                   q_len: int, k_len: int, operand_bytes: tuple[int, int, int]) -> KernelConfig:
    """The cached configuration for this shape class; times the candidates on its first call."""
    if device.type != "cuda":
        return KernelConfig(64, 4, 1)  # the interpreter: any valid configuration
    capability = capability_of(device)
    key = (capability, mode, dtype, head_dim, block_q, block_k, causal, sparse, pv_skip,
           _bucket(q_len), _bucket(k_len))
    if key in _TUNED:
        return _TUNED[key]
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    cands = candidate_configs(capability, head_dim, block_q, block_k=block_k,
                              operand_bytes=operand_bytes, smem_bytes=smem)
    if not _autotune_enabled() or torch.cuda.is_current_stream_capturing():
        _TUNED[key] = cands[0]
        return cands[0]
    best = fastest_config(cands, run, _cuda_time)
    if best is None:
        raise RuntimeError(f"no attention kernel configuration compiled for {key}")
    _TUNED[key] = best
    return best


# Rounds of timing per candidate, and the least GPU time one timing covers (short kernels are
# repeated back to back to fill it).
TUNE_ROUNDS = 5
TUNE_MIN_MS = 2.0


def fastest_config(candidates: list[KernelConfig], run: Callable[[KernelConfig], object],
                   timer: Callable[[Callable[[], object], int], float]) -> KernelConfig | None:
    """The candidate with the smallest median time, or None if none runs.

    Every candidate is first run once (compiling it; one that fails, for lack of registers or
    shared memory, is dropped) and timed once for an estimate. Then come ``TUNE_ROUNDS`` rounds
    in which each candidate is timed once, over enough back-to-back calls to cover
    ``TUNE_MIN_MS``, each round starting at the next candidate: a clock that drifts over the
    tuning (a GPU settling at its power limit after the idle time of the compilations) weighs
    on every candidate alike instead of favouring the ones timed first.
    ``timer(fn, n)``: milliseconds per call of ``fn`` over ``n`` calls.
    """
    live: list[tuple[KernelConfig, int]] = []
    for cfg in candidates:
        try:
            run(cfg)
            estimate = timer(lambda cfg=cfg: run(cfg), 1)
        except Exception:  # noqa: BLE001 - a config that does not compile here (resources)
            continue
        live.append((cfg, max(1, math.ceil(TUNE_MIN_MS / max(estimate, 1e-3)))))
    if not live:
        return None
    times: dict[KernelConfig, list[float]] = {cfg: [] for cfg, _ in live}
    for first in range(TUNE_ROUNDS):
        for index in range(len(live)):
            cfg, calls = live[(first + index) % len(live)]
            times[cfg].append(timer(lambda cfg=cfg: run(cfg), calls))
    return min(times, key=lambda cfg: statistics.median(times[cfg]))


def _cuda_time(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` back-to-back calls (CUDA events)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def tuned_configs() -> dict[tuple, KernelConfig]:
    """The configurations chosen so far, by shape class (for reports)."""
    return dict(_TUNED)


__all__ = ["BlockTable", "KernelConfig", "block_table", "candidate_configs", "launch",
           "tuned_configs", "num_blocks"]
