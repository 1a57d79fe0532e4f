"""runtime/ping and runtime/info: answered on the reader thread, never behind a model."""

import os
import time

from .. import PROTOCOL_VERSION, __version__


def ping(server, req):
    return {}


def info(server, req):
    engine = server.engine
    return {
        "server_info": {"name": "mlx-sidecar", "version": __version__},
        "protocol_version": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "uptime_ms": round((time.monotonic() - server.started_at) * 1000, 1),
        "framing": server.framing,
        "device": engine.device,
        "versions": server.versions(),
        "memory": dict(engine.memory),
        "models": [m.info for m in list(engine.models.values())],
        "in_flight": {"requests": len(server.inflight), "generating": engine.generating, "queued": engine.queued},
    }
