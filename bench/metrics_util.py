"""The runtime's own latency figures (runtime/metrics) printed beside what a bench measured as the host.

    from metrics_util import show
    show(pipe, "label", host={"ttft": [ms, ...], "inter_token": [ms, ...]})

Host and runtime windows use the same nearest-rank percentiles (mlx_sidecar.metrics.summary), so
the two lines compare directly: the runtime's start at the request being read, the host's at the
request being written, and the difference is the pipe, the reader and the writer."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))

from mlx_sidecar.metrics import summary  # noqa: E402

WINDOWS = (("ttft", "TTFT"), ("inter_token", "inter-token"), ("queue_wait", "queue wait"))


def fetch(p, timeout: float = 60.0) -> dict:
    """runtime/metrics' result from a live testing.pipe.Pipe (other messages read meanwhile are dropped:
    call it once the bench's own requests are answered)."""
    answer, _ = p.request("runtime/metrics", timeout=timeout)
    if "result" not in answer:
        raise RuntimeError(f"runtime/metrics failed: {answer.get('error')}")
    return answer["result"]


def line(window: dict) -> str:
    """'p50 1.2 · p95 3.4 · p99 5.6 · max 7.8 ms (n=100)', or 'no samples'."""
    if not window.get("count"):
        return "no samples"
    return (f"p50 {window['p50']:.1f} · p95 {window['p95']:.1f} · p99 {window['p99']:.1f} · max {window['max']:.1f} ms"
            f" (n={window['count']})")


def show(p, label: str, host: dict | None = None, out=sys.stdout) -> dict:
    """Print the runtime's TTFT, inter-token and queue-wait percentiles, each with the host's window
    of the same name beside it when given (host: name → samples in ms); returns both as data."""
    runtime = fetch(p)["latency_ms"]
    host_summary = {name: summary(samples) for name, samples in (host or {}).items()}
    for name, title in WINDOWS:
        text = f"{label}: {title:<11} runtime {line(runtime[name])}"
        if name in host_summary:
            text += f" | host {line(host_summary[name])}"
        print(text, file=out, flush=True)
    return {"runtime": runtime, "host": host_summary}
