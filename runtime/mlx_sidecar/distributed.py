"""One model sharded over a group of processes with mlx.distributed; this is rank 0's side.

Rank 0 is the sidecar the host spawned. Every other rank runs follower.py. Every collective must
line up, so the followers replay what rank 0's engine does, in the same order: loads, unloads,
admitted generations and each engine step. Rank 0 sends those over a plain TCP side channel
(length-prefixed MessagePack), so an idle follower sleeps in a blocking read instead of busy-polling
inside a collective. What depends on time or on the host is decided here and sent: which requests
were cancelled before this step (latched once per step), the pacer's prefill slice, when a request
ended. Tokens are sampled on rank 0 only and shared through an all_sum in the sampler, so every rank
feeds the same token whatever the sampler, seed or logits processors. Speculative decoding, score
and vision models are refused in a group."""

import json
import logging
import os
import queue
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack

from .errors import GENERATION_FAILED, INTERNAL_ERROR, INVALID_PARAMS, MODEL_LOAD_FAILED, RpcError

log = logging.getLogger(__name__)

GROUP = None                # the Leader when this process is rank 0 of a group; None otherwise
CONNECT_TIMEOUT = 120.0     # seconds for followers to start and join
LOAD_CHECK_TIMEOUT = 60.0   # seconds for followers to find a model's files
MEMORY_EVERY = 0.5          # seconds between a busy follower's memory reports
WATCHDOG_S = 3.0            # seconds a broken group's engine may stay inside a collective
HEARTBEAT_S = 1.0           # a follower says it is alive this often, busy or idle
SILENCE_S = float(os.environ.get("MLX_SIDECAR_GROUP_TIMEOUT", "15"))  # then a silent rank counts as gone
_LOCAL = {"localhost", "127.0.0.1", "::1", socket.gethostname()}


# ---- the side channel: length-prefixed MessagePack ----
def send_msg(sock, obj) -> int:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(data)) + data)
    return len(data) + 4


def recv_msg(sock):
    """The next message, or None at EOF."""
    head = _exact(sock, 4)
    if head is None:
        return None
    body = _exact(sock, struct.unpack(">I", head)[0])
    return None if body is None else msgpack.unpackb(body, raw=False, strict_map_key=False)


def _exact(sock, n: int):
    buf = bytearray()
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except TimeoutError:
            raise
        except OSError:
            return None
        if not part:
            return None
        buf += part
    return bytes(buf)


def read_hostfile(path: str):
    """(backend, hosts) from mlx.launch's hostfile format: a list of {"ssh", "ips"} or an object
    with "hosts" (and optionally "backend")."""
    with open(path) as f:
        data = json.load(f)
    backend = "ring"
    if isinstance(data, dict):
        backend = data.get("backend") or backend
        data = data["hosts"]
    hosts = [{"ssh": h.get("ssh", "localhost"), "ips": list(h.get("ips") or [])} for h in data]
    if len(hosts) < 2:
        raise ValueError(f"{path}: a group needs at least 2 hosts, the file lists {len(hosts)}")
    if backend == "ring" and any(not h["ips"] for h in hosts):
        raise ValueError(f"{path}: the ring backend needs an IP address (\"ips\") for every host")
    return backend, hosts


def sharded_load(path, group, sharding: str, trust_remote_code: bool):
    """mlx-lm's sharded_load with the group and kind chosen here; returns (model, tokenizer, kind)."""
    from mlx_lm.utils import sharded_load as mlx_sharded_load

    kind = sharding if sharding in ("tensor", "pipeline") else pick_sharding(path, sharding)
    if kind == "tensor":
        model, tok = mlx_sharded_load(str(path), tensor_group=group, trust_remote_code=trust_remote_code)
    else:
        model, tok = mlx_sharded_load(str(path), pipeline_group=group, trust_remote_code=trust_remote_code)
    return model, tok, kind


