"""The engine thread: the one owner of every MLX call (loading, prefill, decoding).

Work arrives in an inbox. Control work (load, unload, tokenize) runs between decode steps, so it
waits at most one step behind running generations. Each loaded model has a runner (runners.py);
every loop steps each busy runner once, so models are served fairly."""

import collections
import logging
import os
import sys
import threading
import time

from . import blas, defaults
from .admission import Admission
from .errors import MODEL_UNLOADED, RpcError, internal
from .loader import Loader
from .residency import Residency

log = logging.getLogger(__name__)

MEMORY_SNAPSHOT_EVERY = 0.25  # seconds between memory readings while generating
IDLE_RELEASE_AFTER = 1.0      # seconds idle before MLX's freed buffers go back to the system


class Engine:
    def __init__(self, max_batch: int = defaults.MAX_BATCH, prompt_cache_bytes: int = defaults.PROMPT_CACHE_BYTES,
                 stalled=lambda: False):
        self.models: dict = {}          # id → LoadedModel; written here, read by the dispatcher
        self.device = {"type": "cpu", "backend": "cpu"}
        self.memory = {"active_bytes": 0, "peak_bytes": 0, "cache_bytes": 0, "rss_bytes": 0}
        self.ready = threading.Event()
        self.max_batch = max_batch
        self.prompt_cache_bytes = prompt_cache_bytes
        self.prefill_factor = defaults.PREFILL_SLICE_FACTOR  # see pacing.py; --prefill-slice-factor
        self.admission = Admission()    # KV budget and context cap (admission.py); set by the CLI
        self.admission.engine = self
        self._stalled = stalled         # True while the host is not reading our output
        # Rank 0 of a group serving sharded models (distributed.py, set up by the CLI), or None.
        self.group = getattr(sys.modules.get(f"{__package__}.distributed"), "GROUP", None)
        self._inbox: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._runners: dict = {}        # model id → runner
        self.residency = Residency()    # --idle-unload and --max-models (residency.py); set by the CLI
        self.make_reload = None         # make_reload(params, request) → a load job (methods/model.py); set by the server
        self.generations_for = lambda model_id: 0  # generate requests admitted and not answered (inflight.py)
        self._loader = Loader(lambda job: self._put(("read", job)))
        self._jobs: collections.deque = collections.deque()     # loads being built, a piece per engine step
        self._parked: dict = {}         # model id being loaded → the work that waits for it, in order
        self._pending: collections.deque = collections.deque()  # work taken from the inbox, not yet run
        self._step_s = 0.0              # how long the last runner steps took: a load piece's budget
        self._residency_at = 0.0
        self._stopping = False
        self._memory_at = 0.0
        self._thread = threading.Thread(target=self._run, name="mlx-sidecar-engine", daemon=True)
        self._thread.start()

    # ---- any thread ----
    def call(self, req, fn, always=None) -> None:
        """Run fn(engine) on the engine thread and answer req with its result; always() runs after
        it, or instead of it when req was cancelled while queued."""
        if self.group is not None and self.group.broken is not None:
            req.fail(self.group.engine_error(req.method))  # at once: the engine may be stuck in a collective
            if always is not None:
                always()
            return
        self._put(("call", req, fn, always))

    def generate(self, generation) -> None:
        self._put(("gen", generation))

    def load(self, job) -> None:
        """Queue a model load (methods/model.py's LoadJob): read on the loader thread, built here in
        pieces between decode steps; work naming the model waits behind it, in order."""
        self._put(("load", job))

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def generating(self) -> int:
        return sum(len(r.active) + (r.solo is not None) for r in list(self._runners.values()))

    def streams(self) -> dict:
        """Per model: generate requests decoding now and waiting for a batch slot."""
        kv = self.admission.by_model()
        return {mid: {"running": len(r.active) + (r.solo is not None), "waiting": len(r.waiting),
                      **kv.get(mid, {"kv_reserved_bytes": 0, "kv_bytes": 0})}
                for mid, r in list(self._runners.items()) if len(r)}

    @property
    def queued(self) -> int:
        parked = sum(len(items) for items in list(self._parked.values()))  # behind a model's load
        return sum(len(r.waiting) for r in list(self._runners.values())) + len(self._inbox) + len(self._pending) + parked

    def _put(self, item) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    # ---- the engine thread ----
    def _busy(self) -> bool:
        return any(len(r) for r in self._runners.values())

    def _run(self) -> None:
        self._init_mlx()
        while True:
            with self._cv:
                idle_since = None
                while not self._inbox and not self._pending and not self._jobs and not self._stopping \
                        and (not self._busy() or self._stalled()):
                    # Idle, or paused because the host stopped reading (backpressure).
                    if self._busy():
                        self._cv.wait(0.01)
                    else:
                        self.residency.track_busy(self._busy_ids())
                        due = self.residency.idle_due(self.models)  # an idle unload (--idle-unload)
                        if due is not None and due <= 0 and time.monotonic() - self._residency_at > 0.05:
                            break
                        due = None if due is None else max(due, 0.05)
                        idle_since = idle_since or time.monotonic()
                        left = IDLE_RELEASE_AFTER - (time.monotonic() - idle_since)
                        if left > 0:
                            self._cv.wait(left if due is None else min(left, due))
                        else:
                            self._release_idle_memory()
                            self._cv.wait(due)
                self._pending.extend(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            while self._pending:
                self._take(self._pending.popleft())
            if stopping:
                if self.group is not None:
                    self.group.stop()
                for runner in self._runners.values():
                    from .runners import cancelled_error

                    runner.abort(lambda: cancelled_error("request cancelled: the runtime is stopping"))
                return
            if self._jobs:
                self._run_jobs()
            self._check_residency()
            if self._stalled():
                continue
            if self.group is not None and not self.group.before_steps(self):
                continue  # the group is broken: its requests were failed (distributed.py)
            started = time.perf_counter()
            for runner in list(self._runners.values()):
                if len(runner):
                    runner.step()
            self._step_s = time.perf_counter() - started
            if time.monotonic() - self._memory_at > MEMORY_SNAPSHOT_EVERY:
                self._snapshot_memory()

    def _init_mlx(self) -> None:
        blas.preload()
        if self.group is not None:
            self.group.join(self)  # the followers and the mx.distributed group, before any MLX work
        try:
            import mlx.core as mx

            # Bound the buffers MLX keeps after use (by default as large as its memory limit).
            mx.set_cache_limit(defaults.MLX_CACHE_BYTES)
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

    # ---- work in order, loads and residency (engine thread) ----
    @staticmethod
    def _model_of(item):
        """The model id a piece of work names, if any."""
        if item[0] in ("load", "read"):
            return item[1].model_id
        if item[0] == "gen":
            return item[1].model_id
        params = getattr(item[1], "params", None)
        model_id = params.get("model") if isinstance(params, dict) else None
        return model_id if isinstance(model_id, str) else None

    def _take(self, item) -> None:
        """Run one piece of work from the inbox, or park it behind the load of the model it names."""
        kind = item[0]
        if kind == "read":  # the loader has read a model: build it here, a piece per step
            self._jobs.append(item[1])
            return
        model_id = self._model_of(item)
        if model_id in self._parked:
            self._parked[model_id].append(item)
            return
        if kind == "load":
            self._start_load(item[1])
            return
        if model_id is not None and model_id not in self.models and self.make_reload is not None \
                and not (kind == "call" and item[1].method == "model/unload"):
            params = self.residency.reload_params(model_id)  # unloaded by --idle-unload/--max-models
            if params is not None:
                self._start_load(self.make_reload(params, item[1] if kind == "call" else item[1].req))
                self._parked.setdefault(model_id, []).append(item)
                return
        if model_id in self.models:
            self.residency.used(model_id)
        if kind == "call":
            try:
                self._run_call(item[1], item[2])
            finally:
                if item[3] is not None:
                    item[3]()
        else:
            self._admit(item[1])

    def _start_load(self, job) -> None:
        if job.begin(self):
            return  # answered at once (already loaded, or an id clash)
        self._parked[job.model_id] = []
        self.residency.track_busy(self._busy_ids())  # requests that just ended count as uses
        others = [m for m in self.models if m != job.model_id]
        for model_id in self.residency.over_limit(others, len(self._parked), self._in_use):
            self._evict(model_id, "--max-models")
        self._loader.submit(job)

    def _run_jobs(self) -> None:
        """Build loading models a piece at a time: about one decode step of work while others decode."""
        deadline = time.perf_counter() + (self._step_s if self._busy() else 0.25)
        while self._jobs:
            job = self._jobs[0]
            started = time.perf_counter()
            over = job.step(self)
            log.debug("load of %r: a piece took %.1f ms", job.model_id, (time.perf_counter() - started) * 1000)
            if over:
                self._jobs.popleft()
                self._unpark(job)
            if time.perf_counter() >= deadline:
                break

    def _unpark(self, job) -> None:
        """A load is over: the work that waited for it runs next, in order (after a failed reload
        on demand it fails with the load's error)."""
        waiting = self._parked.pop(job.model_id, [])
        if job.is_reload and job.error is not None:
            for item in [i for i in waiting if i[0] in ("call", "gen")]:
                req = item[1] if item[0] == "call" else item[1].req
                if req.try_start():
                    req.fail(job.error)
                if item[0] == "call" and item[3] is not None:
                    item[3]()
            waiting = [i for i in waiting if i[0] not in ("call", "gen")]
        self._pending.extendleft(reversed(waiting))

    def _in_use(self, model_id) -> bool:
        """Requests in flight on a model: generations running or queued, other work queued, a load."""
        runner = self._runners.get(model_id)
        if (runner is not None and len(runner)) or model_id in self._parked or self.generations_for(model_id):
            return True
        with self._cv:
            queued = list(self._inbox)
        return any(self._model_of(item) == model_id for item in list(self._pending) + queued)

    def _busy_ids(self) -> set:
        return {m for m, r in self._runners.items() if len(r)}

    def _check_residency(self) -> None:
        """Unload models idle for --idle-unload seconds, and the least recently used past --max-models."""
        self.residency.track_busy(self._busy_ids())
        due = self.residency.idle_due(self.models)
        if due is not None and due <= 0:
            self._residency_at = time.monotonic()
            for model_id in self.residency.idle(list(self.models), self._in_use):
                self._evict(model_id, "idle")
        for model_id in self.residency.over_limit(list(self.models), len(self._parked), self._in_use):
            self._evict(model_id, "--max-models")

    def _evict(self, model_id, why: str) -> None:
        loaded = self.models.get(model_id)
        if loaded is None:
            return
        self.residency.unloaded(model_id, loaded.info)  # from here a request naming it reloads it
        self.drop_model(model_id)  # nothing in flight: this drops its runner and prompt cache too
        log.info("unloaded %r (%s); a request naming it reloads it", model_id, why)

    def drop_model(self, model_id):
        """Unload a model (engine thread): fail its requests, free its memory, then forget it, so
        model/list stops showing it loaded once its memory is back. Returns it, or None."""
        loaded = self.models.get(model_id)
        if loaded is None:
            return None
        self.abort_model(model_id)
        from . import models as model_files

        model_files.release(loaded)
        self._snapshot_memory()
        del self.models[model_id]
        return loaded

    def snapshot_memory(self) -> None:
        self._snapshot_memory()

    def _run_call(self, req, fn) -> None:
        if not req.try_start():
            return  # cancelled while queued: already answered
        try:
            result = fn(self)
        except RpcError as e:
            self._snapshot_memory()
            req.fail(e)
            return
        except Exception as e:
            log.exception("%s failed", req.method)
            req.fail(internal(req.method, e))
            return
        self._snapshot_memory()  # before answering, so runtime/info right after sees the new model
        req.respond(result)

    def _admit(self, gen) -> None:
        """Check and tokenize a new generation, then hand it to its model's runner."""
        if not gen.req.try_start():
            return
        try:
            gen.prepare(self.models, self.admission)
            self.admission.refuse_if_never_fits(gen)
            if self.group is not None:
                self.group.admit(gen)  # the followers mirror it (last: nothing may refuse it after this)
        except RpcError as e:
            gen.req.fail(e)
            return
        except Exception as e:
            log.exception("could not start generation")
            gen.req.fail(internal("generate", e))
            return
        runner = self._runners.get(gen.model_id)
        if runner is None or runner.loaded is not gen.loaded:
            # Vision models have their own runner (vision.py); text models decode in runners.py.
            from .runners import ModelRunner as make

            if gen.loaded.kind == "vision":
                from .vision import VisionRunner as make
            runner = self._runners[gen.model_id] = make(gen.loaded, self.max_batch, self.prompt_cache_bytes)
            if self.group is not None:
                runner.fuse = False  # ranks run mlx-lm's own two forwards per step, as followers do
            if hasattr(runner, "pacer"):
                runner.pacer.factor = self.prefill_factor
            runner.admission = self.admission
        runner.add(gen)

    def abort_model(self, model_id: str) -> None:
        """Fail every generation on a model that is being unloaded (engine thread)."""
        runner = self._runners.pop(model_id, None)
        if self.group is not None:
            self.group.unload(model_id)
        if runner is not None:
            runner.abort(lambda: RpcError(MODEL_UNLOADED, f"model {model_id!r} was unloaded while this request waited or ran"))

    def _release_idle_memory(self) -> None:
        """Nothing to do: hand MLX's freed buffers back to the system and take a fresh reading."""
        try:
            import mlx.core as mx

            if mx.get_cache_memory():
                mx.clear_cache()
                self._snapshot_memory()
        except Exception:
            pass

    def _snapshot_memory(self) -> None:
        self._memory_at = time.monotonic()
        try:
            import mlx.core as mx

            self.memory = {
                "active_bytes": int(mx.get_active_memory()),
                "peak_bytes": int(mx.get_peak_memory()),
                "cache_bytes": int(mx.get_cache_memory()),
                "cache_limit_bytes": defaults.MLX_CACHE_BYTES,
                "prompt_cache_bytes": sum(r.prompt_cache.nbytes for r in list(self._runners.values()) if r.prompt_cache is not None),
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
