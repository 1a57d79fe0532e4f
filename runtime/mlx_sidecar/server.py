"""Wiring and lifecycle: the reader thread, the dispatcher, the engine and the writer.

stdout is reserved for frames: at start the real stdout is duplicated for the writer and fd 1 is
pointed at stderr, so a stray print() or a C library's output can never corrupt the stream."""

import logging
import os
import signal
import sys
import threading
import time
from importlib import metadata

from . import framing
from .dispatcher import Dispatcher
from .engine import Engine
from .errors import CANCELLED, OVERLOADED, RpcError, model_not_found
from .writer import Writer

log = logging.getLogger(__name__)

STOP_BUDGET = 0.9  # seconds from EOF/SIGTERM to exit


class Server:
    def __init__(self, framing_name: str = "auto", max_frame_bytes: int = framing.DEFAULT_MAX_FRAME_BYTES,
                 preload: list[str] = (), max_batch: int = 16, max_queue: int = 64,
                 prompt_cache_bytes: int = 512 << 20):
        self.requested_framing = framing_name
        self.framing = framing_name
        self.max_frame_bytes = max_frame_bytes
        self.preload = list(preload)
        self.started_at = time.monotonic()
        self.inflight: dict = {}
        self.pending_loads: dict = {}   # model id → loads queued or running
        self.shutting_down = False
        self.got_shutdown = False
        self._shutdown_req = None
        self._eof = False               # stdin has ended
        self._stop = threading.Event()
        self._exit_code = 0
        self._versions = None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.generations: dict = {}     # model id → generate requests admitted and not yet answered
        self.writer = None
        self.engine = Engine(max_batch, prompt_cache_bytes,
                             stalled=lambda: self.writer is not None and self.writer.stalled())

    # ---- lifecycle ----
    def serve(self, in_fd: int, out_fd: int) -> int:
        from .methods.model import queue_load

        for source in self.preload:
            queue_load(self, _Preload(source), source, source)
        reader = threading.Thread(target=self._read, args=(in_fd, out_fd), name="mlx-sidecar-reader", daemon=True)
        reader.start()
        while not self._stop.wait(0.5):
            pass
        return self._teardown()

    def stop(self, code: int = 0) -> None:
        if not self._stop.is_set():
            self._exit_code = code
            self._stop.set()

    def begin_shutdown(self, req) -> None:
        self.shutting_down = True
        self.got_shutdown = True
        self._shutdown_req = req
        self._maybe_finish_shutdown()

    def request_done(self, req) -> None:
        if not req.is_notification:
            self.inflight.pop(req.id, None)
        if self._shutdown_req is not None and req is not self._shutdown_req:
            self._maybe_finish_shutdown()

    def _maybe_finish_shutdown(self) -> None:
        req = self._shutdown_req
        if req is not None and all(r is req for r in list(self.inflight.values())):
            self._shutdown_req = None
            req.respond({})
            if self._eof:
                self.stop(0)

    def _read(self, in_fd: int, out_fd: int) -> None:
        def read(n: int) -> bytes:
            try:
                return os.read(in_fd, n)
            except OSError:  # stdin closed under us: same as EOF
                return b""

        first = read(1 << 16)
        name = self.requested_framing
        if name == "auto":
            name = framing.detect(first) if first else "ndjson"
        self.framing = name
        codec = framing.load(name)
        self.writer = Writer(out_fd, codec.encode, on_broken_pipe=lambda: self.stop(0))
        log.debug("framing: %s", name)
        dispatcher = Dispatcher(self)
        try:
            if first:
                for frame in codec.Reader(read, self.max_frame_bytes, first):
                    dispatcher.handle(frame)
                    if self._stop.is_set():
                        return
        except Exception:
            log.exception("reader failed")
        # EOF: the host is gone. After shutdown, let the drain finish; otherwise stop now.
        self._eof = True
        if self._shutdown_req is None or not self.inflight:
            self.stop(0)

    def _teardown(self) -> int:
        deadline = time.monotonic() + STOP_BUDGET
        self.shutting_down = True
        for req in list(self.inflight.values()):
            req.cancel()
        self.engine.stop()
        self.engine.join(max(0.0, deadline - time.monotonic() - 0.2))
        # Work the engine could not finish in time (a model load, say) is still answered.
        for req in list(self.inflight.values()):
            req.fail(RpcError(CANCELLED, "request cancelled: the runtime is stopping", **(req.partial or {})))
        if self.writer is not None:
            self.writer.flush(max(0.05, deadline - time.monotonic()))
        logging.shutdown()
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(self._exit_code)

    # ---- helpers for methods ----
    def admit_generation(self, req, model_id: str) -> None:
        """Count a generate request against its model's limits: max_batch running plus max_queue
        waiting; past that, answer overloaded at once."""
        n = self.generations.get(model_id, 0)
        limit = self.max_batch + self.max_queue
        if n >= limit:
            raise RpcError(OVERLOADED, f"model {model_id!r} already has {n} generate requests running or queued (limit {limit}); retry later",
                           model=model_id, limit=limit)
        self.generations[model_id] = n + 1

        def done():
            self.generations[model_id] -= 1

        req.on_done = done

    def check_model(self, model_id: str) -> None:
        """Fail fast for a model that is neither loaded nor being loaded; the engine looks it up
        again in order, so `model/load` then `generate` can be pipelined."""
        if model_id not in self.engine.models and not self.pending_loads.get(model_id):
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


class _Preload:
    """The request behind a --model flag: answered into the log instead of the pipe."""

    is_notification = True
    method = "model/load"
    id = None
    cancel_requested = False

    def __init__(self, source):
        self.source = source
        self.params = {"model": source}

    def try_start(self):
        return True

    def respond(self, result, buf=None):
        pass

    def fail(self, error, buf=None):
        log.error("could not preload %s: %s", self.source, error.message)


def install_signal_handlers(server: Server) -> None:
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    signal.signal(signal.SIGINT, lambda *_: server.stop(0))
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed stdout is an EPIPE to handle, not a kill


def reserve_stdout() -> int:
    """Keep the real stdout for frames only; everything else written to fd 1 goes to stderr."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out_fd
