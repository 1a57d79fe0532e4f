"""A follower rank (`mlx-sidecar --follower`, started by rank 0): replays rank 0's engine work on
its own shard so that every collective lines up. It writes no frames; it logs to stderr.

It runs the same runner code as rank 0 (runners.py) with stand-in generations: they keep the
tokens (which come from rank 0 through the sampler's all_sum) and end only when rank 0 says so,
at the start of the next step, before any collective. Between messages it sleeps in a blocking
read of the side channel, so an idle follower costs no CPU."""

import logging
import os
import socket
import sys
import threading
import time

from . import blas, defaults, distributed, models
from .errors import RpcError

log = logging.getLogger(__name__)


class _Req:
    cancel_requested = False


class _Stand:
    """What the runner needs of a generation; rank 0 decides everything a host would see."""

    top_logprobs = None
    speculative = None

    def __init__(self, gid, model_id, loaded, prompt, max_tokens, stop, sampler):
        self.gid, self.model_id, self.loaded = gid, model_id, loaded
        self.req = _Req()
        self.prompt_ids = list(prompt)
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(stop)
        self.sampler = sampler
        self.processors = []     # rank 0 applies them; its sampled token is the one fed
        self.tokens: list[int] = []
        self.completion = self.cached_tokens = 0
        self.first_at = None
        self.done = False

    def begin(self, cached_tokens: int) -> None:
        self.cached_tokens = cached_tokens

    def on_token(self, token, lp=None, drafted=False) -> bool:
        self.first_at = self.first_at or time.monotonic()
        if token not in self.stop_ids:
            self.tokens.append(token)
            self.completion += 1
        return False             # rank 0 says when it ended (next step's "ended")

    def finish(self, reason) -> None:
        self.done = True

    def finish_error(self, error) -> None:
        self.done = True


class _Receive:
    """A follower's sampler: its part of the all_sum that carries rank 0's tokens."""

    def __init__(self, group):
        self.group = group

    def __call__(self, logprobs):
        import mlx.core as mx

        return mx.distributed.all_sum(mx.zeros(logprobs.shape[:-1], dtype=mx.uint32), group=self.group)


