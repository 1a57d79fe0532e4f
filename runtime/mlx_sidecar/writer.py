"""The writer thread: the only code that touches the protocol's stdout.

Everything outgoing goes through one queue, so frames never interleave. Streamed tokens wait in
a per-request `ChunkBuffer`; the writer sends a chunk when the engine asks (first token, or N
tokens buffered) or when the oldest buffered token has waited `max_latency` seconds."""

import heapq
import logging
import os
import queue
import threading
import time

log = logging.getLogger(__name__)

_monotonic = time.monotonic
MAX_WAIT = 3600.0  # the longest the writer sleeps on a timer; deadlines past it fire at once


class ChunkBuffer:
    """Tokens and text of one streaming request, filled by the engine and drained by the writer."""

    __slots__ = ("request_id", "chunk_tokens", "max_latency", "lock", "token_ids", "text",
                 "since", "index", "flush_asked", "timer_set", "closed", "logprobs", "extra", "ready")

    def __init__(self, request_id, chunk_tokens: int, max_latency: float, with_logprobs: bool = False):
        self.request_id = request_id
        self.chunk_tokens = chunk_tokens
        self.max_latency = max_latency
        self.lock = threading.Lock()
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.since = 0.0       # when the oldest buffered token arrived
        self.index = 0         # the next chunk's index
        self.flush_asked = False
        self.timer_set = False
        self.closed = False
        self.logprobs = [] if with_logprobs else None   # one item per token id, when asked for
        self.extra: dict = {}  # other chunk fields (a tool_calls delta), merged into the next chunk
        self.ready: list = []  # chunks sealed by the engine (first token, N tokens), not yet sent

    def seal(self) -> None:
        """Close the pending tokens into a chunk of their own (caller holds the lock), so a chunk
        has exactly the tokens it was asked for even when the writer runs late."""
        if not self.token_ids and not self.text and not self.extra:
            return
        params = {"id": self.request_id, "index": self.index,
                  "text": "".join(self.text), "token_ids": self.token_ids}
        if self.logprobs is not None:
            params["logprobs"] = self.logprobs
            self.logprobs = []
        if self.extra:
            params.update(self.extra)
            self.extra = {}
        self.index += 1
        self.token_ids = []
        self.text = []
        self.ready.append(params)

    def take(self, everything: bool = True):
        """(chunks due now, in order; a deadline for what stays pending or None). Sealed chunks always
        go; pending tokens too when `everything` (a deadline passed, the request ended). Caller holds no lock."""
        with self.lock:
            self.flush_asked = False
            if everything:
                self.timer_set = False
                self.seal()
            ready, self.ready = self.ready, []
            deadline = None
            if not everything and self.token_ids and not self.timer_set:
                self.timer_set = True  # tokens that came while the flush was on its way
                deadline = self.since + self.max_latency
            return ready, deadline


