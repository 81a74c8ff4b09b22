"""A short program for a profiler: the dense attention kernel on one shape and configuration,
launched a few times on pre-quantized inputs (the pre-pass runs once, before).

    ncu --clock-control none --kernel-name regex:_sparse_attn_fwd --launch-skip 2 \\
        --launch-count 1 --section SchedulerStats --section WarpStateStats \\
        python bench/profile_target.py --length 8192 --dim 128 --stages 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import launch_quantized  # noqa: E402

from sparge.kernels import prepare_qkv  # noqa: E402
from sparge.kernels.attention import KernelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--max-registers", type=int, default=None)
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args()
    q, k, v = (torch.randn(1, args.heads, args.length, args.dim, device="cuda",
                           dtype=torch.bfloat16) for _ in range(3))
    quant = prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8", with_stats=False)[0]
    out = torch.empty_like(q)
    lam = torch.full((args.heads,), 50.0, device="cuda")
    cfg = KernelConfig(args.block_m, args.warps, args.stages, args.max_registers)
    for _ in range(args.launches):
        launch_quantized(quant, out=out, table=None, block_q=64, block_k=128, causal=False,
                         scale=args.dim ** -0.5, pv_threshold=lam, mode="int8_fp8", config=cfg)
    torch.cuda.synchronize()
    print(f"done: {cfg}")


if __name__ == "__main__":
    main()
