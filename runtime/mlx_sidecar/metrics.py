"""Counters and latency windows behind runtime/metrics. Written by the engine and reader threads,
read by runtime/metrics; counters take a lock, latency samples go into bounded deques (appends are
atomic), so recording costs well under a microsecond."""

import collections
import threading

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