class Writer:
    def __init__(self, fd: int, encode, on_broken_pipe=None):
        self._fd = fd
        self._encode = encode
        self._on_broken_pipe = on_broken_pipe
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlx-sidecar-writer", daemon=True)
        self._broken = False
        self._writing_since = 0.0
        self.bytes_written = 0
        self._thread.start()

    # ---- called from any thread ----
    def send(self, message) -> None:
        self._q.put(("msg", message))

    def add_tokens(self, buf: ChunkBuffer, token_ids, text: str, flush: bool, logprobs=None, extra=None) -> None:
        """Engine side: buffer new tokens/text (and a logprobs item per token, other chunk fields);
        ask for a chunk now (flush) or by the deadline."""
        now = _monotonic()
        with buf.lock:
            if not buf.token_ids and not buf.text and not buf.extra:
                buf.since = now
            if isinstance(token_ids, int):
                buf.token_ids.append(token_ids)
                if logprobs is not None and buf.logprobs is not None:
                    buf.logprobs.append(logprobs)
            else:
                buf.token_ids.extend(token_ids)
                if logprobs is not None and buf.logprobs is not None:
                    buf.logprobs.extend(logprobs)
            if text:
                buf.text.append(text)
            if extra:
                for key, value in extra.items():
                    buf.extra[key] = buf.extra[key] + value if key in buf.extra else value  # deltas and counts accumulate
            n = len(buf.token_ids)
            due = flush or n >= buf.chunk_tokens or buf.max_latency <= 0
            if due:
                buf.seal()
            ask_flush = due and not buf.flush_asked
            if ask_flush:
                buf.flush_asked = True
            set_timer = not ask_flush and not buf.flush_asked and not buf.timer_set
            if set_timer:
                buf.timer_set = True
        if ask_flush:
                self._q.put(("flush", buf))
        elif set_timer:
            self._q.put(("timer", buf, buf.since + buf.max_latency))

    def finish(self, buf: ChunkBuffer | None, response) -> None:
        """Send what is left in the buffer as a last chunk, then the response."""
        self._q.put(("finish", buf, response))

    def stalled(self, after: float = 0.05) -> bool:
        """True while a write has been blocked for a while: the host is not reading stdout."""
        since = self._writing_since
        return since > 0 and _monotonic() - since > after

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far has been written (or the pipe broke)."""
        marker = threading.Event()
        self._q.put(("mark", marker))
        return marker.wait(timeout)

    def close(self) -> None:
        """End the writer thread once what is queued before this call has been written."""
        self._q.put(("close",))

    # ---- the writer thread ----
    def _run(self):
        # The writer must outlive any one bad message: a failure is logged and the loop goes on.
        self._timers: list = []  # (deadline, seq, buf)
        self._seq = 0
        while True:
            try:
                self._loop()
                return  # closed
            except Exception:
                log.exception("writer: unexpected failure; continuing")

    def _encode_safely(self, message) -> bytes | None:
        """Encode one message; one that cannot be encoded becomes an error answer for its id."""
        try:
            return self._encode(message)
        except Exception as e:
            log.exception("writer: could not encode a message")
            if isinstance(message, dict) and "id" in message:
                from .errors import internal

                try:
                    return self._encode({"jsonrpc": "2.0", "id": message["id"], "error": internal("encoding the answer", e).to_dict()})
                except Exception:
                    pass
            return None

    def _chunk(self, buf: ChunkBuffer, everything: bool = True) -> bytes | None:
        ready, deadline = buf.take(everything)
        if deadline is not None:
            self._add_timer(deadline, buf)
        frames = [self._encode_safely({"jsonrpc": "2.0", "method": "generate/chunk", "params": params})
                  for params in ready]
        frames = [f for f in frames if f is not None]
        return b"".join(frames) if frames else None

    def _add_timer(self, deadline: float, buf: ChunkBuffer) -> None:
        if not deadline <= _monotonic() + MAX_WAIT:  # NaN or absurd: send at once
            deadline = _monotonic()
        self._seq += 1
        heapq.heappush(self._timers, (deadline, self._seq, buf))

    def _loop(self):
        timers = self._timers
        out: list = []
        while True:
            timeout = None
            if timers:
                timeout = min(max(0.0, timers[0][0] - _monotonic()), MAX_WAIT)
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                item = None
            marks = []
            closing = False
            while item is not None:
                kind = item[0]
                if kind == "msg":
                    out.append(self._encode_safely(item[1]))
                elif kind == "flush":
                    out.append(self._chunk(item[1], everything=False))
                elif kind == "timer":
                    self._add_timer(item[2], item[1])
                elif kind == "finish":
                    buf = item[1]
                    if buf is not None:
                        out.append(self._chunk(buf))
                        buf.closed = True
                    if item[2] is not None:
                        out.append(self._encode_safely(item[2]))
                elif kind == "mark":
                    marks.append(item[1])
                elif kind == "close":
                    closing = True
                    break
                # Coalesce whatever else is already queued into one write.
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = None
            now = _monotonic()
            while timers and timers[0][0] <= now:
                _, _, buf = heapq.heappop(timers)
                if buf.closed:
                    continue
                with buf.lock:
                    due = buf.timer_set and buf.since + buf.max_latency <= now + 0.0005
                if due:
                    out.append(self._chunk(buf))
            frames = [f for f in out if f is not None]
            out.clear()
            if frames:
                self._write(b"".join(frames) if len(frames) > 1 else frames[0])
            for m in marks:
                m.set()
            if closing:
                return

    def _write(self, data: bytes) -> None:
        if self._broken:
            return
        view = memoryview(data)
        self._writing_since = _monotonic()
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.bytes_written += len(data)
        except (BrokenPipeError, OSError) as e:
            self._broken = True
            log.warning("stdout closed (%s); stopping", e)
            if self._on_broken_pipe:
                self._on_broken_pipe()
        finally:
            self._writing_since = 0.0
