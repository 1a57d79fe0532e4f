"""JSON-RPC 2.0 on decoded frames: envelopes, ids, batches, notifications, cancellation.

Runs on the reader thread and never touches MLX: cheap methods answer here, the rest hand a
closure or a Generation to the engine and answer later through their `Request`."""

import logging
import threading
import time

from . import spec
from .errors import (CANCELLED, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND,
                     RpcError, internal)
from .methods import PENDING, handler as method_handler, notification_handler

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE = 0, 1, 2
_MISSING = object()


def error_message(id, error: RpcError) -> dict:
    return {"jsonrpc": "2.0", "id": id, "error": error.to_dict()}


class Request:
    """One request (or notification) from receipt to its single answer."""

    __slots__ = ("id", "method", "params", "received_at", "is_notification", "cancel_requested",
                 "partial", "on_done", "_sink", "_state", "_lock", "_inflight")

    def __init__(self, inflight, id, method, params, sink, received_at):
        self.id = id
        self.method = method
        self.params = params
        self.received_at = received_at
        self.is_notification = id is _MISSING
        self.cancel_requested = False
        self.partial = None  # data for a cancellation that arrives before work starts
        self.on_done = None  # called once, after the answer is queued
        self._sink = sink
        self._state = QUEUED
        self._lock = threading.Lock()
        self._inflight = inflight

    def try_start(self) -> bool:
        """Engine side: claim the request; False when it was cancelled while queued."""
        with self._lock:
            if self._state != QUEUED:
                return False
            self._state = RUNNING
            return True

    def cancel(self) -> None:
        with self._lock:
            state = self._state
            self.cancel_requested = True
        if state == QUEUED:
            self.fail(RpcError(CANCELLED, "request cancelled before it started", **(self.partial or {})))

    def respond(self, result, buf=None) -> None:
        self._finish({"jsonrpc": "2.0", "id": self.id, "result": result}, buf)

    def fail(self, error: RpcError, buf=None) -> None:
        if self.is_notification:
            log.info("notification %s failed: %s", self.method, error.message)
        self._finish(error_message(self.id, error), buf)

    def _finish(self, message, buf) -> None:
        with self._lock:
            if self._state == DONE:
                return
            self._state = DONE
        self._sink(None if self.is_notification else message, buf)
        if self.on_done is not None:
            self.on_done()
        self._inflight.metrics.request_done(self.method, message.get("error"))
        self._inflight.complete(self)


class _Batch:
    """Collects the answers of one batch array and sends them as one array."""

    def __init__(self, writer):
        self._writer = writer
        self._lock = threading.Lock()
        self._answers: list = []
        self._expected = 0
        self._sealed = False

    def expect(self) -> None:
        self._expected += 1

    def sink(self, message, buf) -> None:
        if buf is not None:
            self._writer.finish(buf, None)
        if message is None:
            return
        with self._lock:
            self._answers.append(message)
            ready = self._sealed and len(self._answers) == self._expected
        if ready:
            self._writer.send(self._answers)

    def seal(self) -> None:
        with self._lock:
            self._sealed = True
            ready = self._expected > 0 and len(self._answers) == self._expected
        if ready:
            self._writer.send(self._answers)


