"""A minimal real-pipe client for tests and benchmarks: spawns the runtime as a subprocess and
speaks one framing. Its decoders are written independently of the runtime's readers."""

import json
import os
import queue
import subprocess
import sys
import threading
import time

import msgpack


def encode(framing: str, message) -> bytes:
    if framing == "msgpack":
        return msgpack.packb(message, use_bin_type=True)
    body = json.dumps(message, separators=(",", ":")).encode()
    if framing == "lsp":
        return b"Content-Length: %d\r\n\r\n" % len(body) + body
    return body + b"\n"


class Pipe:
    def __init__(self, framing: str = "ndjson", args=(), env=None, python=None, stderr_to=None):
        self.framing = framing
        cmd = [python or sys.executable, "-m", "mlx_sidecar", *args]
        full_env = dict(os.environ, **(env or {}))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr_to or subprocess.PIPE, env=full_env, bufsize=0)
        self.messages: queue.Queue = queue.Queue()
        self.raw_stdout = bytearray()
        self.stderr = bytearray()
        self._next_id = 0
        self._lock = threading.Lock()
        self._reading = threading.Event()
        self._reading.set()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if stderr_to is None:
            threading.Thread(target=self._read_stderr, daemon=True).start()

    # ---- sending ----
    def send(self, message) -> None:
        self.send_raw(encode(self.framing, message))

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def notify(self, method, params=None) -> None:
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def start(self, method, params=None, id=None):
        id = self.next_id() if id is None else id
        msg = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return id

    def request(self, method, params=None, id=None, timeout=60.0):
        """Send a request and wait for its answer; returns (answer, notifications seen meanwhile)."""
        id = self.start(method, params, id)
        return self.wait(id, timeout)

    def wait(self, id, timeout=60.0):
        notes = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if isinstance(msg, dict) and "method" in msg and "id" not in msg:
                notes.append(msg)
                continue
            if isinstance(msg, dict) and "__decode_error__" in msg:
                raise AssertionError(f"could not decode the runtime's output: {msg['__decode_error__']}")
            if isinstance(msg, dict) and msg.get("id") == id:
                return msg, notes
            notes.append(msg)  # another request's answer

    def recv(self, timeout=30.0):
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout:.1f}s; stderr tail: {bytes(self.stderr[-2000:]).decode(errors='replace')}") from None
        if msg is EOFError:
            raise EOFError(f"runtime closed stdout; stderr tail: {bytes(self.stderr[-2000:]).decode(errors='replace')}")
        return msg

    # ---- lifecycle ----
    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self, timeout=5.0) -> int:
        self.close_stdin()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def pause_reading(self) -> None:
        """Stop reading stdout, like a host that stopped paying attention (backpressure tests)."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def _read(self, out):
        self._reading.wait()
        return out.read(65536)

    # ---- reading ----
    def _read_stderr(self):
        for chunk in iter(lambda: self.proc.stderr.read(4096), b""):
            self.stderr += chunk

    def _read_stdout(self):
        out = self.proc.stdout
        try:
            if self.framing == "msgpack":
                unpacker = msgpack.Unpacker(raw=False)
                for chunk in iter(lambda: self._read(out), b""):
                    self.raw_stdout += chunk
                    unpacker.feed(chunk)
                    for msg in unpacker:
                        self.messages.put(msg)
            elif self.framing == "lsp":
                buf = b""
                for chunk in iter(lambda: self._read(out), b""):
                    self.raw_stdout += chunk
                    buf += chunk
                    while True:
                        head, sep, rest = buf.partition(b"\r\n\r\n")
                        if not sep:
                            break
                        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n"))
                        n = int(fields[b"Content-Length"])
                        if len(rest) < n:
                            break
                        self.messages.put(json.loads(rest[:n]))
                        buf = rest[n:]
            else:
                buf = b""
                for chunk in iter(lambda: self._read(out), b""):
                    self.raw_stdout += chunk
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        self.messages.put(json.loads(line))
        except Exception as e:  # a framing bug in the runtime: surface it in the test
            self.messages.put({"__decode_error__": repr(e)})
        self.messages.put(EOFError)
