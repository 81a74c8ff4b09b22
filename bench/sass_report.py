"""What the compiler makes of a kernel, without a GPU.

Compiles a kernel ahead of time for an NVIDIA target (default sm_90) with Triton's bundled
``ptxas``, disassembles it with the bundled ``nvdisasm`` and reports the registers, the spill
stack and the shared memory, then:

- ``--kernel attention`` (default), ``_sparse_attn_fwd``: the instruction mix of each loop body
  that issues matrix instructions (the per-key-tile work), with the count per score element;
- ``--kernel quantize``, the pre-pass's ``_quantize_kernel`` for the jobs of ``--jobs`` in the
  launch shape the library gives them (``--stats`` for the block statistics): the largest basic
  blocks' instruction mix;
- ``--kernel select``, the block selection's ``_select_kernel`` for rows of ``--key-blocks``
  (padded to a power of two; ``--causal``, ``--topk``), with its lookup table: the instruction
  count and the largest basic blocks' mix.

Integer strides are assumed divisible by 16 and the innermost stride 1, as Triton specialises
them for contiguous tensors at launch.

    python bench/sass_report.py                       # D128, BLOCK_M 64, 4 warps, 3 stages
    python bench/sass_report.py --dim 64 --max-registers 168 --block-n 128 --arch 90
    python bench/sass_report.py --kernel quantize --jobs QK --stats
    python bench/sass_report.py --kernel select --key-blocks 512 --causal
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
attention = importlib.import_module("sparge.kernels.attention")
prepass = importlib.import_module("sparge.kernels.prepass")
launcher = importlib.import_module("sparge.kernels.launcher")
select = importlib.import_module("sparge.kernels.select")

POINTERS = {"Q": "*i8", "K": "*i8", "V": "*fp8e4nv", "Out": "*bf16", "QS": "*fp32", "KS": "*fp32",
            "KSMax": "*fp32", "VS": "*fp32", "Lam": "*fp32", "Counts": "*i32", "NFull": "*i32",
            "Indices": "*i32", "Addresses": "*i64"}
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_od", "group")


def dependent(args) -> bool:
    """Whether the kernel is compiled for programmatic dependent launch, as the library
    launches it from sm90 on where Triton can compile it (``--no-pdl``: without)."""
    return args.arch >= 90 and not args.no_pdl and launcher.gdc_wait is not None


def source(fn, signature: dict, constants: dict, aligned: list) -> ASTSource:
    """``fn`` to compile with argument types ``signature``, the ``constants`` folded in, and the
    ``aligned`` arguments (pointers, strides) known divisible by 16, as Triton specialises them
    at launch."""
    names = list(fn.arg_names)
    return ASTSource(fn, signature,
                     constexprs={(names.index(n),): v for n, v in constants.items()},
                     attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})


def compile_kernel(args) -> triton.compiler.CompiledKernel:
    """The attention kernel as the library launches it on ``args.arch``: FP8 P.V (the
    K-major FP8 V buffer) from sm89 on, FP16 P.V before; TMA descriptors from sm90 on unless
    ``--no-tma``."""
    fn = attention._sparse_attn_fwd
    names = list(fn.arg_names)
    fp8 = args.arch >= 89
    tma = args.arch >= 90 and not args.no_tma
    constants = dict(HEAD_DIM=args.dim, BLOCK_M=args.block_m, BLOCK_N=args.block_n,
                     BLOCK_Q=args.block_m, MODE=0 if fp8 else 1, CAUSAL=args.causal,
                     SPARSE=args.sparse, PV_SKIP=False, EVEN_D=True, IEEE_DOT=False,
                     ROUND_FP8=False, FAST_CVT=True, FOLD=not args.no_fold, TMA=tma,
                     ONES_SPLAT=attention.ones_splat(divmod(args.arch, 10)), INDIRECT=False,
                     PDL=dependent(args))
    if not tma:
        constants.update(KDesc=None, VDesc=None)
    # unit strides: the channels of Q, K and the output, V's keys in the FP8 buffer (its channels
    # in the float16 V), and the GQA group
    constants.update({n: 1 for n in (*UNIT_STRIDES, "stride_vn" if fp8 else "stride_vd")})
    pointers = dict(POINTERS, V="*fp8e4nv" if fp8 else "*fp16")
    signature = {}
    for n in names:
        if n in pointers:
            signature[n] = pointers[n]
        elif n in ("KDesc", "VDesc") and tma:
            block = [args.block_n, args.dim] if n == "KDesc" else [args.dim, args.block_n]
            signature[n] = f"tensordesc<{POINTERS[n[0]][1:]}{block}>"
        elif n in constants:
            signature[n] = "constexpr"
        else:
            signature[n] = "fp32" if n == "sm_scale_log2" else "i32"
    aligned = [n for n in names if signature[n] != "constexpr"
               and n not in ("heads_q", "sm_scale_log2", "heads_per_group")]
    src = source(fn, signature, constants, aligned)
    options = dict(num_warps=args.warps, num_stages=args.stages, enable_fp_fusion=True,
                   **({"launch_pdl": True} if dependent(args) else {}))
    if args.max_registers:
        options["maxnreg"] = args.max_registers
    return triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=options)


def compile_quantize(args) -> tuple[triton.compiler.CompiledKernel, str]:
    """``_quantize_kernel`` for bf16 inputs and the jobs of ``args.jobs``, in the launch shape
    ``prepass._quantize`` gives them; returns the kernel and a description of the shape."""
    fn = prepass._quantize_kernel
    names = list(fn.arg_names)
    shape = prepass._launch_shape(args.stats, any(j in args.jobs for j in "QK"),
                                  divmod(args.arch, 10))
    block_q, block_k = args.block_m, args.block_n
    v_fp8 = args.arch >= 89  # FP8 V where the GPU has FP8 tensor cores, else its float16 cast
    # one-warp statistics programs take K's channel mean finished by the launch before
    constants = prepass._constants(shape, args.dim, block_q, block_k, quant=True,
                                   stats=args.stats, k_scale_max="K" in args.jobs,
                                   k_mean_given=shape.num_warps == 1, v_fp8=v_fp8,
                                   round_fp8=False,
                                   has_m="M" in args.jobs, has_q="Q" in args.jobs,
                                   has_k="K" in args.jobs, has_v="V" in args.jobs)
    constants.update(sqd=1, skd=1, svd=1, PDL=dependent(args))
    signature = {}
    for n in names:
        if n in constants:
            signature[n] = "constexpr"
        elif n in ("q_ptr", "k_ptr", "v_ptr"):
            signature[n] = "*bf16"
        elif n in ("q8_ptr", "k8_ptr"):
            signature[n] = "*i8"
        elif n == "v8_ptr":
            signature[n] = "*fp8e4nv" if v_fp8 else "*fp16"
        elif n == "addresses":
            signature[n] = "*i64"
        elif n.endswith("_ptr"):
            signature[n] = "*fp32"
        else:
            signature[n] = "i32"
    counts = ("m_jobs", "k_jobs", "v_jobs", "q_per_head", "k_per_head", "v_per_head", "q_blocks",
              "k_blocks", "v_tiles", "n_chunks", "HQ", "HK")
    aligned = [n for n in names if signature[n] != "constexpr" and n not in counts]
    src = source(fn, signature, constants, aligned)
    options = dict(num_warps=shape.num_warps, enable_fp_fusion=True,
                   **({"launch_pdl": True} if dependent(args) else {}))
    if shape.maxnreg is not None:
        options["maxnreg"] = shape.maxnreg
    kernel = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=options)
    return kernel, (f"jobs {args.jobs}, statistics {'on' if args.stats else 'off'}, D{args.dim}, "
                    f"block_q {block_q}, block_k {block_k}: {shape}")


def compile_select(args) -> tuple[triton.compiler.CompiledKernel, str]:
    """``_select_kernel`` with its lookup table, for rows of ``args.key_blocks`` key blocks, as
    ``select._select`` launches it; returns the kernel and a description."""
    fn = select._select_kernel
    names = list(fn.arg_names)
    nkp = max(16, launcher.next_pow2(args.key_blocks))
    constants = dict(NKP=nkp, TOPK=args.topk, CAUSAL=args.causal, SINK=False, TABLE=True,
                     PDL=dependent(args))
    signature = {}
    for n in names:
        if n in constants:
            signature[n] = "constexpr"
        elif n == "out_ptr":
            signature[n] = "*u8"
        elif n in ("lut_ptr", "counts_ptr", "n_full_ptr"):
            signature[n] = "*i32"
        elif n.endswith("_ptr"):
            signature[n] = "*fp32"
        else:
            signature[n] = "fp32" if n == "sqrt_d" else "i32"
    src = source(fn, signature, constants, [n for n in names if n.endswith("_ptr")])
    warps = select._warps_per_row(nkp)
    options = dict(num_warps=warps, enable_fp_fusion=True,
                   **({"launch_pdl": True} if dependent(args) else {}))
    kernel = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=options)
    rule = "top-k" if args.topk else "CDF"
    return kernel, (f"{rule} rule, {'causal, ' if args.causal else ''}rows of {args.key_blocks} "
                    f"key blocks (NKP {nkp}), {warps} warp(s), with the lookup table")


def disassemble(kernel: triton.compiler.CompiledKernel) -> tuple[str, int, int]:
    """The SASS of a compiled kernel, its registers and its spill stack in bytes."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    resources = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return sass, int(resources.group(1)), int(resources.group(2))


