"""Method handlers: `handle(server, req)` returns a result, or PENDING when the engine will answer."""

PENDING = object()

from . import generate, lifecycle, model, runtime, score, tokenize  # noqa: E402

HANDLERS = {
    "initialize": lifecycle.initialize,
    "shutdown": lifecycle.shutdown,
    "exit": lifecycle.exit,
    "runtime/ping": runtime.ping,
    "runtime/info": runtime.info,
    "runtime/metrics": runtime.metrics,
    "model/load": model.load,
    "model/unload": model.unload,
    "model/list": model.list_models,
    "generate": generate.generate,
    "score": score.score,
    "tokenize": tokenize.tokenize,
    "detokenize": tokenize.detokenize,
}

# What runs when sent as a notification: the real notifications, and methods whose effect outlives
# their answer. Queries (generate, tokenize, runtime/*, ...) would answer nobody, so they are ignored.
NOTIFICATIONS = {
    "exit": lifecycle.exit,
    "$/cancelRequest": lifecycle.cancel_request,
    "model/load": model.load,
    "model/unload": model.unload,
}
