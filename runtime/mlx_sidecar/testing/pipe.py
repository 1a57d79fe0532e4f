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


class InProcess:
    """The real runtime (Server.serve) on a thread of this process, over os.pipe() pairs, with the
    few Popen members Pipe uses. Starts in milliseconds; the subprocess stays for signals and exit."""

    def __init__(self, args=()):
        from ..cli import parse_args
        from ..server import Server

        a = parse_args(list(args))
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        from ..cli import image_options

        self.server = Server(a.framing, a.max_frame_bytes, preload=a.model, max_batch=a.max_batch,
                             max_queue=a.max_queue, prompt_cache_bytes=a.prompt_cache_bytes,
                             image_options=image_options(a))
        self.server.engine.prefill_factor = max(0.0, a.prefill_slice_factor)
        self.server.engine.admission.fixed_budget = a.kv_budget_bytes
        self.server.engine.admission.max_context = a.max_context
        self.stdin = os.fdopen(in_w, "wb", buffering=0)
        self.stdout = os.fdopen(out_r, "rb", buffering=0)
        self.stderr = None
        self.returncode = None
        self._thread = threading.Thread(target=self._run, args=(in_r, out_w), name="in-process-runtime", daemon=True)
        self._thread.start()

    def _run(self, in_r, out_w):
        try:
            self.returncode = self.server.serve(in_r, out_w)
        finally:
            os.close(out_w)

    def poll(self):
        return None if self._thread.is_alive() else self.returncode

    def wait(self, timeout=None):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("in-process runtime", timeout)
        return self.returncode

    def kill(self):
        self.server.stop(-9)
        try:
            self.stdin.close()
        except OSError:
            pass


class Pipe:
    def __init__(self, framing: str = "ndjson", args=(), env=None, python=None, stderr_to=None, in_process=False,
                 check_schemas=True):
        self.framing = framing
        self.started = time.monotonic()
        if in_process:
            assert env is None and python is None, "an in-process runtime shares this process's environment"
            self.proc = InProcess(args)
        else:
            cmd = [python or sys.executable, "-m", "mlx_sidecar", *args]
            full_env = dict(os.environ, **(env or {}))
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr_to or subprocess.PIPE, env=full_env, bufsize=0)
        self.check_schemas = check_schemas  # every answer and notification checked against protocol/
        self.messages: queue.Queue = queue.Queue()
        self.raw_stdout = bytearray()
        self.stderr = bytearray()
        self._next_id = 0
        self._methods: dict = {}  # id → method, to check each answer against its result schema
        self._lock = threading.Lock()
        self._reading = threading.Event()
        self._reading.set()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if stderr_to is None and self.proc.stderr is not None:
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
        self._methods[id] = method
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
        if self.check_schemas:
            for one in msg if isinstance(msg, list) else [msg]:
                self._check(one)
        return msg

    def _check(self, msg) -> None:
        """Fail loudly when the runtime sends something its own protocol/ does not allow."""
        from .. import spec

        if not isinstance(msg, dict) or "__decode_error__" in msg:
            return
        if "method" in msg and "id" not in msg:
            method, part, value = msg["method"], "params", msg.get("params", {})
        elif "result" in msg and msg.get("id") in self._methods:
            method, part, value = self._methods[msg["id"]], "result", msg["result"]
        else:
            return
        problem = spec.problem(method, part, value)
        if problem:
            raise AssertionError(f"the runtime sent a {method} {part} that breaks protocol/: {problem}\n{msg!r:.2000}")

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
