"""The ``sparge`` command line (also ``python -m sparge``).

- ``sparge info``: versions, devices, and which execution path each entry point takes, and why.
- ``sparge demo``: sparse attention on a synthetic video-like token sequence, against exact
  attention: sparsity, relative L1 error and time.
- ``sparge selftest``: every entry point against ``scaled_dot_product_attention`` (math backend),
  PASS/FAIL with the numbers and tolerances; the exit status is 1 if anything fails. The
  attention kernel runs each shape's default launch configuration unless ``--tune`` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparge

from . import backend as dispatch
from . import settings
from ._inputs import MAX_HEAD_DIM
from .mask import SparseMask

ENTRY_POINTS = ("sparse_attn", "block_sparse_attn", "quantized_attn", "predict_mask")


# ------------------------------------------------------------------------------------ helpers
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available here")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int,
           warmup: int) -> tuple[torch.Tensor, float]:
    """Run ``fn`` ``warmup`` + ``repeats`` times; returns the last result and the median seconds."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum |out - ref| / sum |ref|, computed in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-300))


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              token_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Exact attention, float32, SDPA math backend, layout HND, GQA by repeating K and V.

    ``token_mask`` is bool (B or 1, H or 1, Lq, Lk), True = attend. Rows with no allowed key are
    zero (SDPA would give NaN), matching sparge's rule.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=token_mask,
                                             is_causal=is_causal)
    if token_mask is not None:
        out = out.nan_to_num(0.0).masked_fill(~token_mask.any(-1, keepdim=True), 0.0)
    return out


