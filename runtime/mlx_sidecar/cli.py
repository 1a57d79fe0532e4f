"""Command line: `mlx-sidecar` / `python -m mlx_sidecar`."""

import argparse
import logging
import os
import sys

from . import __version__, defaults, framing


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="mlx-sidecar",
        description="Run MLX generation behind JSON-RPC 2.0 on stdin/stdout. Logs go to stderr; stdout carries protocol frames only.")
    p.add_argument("--framing", choices=("auto",) + framing.NAMES, default="auto",
                   help="how frames are cut (default: auto, detected from the client's first byte)")
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="load a model at start (repeatable); its id is the string given")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="stderr log level (default: info)")
    p.add_argument("--max-frame-bytes", type=int, default=framing.DEFAULT_MAX_FRAME_BYTES,
                   help="largest accepted frame; bigger ones are answered with frame_too_large (default: 64 MiB)")
    p.add_argument("--max-batch", type=int, default=defaults.MAX_BATCH, metavar="N",
                   help="generate requests decoded together per model (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=defaults.MAX_QUEUE, metavar="N",
                   help="generate requests waiting per model beyond --max-batch; more are refused as overloaded (default: %(default)s)")
    p.add_argument("--prompt-cache-bytes", type=int, default=defaults.PROMPT_CACHE_BYTES, metavar="BYTES",
                   help="KV cache kept per model for reuse by prompts with a shared prefix; 0 turns it off (default: %(default)s)")
    p.add_argument("--max-image-side", type=int, default=0, metavar="PIXELS",
                   help="images are shrunk so their longest side is at most this (default: by memory: 1024 at >= 64 GB, 768 at >= 32 GB, else 512)")
    p.add_argument("--max-images", type=int, default=16, metavar="N", help="images per generate request (default: %(default)s)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off by default: the runtime never reaches the network by surprise)")
    p.add_argument("--prefill-slice-factor", type=float, default=defaults.PREFILL_SLICE_FACTOR, metavar="F",
                   help="while other requests decode, each batch step prefills new prompts for about F decode steps, "
                        "so running streams wait at most ~(1+F)x their token time; 0 prefills in 512-token steps (default: %(default)s)")
    p.add_argument("--kv-budget-bytes", type=int, default=0, metavar="BYTES",
                   help="memory for the KV caches of running generate requests; a request starts only when its prompt + "
                        "max_tokens fit beside the others, one that never could is refused (default: 0, from the machine's memory)")
    p.add_argument("--max-context", type=int, default=0, metavar="TOKENS",
                   help="cap every model's context (prompt + output) at this many tokens; longer prompts are refused (default: 0, the model's own)")
    p.add_argument("--distributed-hostfile", metavar="FILE",
                   help="serve each model sharded over the hosts in FILE (mlx.launch's JSON hostfile; this process is rank 0 and starts the others)")
    p.add_argument("--distributed-port", type=int, default=32323, metavar="PORT",
                   help="the ring backend's first port, one more per rank (default: %(default)s)")
    p.add_argument("--distributed-sharding", choices=("auto", "tensor", "pipeline"), default="auto",
                   help="how models are split over the group (default: auto, tensor-parallel where the architecture has it)")
    p.add_argument("--follower", action="store_true", help=argparse.SUPPRESS)  # a group's other ranks (follower.py)
    p.add_argument("--idle-unload", type=float, default=0, metavar="SECONDS",
                   help="unload a model unused this long; a later request naming it reloads it (default: 0, never)")
    p.add_argument("--max-models", type=int, default=0, metavar="N",
                   help="keep at most N models loaded, unloading the least recently used idle one first (default: 0, no limit)")
    p.add_argument("--version", action="version", version=f"mlx-sidecar {__version__}")
    return p.parse_args(argv)


def image_options(args):
    from .images import Options

    if args.max_image_side < 0 or args.max_images < 0:
        raise SystemExit("mlx-sidecar: --max-image-side and --max-images must be >= 0")
    return Options(max_side=args.max_image_side, max_images=args.max_images, allow_remote=args.allow_remote_images)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format="mlx-sidecar %(levelname)s %(name)s: %(message)s")
    if args.follower:
        from . import follower

        code = follower.main()
        logging.shutdown()
        os._exit(code)
    from .server import Server, install_signal_handlers, reserve_stdout

    out_fd = reserve_stdout()
    if args.max_batch < 1 or args.max_queue < 0 or args.prompt_cache_bytes < 0:
        raise SystemExit("mlx-sidecar: --max-batch must be >= 1, --max-queue and --prompt-cache-bytes >= 0")
    if args.kv_budget_bytes < 0 or args.max_context < 0:
        raise SystemExit("mlx-sidecar: --kv-budget-bytes and --max-context must be >= 0")
    if args.distributed_hostfile:
        from . import distributed

        try:
            distributed.GROUP = distributed.Leader(args.distributed_hostfile, args.distributed_port,
                                                   args.distributed_sharding, args.log_level)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"mlx-sidecar: --distributed-hostfile: {e}")
        distributed.GROUP.spawn()
    server = Server(args.framing, args.max_frame_bytes, preload=args.model, max_batch=args.max_batch,
                    max_queue=args.max_queue, prompt_cache_bytes=args.prompt_cache_bytes,
                    image_options=image_options(args))
    server.engine.prefill_factor = max(0.0, args.prefill_slice_factor)
    if args.idle_unload < 0 or args.max_models < 0:
        raise SystemExit("mlx-sidecar: --idle-unload and --max-models must be >= 0")
    server.engine.residency.idle_unload, server.engine.residency.max_models = args.idle_unload, args.max_models
    server.engine.admission.fixed_budget = args.kv_budget_bytes
    server.engine.admission.max_context = args.max_context
    install_signal_handlers(server)
    code = server.serve(0, out_fd)
    logging.shutdown()
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)  # daemon threads (a load mid-way, say) must not hold the exit
