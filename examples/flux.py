"""Flux text-to-image with sparge sparse attention.

    python examples/flux.py --model PATH [--mode budget --budget 0.05]
    python examples/flux.py --model PATH --mode calibrate --tuned flux.json
    python examples/flux.py --model PATH --mode tuned --tuned flux.json
    python examples/flux.py --tiny        # same sparge path, tiny random model, no weights

PATH is a local diffusers pipeline folder (or a hub id, if you are online).
"""

import sys

from _sparge_example import parser, run_pipeline, run_tiny, save_image


def main(argv: list[str] | None = None) -> dict:
    args = parser("flux", 28).parse_args(argv)
    if args.tiny:
        return run_tiny("flux", args)
    from diffusers import FluxPipeline

    call_kwargs = {
        "height": args.height,
        "width": args.width,
        "guidance_scale": 3.5,
    }
    return run_pipeline(FluxPipeline, args, call_kwargs, save_image)


if __name__ == "__main__":
    main(sys.argv[1:])
