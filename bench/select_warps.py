"""Device time of the selection kernel (which also writes the lookup table) and of the lookup-table
kernel (the table of a given mask), by warps per program.

    PYTHONPATH=src python3 bench/select_warps.py [--warps 1,2,4,8] [--rule topk]

For B1 H24, D128, L 4096 / 8192 / 32768 / 65536, causal and not, on structured local data, with
the CDF rule (``Selection(0.6, 0.98)``, ``sparse_attn``'s default) or the top-k rule
(``Selection(0.6, None, 0.5)``), each
kernel's mean device time over a few profiled calls (``torch.profiler``) for each warp count, and
the fraction of the selection's blocks that differ from the default's mask (the softmax sum and
the cumulative sum add in an order that depends on the layout, so a block within rounding of the
CDF threshold may flip).
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

from bench_attention import local_inputs  # noqa: E402
from profile_calls import kernel_times  # noqa: E402

from sparge.kernels import select  # noqa: E402
from sparge.kernels.prepass import prepare_qkv  # noqa: E402
from sparge.predict import Selection  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--lengths", default="4096,8192,32768,65536")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rule", choices=("cdf", "topk"), default="cdf")
    args = parser.parse_args()
    selection = Selection(0.6, 0.98) if args.rule == "cdf" else Selection(0.6, None, 0.5)
    default = select._warps_per_row
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; B1 H24 D128, local data, {selection}")
    print("| L | causal | warps | select kernel us | blocks differing from default "
          "| table kernel us |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v = local_inputs(1, 24, length, 128, gen)
        _, q_stats, k_stats = prepare_qkv(q, k, v, block_q=64, block_k=128, mode="int8_fp8",
                                          with_stats=True)
        for causal in (False, True):
            def call(q_stats=q_stats, k_stats=k_stats, length=length, causal=causal):
                return select.select_with_table(q_stats, k_stats, selection,
                                                q_len=length, k_len=length, block_q=64,
                                                block_k=128, causal=causal)

            reference = call()[0].blocks.clone()
            for warps in (int(x) for x in args.warps.split(",")):
                select._warps_per_row = lambda nkp, w=warps: w
                blocks = call()[0].blocks
                differ = (blocks != reference).float().mean().item()
                mask = call()[0]
                select_us = dict(kernel_times(call, args.calls))["_select_kernel"]
                table_us = dict(kernel_times(lambda mask=mask: select.mask_table(mask),
                                             args.calls))["_lut_kernel"]
                print(f"| {length} | {causal} | {warps} | {select_us:.1f} | {differ:.1e} "
                      f"| {table_us:.1f} |", flush=True)
            select._warps_per_row = default


if __name__ == "__main__":
    main()
