"""Time RadialAttention on sparge's block-sparse kernel against dense attention on a CUDA GPU.

    PYTHONPATH=src python3 bench/bench_radial.py --out DIR [--configs wan-720p,hunyuan-720p]

For each video-model shape it reports the radial mask's sparsity and build time (first call and
cached), and the median time (``triton.testing.do_bench``) of

- ``sdpa``: dense ``torch.nn.functional.scaled_dot_product_attention`` (bf16, FlashAttention
  backend where available), the baseline;
- ``sparge dense``: ``sparge.quantized_attn`` (every block, INT8 QK / FP8 or FP16 PV);
- ``radial``: ``sparge.radial.radial_attn`` (the radial mask, text included, quantized) at the
  kernel granularities 64x128 and 128x128 (both exact for the 128-token radial mask);
- ``radial exact``: the same with ``quant="none"``.

It prints a table and writes ``radial.json`` and ``radial.md`` to ``--out``. The relative L1 error
of the quantized radial output against the unquantized one is reported too (the mask is the same,
so it is the quantization error alone).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import sparge
from sparge.radial import radial_attn, radial_block_mask


@dataclass(frozen=True)
class Config:
    name: str
    tokens_per_frame: int
    frames: int
    text: int  # text tokens after the video tokens (attended densely)
    heads: int
    head_dim: int
    model_type: str


CONFIGS = {
    # Wan 2.1 14B, 1280x720, 81 frames: 21 latent frames of 45 x 80 tokens; 40 heads of 128.
    "wan-720p": Config("wan-720p", 45 * 80, 21, 0, 40, 128, "wan"),
    # Wan 2.1, 832x480, 81 frames: 21 latent frames of 30 x 52 tokens.
    "wan-480p": Config("wan-480p", 30 * 52, 21, 0, 40, 128, "wan"),
    # HunyuanVideo, 1280x720, 129 frames: 33 latent frames of 45 x 80 tokens, 256 text tokens;
    # 24 heads of 128.
    "hunyuan-720p": Config("hunyuan-720p", 45 * 80, 33, 256, 24, 128, "hunyuan"),
    # A small shape for a quick check.
    "small": Config("small", 32 * 32, 8, 64, 8, 64, "hunyuan"),
}


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().sum() / ref.float().abs().sum())


def bench_config(cfg: Config, do_bench, decay_factor: float, device: torch.device) -> dict:
    video = cfg.tokens_per_frame * cfg.frames
    seq = video + cfg.text
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, seq, cfg.heads, cfg.head_dim)  # NHD, as RadialAttention passes it
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    q_hnd, k_hnd, v_hnd = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    start = time.perf_counter()
    blocks = radial_block_mask(seq, video, cfg.frames, 128, decay_factor, cfg.model_type)
    build_cold = time.perf_counter() - start
    start = time.perf_counter()
    radial_block_mask(seq, video, cfg.frames, 128, decay_factor, cfg.model_type)
    build_cached = time.perf_counter() - start
    sparsity = 1.0 - float(blocks.float().mean())

    def radial(block_q: int, quant: str):
        return lambda: radial_attn(q, k, v, video_len=video, num_frames=cfg.frames,
                                   decay_factor=decay_factor, model_type=cfg.model_type,
                                   block_q=block_q, quant=quant)

    timings = {
        "sdpa": do_bench(lambda: F.scaled_dot_product_attention(q_hnd, k_hnd, v_hnd)),
        "sparge dense": do_bench(lambda: sparge.quantized_attn(q_hnd, k_hnd, v_hnd)),
        "radial 64x128": do_bench(radial(64, "auto")),
        "radial 128x128": do_bench(radial(128, "auto")),
        "radial exact 64x128": do_bench(radial(64, "none")),
    }
    error = rel_l1(radial(64, "auto")(), radial(64, "none")())
    return {"config": asdict(cfg), "seq_len": seq, "video_len": video,
            "decay_factor": decay_factor, "sparsity": sparsity,
            "mask_build_s": {"first": build_cold, "cached": build_cached},
            "median_ms": timings, "quant_rel_l1": error}


def table(results: list[dict]) -> str:
    names = list(results[0]["median_ms"])
    head = ["config", "L", "sparsity", *[f"{n} ms" for n in names], "speed-up", "quant L1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ms = r["median_ms"]
        best = min(v for n, v in ms.items() if n.startswith("radial"))
        cells = [r["config"]["name"], str(r["seq_len"]), f"{r['sparsity']:.3f}",
                 *[f"{ms[n]:.2f}" for n in names], f"{ms['sdpa'] / best:.2f}x",
                 f"{r['quant_rel_l1']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for radial.json and radial.md")
    parser.add_argument("--configs", default="small,wan-480p,wan-720p,hunyuan-720p",
                        help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--decay-factor", type=float, default=1.0)
    parser.add_argument("--cpu-check", action="store_true",
                        help="run on the CPU with one timed call each (checks the script only)")
    args = parser.parse_args()
    if args.cpu_check:
        device = torch.device("cpu")

        def median(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_radial.py needs a CUDA GPU (or --cpu-check)")
        from triton.testing import do_bench

        device = torch.device("cuda")

        def median(fn) -> float:
            return do_bench(fn, return_mode="median")

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{device_name}, torch {torch.__version__}, sparge {sparge.__version__}", flush=True)
    results = []
    for name in names:
        results.append(bench_config(CONFIGS[name], median, args.decay_factor, device))
        r = results[-1]
        print(f"{name}: sparsity {r['sparsity']:.3f}, mask {r['mask_build_s']['first']:.2f} s "
              f"(cached {r['mask_build_s']['cached'] * 1e3:.2f} ms), "
              + ", ".join(f"{n} {t:.2f} ms" for n, t in r["median_ms"].items()), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = table(results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "radial.json"), "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "results": results}, f,
                  indent=2)
    with open(os.path.join(args.out, "radial.md"), "w") as f:
        timing = "one call each (--cpu-check)" if args.cpu_check else "median ms (do_bench)"
        f.write(f"RadialAttention on sparge vs dense, {device_name}, {timing}\n\n{text}\n")


if __name__ == "__main__":
    main()
