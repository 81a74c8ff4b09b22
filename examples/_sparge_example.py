"""Shared code of the per-family example scripts: run a diffusers pipeline with sparge, or (with
``--tiny``) the same sparge code path on a tiny randomly initialised transformer (no weights, no
network), which is what the test suite runs."""

from __future__ import annotations

import argparse
import time

import torch

from sparge.integrations.diffusers import disable_sparge, enable_sparge, sparge_report
from sparge.tuning import calibration, save_tuning, summarize


def parser(family: str, default_steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"{family} with sparge sparse attention")
    p.add_argument("--model", help="local path (or hub id) of the diffusers pipeline")
    p.add_argument("--tiny", action="store_true",
                   help="run a tiny random transformer instead of a pipeline (no weights)")
    p.add_argument("--mode", choices=("budget", "calibrate", "tuned", "dense"), default="budget")
    p.add_argument("--budget", type=float, default=0.05, help="relative L1 budget per layer")
    p.add_argument("--tuned", help="tuning file: written by --mode calibrate, read by tuned")
    p.add_argument("--dense-steps", type=int, default=2)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=default_steps)
    p.add_argument("--prompt", default="A cat walks on the grass, realistic style.")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=f"{family}_sparge")
    return p


def _enable(transformer, args, sparse_kwargs=None):
    return enable_sparge(transformer, args.mode, budget=args.budget,
                         tuned=args.tuned if args.mode in ("tuned", "budget") and args.tuned
                         else None, dense_layers=args.dense_layers, dense_steps=args.dense_steps,
                         sparse_kwargs=sparse_kwargs)


def _finish(transformer, args) -> dict:
    report = sparge_report(transformer)
    if args.mode == "budget":
        print(summarize({n: s.budget for n, s in report.items()}))
    else:
        for name, stats in report.items():
            print(f"{name}: sparse calls {stats.sparse_calls}, dense calls {stats.dense_calls}, "
                  f"last sparsity {stats.last_sparsity:.3f}")
    if args.mode == "calibrate" and args.tuned:
        save_tuning(transformer, args.tuned)
        print(f"tuned values written to {args.tuned}")
    disable_sparge(transformer)
    return report


@torch.no_grad()
def run_tiny(family: str, args: argparse.Namespace) -> dict:
    """Denoise-like loop on a tiny random transformer: the sparge path of the real run."""
    from sparge.integrations.testing import tiny_inputs, tiny_transformer

    transformer = tiny_transformer(family, seed=args.seed)
    sparse_kwargs = {"granularity": 2, "pv_tol": 5.0} if args.mode in ("calibrate", "tuned") \
        else None
    _enable(transformer, args, sparse_kwargs)
    start = time.time()
    context = calibration(transformer, args.tuned, calls=1) if args.mode == "calibrate" else None
    if context is not None:
        context.__enter__()
    try:
        for i in range(args.steps):
            t = 1000.0 * (1 - i / args.steps)
            transformer(**tiny_inputs(family, timestep=t, seed=args.seed))
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    print(f"{args.steps} steps in {time.time() - start:.1f} s")
    return _finish(transformer, args)


def run_pipeline(pipeline_cls, args: argparse.Namespace, call_kwargs: dict, save) -> dict:
    """Load ``pipeline_cls`` from ``args.model``, enable sparge, generate and save."""
    if not args.model:
        raise SystemExit("give --model PATH (a diffusers pipeline) or --tiny")
    dtype = torch.bfloat16
    pipe = pipeline_cls.from_pretrained(args.model, torch_dtype=dtype)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    _enable(pipe.transformer, args)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    call_kwargs = {k: v for k, v in call_kwargs.items() if v is not None}
    context = calibration(pipe.transformer, args.tuned, calls=1) \
        if args.mode == "calibrate" else None
    start = time.time()
    if context is not None:
        context.__enter__()
    try:
        result = pipe(prompt=args.prompt, num_inference_steps=args.steps, generator=generator,
                      **call_kwargs)
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    print(f"generated in {time.time() - start:.1f} s")
    save(result, args.out)
    return _finish(pipe.transformer, args)


def save_video(result, out: str, fps: int = 16) -> None:
    from diffusers.utils import export_to_video

    export_to_video(result.frames[0], f"{out}.mp4", fps=fps)
    print(f"wrote {out}.mp4")


def save_image(result, out: str) -> None:
    result.images[0].save(f"{out}.png")
    print(f"wrote {out}.png")
