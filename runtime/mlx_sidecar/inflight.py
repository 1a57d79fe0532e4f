"""Every in-flight fact in one lock-guarded place: requests by id, generate admissions per model,
pending model loads, and the shutdown drain. The reader, engine and writer threads all go through
these few verbs, so no fact is read-modified-written from two threads at once."""

import threading

from .errors import INVALID_REQUEST, OVERLOADED, RpcError
from .metrics import Metrics


class InFlight:
    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._requests: dict = {}      # id → Request, from admission to its answer
        self._generations: dict = {}   # model id → generate requests admitted and not answered
        self._loads: dict = {}         # model id → loads queued or running
        self._shutdown = None          # the shutdown request, until everything else is answered
        self._shutting_down = False
        self._got_shutdown = False
        self.on_drained = lambda: None  # called once shutdown has been answered
        self.metrics = Metrics()        # what has been answered so far (runtime/metrics)

    # ---- requests ----
    def admit(self, req) -> None:
        """Register a request under its id; a duplicate id in flight is refused."""
        with self._lock:
            if req.id in self._requests:
                raise RpcError(INVALID_REQUEST, f"id {req.id!r} is already in use by a request in flight; use a fresh id",
                               type="duplicate_id")
            self._requests[req.id] = req

    def get(self, id):
        with self._lock:
            return self._requests.get(id)

    def requests(self) -> list:
        with self._lock:
            return list(self._requests.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._requests)

    def complete(self, req) -> None:
        """A request has been answered. Answers a pending shutdown once nothing else is in flight."""
        with self._lock:
            if not req.is_notification and self._requests.get(req.id) is req:
                del self._requests[req.id]
            shutdown = self._take_shutdown_if_drained()
        if shutdown is not None:
            shutdown.respond({})
            self.on_drained()

    # ---- generate admission ----
    def admit_generation(self, model_id: str):
        """Count a generate request against its model's limits (max_batch running plus max_queue
        waiting); past them, overloaded at once. Returns the release to call when it is answered."""
        limit = self.max_batch + self.max_queue
        with self._lock:
            n = self._generations.get(model_id, 0)
            if n >= limit:
                raise RpcError(OVERLOADED, f"model {model_id!r} already has {n} generate requests running or queued (limit {limit}); retry later",
                               model=model_id, limit=limit)
            self._generations[model_id] = n + 1

        def release():
            with self._lock:
                left = self._generations[model_id] - 1
                if left:
                    self._generations[model_id] = left
                else:
                    del self._generations[model_id]

        return release

    def generations(self, model_id: str) -> int:
        """Generate requests on a model admitted and not yet answered (residency: never unload those)."""
        with self._lock:
            return self._generations.get(model_id, 0)

    # ---- model loads ----
    def load_queued(self, model_id: str) -> None:
        with self._lock:
            self._loads[model_id] = self._loads.get(model_id, 0) + 1

    def load_done(self, model_id: str) -> None:
        with self._lock:
            left = self._loads.get(model_id, 1) - 1
            if left:
                self._loads[model_id] = left
            else:
                self._loads.pop(model_id, None)

    def loading(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._loads

    # ---- shutdown ----
    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def got_shutdown(self) -> bool:
        return self._got_shutdown

    def begin_shutdown(self, req=None) -> None:
        """Refuse new requests from now on; with a shutdown request, answer it once drained."""
        with self._lock:
            self._shutting_down = True
            if req is None:
                return
            self._got_shutdown = True
            self._shutdown = req
            shutdown = self._take_shutdown_if_drained()
        if shutdown is not None:
            shutdown.respond({})
            self.on_drained()

    def draining(self) -> bool:
        """True while a shutdown waits for in-flight work to be answered."""
        with self._lock:
            return self._shutdown is not None

    def _take_shutdown_if_drained(self):
        req = self._shutdown
        if req is not None and all(r is req for r in self._requests.values()):
            self._shutdown = None
            return req
        return None