class Follower:
    def __init__(self, sock, rank: int):
        self.sock, self.rank = sock, rank
        self.models: dict = {}
        self.runners: dict = {}
        self.gens: dict = {}       # gid → _Stand
        self.samplers: dict = {}   # rank 0's sampler key → _Receive
        self._memory_at = 0.0
        self._send_lock = threading.Lock()
        threading.Thread(target=self._heartbeat, name="mlx-sidecar-heartbeat", daemon=True).start()

    def send(self, obj) -> None:
        with self._send_lock:
            distributed.send_msg(self.sock, obj)

    def _heartbeat(self) -> None:
        # Tells rank 0 this process is alive even while it waits inside a collective (MLX releases the GIL).
        while True:
            time.sleep(distributed.HEARTBEAT_S)
            try:
                self.send({"op": "alive"})
            except OSError:
                return

    def run(self) -> int:
        config = distributed.recv_msg(self.sock)
        if config is None:
            return 1
        self.max_batch, self.cache_bytes = config["max_batch"], config["prompt_cache_bytes"]
        blas.preload()
        import mlx.core as mx

        mx.set_cache_limit(defaults.MLX_CACHE_BYTES)
        self.group = mx.distributed.init(backend=config["backend"], strict=True)
        distributed.keep_gil_free()
        log.info("rank %d of %d joined", self.group.rank(), self.group.size())
        self._report_memory()
        while True:
            msg = distributed.recv_msg(self.sock)  # blocks: an idle follower sleeps here
            if msg is None or msg["op"] == "stop":
                log.info("rank %d: rank 0 has gone; exiting", self.rank)
                return 0
            getattr(self, "_" + msg["op"])(msg)
            if time.monotonic() - self._memory_at > distributed.MEMORY_EVERY:
                self._report_memory()

    # ---- operations, in rank 0's order ----
    def _load(self, msg) -> None:
        from pathlib import Path

        path = Path(msg["path"])
        if not (path / "config.json").is_file():
            self.send({"op": "ready", "ok": False, "error": f"{path} has no config.json on this machine"})
            return
        self.send({"op": "ready", "ok": True})
        import json

        started = time.perf_counter()
        try:
            model, tok, _ = distributed.sharded_load(path, self.group, msg["sharding"], msg["trust_remote_code"])
        except Exception:
            # Rank 0 fails the same way (same files, same checks) and answers the host; stay in the group.
            log.exception("rank %d: could not load %s", self.rank, path)
            return
        config = json.loads((path / "config.json").read_text())
        self.models[msg["id"]] = distributed.settle(models._finish(str(path), msg["id"], path, config, "llm", model, tok, None,
                                                msg["dtype"], "cpu" if _device_type() == "cpu" else "gpu", started))
        self._report_memory()

    def _unload(self, msg) -> None:
        runner = self.runners.pop(msg["id"], None)
        if runner is not None:
            runner.abort(lambda: RpcError(0, "unloaded"))
        loaded = self.models.pop(msg["id"], None)
        if loaded is not None:
            models.release(loaded)
        self._report_memory()

    def _admit(self, msg) -> None:
        from .runners import ModelRunner

        loaded = self.models[msg["model"]]
        sampler = self.samplers.get(msg["sampler"])
        if sampler is None:
            sampler = self.samplers[msg["sampler"]] = _Receive(self.group)
        gen = self.gens[msg["gid"]] = _Stand(msg["gid"], msg["model"], loaded, msg["prompt"], msg["max_tokens"], msg["stop"], sampler)
        runner = self.runners.get(gen.model_id)
        if runner is None or runner.loaded is not loaded:
            runner = self.runners[gen.model_id] = ModelRunner(loaded, self.max_batch, self.cache_bytes)
            runner.fuse = False  # as rank 0 does in a group: mlx-lm's own two forwards per step
        runner.add(gen)

    def _step(self, msg) -> None:
        # Requests that ended on rank 0 last step, or were cancelled before this one, leave first.
        for gid in list(msg["ended"]) + list(msg["cancel"]):
            gen = self.gens.get(gid)
            if gen is not None:
                gen.req.cancel_requested = True
        for gid in msg["ended"]:
            self.gens.pop(gid, None)
        for key in msg["drop"]:
            self.samplers.pop(key, None)
        for runner in self.runners.values():
            if len(runner):
                runner._sweep_cancelled()
        for mid, (step_tokens, factor) in msg["models"].items():
            runner = self.runners[mid]
            runner.pacer.step_tokens, runner.pacer.factor = step_tokens, factor  # rank 0's timing decides the slice
            runner.step()

    def _report_memory(self) -> None:
        import mlx.core as mx
        from .engine import _rss_bytes

        self._memory_at = time.monotonic()
        memory = {"active_bytes": int(mx.get_active_memory()), "peak_bytes": int(mx.get_peak_memory()),
                  "cache_bytes": int(mx.get_cache_memory()), "rss_bytes": _rss_bytes()}
        self.send({"op": "memory", "memory": memory})


def _device_type() -> str:
    import mlx.core as mx

    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def main() -> int:
    """Connect the side channel named by MLX_SIDECAR_CONTROL and follow rank 0 until it goes."""
    rank = int(os.environ.get("MLX_RANK", "1"))
    host, _, port = os.environ["MLX_SIDECAR_CONTROL"].rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=distributed.CONNECT_TIMEOUT)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    distributed.send_msg(sock, {"op": "hello", "rank": rank, "pid": os.getpid()})
    try:
        return Follower(sock, rank).run()
    except Exception:
        log.exception("rank %d failed; leaving the group", rank)
        return 1
    finally:
        sys.stderr.flush()