class Dispatcher:
    def __init__(self, ctx):
        self.ctx = ctx
        self.inflight = ctx.inflight
        self.writer = ctx.writer

    def _single_sink(self, message, buf) -> None:
        if message is not None or buf is not None:
            self.writer.finish(buf, message)

    def handle(self, frame) -> None:
        try:
            self._handle(frame)
        except Exception as e:  # a bug must cost one answer, never the reader
            log.exception("dispatcher: unexpected failure")
            self.writer.send(error_message(None, internal("the dispatcher", e)))

    def _handle(self, frame) -> None:
        if frame.error is not None:
            self.writer.send(error_message(None, frame.error))
            return
        message = frame.message
        if isinstance(message, list):
            if not message:
                self.writer.send(error_message(None, RpcError(INVALID_REQUEST, "empty batch: send an array with at least one request")))
                return
            batch = _Batch(self.writer)
            for item in message:
                self._one(item, batch)
            batch.seal()
        else:
            self._one(message, None)

    def _one(self, msg, batch) -> None:
        received = time.monotonic()
        sink = batch.sink if batch is not None else self._single_sink

        def reject(id, error):
            if batch is not None:
                batch.expect()
            method = msg.get("method") if isinstance(msg, dict) else None
            self.inflight.metrics.request_done(method if type(method) is str else "(invalid)", error.to_dict())
            sink(error_message(id, error), None)

        if not isinstance(msg, dict):
            return reject(None, RpcError(INVALID_REQUEST, "a request must be a JSON object with jsonrpc, method and (for requests) id"))
        id = msg.get("id", _MISSING)
        if id is not _MISSING and not (type(id) is int or type(id) is str):
            return reject(None, RpcError(INVALID_REQUEST, "id must be a string or an integer"))
        reply_id = None if id is _MISSING else id
        if msg.get("jsonrpc") != "2.0":
            return self._maybe_reject(id, reject, RpcError(INVALID_REQUEST, 'jsonrpc must be exactly "2.0"'))
        method = msg.get("method")
        if type(method) is not str:
            return self._maybe_reject(id, reject, RpcError(INVALID_REQUEST, "method must be a string"))
        params = msg.get("params", _MISSING)
        if params is _MISSING or params is None:
            params = {}
        elif isinstance(params, list):
            return self._maybe_reject(id, reject, RpcError(INVALID_PARAMS, f"params of {method} must be an object (by name), not an array", path=""))
        elif not isinstance(params, dict):
            return self._maybe_reject(id, reject, RpcError(INVALID_REQUEST, "params must be an object"))

        if id is _MISSING:
            return self._notification(method, params, received)
        if self.inflight.shutting_down and method != "exit":
            return reject(reply_id, RpcError(INVALID_REQUEST, "shutting down: no new requests are accepted after shutdown", type="shutting_down"))
        handler = method_handler(method)
        if handler is None:
            return reject(reply_id, RpcError(METHOD_NOT_FOUND, f"method {method!r} does not exist; initialize lists the methods", method=method))
        if self.inflight.get(id) is not None:
            return reject(reply_id, RpcError(INVALID_REQUEST, f"id {id!r} is already in use by a request in flight; use a fresh id", type="duplicate_id"))
        try:
            spec.validate(method, "params", params)
        except RpcError as e:
            return reject(reply_id, e)
        req = Request(self.inflight, id, method, params, sink, received)
        try:
            self.inflight.admit(req)
        except RpcError as e:
            return reject(reply_id, e)
        if batch is not None:
            batch.expect()
        self._run(handler, req)

    def _maybe_reject(self, id, reject, error):
        # A malformed notification is never answered (JSON-RPC); a malformed request is.
        if id is _MISSING:
            log.warning("ignored malformed notification: %s", error.message)
            return
        reject(id, error)

    def _notification(self, method, params, received) -> None:
        handler = notification_handler(method)
        if handler is None or (self.inflight.shutting_down and method not in ("exit", "$/cancelRequest")):
            if not method.startswith("$/"):
                log.warning("ignored notification %r (%s)", method, "shutting down" if handler else
                            "not a notification: send it with an id to get an answer")
            return
        try:
            spec.validate(method, "params", params)
        except RpcError as e:
            log.warning("ignored notification %s: %s", method, e.message)
            return
        req = Request(self.inflight, _MISSING, method, params, self._single_sink, received)
        self._run(handler, req)

    def _run(self, handler, req) -> None:
        try:
            result = handler(self.ctx, req)
        except RpcError as e:
            req.fail(e)
            return
        except Exception as e:
            log.exception("%s failed", req.method)
            req.fail(internal(req.method, e))
            return
        if result is not PENDING:
            req.respond(result)
