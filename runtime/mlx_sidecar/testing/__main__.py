"""python -m mlx_sidecar.testing make-model DIR [--preset tiny|small] [--seed N] [--eos] [--vision]"""

import argparse
import sys

from .models import PRESETS, make_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_sidecar.testing")
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-model", help="write a tiny random-weight llama model directory")
    mk.add_argument("dir")
    mk.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--eos", action="store_true",
                    help="make EOS reachable (by default generation always runs to max_tokens)")
    mk.add_argument("--vision", action="store_true", help="a tiny qwen2_vl vision model (mlx-vlm) instead; --preset is ignored")
    args = p.parse_args(argv)
    if args.vision:
        from .vision import make_vision_model

        path = make_vision_model(args.dir, seed=args.seed, reachable_eos=args.eos)
    else:
        path = make_model(args.dir, preset=args.preset, seed=args.seed, reachable_eos=args.eos)
    print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
