"""Attention benchmark: sparge (dense quantized, block-sparse, full pipeline) against SDPA (cuDNN,
flash) and FlexAttention, in one run on one card.

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first), rotating over several
input sets so that L2 does not serve a repeated input. Throughput is dense-equivalent:
TOPS = 4 B H Lq Lk D / time, halved for causal. ``rel_l1`` is sum|o - o_exact| / sum|o_exact| on
sampled query rows, against float64 attention: for a fixed block mask (the sparse and FlexAttention
rows) on the same mask, for everything else (dense rows and the full pipeline, whose mask is its
own approximation) against dense attention.

    python bench/bench_attention.py                      # B1 H24, L 4096/8192/32768, D 64/128,
                                                         # causal and not
    python bench/bench_attention.py --shapes 32768:128:0,8192:128:1 --no-flex

Writes bench/results/<card>-<date>.md, the same rows as JSON next to it, and
bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import sparge  # noqa: E402
from sparge.kernels import block_table, launch, prepare_qkv  # noqa: E402
from sparge.kernels.attention import tuned_configs  # noqa: E402
from sparge.mask import SparseMask, causal_block_mask, num_blocks  # noqa: E402

BQ, BK = 64, 128
SPARSITIES = (0.0, 0.5, 0.75, 0.9)
DEVICE = "cuda"


@dataclass
class Row:
    name: str
    card: str
    torch: str
    triton: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    causal: bool
    sparsity: float
    ms: float
    tops: float
    rel_l1: float | None
    speedup_vs_cudnn: float | None = None
    cudnn_ms: float | None = None  # cuDNN timed right after this row (the ratio's reference)


# ------------------------------------------------------------------------------------ inputs
def random_inputs(b: int, h: int, length: int, d: int, gen: torch.Generator):
    """Gaussian Q, K and V (bf16) on ``gen``'s device."""
    return tuple(torch.randn(b, h, length, d, generator=gen, device=gen.device,
                             dtype=torch.bfloat16) for _ in range(3))


def local_inputs(b: int, h: int, length: int, d: int, gen: torch.Generator):
    """Structured local Q and K: a smooth random signal along the sequence plus token noise.

    Each channel is white noise low-passed by a Gaussian of width 64 tokens (unit variance), so
    neighbouring tokens are alike (blocks are self-similar) and q_i . k_j decays with |i - j|:
    attention is local, as in video diffusion transformers. The amplitude keeps the score range
    independent of D. V is random. On ``gen``'s device.
    """
    device = gen.device
    eps = torch.randn(b, h, d, length, generator=gen, device=device)
    freq = torch.fft.rfftfreq(length, device=device)
    smooth = torch.fft.irfft(torch.fft.rfft(eps) * torch.exp(-0.5 * (2 * math.pi * freq * 64) ** 2),
                             n=length)
    z = (smooth / smooth.std(dim=-1, keepdim=True)).transpose(-1, -2)
    amp = (64 / d) ** 0.25
    q = amp * z + 0.3 * torch.randn(z.shape, generator=gen, device=device)
    k = amp * z + 0.3 * torch.randn(z.shape, generator=gen, device=device)
    v = torch.randn(b, h, length, d, generator=gen, device=device)
    return tuple(t.to(torch.bfloat16).contiguous() for t in (q, k, v))


def random_block_mask(b: int, h: int, lq: int, lk: int, causal: bool, skip: float,
                      gen: torch.Generator) -> SparseMask:
    """Exactly round(skip * visitable) of each head's visitable blocks dropped, chosen at random."""
    n_q, n_k = num_blocks(lq, BQ), num_blocks(lk, BK)
    visitable = (causal_block_mask(lq, lk, BQ, BK, DEVICE) if causal
                 else torch.ones(n_q, n_k, dtype=torch.bool, device=DEVICE))
    n_vis = int(visitable.sum())
    n_keep = n_vis - round(skip * n_vis)
    keys = torch.rand(b, h, n_q * n_k, generator=gen, device=DEVICE)
    keys = keys.masked_fill(~visitable.reshape(-1), 2.0)  # never chosen
    order = keys.argsort(-1)[..., :n_keep]
    blocks = torch.zeros(b, h, n_q * n_k, dtype=torch.bool, device=DEVICE)
    blocks.scatter_(-1, order, True)
    return SparseMask(blocks.view(b, h, n_q, n_k), BQ, BK, lq, lk, causal)


