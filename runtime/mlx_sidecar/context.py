"""What a method handler may use: the engine, the writer, the in-flight state, the runtime's options
and a way to stop it. Handlers get this narrow context, never the server itself."""

import logging
import sys
import time
from importlib import metadata

from .errors import model_not_found

log = logging.getLogger(__name__)


class Context:
    def __init__(self, engine, inflight, stop, max_frame_bytes: int, framing: str = "auto"):
        self.engine = engine
        self.inflight = inflight
        self.stop = stop                  # stop(code): end the process after answering what it can
        self.max_frame_bytes = max_frame_bytes
        self.framing = framing            # set once the first bytes are read
        self.writer = None                # likewise
        self.images = None                # images.Options: the image limits and resize budget
        self.started_at = time.monotonic()
        self._versions = None

    def check_model(self, model_id: str) -> None:
        """Fail fast for a model that is neither loaded, nor being loaded, nor unloaded by
        --idle-unload/--max-models (reloaded on demand); the engine looks it up again in order,
        so `model/load` then `generate` can be pipelined."""
        if model_id not in self.engine.models and not self.inflight.loading(model_id) \
                and not self.engine.residency.knows(model_id):
            raise model_not_found(model_id)

    def versions(self) -> dict:
        if self._versions is None:
            from . import __version__

            def v(name):
                try:
                    return metadata.version(name)
                except metadata.PackageNotFoundError:
                    return None

            self._versions = {"mlx_sidecar": __version__, "python": sys.version.split()[0],
                              "mlx": v("mlx"), "mlx_lm": v("mlx-lm"), "mlx_vlm": v("mlx-vlm")}
        return self._versions

    def progress_reporter(self, req, title: str):
        """A callback(fraction, message, end=False) that sends $/progress for req (LSP's shape)."""
        state = {"begun": False}
        writer = self.writer
        bar = _StderrBar(title)

        def report(fraction: float, message: str, end: bool = False):
            bar.update(fraction, message, end)
            if req.is_notification or writer is None:
                return
            if not state["begun"]:
                state["begun"] = True
                writer.send(_progress(req.id, {"kind": "begin", "title": title, "percentage": 0}))
            if end:
                value = {"kind": "end", "message": message}
            else:
                value = {"kind": "report", "message": message, "percentage": round(max(0.0, min(1.0, fraction)) * 100, 1)}
            writer.send(_progress(req.id, value))

        return report


class _StderrBar:
    """Progress for a person: a bar redrawn in place on a terminal, a few log lines otherwise."""

    def __init__(self, title: str):
        self.title = title
        self.tty = sys.stderr.isatty()
        self.logged = -1

    def update(self, fraction: float, message: str, end: bool) -> None:
        pct = int(max(0.0, min(1.0, 1.0 if end else fraction)) * 100)
        if self.tty:
            filled = pct * 30 // 100
            sys.stderr.write(f"\r{self.title[:40]} [{'#' * filled}{' ' * (30 - filled)}] {pct:3d}% {message[:40]:<40}")
            if end:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif end or pct // 25 > self.logged:
            self.logged = pct // 25
            log.info("%s: %d%% %s", self.title, pct, message)


def _progress(token, value) -> dict:
    return {"jsonrpc": "2.0", "method": "$/progress", "params": {"token": token, "value": value}}


