"""Wiring and lifecycle: the reader thread, the dispatcher, the engine and the writer.

stdout is reserved for frames: at start the real stdout is duplicated for the writer and fd 1 is
pointed at stderr, so a stray print() or a C library's output can never corrupt the stream."""

import logging
import os
import signal
import sys
import threading
import time

from . import defaults, framing, methods, metrics
from .context import Context
from .dispatcher import Dispatcher
from .engine import Engine
from .errors import CANCELLED, RpcError
from .inflight import InFlight
from .writer import Writer

log = logging.getLogger(__name__)

STOP_BUDGET = 0.9  # seconds from EOF/SIGTERM to exit


class Server:
    """The runtime's lifecycle: reads frames, dispatches them, and stops cleanly. `serve` returns
    the exit code instead of exiting, so tests can run whole servers in-process over os.pipe()."""

    def __init__(self, framing_name: str = "auto", max_frame_bytes: int = framing.DEFAULT_MAX_FRAME_BYTES,
                 preload: list[str] = (), max_batch: int = defaults.MAX_BATCH, max_queue: int = defaults.MAX_QUEUE,
                 prompt_cache_bytes: int = defaults.PROMPT_CACHE_BYTES, image_options=None):
        self.requested_framing = framing_name
        self.preload = list(preload)
        self._eof = False               # stdin has ended
        self._stop = threading.Event()
        self._exit_code = 0
        self.inflight = InFlight(max_batch, max_queue)
        self.inflight.on_drained = self._drained
        self.engine = Engine(max_batch, prompt_cache_bytes,
                             stalled=lambda: self.ctx.writer is not None and self.ctx.writer.stalled())
        self.ctx = Context(self.engine, self.inflight, self.stop, max_frame_bytes, framing_name)
        from .images import Options

        self.ctx.images = image_options if image_options is not None else Options()
        # Models unloaded by --idle-unload/--max-models come back when a request names them.
        self.engine.make_reload = self._reload_job
        self.engine.generations_for = self.inflight.generations
        # $/metrics every initialize.metrics_interval_ms, sent from its own thread.
        self.ctx.metrics_ticker = metrics.Ticker(self._snapshot, lambda msg: self.ctx.writer.send(msg),
                                                 stalled=lambda: self.ctx.writer is None or self.ctx.writer.stalled())

    # The handlers' modules are imported on first use (methods/__init__.py), not before initialize.
    def _reload_job(self, params, trigger):
        from .methods.model import reload_job

        return reload_job(self.ctx, params, trigger)

    def _snapshot(self) -> dict:
        from .methods.runtime import snapshot

        return snapshot(self.ctx)

    def _import_handlers(self) -> None:
        # Once the first answer is written, import the rest, so the first generate does not wait on it.
        self.ctx.writer.flush(2.0)
        methods.preload()

    # ---- lifecycle ----
    def serve(self, in_fd: int, out_fd: int) -> int:
        """Serve until exit, EOF or stop(); returns the exit code once everything is answered."""
        if self.preload:
            from .methods.model import LoggedLoad, queue_load

            for source in self.preload:
                queue_load(self.ctx, LoggedLoad(source), source, source)
        reader = threading.Thread(target=self._read, args=(in_fd, out_fd), name="mlx-sidecar-reader", daemon=True)
        reader.start()
        while not self._stop.wait(0.5):
            pass
        return self._teardown()

    def stop(self, code: int = 0) -> None:
        if not self._stop.is_set():
            self._exit_code = code
            self._stop.set()

    def _drained(self) -> None:
        # shutdown has been answered; after EOF nothing more can come, so stop.
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
        self.ctx.framing = name
        codec = framing.load(name)
        self.ctx.writer = Writer(out_fd, codec.encode, on_broken_pipe=lambda: self.stop(0))
        log.debug("framing: %s", name)
        dispatcher = Dispatcher(self.ctx)
        importer = threading.Thread(target=self._import_handlers, name="mlx-sidecar-imports", daemon=True)
        pending = first
        # A failure in the reader must never end the process: log it, start a fresh reader, go on.
        while pending is not None and not self._stop.is_set():
            try:
                for frame in codec.Reader(read, self.ctx.max_frame_bytes, pending):
                    dispatcher.handle(frame)
                    if importer is not None:
                        importer.start()
                        importer = None
                    if self._stop.is_set():
                        return
                pending = None
            except Exception:
                log.exception("reader: unexpected failure; resuming with the next bytes")
                pending = read(1 << 16) or None
        # EOF: the host is gone. After shutdown, let the drain finish; otherwise stop now.
        self._eof = True
        if not self.inflight.draining() or not len(self.inflight):
            self.stop(0)

    def _teardown(self) -> int:
        deadline = time.monotonic() + STOP_BUDGET
        self.ctx.metrics_ticker.stop()
        self.inflight.begin_shutdown()
        for req in self.inflight.requests():
            req.cancel()
        self.engine.stop()
        self.engine.join(max(0.0, deadline - time.monotonic() - 0.2))
        # Work the engine could not finish in time (a model load, say) is still answered.
        for req in self.inflight.requests():
            req.fail(RpcError(CANCELLED, "request cancelled: the runtime is stopping", **(req.partial or {})))
        writer = self.ctx.writer
        if writer is not None:
            writer.flush(max(0.05, deadline - time.monotonic()))
            writer.close()
        return self._exit_code


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
