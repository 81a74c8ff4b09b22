"""``block_sparse_attn`` at short lengths in its quantized mode and with ``quant="none"`` (no
pre-pass, bf16 products), beside FlexAttention on the same masks and cuDNN dense (CUDA).

    PYTHONPATH=src python3 bench/short_quant_modes.py

B1 H24 bf16 random inputs, L 4096 and 8192, D 64 and 128, causal and not, random block masks
skipping 50, 75 and 90 % of the blocks; do_bench medians (ms) over three rotated input sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_attention import bench, flex_block_mask, random_block_mask, random_inputs  # noqa: E402

import sparge  # noqa: E402

SETS = 3


def main() -> None:
    flex = torch.compile(flex_attention, dynamic=False)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for length in (4096, 8192):
        for d in (64, 128):
            for causal in (False, True):
                sets = [random_inputs(1, 24, length, d, gen) for _ in range(SETS)]
                cudnn = bench(lambda i, sets=sets, causal=causal:
                              torch.nn.functional.scaled_dot_product_attention(
                                  *sets[i], is_causal=causal), SETS, 25, 200)
                line = f"L{length} D{d} c{int(causal)} cudnn {cudnn:.3f} |"
                for skip in (0.5, 0.75, 0.9):
                    mask = random_block_mask(1, 24, length, length, causal, skip, gen)
                    times = [bench(lambda i, sets=sets, mask=mask, mode=mode:
                                   sparge.block_sparse_attn(*sets[i], mask, quant=mode),
                                   SETS, 25, 200) for mode in ("int8_fp8", "none")]
                    block_mask = flex_block_mask(mask)
                    try:  # FlexAttention's tiles must divide the (64, 128) mask blocks
                        flex(*sets[0], block_mask=block_mask)
                        options = None
                    except Exception:  # noqa: BLE001
                        options = {"BLOCK_M": 64, "BLOCK_N": 64}
                    flex_ms = bench(lambda i, sets=sets, bm=block_mask, opts=options:
                                    flex(*sets[i], block_mask=bm, kernel_options=opts),
                                    SETS, 25, 200)
                    line += (f" {int(skip * 100)}%: int8 {times[0]:.3f} none {times[1]:.3f} "
                             f"flex {flex_ms:.3f} |")
                print(line, flush=True)


if __name__ == "__main__":
    main()
