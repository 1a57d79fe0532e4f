"""Method handlers: `handle(ctx, req)` returns a result, or PENDING when the engine will answer.

A handler's module is imported when its method is first called (or by `preload`), so `initialize`
is answered before generation, models and images are imported."""

import importlib

PENDING = object()

# method → (module in this package, function)
_FUNCTIONS = {
    "initialize": ("lifecycle", "initialize"),
    "shutdown": ("lifecycle", "shutdown"),
    "exit": ("lifecycle", "exit"),
    "$/cancelRequest": ("lifecycle", "cancel_request"),
    "runtime/ping": ("runtime", "ping"),
    "runtime/info": ("runtime", "info"),
    "runtime/metrics": ("runtime", "metrics"),
    "model/load": ("model", "load"),
    "model/unload": ("model", "unload"),
    "model/list": ("model", "list_models"),
    "generate": ("generate", "generate"),
    "score": ("score", "score"),
    "tokenize": ("tokenize", "tokenize"),
    "detokenize": ("tokenize", "detokenize"),
}
_REQUESTS = frozenset(_FUNCTIONS) - {"$/cancelRequest"}
# What runs when sent as a notification: the real notifications, and methods whose effect outlives
# their answer. Queries (generate, tokenize, runtime/*, ...) would answer nobody, so they are ignored.
_NOTIFICATIONS = frozenset({"exit", "$/cancelRequest", "model/load", "model/unload"})

_resolved: dict = {}  # method → its function, imported on first use


def _resolve(method: str):
    fn = _resolved.get(method)
    if fn is None:
        module, name = _FUNCTIONS[method]
        fn = _resolved[method] = getattr(importlib.import_module("." + module, __name__), name)
    return fn


def handler(method: str):
    """The function answering a request for method, or None."""
    return _resolve(method) if method in _REQUESTS else None


def notification_handler(method: str):
    return _resolve(method) if method in _NOTIFICATIONS else None


def preload() -> None:
    """Import every handler's module (the server calls it once the first answer is written)."""
    for method in _FUNCTIONS:
        _resolve(method)
