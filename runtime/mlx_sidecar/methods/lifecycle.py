"""initialize, shutdown, exit and $/cancelRequest."""

import sys

from .. import PROTOCOL_VERSION, __version__, constraints, spec
from ..errors import INVALID_PARAMS, RpcError
from ..metrics import Ticker
from . import PENDING


def capabilities(ctx) -> dict:
    from ..framing import NAMES

    ix = spec.index()
    return {
        "framings": list(NAMES),
        "framing": ctx.framing,
        "methods": list(ix["methods"]),
        "notifications": list(ix["client_notifications"]) + list(ix["server_notifications"]),
        "device": ctx.engine.device,
        "versions": ctx.versions(),
        "limits": {"max_frame_bytes": ctx.max_frame_bytes, "max_stop_strings": 16},
        "structured_output": constraints.capabilities(),
    }


def initialize(ctx, req):
    wanted = req.params.get("protocol_version")
    if wanted is not None and wanted.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise RpcError(INVALID_PARAMS, f"protocol version {wanted} is not supported; this runtime speaks {PROTOCOL_VERSION}",
                       path="/protocol_version", supported=[PROTOCOL_VERSION])
    interval = req.params.get("metrics_interval_ms")
    if interval is not None and 0 < interval < Ticker.MIN_INTERVAL_MS:
        raise RpcError(INVALID_PARAMS, f"metrics_interval_ms must be 0 (off) or at least {Ticker.MIN_INTERVAL_MS}",
                       path="/metrics_interval_ms")
    ctx.engine.ready.wait(2.0)  # mlx.core's import: tens of milliseconds after spawn
    if interval is not None:
        ctx.metrics_ticker.set_interval(interval)  # the first $/metrics comes one interval from now
    return {
        "protocol_version": PROTOCOL_VERSION,
        "server_info": {"name": "mlx-sidecar", "version": __version__},
        "capabilities": capabilities(ctx),
    }


def shutdown(ctx, req):
    """Stop taking requests; answer once everything in flight has been answered."""
    ctx.metrics_ticker.stop()
    ctx.inflight.begin_shutdown(req)
    return PENDING


def exit(ctx, req):
    if not req.is_notification:
        req.respond({})
    ctx.stop(0 if ctx.inflight.got_shutdown else 1)
    return PENDING


def cancel_request(ctx, req):
    target = ctx.inflight.get(req.params["id"])
    if target is not None and target is not req:
        target.cancel()
    return PENDING