def pick_sharding(path, sharding: str) -> str:
    """auto: tensor-parallel when the architecture can, else pipeline (which needs an index file).
    Raises ValueError when the architecture cannot be split the way asked."""
    from mlx_lm.utils import load_model

    model, _ = load_model(path, lazy=True, strict=False)
    tensor = hasattr(model, "shard")
    pipeline = hasattr(model, "model") and hasattr(model.model, "pipeline")
    kind = sharding if sharding != "auto" else ("tensor" if tensor else "pipeline")
    if kind == "tensor" and not tensor:
        raise ValueError("its architecture has no tensor-parallel split (mlx-lm's shard); try --distributed-sharding pipeline")
    if kind == "pipeline" and not pipeline:
        raise ValueError("its architecture cannot be pipelined by mlx-lm" + ("; try --distributed-sharding tensor" if tensor else ""))
    if kind == "pipeline" and not (Path(path) / "model.safetensors.index.json").is_file():
        raise ValueError("pipeline sharding needs model.safetensors.index.json in the model directory")
    return kind


class _MxWithoutClearCache:
    """mlx.core as mlx-lm's generate module sees it in a group: clear_cache is skipped there.
    mlx-lm calls it between steps (every 256 tokens, after prefills) and it waits for the pending
    step while holding Python's GIL: with a stuck or dead peer that would freeze every thread of
    the process. The cache stays bounded by set_cache_limit, and the engine clears it when idle."""

    def __init__(self, mx):
        self._mx = mx

    def __getattr__(self, name):
        return getattr(self._mx, name)

    def clear_cache(self):
        pass


def keep_gil_free() -> None:
    """Every rank of a group calls this once before generating (idempotent)."""
    import mlx.core as mx
    import mlx_lm.generate  # noqa: F401  (the package's `generate` attribute is the function)

    gen = sys.modules["mlx_lm.generate"]
    if not isinstance(gen.mx, _MxWithoutClearCache):
        gen.mx = _MxWithoutClearCache(mx)


def settle(loaded):
    """Measure what would otherwise be measured later on rank 0 alone (a forward pass: a collective
    the followers would not join). Every rank calls this right after loading."""
    try:
        from . import admission

        loaded.kv = admission.measure(loaded.model, loaded.config)
    except ImportError:
        pass
    return loaded


class _Broadcast:
    """Rank 0's sampler: samples, then shares the tokens with every rank (the others add zeros)."""

    def __init__(self, inner, group):
        self.inner, self.group = inner, group

    def __call__(self, logprobs):
        import mlx.core as mx

        return mx.distributed.all_sum(self.inner(logprobs).astype(mx.uint32), group=self.group)

    def rewind(self):
        if hasattr(self.inner, "rewind"):
            self.inner.rewind()


class _LatchedReq:
    """A request as the runner sees it in a group: cancellation changes only once per engine step,
    when rank 0 tells the followers, so both sides cancel at the same step."""

    def __init__(self, inner):
        self.inner = inner
        self.cancel_requested = False

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Peer:
    def __init__(self, rank: int, host: str, proc):
        self.rank, self.host, self.proc = rank, host, proc
        self.sock = None
        self.pid = None
        self.memory: dict = {}


