"""HunyuanVideo text-to-video with sparge sparse attention.

    python examples/hunyuan.py --model PATH [--mode budget --budget 0.05]
    python examples/hunyuan.py --model PATH --mode calibrate --tuned hunyuan.json
    python examples/hunyuan.py --model PATH --mode tuned --tuned hunyuan.json
    python examples/hunyuan.py --tiny        # same sparge path, tiny random model, no weights

PATH is a local diffusers pipeline folder (or a hub id, if you are online).
"""

import sys

from _sparge_example import parser, run_pipeline, run_tiny, save_video


def main(argv: list[str] | None = None) -> dict:
    args = parser("hunyuan", 30).parse_args(argv)
    if args.tiny:
        return run_tiny("hunyuan", args)
    from diffusers import HunyuanVideoPipeline

    call_kwargs = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
    }
    return run_pipeline(HunyuanVideoPipeline, args, call_kwargs, save_video)


if __name__ == "__main__":
    main(sys.argv[1:])
