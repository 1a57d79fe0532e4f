"""runtime/ping, runtime/info and runtime/metrics: answered on the reader thread, never behind a model
(the periodic $/metrics notification sends the same snapshot from its own thread)."""

import os
import time

from .. import PROTOCOL_VERSION, __version__, constraints


def ping(ctx, req):
    return {}


def info(ctx, req):
    engine = ctx.engine
    out = {
        "server_info": {"name": "mlx-sidecar", "version": __version__},
        "protocol_version": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "uptime_ms": round((time.monotonic() - ctx.started_at) * 1000, 1),
        "framing": ctx.framing,
        "device": engine.device,
        "versions": ctx.versions(),
        "memory": dict(engine.memory),
        "models": [m.info for m in list(engine.models.values())],
        "structured_output": constraints.capabilities(),
        "grammar_cache": constraints.cache_info(),
        "in_flight": {"requests": len(ctx.inflight), "generating": engine.generating, "queued": engine.queued},
    }
    if getattr(engine, "group", None) is not None:
        out["group"] = engine.group.describe(engine)  # a sharded model's ranks (distributed.py)
    return out


def metrics(ctx, req):
    return snapshot(ctx)


def snapshot(ctx) -> dict:
    """runtime/metrics' result, also the body of each periodic $/metrics notification."""
    engine = ctx.engine
    snap = ctx.inflight.metrics.snapshot()
    snap["uptime_ms"] = round((time.monotonic() - ctx.started_at) * 1000, 1)
    snap["gauges"] = {"requests_in_flight": len(ctx.inflight), "generating": engine.generating,
                      "queued": engine.queued, "streams": engine.streams(), "memory": dict(engine.memory),
                      "kv": engine.admission.describe()}
    return snap