# ------------------------------------------------------------------------------------ accuracy
def sample_rows(b: int, h: int, lq: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n random (batch, head, row) triples as a long tensor (n, 3)."""
    flat = torch.randperm(b * h * lq, generator=gen, device="cpu")[:n]
    return torch.stack([flat // (h * lq), (flat // lq) % h, flat % lq], -1)


def exact_rows(q, k, v, rows: torch.Tensor, mask: SparseMask | None, causal: bool,
               scale: float) -> torch.Tensor:
    """Float64 attention output for the sampled rows (n, D); rows with no key are zero."""
    outs = []
    lk = k.shape[2]
    keys = torch.arange(lk, device=q.device)
    for bi, hi, i in rows.tolist():
        s = (k[bi, hi].double() @ q[bi, hi, i].double()) * scale
        allowed = torch.ones(lk, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= keys <= i
        if mask is not None:
            allowed &= mask.blocks[bi, hi, i // mask.block_q].repeat_interleave(
                mask.block_k)[:lk]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, 0).nan_to_num(0.0)
        outs.append(p @ v[bi, hi].double())
    return torch.stack(outs)


def rel_l1_rows(out: torch.Tensor, rows: torch.Tensor, exact: torch.Tensor) -> float:
    got = out[rows[:, 0], rows[:, 1], rows[:, 2]].double()
    return float((got - exact).abs().sum() / exact.abs().sum())


# ------------------------------------------------------------------------------------ timing
def launch_quantized(qq, **kwargs):
    """The attention kernel on pre-quantized operands (a ``prepare_qkv`` result); ``kwargs`` are
    :func:`sparge.kernels.launch`'s remaining arguments. Returns Triton's kernel handle."""
    return launch(qq.q, qq.k, qq.v, q_scale=qq.q_scale, k_scale=qq.k_scale, v_scale=qq.v_scale,
                  **kwargs)


@dataclass
class PipelinePair:
    """The full pipeline and the kernel alone on the same masks, for a list of input sets.

    ``pipeline(i)`` runs ``sparge.sparse_attn`` on set i; ``kernel(i)`` runs the attention kernel
    alone on set i's pre-quantized operands and on the mask the pipeline predicts for set i
    (``masks[i]``), writing and returning ``out``; ``block_sparse(i)`` runs
    ``sparge.block_sparse_attn`` on set i and ``masks[i]``: the kernel with its quantization, as
    upstream's kernel times are taken.
    """

    pipeline: Callable[[int], torch.Tensor]
    kernel: Callable[[int], torch.Tensor]
    block_sparse: Callable[[int], torch.Tensor]
    masks: list[SparseMask]

    def sparsity(self) -> float:
        return sum(m.sparsity() for m in self.masks) / len(self.masks)


def pipeline_pair(sets, *, causal: bool, mode: str, pv_threshold: torch.Tensor,
                  out: torch.Tensor, pv_skip: bool = False) -> PipelinePair:
    """Masks, tables and quantized operands of every set, made once before any timing."""
    masks = [sparge.sparse_attn(*s, is_causal=causal, quant=mode, return_stats=True)[1].mask
             for s in sets]
    tables = [block_table(m) for m in masks]
    quant = [prepare_qkv(*s, block_q=BQ, block_k=BK, mode=mode, with_stats=False)[0]
             for s in sets]
    scale = sets[0][0].shape[-1] ** -0.5

    def pipeline(i):
        return sparge.sparse_attn(*sets[i], is_causal=causal, quant=mode)

    def kernel(i):
        launch_quantized(quant[i], out=out, table=tables[i], block_q=BQ, block_k=BK,
                         causal=causal, scale=scale, pv_threshold=pv_threshold, mode=mode,
                         pv_skip=pv_skip)
        return out

    def block_sparse(i):
        return sparge.block_sparse_attn(*sets[i], masks[i], quant=mode)

    return PipelinePair(pipeline, kernel, block_sparse, masks)


def bench(fn_for_set, n_sets: int, warmup: int, rep: int) -> float:
    """Median ms of fn_for_set(i), i rotating over the input sets."""
    state = {"i": 0}

    def step():
        fn_for_set(state["i"] % n_sets)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def graphed(fn_for_set: Callable[[int], torch.Tensor], n_sets: int
            ) -> Callable[[int], torch.Tensor]:
    """``fn_for_set`` with set i's call captured once into a CUDA graph and replayed: what the
    GPU spends on the call's kernels, without the host time of launching them (after one eager
    warm-up call per set, which tunes and compiles outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    captured = []
    with torch.cuda.stream(side):
        for i in range(n_sets):
            fn_for_set(i)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                result = fn_for_set(i)
            captured.append((graph, result))
    torch.cuda.current_stream().wait_stream(side)

    def replay(i: int) -> torch.Tensor:
        graph, result = captured[i]
        graph.replay()
        return result

    # the graphs read the tensors that fn_for_set holds (inputs, tables): keep them alive
    replay.captured_from = fn_for_set
    return replay


def card_name() -> str:
    name = torch.cuda.get_device_name()
    return re.sub(r"[^A-Za-z0-9]+", "-", name.replace("NVIDIA", "")).strip("-")


def flex_block_mask(mask: SparseMask):
    """A FlexAttention BlockMask with the kept blocks of ``mask``: full blocks, except the causal
    diagonal blocks, which are partial with a causal mask_mod (one compiled kernel per causality,
    whatever the mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = mask.blocks
    n_q, n_k = mask.shape[2:]
    if mask.causal:
        first_q = torch.arange(n_q, device=blocks.device) * mask.block_q
        last_k = torch.clamp((torch.arange(n_k, device=blocks.device) + 1) * mask.block_k,
                             max=mask.k_len) - 1
        below = last_k[None, :] <= first_q[:, None]
        full, partial = blocks & below, blocks & ~below
    else:
        full, partial = blocks, torch.zeros_like(blocks)

    def lists(x):
        m = SparseMask(x, mask.block_q, mask.block_k, mask.q_len, mask.k_len, False)
        return m.kv_indices()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def noop_mod(b, h, q_idx, kv_idx):
        return q_idx >= 0

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                    BLOCK_SIZE=(mask.block_q, mask.block_k),
                                    mask_mod=causal_mod if mask.causal else noop_mod,
                                    seq_lengths=(mask.q_len, mask.k_len))


# ------------------------------------------------------------------------------------ one shape
def run_shape(args, b: int, h: int, length: int, d: int, causal: bool, meta: dict,
              log) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gen = torch.Generator(device=DEVICE).manual_seed(1234 + length + d + causal)
    cpu_gen = torch.Generator().manual_seed(99)
    scale = d ** -0.5
    sets = [random_inputs(b, h, length, d, gen) for _ in range(args.sets)]
    local_sets = [local_inputs(b, h, length, d, gen) for _ in range(args.sets)]
    rows_idx = sample_rows(b, h, length, args.rows, cpu_gen)
    flops = 4.0 * b * h * length * length * d / (2 if causal else 1)
    lam = torch.full((h,), 50.0, device=DEVICE)
    out = torch.empty_like(sets[0][0])
    exact_dense = exact_rows(*sets[0], rows_idx, None, causal, scale)
    rows: list[Row] = []

    def record(name, ms, sparsity, err, cudnn_ms=None):
        row = Row(name, meta["card"], meta["torch"], meta["triton"], b, h, length, length, d,
                  causal, sparsity, ms, flops / ms / 1e9, err, cudnn_ms=cudnn_ms)
        rows.append(row)
        log(f"  {name:<44} {ms:9.3f} ms {row.tops:8.1f} TOPS  sparsity {sparsity:.3f}  "
            f"rel_l1 {err if err is None else round(err, 4)}")

    def sdpa_fn(i, backend=SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel(backend):
            return sdpa(*sets[i], is_causal=causal)

    def timed(name, fn, sparsity, exact, mask_for_err=None):
        try:
            result = fn(0)
            torch.cuda.synchronize()
            err = rel_l1_rows(result, rows_idx, exact) if exact is not None else None
            ms = bench(fn, args.sets, args.warmup, args.rep)
        except Exception as exc:  # noqa: BLE001 - a backend missing on this card/build
            log(f"  {name:<44} failed: {type(exc).__name__}: {str(exc)[:200]}")
            return
        # The card's clock drifts with its temperature and power over a run: each row's ratio
        # is to cuDNN timed right after it, in the same state.
        record(name, ms, sparsity, err, bench(sdpa_fn, args.sets, args.warmup, args.rep))

    # SDPA baselines (after a warm-up at full load, so the first rows see a steady clock).
    bench(sdpa_fn, args.sets, args.warmup, 1000)
    timed("sdpa cudnn bf16", sdpa_fn, 0.0, exact_dense)
    timed("sdpa flash bf16", lambda i: sdpa_fn(i, SDPBackend.FLASH_ATTENTION), 0.0, exact_dense)

    # sparge dense quantized: the kernel on pre-quantized inputs, and the whole call.
    quant = [prepare_qkv(*s, block_q=BQ, block_k=BK, mode=args.mode, with_stats=False)[0]
             for s in sets]

    def kernel_fn(table):
        def fn(i):
            launch_quantized(quant[i], out=out, table=table, block_q=BQ, block_k=BK,
                             causal=causal, scale=scale, pv_threshold=lam, mode=args.mode,
                             pv_skip=args.tile_skip)
            return out
        return fn if args.eager_kernel else graphed(fn, args.sets)

    timed("sparge dense int8/fp8 kernel", kernel_fn(None), 0.0, exact_dense)
    timed("sparge quantized_attn (quant + kernel)",
          lambda i: sparge.quantized_attn(*sets[i], is_causal=causal, quant=args.mode), 0.0,
          exact_dense)

    # Block-sparse at fixed fractions of skipped blocks, and FlexAttention with the same masks.
    flex, flex_options = None, {}
    wanted = args.flex_shapes.split(",")
    if not args.no_flex and (args.flex_shapes == "all" or str(length) in wanted
                             or f"{length}:{d}" in wanted):
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    for skip in SPARSITIES:
        mask = random_block_mask(b, h, length, length, causal, skip, gen)
        table = block_table(mask)
        exact_mask = exact_rows(*sets[0], rows_idx, mask, causal, scale)
        pct = int(round(skip * 100))
        sparsity = mask.sparsity()
        timed(f"sparge block-sparse {pct}% kernel", kernel_fn(table), sparsity, exact_mask)
        if skip == SPARSITIES[-1]:
            timed(f"sparge block_sparse_attn {pct}% (quant + kernel)",
                  lambda i, mask=mask: sparge.block_sparse_attn(*sets[i], mask, quant=args.mode),
                  sparsity, exact_mask)
        if flex is not None:
            block_mask = flex_block_mask(mask)
            def flex_fn(i, bm=block_mask):
                opts = flex_options.get("opts")
                if opts is None:
                    return flex(*sets[i], block_mask=bm, scale=scale)
                return flex(*sets[i], block_mask=bm, scale=scale, kernel_options=opts)

            try:  # FlexAttention's tiles must divide the (64, 128) mask blocks
                flex_fn(0)
            except Exception as exc:  # noqa: BLE001
                log(f"  flex_attention with its default tiles failed ({type(exc).__name__}); "
                    "retrying with BLOCK_M 64, BLOCK_N 64")
                flex_options["opts"] = {"BLOCK_M": 64, "BLOCK_N": 64}
            timed(f"flex_attention bf16 {pct}%", flex_fn, sparsity, exact_mask)

    # Full pipeline (prediction + quantization + kernel), random and structured local data, and
    # the kernel alone on each set's predicted mask.
    for data_name, data in (("random", sets), ("local", local_sets)):
        pair = pipeline_pair(data, causal=causal, mode=args.mode, pv_threshold=lam, out=out,
                             pv_skip=args.tile_skip)
        if not args.eager_kernel:
            pair.kernel = graphed(pair.kernel, args.sets)
        exact = exact_dense if data is sets else exact_rows(*data[0], rows_idx, None, causal,
                                                            scale)
        timed(f"sparge sparse_attn pipeline, {data_name} data", pair.pipeline, pair.sparsity(),
              exact)
        exact_m = exact_rows(*data[0], rows_idx, pair.masks[0], causal, scale)
        timed(f"sparge kernel alone, pipeline mask, {data_name}", pair.kernel, pair.sparsity(),
              exact_m)
        del pair

    for r in rows:
        r.speedup_vs_cudnn = r.cudnn_ms / r.ms if r.cudnn_ms else None
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------ output
def markdown(rows: list[Row], meta: dict) -> str:
    lines = [f"# Attention benchmark: {meta['card']}, {meta['date']}", "",
             f"torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta['cuda']}; "
             f"B1 H24, bf16 inputs, layout HND; medians of do_bench over {meta['sets']} rotated "
             "input sets. TOPS are dense-equivalent (4 B H Lq Lk D / time, halved for causal). "
             "rel_l1 on sampled rows against float64 attention (on the same mask for the fixed-"
             "mask rows, dense otherwise). x cuDNN divides the time of SDPA's cuDNN backend, "
             "timed right after each row (its ms in the last column: the clock drifts over a "
             "run), by the row's time. "
             + ("Kernel rows time the launch as called, host time included."
                if meta.get("eager_kernel") else
                "Kernel rows (the kernel alone on pre-quantized inputs) replay a CUDA graph of "
                "the launch: the kernel's GPU time; the public calls run as a caller runs them."),
             ""]
    shapes = sorted({(r.Lq, r.D, r.causal) for r in rows})
    for lq, d, causal in shapes:
        lines += [f"## L{lq} D{d} {'causal' if causal else 'non-causal'}", "",
                  "| name | sparsity | ms | TOPS | x cuDNN | rel L1 | cuDNN ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            if (r.Lq, r.D, r.causal) != (lq, d, causal):
                continue
            sp = "" if r.speedup_vs_cudnn is None else f"{r.speedup_vs_cudnn:.2f}"
            err = "" if r.rel_l1 is None else f"{r.rel_l1:.4f}"
            ref = "" if r.cudnn_ms is None else f"{r.cudnn_ms:.3f}"
            lines.append(f"| {r.name} | {r.sparsity:.3f} | {r.ms:.3f} | {r.tops:.0f} | {sp} | "
                         f"{err} | {ref} |")
        lines.append("")
    if meta.get("configs"):
        lines += ["Kernel configurations chosen (shape class -> BLOCK_M, warps, stages):", ""]
        lines += [f"- {k}: {v}" for k, v in meta["configs"].items()]
    return "\n".join(lines) + "\n"


def parse_shapes(text: str | None, lengths: list[int], dims: list[int],
                 causals: list[bool]) -> list[tuple[int, int, bool]]:
    if text:
        out = []
        for item in text.split(","):
            length, d, causal = item.split(":")
            out.append((int(length), int(d), causal in ("1", "true", "causal")))
        return out
    return [(length, d, c) for length in lengths for d in dims for c in causals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="comma list of L:D:causal (causal 0/1); overrides "
                        "--lengths/--dims/--causal")
    parser.add_argument("--lengths", default="4096,8192,32768")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--causal", default="0,1", help="0, 1 or 0,1")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated while timing")
    parser.add_argument("--rows", type=int, default=256, help="query rows for rel_l1")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--mode", default="auto", help="sparge quantization mode")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--eager-kernel", action="store_true",
                        help="time the kernel rows as launched, host time included (by "
                        "default they replay a CUDA graph of the launch: the kernel's GPU time)")
    parser.add_argument("--tile-skip", action="store_true",
                        help="kernel rows with the tile-level P.V skip branch on")
    parser.add_argument("--flex-shapes", default="all",
                        help="comma list of L or L:D at which to run FlexAttention (each shape "
                        "compiles anew)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    # One compiled flex_attention per shape and mask kind: more than dynamo's default cache
    # holds, and past it dynamo silently falls back to the unfused eager implementation.
    dynamo_config = importlib.import_module("torch._dynamo").config
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 1024)
    if args.mode == "auto":
        args.mode = "int8_fp8" if torch.cuda.get_device_capability() >= (8, 9) else "int8_fp16"

    meta = {"card": card_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": dt.date.today().isoformat(),
            "host": platform.node(), "sets": args.sets, "eager_kernel": args.eager_kernel}
    shapes = parse_shapes(args.shapes, [int(x) for x in args.lengths.split(",")],
                          [int(x) for x in args.dims.split(",")],
                          [x == "1" for x in args.causal.split(",")])
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    log(f"{meta['card']} torch {meta['torch']} triton {meta['triton']}; shapes {shapes}")
    rows: list[Row] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['card']}-{meta['date']}"
    for length, d, causal in shapes:
        log(f"B{args.batch} H{args.heads} L{length} D{d} causal={causal}")
        rows += run_shape(args, args.batch, args.heads, length, d, causal, meta, log)
        table = write_results(rows, meta, out_dir, stem)  # after every shape: partial runs count
    print(table, flush=True)


def write_results(rows: list[Row], meta: dict, out_dir: Path, stem: str) -> str:
    meta["configs"] = {str(k): asdict(v) for k, v in tuned_configs().items()}
    table = markdown(rows, meta)
    (out_dir / f"{stem}.md").write_text(table)
    data = [asdict(r) for r in rows]
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out_dir / "latest.json").write_text(json.dumps(data, indent=1))
    return table


if __name__ == "__main__":
    main()