def video_like_qkv(seq_len: int, heads: int, head_dim: int = 64, *, height: int = 24,
                   width: int = 32, batch: int = 1, seed: int = 0,
                   lengthscale: tuple[float, float, float] = (3.0, 10.0, 24.0),
                   sharpness: float = 60.0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A synthetic video-like token sequence whose attention is local in space and time.

    Tokens are the pixels of frames of ``height`` x ``width`` in raster order (frame, row,
    column), ``seq_len`` of them (the last frame may be partial). Q and K of each head are random
    Fourier features of the token's (t, y, x) position with the given length scales (in frames,
    rows, columns), so that <q_i, k_j> ~ exp(-|p_i - p_j|^2 / 2) smoothly decays with distance;
    ``sharpness`` (the score of a token with itself, times sqrt(D)) makes attention concentrate
    on nearby tokens. V is a smooth function of the position plus noise. Deterministic for a seed.

    Returns:
        q, k, v: (batch, heads, seq_len, head_dim) in ``dtype`` on ``device`` (layout HND).
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    gen = torch.Generator().manual_seed(seed)
    per_frame = height * width
    frames = -(-seq_len // per_frame)
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width),
                             indexing="ij")
    pos = torch.stack([t, y, x], dim=-1).reshape(-1, 3)[:seq_len].float()
    half = head_dim // 2
    freqs = torch.randn(batch, heads, half, 3, generator=gen) / torch.tensor(lengthscale)
    phase = torch.rand(batch, heads, 1, half, generator=gen) * 2 * math.pi
    angle = torch.einsum("bhmc,lc->bhlm", freqs, pos) + phase
    feat = torch.cat([angle.cos(), angle.sin()], dim=-1) / math.sqrt(half)  # <f_i, f_i> = 1
    amp = math.sqrt(sharpness * math.sqrt(head_dim))
    shape = (batch, heads, seq_len, head_dim)
    q = amp * feat + 0.05 * torch.randn(shape, generator=gen)
    k = amp * feat + 0.05 * torch.randn(shape, generator=gen)
    mix = torch.randn(batch, heads, head_dim, head_dim, generator=gen)
    v = feat @ mix * math.sqrt(half / head_dim) + 0.1 * torch.randn(shape, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- info
def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices and the execution path of every entry point."""
    print(f"sparge          {sparge.__version__}")
    print(f"python          {platform.python_version()} ({platform.system()} "
          f"{platform.machine()})")
    print(f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton          {dispatch.triton_version() or 'not installed'}")
    for switch in settings.SWITCHES:
        state = "on" if switch.enabled() else "off"
        print(f"{switch.name}={switch.value()}  ({state}: {switch.meaning})")
    kernels = importlib.util.find_spec("sparge.kernels") is not None
    print(f"sparge.kernels  {'present' if kernels else 'missing'}")
    print()
    print("devices:")
    for device in _devices():
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            fp8 = "yes" if dispatch.has_fp8_tensor_cores(device) else "no"
            print(f"  {device}: {torch.cuda.get_device_name(device)}, compute capability "
                  f"{major}.{minor}, FP8 tensor cores: {fp8}")
        else:
            print(f"  {device}: {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} logical CPUs")
    print()
    print("execution path (backend='auto', quant='auto'):")
    for device in _devices():
        ok, why = dispatch.triton_status(device)
        path = dispatch.choose_backend("auto", device)
        quant = dispatch.choose_quant("auto", device)
        if path == "triton":
            reason = f"Triton kernels: {why}"
        elif ok:
            reason = f"PyTorch reference ({why}; used only with backend='triton')"
        else:
            reason = f"PyTorch reference: {why}"
        pv = ("FP8 e4m3 PV (FP8 tensor cores)" if quant == "int8_fp8"
              else "FP16 PV (no FP8 tensor cores)")
        for entry in ENTRY_POINTS:
            precision = {"predict_mask": "no quantization (mask only)"}.get(
                entry, f"INT8 QK, {pv}")
            print(f"  {str(device):8s} {entry:18s} -> {path:9s} {precision}")
        print(f"  {'':8s} {'spas_sage_attn.*':18s} -> as sparse_attn / block_sparse_attn")
        print(f"  {'':8s} why: {reason}")
    return 0


# --------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Exact attention against sparse attention on a synthetic video-like sequence."""
    device = _device(args.device)
    on_gpu = device.type == "cuda"
    if args.quick:
        seq_len, heads = 1024, 1
    else:
        seq_len = args.seq_len or (32768 if on_gpu else 12288)
        heads = args.heads or (8 if on_gpu else 4)
    head_dim = args.head_dim or (128 if on_gpu else 64)
    dtype = torch.float16 if on_gpu else torch.float32
    path = dispatch.choose_backend("auto", device)
    quant = dispatch.choose_quant("auto", device)
    frame = args.height * args.width
    print(f"sparge demo: {seq_len} tokens (frames of {args.height}x{args.width}, "
          f"{-(-seq_len // frame)} frames), {heads} heads, head dim {head_dim}, {dtype}, "
          f"{device} ({path} path, {quant})", flush=True)

    print("[1/3] building the video-like sequence ...", flush=True)
    q, k, v = video_like_qkv(seq_len, heads, head_dim, height=args.height, width=args.width,
                             seed=args.seed, dtype=dtype, device=device)

    print("[2/3] exact attention (scaled_dot_product_attention) ...", flush=True)
    ref, t_dense = _timed(lambda: F.scaled_dot_product_attention(q, k, v), device,
                          repeats=5 if on_gpu else 2, warmup=1 if on_gpu else 0)
    print(f"      {t_dense * 1e3:.1f} ms", flush=True)

    print(f"[3/3] sparge.sparse_attn (cdf_threshold={args.cdf_threshold}, "
          f"sim_threshold={args.sim_threshold}) ...", flush=True)
    options = dict(sim_threshold=args.sim_threshold, cdf_threshold=args.cdf_threshold)
    if on_gpu:  # time the call alone; the statistics (a read-back) come from one more call
        print("      first call (compiles and tunes the kernels; Triton keeps them on disk for "
              "later runs) ...", end=" ", flush=True)
        _, t_first = _timed(lambda: sparge.sparse_attn(q, k, v, **options), device, repeats=1,
                            warmup=0)
        print(f"{t_first:.1f} s", flush=True)
        _, t_sparse = _timed(lambda: sparge.sparse_attn(q, k, v, **options), device, repeats=5,
                             warmup=0)
        out, stats = sparge.sparse_attn(q, k, v, return_stats=True, **options)
    else:  # one call: the reference path is slow and the read-back is negligible next to it
        start = time.perf_counter()
        out, stats = sparge.sparse_attn(q, k, v, return_stats=True, **options)
        t_sparse = time.perf_counter() - start
    print(f"      {t_sparse * 1e3:.1f} ms", flush=True)

    err = rel_l1(out, ref)
    per_head = ", ".join(f"{s:.2f}" for s in stats.per_head_sparsity.tolist())
    print()
    print(f"sparsity          {stats.sparsity:.3f} of the key blocks skipped "
          f"(per head: {per_head})")
    print(f"relative L1 error {err:.4f} (sum|o - o_exact| / sum|o_exact|)")
    print(f"time              sparge {t_sparse * 1e3:.1f} ms vs SDPA {t_dense * 1e3:.1f} ms "
          f"(speed-up {t_dense / t_sparse:.3g}x)")
    if path == "reference":
        print("note: the PyTorch reference path ran (no Triton-capable GPU here): it is the "
              "specification the GPU kernels follow, not a tuned kernel; its time reflects the "
              "skipped blocks, not the GPU kernels' speed.")
    return 0


# ----------------------------------------------------------------------------------- selftest
@dataclass
class Check:
    """One selftest line: a measured value against a bound."""

    name: str
    value: float
    bound: float
    metric: str = "rel L1"
    above: bool = False  # pass when value >= bound instead of value <= bound

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.bound if self.above else self.value <= self.bound

    def line(self) -> str:
        op = ">=" if self.above else "<="
        status = "PASS" if self.passed else "FAIL"
        return f"{status}  {self.name:62s} {self.metric} = {self.value:.3g} ({op} {self.bound:g})"


def _random_qkv(batch: int, heads_q: int, heads_k: int, q_len: int, k_len: int, dim: int,
                dtype: torch.dtype, device: torch.device, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, q_len, dim, generator=gen)
    k = torch.randn(batch, heads_k, k_len, dim, generator=gen)
    v = torch.randn(batch, heads_k, k_len, dim, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def selftest_checks(device: torch.device, dtype: torch.dtype, seed: int = 0
                    ) -> list[tuple[str, Callable[[], list[Check]]]]:
    """The selftest, as (group name, function returning its checks) pairs."""
    exact_tol = 1e-5 if dtype == torch.float32 else 1e-2
    quant_tol = 0.05
    rand = _random_qkv(2, 4, 2, 333, 333, 64, dtype, device, seed)  # GQA, ragged last block
    video = video_like_qkv(1536, 2, 64, height=16, width=32, seed=seed, dtype=dtype,
                           device=device)

    def token_mask(mask: SparseMask) -> torch.Tensor:
        return mask.to_token_mask()

    def quantized() -> list[Check]:
        q, k, v = rand
        ref = sdpa_math(q, k, v)
        return [
            Check("quantized_attn quant='none' vs SDPA", rel_l1(
                sparge.quantized_attn(q, k, v, quant="none"), ref), exact_tol),
            Check("quantized_attn (INT8 QK, auto PV) vs SDPA", rel_l1(
                sparge.quantized_attn(q, k, v), ref), quant_tol),
            Check("quantized_attn causal vs SDPA is_causal", rel_l1(
                sparge.quantized_attn(q, k, v, is_causal=True),
                sdpa_math(q, k, v, is_causal=True)), quant_tol),
        ]

    def sparse_cdf() -> list[Check]:
        q, k, v = rand
        checks = [Check("sparse_attn CDF, random input vs SDPA", rel_l1(
            sparge.sparse_attn(q, k, v), sdpa_math(q, k, v)), quant_tol)]
        q, k, v = video
        out, stats = sparge.sparse_attn(q, k, v, return_stats=True)
        exact, _ = sparge.sparse_attn(q, k, v, quant="none", return_stats=True)
        masked = sdpa_math(q, k, v, token_mask=token_mask(stats.mask))
        checks += [
            Check("sparse_attn CDF, video-like: sparsity", stats.sparsity, 0.2, "sparsity",
                  above=True),
            Check("sparse_attn CDF, video-like, quant='none' vs masked SDPA",
                  rel_l1(exact, masked), exact_tol),
            Check("sparse_attn CDF, video-like vs masked SDPA", rel_l1(out, masked), quant_tol),
            Check("sparse_attn CDF, video-like vs full SDPA", rel_l1(out, sdpa_math(q, k, v)),
                  quant_tol),
        ]
        return checks

    def sparse_topk() -> list[Check]:
        q, k, v = video
        out, stats = sparge.sparse_attn(q, k, v, sim_threshold=-0.1, topk=0.5, is_causal=True,
                                        return_stats=True)
        masked = sdpa_math(q, k, v, token_mask=token_mask(stats.mask))
        return [
            Check("sparse_attn top-k 0.5 causal: sparsity", stats.sparsity, 0.2, "sparsity",
                  above=True),
            Check("sparse_attn top-k 0.5 causal vs masked SDPA", rel_l1(out, masked),
                  quant_tol),
            Check("sparse_attn NHD layout vs HND", rel_l1(
                sparge.sparse_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   sim_threshold=-0.1, topk=0.5, is_causal=True,
                                   layout="NHD").transpose(1, 2), out), exact_tol),
        ]

    def block_sparse() -> list[Check]:
        q, k, v = _random_qkv(1, 4, 1, 200, 450, 64, dtype, device, seed + 1)  # MQA, Lq != Lk
        gen = torch.Generator().manual_seed(seed + 2)
        blocks = (torch.rand(1, 4, 4, 4, generator=gen) < 0.5).to(device)
        mask = SparseMask(blocks, 64, 128, 200, 450)
        masked = sdpa_math(q, k, v, token_mask=token_mask(mask))
        return [
            Check("block_sparse_attn quant='none' vs masked SDPA (MQA, Lq!=Lk)", rel_l1(
                sparge.block_sparse_attn(q, k, v, mask, quant="none"), masked), exact_tol),
            Check("block_sparse_attn vs masked SDPA (MQA, Lq!=Lk)", rel_l1(
                sparge.block_sparse_attn(q, k, v, mask), masked), quant_tol),
        ]

    def predictor() -> list[Check]:
        q, k, v = video
        _, stats = sparge.sparse_attn(q, k, v, return_stats=True)
        alone = sparge.predict_mask(q, k)
        differ = float((alone.blocks != stats.mask.blocks).sum())
        return [Check("predict_mask equals sparse_attn's mask", differ, 0.0, "blocks differing")]

    def compat() -> list[Check]:
        import spas_sage_attn
        from spas_sage_attn.utils import get_block_map_meansim

        q, k, v = _random_qkv(2, 4, 4, 128, 128, 128, dtype, device, seed + 3)
        checks = [Check("spas_sage_attn_meansim vs SDPA (upstream's test)", rel_l1(
            spas_sage_attn.spas_sage_attn_meansim(q, k, v), sdpa_math(q, k, v)), quant_tol)]
        q, k, v = video
        blocks = get_block_map_meansim(q, k, simthreshd1=-0.1, cdfthreshd=None, topk=0.5)
        masked = sdpa_math(q, k, v, token_mask=token_mask(
            SparseMask(blocks, 128, 64, q.shape[2], k.shape[2])))
        checks.append(Check("spas_sage2_attn_meansim_topk_cuda vs masked SDPA", rel_l1(
            spas_sage_attn.spas_sage2_attn_meansim_topk_cuda(q, k, v), masked), quant_tol))
        gen = torch.Generator().manual_seed(seed + 4)
        for block_q, block_k in ((128, 64), (64, 128)):
            mask = SparseMask((torch.rand(1, 2, -(-1536 // block_q), -(-1536 // block_k),
                                          generator=gen) < 0.4).to(device),
                              block_q, block_k, 1536, 1536)
            out = spas_sage_attn.block_sparse_sage2_attn_cuda(
                q, k, v, mask_id=mask.blocks.to(torch.int8))
            checks.append(Check(f"block_sparse_sage2_attn_cuda, mask_id {block_q}x{block_k} "
                                "vs masked SDPA",
                                rel_l1(out, sdpa_math(q, k, v, token_mask=token_mask(mask))),
                                quant_tol))
        return checks

    return [("quantized_attn", quantized), ("sparse_attn (CDF)", sparse_cdf),
            ("sparse_attn (top-k)", sparse_topk), ("block_sparse_attn", block_sparse),
            ("predict_mask", predictor), ("spas_sage_attn", compat)]


def cmd_selftest(args: argparse.Namespace) -> int:
    """Run every check; exit status 1 if any fails."""
    device = _device(args.device)
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}[args.dtype]
    path = dispatch.choose_backend("auto", device)
    print(f"sparge selftest: {device}, {dtype}, {path} path, "
          f"{dispatch.choose_quant('auto', device)}; reference: SDPA math backend in float32",
          flush=True)
    if path == "triton" and device.type == "cuda":
        if args.tune:
            tuning = "times the attention kernel's launch configurations of each shape, as calls do"
        else:
            tuning = ("runs each shape's default launch configuration (--tune times them all, "
                      "as calls do)")
        print(f"(the kernels compile on a first run, which Triton keeps on disk for later runs; "
              f"the selftest {tuning})", flush=True)
    failed = 0
    total = 0
    with settings.AUTOTUNE.forced(args.tune):
        for group, run in selftest_checks(device, dtype, args.seed):
            try:
                checks = run()
            except Exception as err:  # noqa: BLE001 - a crash is a failure to report
                print(f"FAIL  {group}: {type(err).__name__}: {err}", flush=True)
                failed += 1
                total += 1
                continue
            for check in checks:
                print(check.line(), flush=True)
                failed += not check.passed
                total += 1
    print()
    if failed:
        print(f"{failed} of {total} checks FAILED")
        return 1
    print(f"all {total} checks passed")
    return 0


# --------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparge", description="Training-free sparse + quantized attention.")
    parser.add_argument("--version", action="version", version=f"sparge {sparge.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, devices and the execution path of each entry point")

    demo = sub.add_parser("demo", help="sparse vs exact attention on a video-like sequence")
    demo.add_argument("--seq-len", type=int, default=None,
                      help="tokens (default 12288 on CPU, 32768 on a GPU)")
    demo.add_argument("--heads", type=int, default=None, help="heads (default 4 CPU, 8 GPU)")
    demo.add_argument("--head-dim", type=int, default=None, help="head dim (64 CPU, 128 GPU)")
    demo.add_argument("--height", type=int, default=24, help="frame height in tokens")
    demo.add_argument("--width", type=int, default=32, help="frame width in tokens")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--cdf-threshold", type=float, default=0.98)
    demo.add_argument("--sim-threshold", type=float, default=0.6)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="a small run (1024 tokens, 1 head) that takes seconds")

    test = sub.add_parser("selftest", help="check every entry point against SDPA")
    test.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    test.add_argument("--dtype", default="auto",
                      choices=("auto", "float32", "float16", "bfloat16"),
                      help="input dtype (auto: float16 on a GPU, float32 on the CPU)")
    test.add_argument("--seed", type=int, default=0)
    test.add_argument("--tune", action="store_true",
                      help="time every launch configuration of the attention kernel, as calls "
                           "do, instead of running each shape's default one (more to compile on "
                           "a first run)")
    return parser


def _demo_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the demo's options, found before any work is done (or None)."""
    if args.head_dim is not None and (args.head_dim % 2 or args.head_dim > MAX_HEAD_DIM):
        return f"--head-dim must be even and at most {MAX_HEAD_DIM}, got {args.head_dim}"
    if not 0 < args.cdf_threshold <= 1:
        return f"--cdf-threshold must be in (0, 1], got {args.cdf_threshold}"
    if not math.isfinite(args.sim_threshold):
        return f"--sim-threshold must be finite, got {args.sim_threshold}"
    if args.quick and (args.seq_len is not None or args.heads is not None):
        return "--quick sets the size (1024 tokens, 1 head): leave out --seq-len and --heads"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparge`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    for name in ("seq_len", "heads", "head_dim", "height", "width"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    error = _demo_error(args) if args.command == "demo" else None
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = {"info": cmd_info, "demo": cmd_demo, "selftest": cmd_selftest}[args.command]
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
