"""Counters and latency windows behind runtime/metrics. Written by the engine and reader threads,
read by runtime/metrics; counters take a lock, latency samples go into bounded deques (appends are
atomic), so recording costs well under a microsecond."""

import collections
import logging
import threading
import time

log = logging.getLogger(__name__)

WINDOW = 4096  # latency samples kept per histogram: percentiles describe the most recent ones


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict = collections.defaultdict(collections.Counter)  # method → outcome → count
        self.errors: collections.Counter = collections.Counter()            # error code → count
        self.tokens = {"prompt": 0, "cached": 0, "completion": 0}
        self.ttft_ms: collections.deque = collections.deque(maxlen=WINDOW)
        self.inter_token_ms: collections.deque = collections.deque(maxlen=WINDOW)
        self.queue_wait_ms: collections.deque = collections.deque(maxlen=WINDOW)

    def request_done(self, method: str, error: dict | None) -> None:
        """One answered request: outcome "ok", or the error's data.type."""
        outcome = "ok" if error is None else error.get("data", {}).get("type", "error")
        with self._lock:
            self.requests[method][outcome] += 1
            if error is not None:
                self.errors[str(error.get("code"))] += 1

    def generation_done(self, prompt: int, cached: int, completion: int, ttft_ms: float | None, queue_ms: float) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt
            self.tokens["cached"] += cached
            self.tokens["completion"] += completion
        if ttft_ms is not None:
            self.ttft_ms.append(ttft_ms)
        self.queue_wait_ms.append(queue_ms)

    def snapshot(self) -> dict:
        with self._lock:
            requests = {m: dict(c) for m, c in self.requests.items()}
            errors = dict(self.errors)
            tokens = dict(self.tokens)
        counts = collections.Counter()
        for by_outcome in requests.values():
            counts.update(by_outcome)
        return {
            "requests": requests,
            "errors": errors,
            "cancellations": counts.get("cancelled", 0),
            "overloads": counts.get("overloaded", 0),
            "tokens": tokens,
            "latency_ms": {"ttft": summary(self.ttft_ms), "inter_token": summary(self.inter_token_ms),
                           "queue_wait": summary(self.queue_wait_ms)},
        }


def summary(samples) -> dict:
    """count, p50, p95, p99 and max of a window of samples (nearest-rank percentiles)."""
    values = sorted(list(samples))
    n = len(values)
    if not n:
        return {"count": 0}

    def rank(p):
        return round(values[min(n - 1, max(0, -(-n * p // 100) - 1))], 3)

    return {"count": n, "p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(values[-1], 3)}


class Ticker:
    """Sends $/metrics every interval from its own thread once initialize asks for it. snapshot()
    reads counters and lock-free gauges only, so a tick never waits behind a model; ticks are
    skipped while the host is not reading (stalled()), so unread notifications never pile up."""

    MIN_INTERVAL_MS = 50

    def __init__(self, snapshot, send, stalled=lambda: False):
        self._snapshot = snapshot   # () -> the runtime/metrics body
        self._send = send           # (message) -> None: hands a frame to the writer
        self._stalled = stalled
        self._cv = threading.Condition()
        self._interval = 0.0        # seconds; 0: off
        self._due = 0.0
        self._stopped = False
        self._thread = None
        self.sent = 0

    def set_interval(self, ms: int) -> None:
        """0 stops the notifications; otherwise the first one comes one interval from now."""
        with self._cv:
            if self._stopped:
                return
            self._interval = ms / 1000
            self._due = time.monotonic() + self._interval
            if ms and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlx-sidecar-metrics", daemon=True)
                self._thread.start()
            self._cv.notify()

    def stop(self) -> None:
        """No notification is sent after this returns (shutdown, teardown)."""
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stopped:
                    return
                if not self._interval:
                    self._cv.wait()
                    continue
                delay = self._due - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                # Keep to the schedule; after a long pause, start again from now instead of bursting.
                self._due += self._interval
                if self._due <= time.monotonic():
                    self._due = time.monotonic() + self._interval
                if self._stalled():
                    continue
                try:
                    # Sent under the lock so that stop() returning means nothing more is sent.
                    self._send({"jsonrpc": "2.0", "method": "$/metrics", "params": self._snapshot()})
                    self.sent += 1
                except Exception:
                    log.exception("$/metrics: could not send a snapshot")
