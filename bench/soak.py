"""Soak: many mixed requests through the real runtime (a subprocess), reading its RSS as it goes.

    .venv/bin/python bench/soak.py --requests 10000 [--model DIR] [--json out.json]

The mix: streamed and non-streamed generates of varied prompts and lengths (seeded and not), cancels
mid-stream, tokenize, invalid params, unknown methods and pings, 32 in flight. Prints RSS and the
runtime's own memory report at each checkpoint; exits 1 if RSS at the end exceeds RSS at the first
checkpoint by more than --tolerance (default 10%). At the end it prints the runtime's own TTFT and
inter-token percentiles (runtime/metrics) beside the host's: request written → first chunk read, and
chunk gaps spread over the chunk's tokens."""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))

from mlx_sidecar.testing import make_model  # noqa: E402
from mlx_sidecar.testing.pipe import Pipe  # noqa: E402

import metrics_util  # noqa: E402


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_request(rng: random.Random, i: int):
    """(method, params, cancel?) for request i."""
    kind = rng.random()
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "soak", "test", str(i)]) for _ in range(rng.randint(1, 60)))
    if kind < 0.55:
        params = {"model": "m", "prompt": words, "max_tokens": rng.randint(1, 24), "stream": rng.random() < 0.7}
        if rng.random() < 0.3:
            params["seed"] = rng.randint(0, 1 << 30)
        if rng.random() < 0.3:
            params["temperature"] = 0.0
        return "generate", params, False
    if kind < 0.65:
        return "generate", {"model": "m", "messages": [{"role": "user", "content": words}], "max_tokens": 200}, True
    if kind < 0.75:
        return "tokenize", {"model": "m", "prompt": words}, False
    if kind < 0.85:
        return "generate", {"model": "m", "prompt": words, "top_k": rng.choice([10 ** 6, -1]), "temperature": 0.5}, False
    if kind < 0.9:
        return "no/such-method", {}, False
    return "runtime/ping", {}, False


class HostTimes:
    """What the host sees of each generate: request written → first chunk, and gaps between chunks."""

    def __init__(self):
        self.sent: dict = {}
        self.last: dict = {}
        self.ttft_ms: list = []
        self.inter_token_ms: list = []

    def chunk(self, params: dict) -> None:
        now, id = time.monotonic(), params["id"]
        if id in self.last:
            n = max(1, len(params["token_ids"]))
            self.inter_token_ms.extend([(now - self.last[id]) * 1000 / n] * n)
        elif id in self.sent:
            self.ttft_ms.append((now - self.sent.pop(id)) * 1000)
        self.last[id] = now

    def pause(self) -> None:
        self.sent.clear()
        self.last.clear()

    def done(self, id) -> None:
        self.sent.pop(id, None)
        self.last.pop(id, None)


host = HostTimes()


def take(msg, pending: dict, outcomes: dict) -> int:
    """Count one answer (1) or act on a chunk (cancel the requests meant to be cancelled) (0)."""
    if msg.get("method") == "generate/chunk":
        id = msg["params"]["id"]
        host.chunk(msg["params"])
        if pending.get(id):
            pending[id] = False
            p_cancel.append(id)
        return 0
    if "id" not in msg or msg["id"] not in pending:
        return 0
    del pending[msg["id"]]
    host.done(msg["id"])
    key = "ok" if "result" in msg else msg["error"]["data"]["type"]
    outcomes[key] = outcomes.get(key, 0) + 1
    return 1


p_cancel: list = []  # ids to cancel, sent by the loop


def soak(model: str, total: int, checkpoints: list[int], in_flight: int = 32, seed: int = 0) -> dict:
    rng = random.Random(seed)
    p = Pipe("ndjson", args=["--max-queue", "256"], check_schemas=False)
    answer, _ = p.request("model/load", {"model": model, "id": "m"})
    assert "result" in answer, answer
    pending: dict = {}
    sent = done = 0
    outcomes: dict = {}
    report = {"requests": total, "checkpoints": []}
    started = time.monotonic()
    next_check = list(checkpoints)
    while done < total:
        while sent < total and len(pending) < in_flight:
            method, params, cancel = one_request(rng, sent)
            id = p.start(method, params)
            if method == "generate":
                host.sent[id] = time.monotonic()
            pending[id] = cancel
            sent += 1
        while p_cancel:
            p.notify("$/cancelRequest", {"id": p_cancel.pop()})
        done += take(p.recv(60), pending, outcomes)
        if next_check and done >= next_check[0]:
            next_check.pop(0)
            time.sleep(1.5)  # let the engine go idle and return freed buffers, as it does between bursts
            host.pause()     # the host's clocks for requests in flight would count the sleep
            answer, others = p.request("runtime/info", timeout=30)
            for msg in others:
                done += take(msg, pending, outcomes)
            info = answer["result"]
            point = {"requests": done, "rss_bytes": rss_bytes(p.proc.pid), "memory": info["memory"],
                     "elapsed_s": round(time.monotonic() - started, 1)}
            report["checkpoints"].append(point)
            print(f"after {done:6d}: RSS {point['rss_bytes'] / 2**20:7.1f} MiB  mlx active {info['memory']['active_bytes'] / 2**20:6.1f} MiB"
                  f"  mlx cache {info['memory']['cache_bytes'] / 2**20:6.1f} MiB  prompt cache {info['memory'].get('prompt_cache_bytes', 0) / 2**20:6.1f} MiB"
                  f"  ({point['elapsed_s']} s)", file=sys.stderr)
    report["outcomes"] = outcomes
    report["latency_ms"] = metrics_util.show(p, "soak", {"ttft": host.ttft_ms, "inter_token": host.inter_token_ms}, out=sys.stderr)
    p.request("shutdown")
    p.notify("exit")
    p.proc.wait(10)
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--model", help="a model directory (default: a tiny random one)")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = args.model or str(make_model(tempfile.mkdtemp(prefix="soak-"), preset="tiny"))
    first = max(1, args.requests // 10)
    marks = sorted({first, args.requests // 2, args.requests})
    report = soak(model, args.requests, marks)
    base, last = report["checkpoints"][0]["rss_bytes"], report["checkpoints"][-1]["rss_bytes"]
    report["growth"] = round(last / base - 1, 4)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if last > base * (1 + args.tolerance):
        print(f"RSS grew {report['growth']:.1%} from {first} to {args.requests} requests (tolerance {args.tolerance:.0%})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
