"""Command line: `mlx-sidecar` / `python -m mlx_sidecar`."""

import argparse
import logging
import sys

from . import __version__, framing


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
    p.add_argument("--version", action="version", version=f"mlx-sidecar {__version__}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper()),
                        format="mlx-sidecar %(levelname)s %(name)s: %(message)s")
    from .server import Server, install_signal_handlers, reserve_stdout

    out_fd = reserve_stdout()
    server = Server(args.framing, args.max_frame_bytes, preload=args.model)
    install_signal_handlers(server)
    return server.serve(0, out_fd)
