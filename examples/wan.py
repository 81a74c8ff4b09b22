"""Wan 2.1 / 2.2 text-to-video with sparge sparse attention.

    python examples/wan.py --model PATH [--mode budget --budget 0.05]
    python examples/wan.py --model PATH --mode calibrate --tuned wan.json
    python examples/wan.py --model PATH --mode tuned --tuned wan.json
    python examples/wan.py --tiny        # same sparge path, tiny random model, no weights

PATH is a local diffusers pipeline folder (or a hub id, if you are online).
"""

import sys

from _sparge_example import parser, run_pipeline, run_tiny, save_video


def main(argv: list[str] | None = None) -> dict:
    args = parser("wan", 30).parse_args(argv)
    if args.tiny:
        return run_tiny("wan", args)
    from diffusers import WanPipeline

    call_kwargs = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "guidance_scale": 5.0,
    }
    return run_pipeline(WanPipeline, args, call_kwargs, save_video)


if __name__ == "__main__":
    main(sys.argv[1:])
