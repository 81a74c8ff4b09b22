"""Compile the attention kernel for the benchmark's shapes and report what the compiler made of it:
registers, spills, shared memory, and which matrix instructions the PTX holds.

    python bench/kernel_info.py [--out DIR]     # writes DIR/kernel_info.txt and the PTX files
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import launch_quantized  # noqa: E402

from sparge.kernels import block_table, prepare_qkv  # noqa: E402
from sparge.kernels.attention import candidate_configs  # noqa: E402
from sparge.mask import SparseMask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    cap = torch.cuda.get_device_capability()
    for d in (64, 128):
        q, k, v = (torch.randn(1, 4, 4096, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        quant, _, _ = prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8",
                                  with_stats=False)
        out = torch.empty_like(q)
        lam = torch.full((4,), 50.0, device="cuda")
        mask = SparseMask.full(1, 4, 4096, 4096, 64, 128, False, "cuda")
        for sparse in (False, True):
            for cfg in candidate_configs(cap, d, 64):
                try:
                    kern = launch_quantized(quant, out=out,
                                            table=block_table(mask) if sparse else None,
                                            block_q=64, block_k=128, causal=False,
                                            scale=d ** -0.5, pv_threshold=lam, mode="int8_fp8",
                                            pv_skip=sparse, config=cfg)
                except Exception as exc:  # noqa: BLE001
                    lines.append(f"D{d} sparse={sparse} {cfg}: failed {type(exc).__name__}: "
                                 f"{str(exc)[:300]}")
                    continue
                ptx = kern.asm["ptx"]
                mma = Counter(re.findall(r"(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx))
                smem = getattr(kern.metadata, "shared", None)
                lines.append(f"D{d} sparse={sparse} {cfg}: regs {kern.n_regs} spills "
                             f"{kern.n_spills} shared {smem} mma {dict(mma)}")
                if cfg == candidate_configs(cap, d, 64)[0]:
                    name = f"attn_d{d}_{'sparse' if sparse else 'dense'}"
                    (out_dir / f"{name}.ptx").write_text(ptx)
    text = "\n".join(lines)
    print(text)
    (out_dir / "kernel_info.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
