"""The benchmark suite: the sidecar against in-process mlx-lm, side by side in one run.

    .venv/bin/python bench/run.py [--quick] [--json bench/results/latest.json] [--default-model]

Measures (each as a ratio or a difference taken in this one run):
  spawn      spawn → initialize answered
  ping       sequential round trip, and pipelined round trips/s, per framing
  stream     single-stream decode tokens/s through the pipe ÷ in-process stream_generate, per framing
  ttft       time to the first chunk − in-process time to the first token
  batch      aggregate tokens/s at 1, 4, 8, 16 concurrent streams ÷ in-process BatchGenerator
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from mlx_sidecar import blas  # noqa: E402

blas.preload()  # the same BLAS the runtime uses, before mlx.core loads

from mlx_sidecar.testing import make_model  # noqa: E402
from mlx_sidecar.testing.pipe import Pipe  # noqa: E402

FRAMINGS = ("ndjson", "lsp", "msgpack")
PROMPT = "The capital of France is"


def spawn_to_initialize(n: int) -> dict:
    times = []
    for _ in range(n):
        p = Pipe("ndjson")
        t0 = p.started
        p.request("initialize")
        times.append((time.monotonic() - t0) * 1000)
        p.close()
    return {"median_ms": statistics.median(times), "max_ms": max(times), "n": n}


def ping(framing: str, sequential: int, pipelined: int, window: int = 256) -> dict:
    p = Pipe(framing)
    p.request("initialize")
    rtts = []
    for _ in range(sequential):
        t = time.perf_counter()
        p.request("runtime/ping")
        rtts.append((time.perf_counter() - t) * 1e6)
    # Pipelined: keep up to `window` pings in flight.
    from mlx_sidecar.testing.pipe import encode

    frames = [encode(framing, {"jsonrpc": "2.0", "id": i, "method": "runtime/ping"}) for i in range(pipelined)]
    t = time.perf_counter()
    sent = received = 0
    while received < pipelined:
        if sent < pipelined and sent - received < window:
            n = min(window - (sent - received), pipelined - sent)
            p.send_raw(b"".join(frames[sent:sent + n]))
            sent += n
        p.recv(30)
        received += 1
    elapsed = time.perf_counter() - t
    p.close()
    return {"rtt_median_us": statistics.median(rtts), "pipelined_per_s": pipelined / elapsed}


def in_process_stream(model, tokenizer, max_tokens: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    t0 = time.perf_counter()
    first = last = None
    n = 0
    for r in stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        n = r.generation_tokens
    return {"tokens": n, "ttft_ms": (first - t0) * 1000, "decode_tps": (n - 1) / (last - first)}


def sidecar_stream(p: Pipe, model_id: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    gid = p.start("generate", {"model": model_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    first = None
    while True:
        msg = p.recv(120)
        now = time.perf_counter()
        if msg.get("method") == "generate/chunk" and first is None:
            first = now
        if msg.get("id") == gid:
            break
    n = msg["result"]["usage"]["completion_tokens"]
    return {"tokens": n, "ttft_ms": (first - t0) * 1000, "decode_tps": (n - 1) / (now - first)}


def stream(model_dir: str, framings, reps: int, max_tokens: int) -> dict:
    from mlx_lm import load

    model, tokenizer = load(model_dir)  # the sidecar also runs these float32 weights as they are
    pipes = {}
    for f in framings:
        pipes[f] = Pipe(f)
        pipes[f].request("model/load", {"model": model_dir, "id": "m"}, timeout=600)
    in_process_stream(model, tokenizer, 16)  # warm-up
    for p in pipes.values():
        sidecar_stream(p, "m", 16)
    runs = {"in_process": []} | {f: [] for f in framings}
    for _ in range(reps):  # alternate, so drift hits both sides alike
        runs["in_process"].append(in_process_stream(model, tokenizer, max_tokens))
        for f, p in pipes.items():
            runs[f].append(sidecar_stream(p, "m", max_tokens))
    for p in pipes.values():
        p.close()
    base_tps = statistics.median(r["decode_tps"] for r in runs["in_process"])
    base_ttft = statistics.median(r["ttft_ms"] for r in runs["in_process"])
    out = {"in_process_tps": base_tps, "in_process_ttft_ms": base_ttft, "max_tokens": max_tokens, "reps": reps}
    for f in framings:
        tps = statistics.median(r["decode_tps"] for r in runs[f])
        ttfts = [r["ttft_ms"] for r in runs[f]]
        out[f] = {"tps": tps, "ratio": tps / base_tps, "ttft_ms": statistics.median(ttfts),
                  "ttft_minus_in_process_ms": statistics.median(ttfts) - base_ttft}
    return out


def in_process_batch(model, tokenizer, width: int, max_tokens: int) -> float:
    from mlx_lm.generate import BatchGenerator

    ids = tokenizer.encode(PROMPT)
    gen = BatchGenerator(model, completion_batch_size=width, prefill_batch_size=min(width, 8), prefill_step_size=512)
    t = time.perf_counter()
    gen.insert([list(ids) for _ in range(width)], max_tokens=[max_tokens] * width)
    tokens = finished = 0
    while finished < width:
        _, responses = gen.next()
        tokens += len(responses)
        finished += sum(r.finish_reason is not None for r in responses)
    elapsed = time.perf_counter() - t
    gen.close()
    return tokens / elapsed


def sidecar_batch(p: Pipe, width: int, max_tokens: int) -> float:
    t = time.perf_counter()
    ids = {p.start("generate", {"model": "m", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}) for _ in range(width)}
    tokens = 0
    while ids:
        msg = p.recv(300)
        if msg.get("id") in ids:
            ids.discard(msg["id"])
            tokens += msg["result"]["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - t)


def batch(model_dir: str, widths, reps: int, max_tokens: int) -> dict:
    from mlx_lm import load

    model, tokenizer = load(model_dir)
    p = Pipe("ndjson", args=["--max-batch", str(max(widths))])
    p.request("model/load", {"model": model_dir, "id": "m"}, timeout=600)
    in_process_batch(model, tokenizer, 2, 16)
    sidecar_batch(p, 2, 16)
    out = {"max_tokens": max_tokens, "reps": reps}
    for w in widths:
        base, side = [], []
        for _ in range(reps):
            base.append(in_process_batch(model, tokenizer, w, max_tokens))
            side.append(sidecar_batch(p, w, max_tokens))
        b, s = statistics.median(base), statistics.median(side)
        out[str(w)] = {"in_process_tps": b, "sidecar_tps": s, "ratio": s / b}
    p.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--default-model", action="store_true", help="also measure SmolLM2-135M (fetched and converted once)")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "python": platform.python_version(), "blas": blas.preload()},
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(make_model(Path(tmp) / "tiny", preset="tiny"))
        results["spawn"] = spawn_to_initialize(5 if args.quick else 10)
        results["ping"] = {f: ping(f, 200 if args.quick else 1000, 5000 if args.quick else 20000) for f in FRAMINGS}
        results["stream_tiny"] = stream(tiny, FRAMINGS, reps, 500 if args.quick else 2000)
        small = str(make_model(Path(tmp) / "small", preset="small"))
        results["batch_small"] = batch(small, (1, 4, 8, 16), 2 if args.quick else 3, 64 if args.quick else 128)
        if args.default_model:
            from mlx_sidecar.sources import resolve

            results["stream_default"] = stream(str(resolve("default")), ("ndjson",), 3 if args.quick else 5, 128)
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_batch(name: str, b: dict) -> None:
    print(f"\n{name}: aggregate tok/s ({b['max_tokens']} tokens per stream, {b['reps']} reps)")
    print(f"{'streams':<8} {'in-process':>11} {'sidecar':>9} {'ratio':>7}")
    for w, v in b.items():
        if isinstance(v, dict):
            print(f"{w:<8} {v['in_process_tps']:>11.1f} {v['sidecar_tps']:>9.1f} {v['ratio']:>7.3f}")


def print_table(r: dict) -> None:
    print(f"\nmlx-sidecar bench — {r['date']} — {r['machine']['processor']}, {r['machine']['cpus']} CPUs, BLAS {r['machine']['blas']}")
    print(f"spawn → initialize answered: median {r['spawn']['median_ms']:.0f} ms (max {r['spawn']['max_ms']:.0f} ms)")
    print(f"{'framing':<9} {'ping rtt µs':>12} {'pings/s':>10}")
    for f, v in r["ping"].items():
        print(f"{f:<9} {v['rtt_median_us']:>12.0f} {v['pipelined_per_s']:>10.0f}")
    for key in ("stream_tiny", "stream_default"):
        s = r.get(key)
        if not s:
            continue
        print(f"\n{key}: in-process {s['in_process_tps']:.1f} tok/s, ttft {s['in_process_ttft_ms']:.1f} ms ({s['max_tokens']} tokens, {s['reps']} reps)")
        print(f"{'framing':<9} {'tok/s':>8} {'ratio':>7} {'ttft ms':>8} {'Δttft ms':>9}")
        for f in FRAMINGS:
            if f in s:
                v = s[f]
                print(f"{f:<9} {v['tps']:>8.1f} {v['ratio']:>7.3f} {v['ttft_ms']:>8.2f} {v['ttft_minus_in_process_ms']:>9.2f}")
    if "batch_small" in r:
        print_batch("batch_small (24M-parameter random llama)", r["batch_small"])


if __name__ == "__main__":
    raise SystemExit(main())