class Leader:
    """Rank 0 of a group: spawns and joins the followers, mirrors the engine's work to them."""

    def __init__(self, hostfile: str, port: int = 32323, sharding: str = "auto", log_level: str = "info"):
        self.backend, self.hosts = read_hostfile(hostfile)
        self.size = len(self.hosts)
        self.port = port
        self.sharding = sharding
        self.log_level = log_level
        self.state = "starting"
        self.broken: str | None = None   # why the group cannot serve any more
        self.group = None                # mx.distributed.Group once joined
        self.models: dict = {}           # model id → "tensor" or "pipeline"
        self.peers: list[_Peer] = []
        self.sent_bytes = 0              # side-channel bytes sent (diagnostics)
        self._live: dict = {}            # gid → Generation admitted and not yet reported ended
        self._next_gid = 0
        self._steps = 0                  # engine steps begun: the watchdog's sign of life
        self._samplers: dict = {}        # id(sampler) → (sampler, _Broadcast): kept alive so ids stay unique
        self._replies: queue.Queue = queue.Queue()
        self._peer_lost = threading.Event()  # a side channel closed: the cause of a failed collective
        self._lock = threading.Lock()
        self._ring_file = None
        self._listener = None

    # ---- start ----
    def spawn(self) -> None:
        """Write the ring's hostfile, listen for followers and start them (before the engine starts)."""
        ring = [[f"{ip}:{self.port + i}" for ip in h["ips"][:1]] for i, h in enumerate(self.hosts)]
        fd, self._ring_file = tempfile.mkstemp(prefix="mlx-sidecar-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(ring, f)
        os.environ["MLX_RANK"] = "0"
        os.environ["MLX_SIDECAR_LOAD_ON_ENGINE"] = "1"  # models.py: the whole load on the engine thread, as the followers do
        os.environ["MLX_HOSTFILE"] = self._ring_file
        bind = self.hosts[0]["ips"][0] if self.hosts[0]["ips"] else "127.0.0.1"
        self._listener = socket.create_server((bind, 0))
        control = f"{bind}:{self._listener.getsockname()[1]}"
        for rank, host in enumerate(self.hosts[1:], start=1):
            env = {"MLX_RANK": str(rank), "MLX_SIDECAR_CONTROL": control, "MLX_HOSTFILE": self._ring_file}
            args = [sys.executable, "-m", "mlx_sidecar", "--follower", "--log-level", self.log_level]
            if host["ssh"] in _LOCAL or (host["ips"] and host["ips"][0].startswith("127.")):
                proc = subprocess.Popen(args, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=2)
            else:
                proc = subprocess.Popen(["ssh", host["ssh"], _remote_script(env, ring, args)],
                                        stdin=subprocess.DEVNULL, stdout=2)
            self.peers.append(_Peer(rank, host["ssh"], proc))

    def join(self, engine) -> None:
        """Engine thread, before any MLX work: accept the followers' side channels, then join the
        mlx.distributed group with them."""
        try:
            self._accept(engine)
            import mlx.core as mx

            self.group = mx.distributed.init(backend=self.backend, strict=True)
            keep_gil_free()
            try:
                os.unlink(self._ring_file)  # every rank has read it while joining
            except OSError:
                pass
            if self.group.size() != self.size:
                raise RuntimeError(f"the group has {self.group.size()} ranks, the hostfile lists {self.size}")
            for peer in self.peers:
                threading.Thread(target=self._listen, args=(peer,), name=f"mlx-sidecar-rank{peer.rank}", daemon=True).start()
            self.state = "ok"
            log.info("joined a %s group of %d ranks", self.backend, self.size)
        except Exception as e:
            self._break(f"the group could not start: {e}")

    def _accept(self, engine) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        waiting = {p.rank: p for p in self.peers}
        self._listener.settimeout(0.5)
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(waiting)} did not connect within {CONNECT_TIMEOUT:.0f} s")
            for p in waiting.values():
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"rank {p.rank} ({p.host}) exited with code {p.proc.returncode} before joining")
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = recv_msg(sock)
            peer = waiting.pop(hello["rank"]) if hello and hello.get("rank") in waiting else None
            if peer is None:
                sock.close()
                continue
            peer.sock, peer.pid = sock, hello.get("pid")
            send_msg(sock, {"op": "config", "max_batch": engine.max_batch,
                            "prompt_cache_bytes": engine.prompt_cache_bytes, "backend": self.backend})
        self._listener.close()

    # ---- the followers' messages (one thread each) ----
    def _listen(self, peer: _Peer) -> None:
        peer.sock.settimeout(SILENCE_S)
        while True:
            try:
                msg = recv_msg(peer.sock)
            except TimeoutError:
                # Alive but stuck (stopped, swapping): rank 0 may be waiting for it inside a collective.
                self._break(f"rank {peer.rank} ({peer.host}) stopped answering (no heartbeat for {SILENCE_S:.0f} s)")
                self._peer_lost.set()
                self._replies.put((peer.rank, None))
                return
            if msg is None:
                code = peer.proc.poll() if peer.proc is not None else None
                if code is None and peer.proc is not None:
                    try:
                        code = peer.proc.wait(1.0)
                    except subprocess.TimeoutExpired:
                        pass
                self._break(f"rank {peer.rank} ({peer.host}) left the group" + (f" (exit code {code})" if code is not None else ""))
                self._peer_lost.set()
                self._replies.put((peer.rank, None))
                return
            if msg.get("op") == "memory":
                peer.memory = msg["memory"]
            elif msg.get("op") != "alive":
                self._replies.put((peer.rank, msg))

    def _break(self, why: str) -> None:
        with self._lock:
            if self.broken is not None:
                return
            self.broken = why
            self.state = "broken"
        log.error("distributed group broken: %s", why)
        threading.Thread(target=self._watchdog, args=(self._steps,), name="mlx-sidecar-group-watchdog", daemon=True).start()

    def _watchdog(self, steps: int) -> None:
        """If the engine thread is stuck inside a collective that never fails, answer its requests
        from here (a request is answered once: the later answer is dropped)."""
        time.sleep(WATCHDOG_S)
        if self._steps != steps or not self._live:
            return
        log.error("the engine has not come back from a collective in %.0f s; failing its requests", WATCHDOG_S)
        for gen in list(self._live.values()):
            if not gen.done:
                gen.finish_error(self.broken_error())  # with the text and usage so far

    def _send(self, obj) -> None:
        for peer in self.peers:
            if self.broken is not None:
                return
            try:
                self.sent_bytes += send_msg(peer.sock, obj)
            except OSError as e:
                self._break(f"rank {peer.rank} ({peer.host}) is unreachable: {e}")

    def broken_error(self) -> RpcError:
        return RpcError(GENERATION_FAILED, f"the distributed group is broken ({self.broken}); restart the runtime",
                        type="generation_failed", group_broken=True)

    def engine_error(self, method: str) -> RpcError:
        return RpcError(INTERNAL_ERROR, f"{method} cannot run: the distributed group is broken ({self.broken}); restart the runtime",
                        group_broken=True)

    def load_error(self, source: str) -> RpcError:
        return RpcError(MODEL_LOAD_FAILED, f"the distributed group is broken ({self.broken}); restart the runtime",
                        type="model_load_failed", model=source)

    # ---- mirrored work (engine thread) ----
    def load(self, path, source: str, model_id: str, dtype: str, trust_remote_code: bool):
        """Load a text model sharded over the group: the followers first check they can read it,
        then every rank loads its shard. Returns (model, tokenizer)."""
        if self.broken is not None:
            raise self.load_error(source)
        try:
            kind = pick_sharding(path, self.sharding)
        except ValueError as e:
            raise RpcError(MODEL_LOAD_FAILED, f"{source!r} cannot be sharded over the group: {e}", type="unsupported_architecture", model=source) from None
        except Exception as e:
            raise RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: {e}", type="invalid_model", model=source) from None
        while not self._replies.empty():
            self._replies.get_nowait()
        self._send({"op": "load", "path": str(path), "id": model_id, "sharding": kind, "dtype": dtype,
                    "trust_remote_code": trust_remote_code})
        problems = []
        deadline = time.monotonic() + LOAD_CHECK_TIMEOUT
        for _ in self.peers:
            try:
                rank, reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._break("a follower did not answer a model load in time")
                break
            if reply is None:
                break
            if not reply.get("ok"):
                problems.append(f"rank {rank}: {reply.get('error')}")
        if self.broken is not None:
            raise RpcError(MODEL_LOAD_FAILED, f"the distributed group is broken ({self.broken}); restart the runtime", type="model_load_failed", model=source)
        if problems:
            raise RpcError(MODEL_LOAD_FAILED, f"could not load {source!r} on every rank: " + "; ".join(problems), type="model_load_failed", model=source)
        try:
            model, tok, kind = sharded_load(path, self.group, kind, trust_remote_code)
        except Exception as e:
            if "[ring]" in str(e):
                self._break(f"a peer was lost while loading {source!r}: {e}")
            raise RpcError(MODEL_LOAD_FAILED, f"could not load {source!r} sharded ({kind}): {type(e).__name__}: {e}", type="model_load_failed", model=source) from None
        self.models[model_id] = kind
        return model, tok

    def unload(self, model_id: str) -> None:
        self.models.pop(model_id, None)
        self._send({"op": "unload", "id": model_id})

    def admit(self, gen) -> None:
        """A generation passed its checks on rank 0: latch its cancellation, share its tokens, and
        tell the followers (before the runner sees it)."""
        if self.broken is not None:
            raise self.broken_error()
        if getattr(gen, "speculative", None) is not None:
            raise RpcError(INVALID_PARAMS, "speculative decoding is not available while a model is sharded over a group; "
                           "send speculative: {\"type\": \"none\"} or leave it out", path="/speculative")
        gen.req = _LatchedReq(gen.req)
        inner = gen.sampler
        entry = self._samplers.get(id(inner))
        if entry is None:
            entry = self._samplers[id(inner)] = (inner, _Broadcast(inner, self.group))
        gen.sampler = entry[1]
        self._next_gid += 1
        gen.gid = self._next_gid
        self._live[gen.gid] = gen
        finish_error = gen.finish_error

        def failed(error, _finish=finish_error):
            # A collective that failed means a rank is gone: say so, and stop serving.
            if error.code == GENERATION_FAILED and ("[ring]" in error.message or self.broken is not None):
                self._peer_lost.wait(2.0)  # the side channel usually tells which rank left
                self._break("a peer was lost during generation")
                error.message = f"generation failed: the distributed group is broken ({self.broken}); restart the runtime"
                error.data["group_broken"] = True
            elif error.code == GENERATION_FAILED and error.message.startswith("generation failed:"):
                self._break(f"rank 0 failed alone, the ranks may disagree: {error.message}")
            return _finish(error)

        gen.finish_error = failed
        self._send({"op": "admit", "gid": gen.gid, "model": gen.model_id, "prompt": list(gen.prompt_ids),
                    "max_tokens": gen.max_tokens, "stop": sorted(gen.stop_ids), "sampler": id(inner)})

    def before_steps(self, engine) -> bool:
        """Engine thread, before it steps the runners: False when nothing may run (group broken)."""
        self._steps += 1
        if self.broken is not None:
            for mid in list(engine._runners):
                engine._runners.pop(mid).abort(self.broken_error)
            self._live.clear()
            return False
        ended, cancelled = [], []
        for gid, gen in list(self._live.items()):
            if gen.done:
                ended.append(gid)
                del self._live[gid]
            elif gen.req.inner.cancel_requested:
                gen.req.cancel_requested = True
                cancelled.append(gid)
        drop = []
        if ended:
            used = {id(g.sampler.inner) for g in self._live.values()}
            drop = [k for k in self._samplers if k not in used]
            for k in drop:
                del self._samplers[k]
        from .admission import UNLIMITED

        for r in engine._runners.values():
            r.admission = UNLIMITED  # the KV budget's waits follow free memory (timing): the followers could not mirror them
        busy = {mid: [r.pacer.step_tokens, r.pacer.factor] for mid, r in engine._runners.items() if len(r) and hasattr(r, "pacer")}
        if busy or drop:
            self._send({"op": "step", "models": busy, "cancel": cancelled, "ended": ended, "drop": drop})
        return self.broken is None

    def stop(self) -> None:
        self._send({"op": "stop"})

    # ---- runtime/info ----
    def describe(self, engine) -> dict:
        ranks = [{"rank": 0, "host": self.hosts[0]["ssh"], "pid": os.getpid(), "memory": dict(engine.memory)}]
        for p in self.peers:
            memory = dict(p.memory) or {"active_bytes": 0, "peak_bytes": 0, "cache_bytes": 0, "rss_bytes": 0}
            ranks.append({"rank": p.rank, "host": p.host, "pid": p.pid or 0, "memory": memory})
        out = {"size": self.size, "backend": self.backend, "state": self.state, "sharding": dict(self.models), "ranks": ranks}
        if self.broken is not None:
            out["error"] = self.broken
        return out


def _remote_script(env: dict, ring, args) -> str:
    """A shell line for ssh: the ring's hostfile in a temporary file, the environment, the follower."""
    script = f"cd {shlex.quote(os.getcwd())} 2>/dev/null; fname=$(mktemp); echo {shlex.quote(json.dumps(ring))} >$fname; "
    for key, value in env.items():
        if key != "MLX_HOSTFILE":
            script += f"export {key}={shlex.quote(value)}; "
    script += "export MLX_HOSTFILE=$fname; exec " + " ".join(map(shlex.quote, args))
    return script
