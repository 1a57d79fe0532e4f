"""Tokens/s of one process vs two ranks on loopback (ring backend), and what the group sends per token.

    .venv/bin/python bench/distributed.py [--presets tiny small] [--tokens 128] [--batch 8] [--pipeline]

For each tiny random llama preset: decode tokens/s of one stream and of --batch streams, through the
real runtime (a subprocess) alone and as rank 0 of a two-rank group. Bytes per token are the kernel's
counts for the follower's TCP sockets (ss -i: the ring's collectives and the side channel). A last probe times one small all_sum between two ranks (the latency a tensor-
parallel layer pays twice per token)."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from mlx_sidecar.testing import PRESETS, make_model  # noqa: E402
from mlx_sidecar.testing.sharded import free_port_pair  # noqa: E402
from mlx_sidecar.testing.pipe import Pipe  # noqa: E402


def tcp_bytes(pid: int) -> tuple[int, int]:
    """(bytes sent, bytes received) over all TCP sockets of a process, from the kernel (ss -i)."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout.splitlines()
    sent = received = 0
    mine = False
    for line in out:
        if not line[:1].isspace():
            mine = f"pid={pid}," in line
        if mine:
            for field in line.split():
                if field.startswith("bytes_sent:"):
                    sent += int(field.split(":")[1])
                elif field.startswith("bytes_received:"):
                    received += int(field.split(":")[1])
    return sent, received


def run(p, n_streams: int, tokens: int) -> float:
    """Aggregate decode tokens/s of n_streams greedy requests started together."""
    started = time.perf_counter()  # from the first request written to the last answer read
    ids = [p.start("generate", {"model": "m", "prompt": f"Stream {i}: the quick brown fox", "max_tokens": tokens,
                                "temperature": 0, "stream": False}) for i in range(n_streams)]
    done = 0
    results = {}
    while done < len(ids):
        msg = p.recv(300)
        if msg.get("id") in ids:
            results[msg["id"]] = msg["result"]
            done += 1
    took = time.perf_counter() - started
    return sum(r["usage"]["completion_tokens"] for r in results.values()) / took


def measure(args_extra, model, tokens, batch, follower=False):
    p = Pipe(args=args_extra, check_schemas=False)
    try:
        assert "result" in p.request("model/load", {"model": model, "id": "m"}, timeout=300)[0]
        run(p, 1, 16)  # warm up
        pid = None
        if follower:
            pid = p.request("runtime/info")[0]["result"]["group"]["ranks"][1]["pid"]
        out = {}
        for n in (1, batch):
            before = tcp_bytes(pid) if pid else (0, 0)
            tps = run(p, n, tokens)
            out[n] = {"tok_s": round(tps, 1)}
            if pid:
                after = tcp_bytes(pid)
                out[n]["rank1_sent_bytes_per_token"] = round((after[0] - before[0]) / (n * tokens))
                out[n]["rank1_received_bytes_per_token"] = round((after[1] - before[1]) / (n * tokens))
        return out
    finally:
        p.close()


def probe_allsum(rounds: int = 2000) -> dict:
    """One float32 all_sum of a 1-token hidden vector between two ranks on loopback: median µs."""
    with tempfile.TemporaryDirectory() as d:
        hosts = Path(d) / "ring.json"
        base = free_port_pair()
        hosts.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
        procs = [subprocess.Popen([sys.executable, __file__, "--probe-rank", str(r), "--rounds", str(rounds)],
                                  env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)},
                                  stdout=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    return json.loads(outs[0])


def probe_rank(rounds: int) -> None:
    import mlx.core as mx

    g = mx.distributed.init(backend="ring", strict=True)
    out = {}
    for width in (64, 512, 4096, 8192):
        x = mx.ones((1, 1, width))
        times = []
        for _ in range(rounds // 10 if width > 512 else rounds):
            t = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=g))
            times.append(time.perf_counter() - t)
        times.sort()
        out[str(width)] = round(times[len(times) // 2] * 1e6, 1)
    if g.rank() == 0:
        print(json.dumps({"allsum_median_us_by_hidden": out}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pipeline", action="store_true", help="also a tiny qwen2 split by pipeline sharding")
    ap.add_argument("--probe-rank", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    if args.probe_rank is not None:
        probe_rank(args.rounds)
        return 0
    report = {"probe": probe_allsum(args.rounds)}
    with tempfile.TemporaryDirectory() as d:
        hostfile = Path(d) / "hosts.json"
        hostfile.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"]}] * 2}))
        for preset in args.presets:
            model = str(make_model(Path(d) / preset, preset=preset))
            cfg = PRESETS[preset]
            one = measure([], model, args.tokens, args.batch)
            group = measure(["--distributed-hostfile", str(hostfile), "--distributed-port", str(free_port_pair())],
                            model, args.tokens, args.batch, follower=True)
            report[preset] = {"layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
                              # Tensor-parallel: 2 all_sums of one hidden vector per layer per token, + the token.
                              "allsum_payload_bytes_per_token": 2 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 4 + 4,
                              "one_process": one, "two_ranks_loopback": group}
            print(json.dumps({preset: report[preset]}), flush=True)
        if args.pipeline:
            from mlx_sidecar.testing.sharded import QWEN2, make_pipeline_model

            model = str(make_pipeline_model(Path(d) / "qwen2"))
            one = measure([], model, args.tokens, args.batch)
            group = measure(["--distributed-hostfile", str(hostfile), "--distributed-port", str(free_port_pair()),
                             "--distributed-sharding", "pipeline"], model, args.tokens, args.batch, follower=True)
            report["qwen2-pipeline"] = {"layers": QWEN2["num_hidden_layers"], "hidden": QWEN2["hidden_size"],
                                        # One hidden vector from stage to stage, an all_gather of it, the token.
                                        "payload_bytes_per_token": 2 * QWEN2["hidden_size"] * 4 + 4,
                                        "one_process": one, "two_ranks_loopback": group}
            print(json.dumps({"qwen2-pipeline": report["qwen2-pipeline"]}), flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
