"""The engine thread: the one owner of every MLX call (loading, prefill, decoding).

Work arrives in an inbox. Control work (load, unload, tokenize) runs between decode steps, so it
waits at most one token behind a running generation. Generations run one at a time, in order."""

import collections
import logging
import os
import sys
import threading
import time

from . import blas
from .errors import CANCELLED, INTERNAL_ERROR, MODEL_UNLOADED, RpcError

log = logging.getLogger(__name__)

MEMORY_SNAPSHOT_EVERY = 0.25  # seconds between memory readings while generating


class Engine:
    def __init__(self):
        self.models: dict = {}          # id → LoadedModel; written here, read by the dispatcher
        self.device = {"type": "cpu", "backend": "cpu"}
        self.versions: dict = {}
        self.memory = {"active_bytes": 0, "peak_bytes": 0, "cache_bytes": 0, "rss_bytes": 0}
        self.ready = threading.Event()
        self._inbox: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._waiting: collections.deque = collections.deque()  # generations not started yet
        self._active = None                                        # the generation decoding now
        self._stopping = False
        self._memory_at = 0.0
        self._thread = threading.Thread(target=self._run, name="mlx-sidecar-engine", daemon=True)
        self._thread.start()

    # ---- any thread ----
    def call(self, req, fn) -> None:
        """Run fn(engine) on the engine thread and answer req with its result."""
        self._put(("call", req, fn))

    def generate(self, generation) -> None:
        self._put(("gen", generation))

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def generating(self) -> int:
        return 1 if self._active is not None else 0

    @property
    def queued(self) -> int:
        return len(self._waiting) + len(self._inbox)

    def _put(self, item) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    # ---- the engine thread ----
    def _run(self) -> None:
        self._init_mlx()
        while True:
            with self._cv:
                while not self._inbox and self._active is None and not self._waiting and not self._stopping:
                    self._cv.wait()
                items = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            for item in items:
                if item[0] == "call":
                    self._run_call(item[1], item[2])
                else:
                    self._waiting.append(item[1])
            if stopping:
                self._cancel_all()
                return
            if self._active is None:
                self._start_next()
            if self._active is not None:
                self._active.step()
                if self._active.done:
                    self._active = None
                    self._snapshot_memory()
                elif time.monotonic() - self._memory_at > MEMORY_SNAPSHOT_EVERY:
                    self._snapshot_memory()

    def _init_mlx(self) -> None:
        blas.preload()
        try:
            import mlx.core as mx

            dev = mx.default_device()
            kind = "gpu" if dev.type == mx.DeviceType.gpu else "cpu"
            backend = "cpu"
            if kind == "gpu":
                backend = "metal" if sys.platform == "darwin" else "cuda"
            self.device = {"type": kind, "backend": backend}
            try:
                name = mx.device_info().get("device_name")
                if name:
                    self.device["name"] = str(name)
            except Exception:
                pass
            self._snapshot_memory()
        except Exception:
            log.exception("could not initialise mlx")
        finally:
            self.ready.set()

    def _run_call(self, req, fn) -> None:
        if not req.try_start():
            return  # cancelled while queued: already answered
        try:
            req.respond(fn(self))
        except RpcError as e:
            req.fail(e)
        except Exception as e:
            log.exception("%s failed", req.method)
            req.fail(RpcError(INTERNAL_ERROR, f"internal error in {req.method}: {type(e).__name__}: {e}"))
        self._snapshot_memory()

    def _start_next(self) -> None:
        while self._waiting:
            gen = self._waiting.popleft()
            if not gen.req.try_start():
                continue
            try:
                gen.start(self.models)
            except RpcError as e:
                gen.req.fail(e)
                continue
            except Exception as e:
                log.exception("could not start generation")
                gen.req.fail(RpcError(INTERNAL_ERROR, f"internal error starting generate: {type(e).__name__}: {e}"))
                continue
            self._active = gen
            return

    def abort_model(self, model_id: str) -> None:
        """Fail every generation on a model that is being unloaded (engine thread)."""
        for gen in list(self._waiting):
            if gen.model_id == model_id:
                self._waiting.remove(gen)
                if gen.req.try_start():
                    gen.finish_error(RpcError(MODEL_UNLOADED, f"model {model_id!r} was unloaded before this request ran"))
        if self._active is not None and self._active.model_id == model_id:
            self._active.finish_error(RpcError(MODEL_UNLOADED, f"model {model_id!r} was unloaded while this request ran"))
            self._active = None

    def _cancel_all(self) -> None:
        err = lambda: RpcError(CANCELLED, "request cancelled: the runtime is stopping", finish_reason="cancelled")
        if self._active is not None:
            self._active.finish_error(err())
            self._active = None
        for gen in self._waiting:
            if gen.req.try_start():
                gen.finish_error(err())
        self._waiting.clear()

    def _snapshot_memory(self) -> None:
        self._memory_at = time.monotonic()
        try:
            import mlx.core as mx

            self.memory = {
                "active_bytes": int(mx.get_active_memory()),
                "peak_bytes": int(mx.get_peak_memory()),
                "cache_bytes": int(mx.get_cache_memory()),
                "rss_bytes": _rss_bytes(),
            }
        except Exception:
            pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
