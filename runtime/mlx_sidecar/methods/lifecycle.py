"""initialize, shutdown, exit and $/cancelRequest."""

import sys

from .. import PROTOCOL_VERSION, __version__, spec
from ..errors import INVALID_PARAMS, RpcError
from . import PENDING


def capabilities(server) -> dict:
    from ..framing import NAMES

    ix = spec.index()
    return {
        "framings": list(NAMES),
        "framing": server.framing,
        "methods": list(ix["methods"]),
        "notifications": list(ix["client_notifications"]) + list(ix["server_notifications"]),
        "device": server.engine.device,
        "versions": server.versions(),
        "limits": {"max_frame_bytes": server.max_frame_bytes, "max_stop_strings": 16},
    }


def initialize(server, req):
    wanted = req.params.get("protocol_version")
    if wanted is not None and wanted.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise RpcError(INVALID_PARAMS, f"protocol version {wanted} is not supported; this runtime speaks {PROTOCOL_VERSION}",
                       path="/protocol_version", supported=[PROTOCOL_VERSION])
    server.engine.ready.wait(2.0)  # mlx.core's import: tens of milliseconds after spawn
    return {
        "protocol_version": PROTOCOL_VERSION,
        "server_info": {"name": "mlx-sidecar", "version": __version__},
        "capabilities": capabilities(server),
    }


def shutdown(server, req):
    """Stop taking requests; answer once everything in flight has been answered."""
    server.begin_shutdown(req)
    return PENDING


def exit(server, req):
    if not req.is_notification:
        req.respond({})
    server.stop(0 if server.got_shutdown else 1)
    return PENDING


def cancel_request(server, req):
    target = server.inflight.get(req.params["id"])
    if target is not None and target is not req:
        target.cancel()
    return PENDING