def loop_bodies(sass: str) -> dict[str, list[str]]:
    """Instructions (opcode with modifiers) per basic block label."""
    blocks: dict[str, list[str]] = {"entry": []}
    current = "entry"
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            current = label.group(1)
            blocks[current] = []
            continue
        op = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[\w.]+)?)",
                      line)
        if op:
            blocks[current].append(op.group(1))
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("attention", "quantize", "select"),
                        default="attention")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-m", type=int, default=64, help="(quantize: block_q)")
    parser.add_argument("--block-n", type=int, default=128,
                        help="keys per step (= block_k; quantize: block_k)")
    parser.add_argument("--jobs", default="QKV",
                        help="quantize: M (K's channel mean), Q, K and/or V")
    parser.add_argument("--stats", action="store_true", help="quantize: the block statistics")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--max-registers", type=int, default=0)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--key-blocks", type=int, default=256, help="select: key blocks a row")
    parser.add_argument("--topk", action="store_true", help="select: the top-k rule (else CDF)")
    parser.add_argument("--sparse", action="store_true")
    parser.add_argument("--no-fold", action="store_true", help="the exact exponent path")
    parser.add_argument("--no-tma", action="store_true", help="pointer loads instead of TMA")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--no-pdl", action="store_true",
                        help="without programmatic dependent launch (the library uses it from "
                             "sm90 on)")
    args = parser.parse_args()
    if args.kernel == "quantize" and args.stats and "V" in args.jobs:
        parser.error("with --stats the library runs V's job in a launch of its own: "
                     "--jobs QK --stats, and --jobs MV for that launch")

    if args.kernel in ("quantize", "select"):
        compiled = compile_quantize if args.kernel == "quantize" else compile_select
        kernel, described = compiled(args)
        sass, registers, stack = disassemble(kernel)
        print(f"Triton {triton.__version__}, sm_{args.arch}: {kernel.name}, {described}")
        bodies = loop_bodies(sass)
        print(f"{sum(len(ops) for ops in bodies.values())} instructions in all")
        print(f"registers {registers}, stack {stack} bytes, shared {kernel.metadata.shared} bytes")
        blocks = sorted(bodies.items(), key=lambda item: -len(item[1]))
        for label, ops in blocks[:6]:
            mix = Counter(op.split(".")[0] for op in ops)
            print(f"\n{label}: {len(ops)} instructions, {mix['LDL'] + mix['STL']} local-memory "
                  "accesses")
            print("  " + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))
        return

    kernel = compile_kernel(args)
    sass, registers, stack = disassemble(kernel)
    print(f"Triton {triton.__version__}, sm_{args.arch}: D{args.dim} BLOCK_M {args.block_m} "
          f"BLOCK_N {args.block_n}, {args.warps} warps, {args.stages} stages, register cap "
          f"{args.max_registers or 'none'}")
    print(f"registers {registers}, stack {stack} bytes, shared {kernel.metadata.shared} bytes")
    per_thread = args.block_m * args.block_n // (32 * args.warps)
    for label, ops in loop_bodies(sass).items():
        if not any(re.match(r"[A-Z]*GMMA|HMMA|IMMA", op) for op in ops):
            continue
        mix = Counter(op.split(".")[0] for op in ops)
        local = mix["LDL"] + mix["STL"]
        print(f"\n{label}: {len(ops)} instructions per key tile, {len(ops) / per_thread:.1f} per "
              f"score element (per thread), {local} local-memory accesses")
        print("  " + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))


if __name__ == "__main__":
    main()
