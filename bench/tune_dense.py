"""Every launch configuration of the dense quantized kernel against SDPA, in one run on one card.

For each shape it times SDPA (cuDNN and flash backends), then the attention kernel on pre-quantized
inputs under each configuration :func:`sparge.kernels.attention.candidate_configs` offers (the
compiler's register and spill counts beside each), then the whole ``sparge.quantized_attn`` call
with the configuration the autotuner picks. Medians of ``do_bench`` over rotated input sets.

    python bench/tune_dense.py                                  # L32768 D128/D64, L8192 D128
    python bench/tune_dense.py --shapes 32768:128:0 --out bench/results/tune.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import (  # noqa: E402
    bench,
    card_name,
    launch_quantized,
    parse_shapes,
    random_inputs,
)

import sparge  # noqa: E402
from sparge.kernels import prepare_qkv  # noqa: E402
from sparge.kernels.attention import (  # noqa: E402
    KernelConfig,
    candidate_configs,
    tuned_configs,
)

BQ, BK = 64, 128


def run_shape(args, length: int, d: int, causal: bool, log) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    b, h = 1, args.heads
    gen = torch.Generator(device="cuda").manual_seed(length + d)
    sets = [random_inputs(b, h, length, d, gen) for _ in range(args.sets)]
    flops = 4.0 * b * h * length * length * d / (2 if causal else 1)
    scale = d ** -0.5
    lam = torch.full((h,), 50.0, device="cuda")
    out = torch.empty_like(sets[0][0])
    lines = [f"## L{length} D{d} {'causal' if causal else 'non-causal'}", "",
             "| what | ms | TOPS | x cuDNN | regs | spills |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    cudnn_ms = None

    def add(name, ms, regs="", spills=""):
        nonlocal cudnn_ms
        cudnn_ms = cudnn_ms or ms
        tops = flops / ms / 1e9
        lines.append(f"| {name} | {ms:.3f} | {tops:.0f} | {cudnn_ms / ms:.3f} | {regs} | "
                     f"{spills} |")
        log(f"  {name:<48} {ms:8.3f} ms {tops:7.1f} TOPS x{cudnn_ms / ms:.3f} {regs} {spills}")

    for backend, name in ((SDPBackend.CUDNN_ATTENTION, "sdpa cudnn bf16"),
                          (SDPBackend.FLASH_ATTENTION, "sdpa flash bf16")):
        def sdpa_fn(i, backend=backend):
            with sdpa_kernel(backend):
                return sdpa(*sets[i], is_causal=causal)
        add(name, bench(sdpa_fn, args.sets, args.warmup, args.rep))

    quant = [prepare_qkv(*s, block_q=BQ, block_k=BK, mode="int8_fp8", with_stats=False)[0]
             for s in sets]
    cap = torch.cuda.get_device_capability()
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    configs = candidate_configs(cap, d, BQ, block_k=BK, smem_bytes=smem)
    configs += [c for c in (KernelConfig(64, 4, 3, 128),) if c not in configs]
    for cfg in configs:
        handle = {}

        def fn(i, cfg=cfg, handle=handle):
            handle["k"] = launch_quantized(quant[i], out=out, table=None, block_q=BQ,
                                           block_k=BK, causal=causal, scale=scale,
                                           pv_threshold=lam, mode="int8_fp8", config=cfg)
        try:
            ms = bench(fn, args.sets, args.warmup, args.rep)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile here
            log(f"  {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}")
            continue
        kern = handle["k"]
        add(f"kernel M{cfg.block_m} N{BK} {cfg.num_warps}w {cfg.num_stages}s "
            f"{cfg.max_registers or '-'}r", ms, kern.n_regs, kern.n_spills)

    add("quantized_attn (pre-pass + autotuned kernel)",
        bench(lambda i: sparge.quantized_attn(*sets[i], is_causal=causal, quant="int8_fp8"),
              args.sets, args.warmup, args.rep))
    lines += ["", f"autotuned: {tuned_configs()}", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32768:128:0,32768:64:0,8192:128:0")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--out", help="write the tables (markdown) to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_dense.py needs a CUDA GPU")

    def log(msg):
        print(msg, flush=True)

    head = [f"# Dense kernel configurations: {card_name()}", "",
            f"torch {torch.__version__}, Triton {triton.__version__}; B1 H{args.heads} bf16, "
            f"medians of do_bench over {args.sets} rotated input sets.", ""]
    lines = list(head)
    for length, d, causal in parse_shapes(args.shapes, [], [], []):
        log(f"L{length} D{d} causal={causal}")
        lines += run_shape(args, length, d, causal, log)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
