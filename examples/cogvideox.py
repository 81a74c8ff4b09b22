"""CogVideoX text-to-video with sparge sparse attention.

    python examples/cogvideox.py --model PATH [--mode budget --budget 0.05]
    python examples/cogvideox.py --model PATH --mode calibrate --tuned cogvideox.json
    python examples/cogvideox.py --model PATH --mode tuned --tuned cogvideox.json
    python examples/cogvideox.py --tiny        # same sparge path, tiny random model, no weights

PATH is a local diffusers pipeline folder (or a hub id, if you are online).
"""

import sys

from _sparge_example import parser, run_pipeline, run_tiny, save_video


def main(argv: list[str] | None = None) -> dict:
    args = parser("cogvideox", 50).parse_args(argv)
    if args.tiny:
        return run_tiny("cogvideox", args)
    from diffusers import CogVideoXPipeline

    call_kwargs = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "guidance_scale": 6.0,
    }
    return run_pipeline(CogVideoXPipeline, args, call_kwargs, save_video)


if __name__ == "__main__":
    main(sys.argv[1:])
