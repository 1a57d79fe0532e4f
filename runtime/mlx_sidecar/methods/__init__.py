"""Method handlers: `handle(ctx, req)` returns a result, or PENDING when the engine will answer.

A handler's module is imported when its method is first called (or by `preload`), so `initialize`
is answered before generation, models and images are imported."""

import importlib

PENDING = object()

# method → (module in this package, function)
_HANDLERS = {
    "initialize": ("lifecycle", "initialize"),
    "shutdown": ("lifecycle", "shutdown"),
    "exit": ("lifecycle", "exit"),
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

# What runs when sent as a notification: the real notifications, and methods whose effect outlives
# their answer. Queries (generate, tokenize, runtime/*, ...) would answer nobody, so they are ignored.
_NOTIFICATIONS = {
    "exit": ("lifecycle", "exit"),
    "$/cancelRequest": ("lifecycle", "cancel_request"),
    "model/load": ("model", "load"),
    "model/unload": ("model", "unload"),
}

HANDLERS: dict = {}       # resolved handlers, filled by handler()
NOTIFICATIONS: dict = {}


def _resolve(table: dict, where: dict, method: str):
    fn = table.get(method)
    if fn is None and method in where:
        module, name = where[method]
        fn = table[method] = getattr(importlib.import_module("." + module, __name__), name)
    return fn


def handler(method: str):
    """The function answering a request for method, or None."""
    return HANDLERS.get(method) or _resolve(HANDLERS, _HANDLERS, method)


def notification_handler(method: str):
    return NOTIFICATIONS.get(method) or _resolve(NOTIFICATIONS, _NOTIFICATIONS, method)


def preload() -> None:
    """Import every handler's module (the server calls it once the first answer is written)."""
    for method in _HANDLERS:
        handler(method)
    for method in _NOTIFICATIONS:
        notification_handler(method)
