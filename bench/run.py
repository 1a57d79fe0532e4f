"""The benchmark suite: the sidecar against in-process mlx-lm, side by side in one run.

    .venv/bin/python bench/run.py [--quick] [--json bench/results/latest.json] [--default-model]

Measures (each as a ratio or a difference taken in this one run):
  spawn      spawn → initialize answered
  ping       sequential round trip, and pipelined round trips/s, per framing
  stream     single-stream tokens/s through the pipe ÷ in-process stream_generate, per framing: end to end
             (request written → final answer read, against the call → its last token) and decode-only
             (first chunk → last; a first chunk can hold several tokens, so this one flatters the pipe)
  ttft       time to the first chunk − in-process time to the first token
  batch      aggregate tokens/s at 1, 4, 8, 16 concurrent streams ÷ in-process BatchGenerator
  default    (--default-model) SmolLM2-135M prefill and decode tokens/s through the sidecar and
             in-process, and decode against the machine's limit (weight bytes per token ÷ copy bandwidth)
  clients    (--clients) the TypeScript and Go clients' own benches: client ÷ raw pipe
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
        p = Pipe("ndjson", check_schemas=False)  # timed as a host sees it: decoded, not checked against protocol/
        t0 = p.started
        p.request("initialize")
        times.append((time.monotonic() - t0) * 1000)
        p.close()
    return {"median_ms": statistics.median(times), "max_ms": max(times), "n": n}


def ping(framing: str, sequential: int, pipelined: int, window: int = 256) -> dict:
    p = Pipe(framing, check_schemas=False)  # the raw pings below reuse ids the checker maps to initialize
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
    return {"tokens": n, "ttft_ms": (first - t0) * 1000, "decode_tps": (n - 1) / (last - first), "e2e_tps": n / (last - t0)}


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
    return {"tokens": n, "ttft_ms": (first - t0) * 1000, "decode_tps": (n - 1) / (now - first), "e2e_tps": n / (now - t0)}


def stream(model_dir: str, framings, reps: int, max_tokens: int) -> dict:
    from mlx_lm import load

    model, tokenizer = load(model_dir)  # the sidecar also runs these float32 weights as they are
    pipes = {}
    for f in framings:
        # Repeated prompts: compare real prefill. A host decodes chunks without checking each against
        # protocol/'s schemas; that check cost this client 25-35 us a token, on the cores the runtime uses.
        pipes[f] = Pipe(f, args=["--prompt-cache-bytes", "0"], check_schemas=False)
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
    base_e2e = statistics.median(r["e2e_tps"] for r in runs["in_process"])
    base_ttft = statistics.median(r["ttft_ms"] for r in runs["in_process"])
    out = {"in_process_tps": base_tps, "in_process_e2e_tps": base_e2e, "in_process_ttft_ms": base_ttft,
           "max_tokens": max_tokens, "reps": reps}
    for f in framings:
        made = ([r["tokens"] for r in runs[f]], [b["tokens"] for b in runs["in_process"]])
        if made[0] != made[1]:  # end to end compares whole runs: they must do the same work
            raise RuntimeError(f"{f}: the sidecar and in-process runs made different numbers of tokens: {made}")
        tps = statistics.median(r["decode_tps"] for r in runs[f])
        e2e = statistics.median(r["e2e_tps"] for r in runs[f])
        # Per-rep ratios of neighbouring runs (they alternate), so slow drift cancels.
        pairs = [r["e2e_tps"] / b["e2e_tps"] for r, b in zip(runs[f], runs["in_process"])]
        ttfts = [r["ttft_ms"] for r in runs[f]]
        out[f] = {"tps": tps, "ratio": tps / base_tps, "e2e_tps": e2e, "e2e_ratio": e2e / base_e2e,
                  "e2e_ratio_paired_median": statistics.median(pairs), "ttft_ms": statistics.median(ttfts),
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


def default_model(reps: int, prompt_tokens: int = 256, gen_tokens: int = 64) -> dict:
    """SmolLM2-135M (float32 on CPU, as the sidecar loads it) in-process and through the pipe."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_sidecar.sources import resolve

    sys.path.insert(0, str(ROOT / "bench"))
    import smollm2_speed as sm

    path = resolve("default")
    model, tokenizer = sm.load_model(path, "float32")
    text = tokenizer.decode(tokenizer.encode(sm.FILLER * (prompt_tokens // 8 + 1))[:prompt_tokens])
    eos = sorted(tokenizer.eos_token_ids)
    eos_arr = mx.array(eos)
    no_eos = lambda tokens, logits: logits.at[:, eos_arr].add(-100.0)  # what logit_bias -100 does

    def in_process():
        first = None
        t0 = time.perf_counter()
        for r in stream_generate(model, tokenizer, text, max_tokens=gen_tokens, sampler=make_sampler(temp=0.0), logits_processors=[no_eos]):
            now = time.perf_counter()
            first = first or now
        return {"prefill_tps": r.prompt_tps, "decode_tps": (r.generation_tokens - 1) / (now - first), "ttft_ms": (first - t0) * 1000,
                "e2e_tps": r.generation_tokens / (now - t0)}

    # Repeated prompt: compare real prefill; no schema check per chunk, as in stream().
    p = Pipe("ndjson", args=["--prompt-cache-bytes", "0"], check_schemas=False)
    p.request("model/load", {"model": "default"}, timeout=600)

    def sidecar():
        t0 = time.perf_counter()
        gid = p.start("generate", {"model": "default", "prompt": text, "max_tokens": gen_tokens, "temperature": 0,
                                   "logit_bias": {str(t): -100 for t in eos}, "stream_options": {"chunk_tokens": 1}})
        first = None
        while True:
            msg = p.recv(300)
            now = time.perf_counter()
            if msg.get("method") == "generate/chunk" and first is None:
                first = now
            if msg.get("id") == gid:
                break
        r = msg["result"]
        return {"prefill_tps": r["timings"]["prompt_tps"], "decode_tps": (r["usage"]["completion_tokens"] - 1) / (now - first),
                "ttft_ms": (first - t0) * 1000, "prompt_tokens": r["usage"]["prompt_tokens"],
                "e2e_tps": r["usage"]["completion_tokens"] / (now - t0)}

    in_process(), sidecar()  # warm-up
    a, b = [], []
    for _ in range(reps):
        a.append(in_process())
        b.append(sidecar())
    p.close()
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    bw = sm.copy_bandwidth()
    per_token = sm.weight_bytes_per_token(model)
    limit = bw["copy_gb_s"] * 1e9 / per_token
    out = {"prompt_tokens": b[0]["prompt_tokens"], "gen_tokens": gen_tokens, "reps": reps,
           "weight_bytes_per_token": per_token, "copy_gb_s": bw["copy_gb_s"], "decode_limit_tps": limit}
    for k in ("prefill_tps", "decode_tps", "ttft_ms", "e2e_tps"):
        out[k] = {"in_process": med(a, k), "sidecar": med(b, k), "ratio": med(b, k) / med(a, k)}
    out["decode_fraction_of_limit"] = out["decode_tps"]["sidecar"] / limit
    return out


def prompt_cache(model: str, prefix_words: int) -> dict:
    """Time to first token for a long prompt, then for another prompt sharing its prefix."""
    p = Pipe("ndjson")
    p.request("model/load", {"model": model, "id": "m"}, timeout=600)
    prefix = "You are a careful assistant who answers questions about cities and rivers. " * (prefix_words // 12)

    def ask(question):
        answer = p.request("generate", {"model": "m", "prompt": prefix + question, "max_tokens": 4, "temperature": 0,
                                        "stream": False}, timeout=600)[0]
        if "result" not in answer:
            raise RuntimeError(f"generate failed: {answer['error']}")
        r = answer["result"]
        return r["timings"]["ttft_ms"], r["usage"]

    cold, usage = ask(" Which river runs through Paris?")
    warm, usage2 = ask(" Which river runs through Rome?")
    p.close()
    return {"prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage2.get("cached_tokens", 0),
            "ttft_cold_ms": cold, "ttft_shared_prefix_ms": warm}


def clients(reps: int) -> dict:
    """The reference clients' own benches (client ÷ raw pipe), when they are built."""
    import subprocess

    out = {}
    ts = ROOT / "clients" / "typescript"
    if (ts / "dist" / "index.js").exists():
        r = subprocess.run(["node", str(ROOT / "bench" / "client_typescript.mjs"), "--json", "--reps", str(reps)],
                           capture_output=True, text=True, cwd=ROOT, timeout=900)
        out["typescript"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-2000:]}
    go = ROOT / "clients" / "go"
    if (go / "cmd" / "sidecar-bench").is_dir():
        r = subprocess.run(["go", "run", "./cmd/sidecar-bench", "-json", "-reps", str(reps)],
                           capture_output=True, text=True, cwd=go, timeout=900)
        if r.returncode == 0:
            g = json.loads(r.stdout)  # the Go bench's own field names, in the TypeScript bench's shape
            out["go"] = {"generate": {"ratio": g["generate_ratio_client_over_raw"],
                                      "delivery_ratio": g["wall_over_runtime_tps_client"]["median"] / g["wall_over_runtime_tps_raw"]["median"]},
                         "ping": {"ratio": g["ping_ratio_client_over_raw"], "client_per_s_median": g["pings_per_s_client"]["median"],
                                  "raw_per_s_median": g["pings_per_s_raw"]["median"]},
                         "raw": g}
        else:
            out["go"] = {"error": r.stderr[-2000:]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--default-model", action="store_true", help="also measure SmolLM2-135M (fetched and converted once)")
    ap.add_argument("--clients", action="store_true", help="also run the TypeScript and Go clients' benches")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "python": platform.python_version(), "blas": blas.preload()},
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(make_model(Path(tmp) / "tiny", preset="tiny"))
        results["spawn"] = spawn_to_initialize(5 if args.quick else 10)
        results["ping"] = {f: ping(f, 200 if args.quick else 1000, 5000 if args.quick else 20000) for f in FRAMINGS}
        results["stream_tiny"] = stream(tiny, FRAMINGS, reps, 500 if args.quick else 1000)  # within its 1,024-token context
        small = str(make_model(Path(tmp) / "small", preset="small"))
        results["prompt_cache_small"] = prompt_cache(small, 500)
        results["batch_small"] = batch(small, (1, 4, 8, 16), 2 if args.quick else 3, 64 if args.quick else 128)
        if args.default_model:
            results["default_model"] = default_model(2 if args.quick else 5)
            results["prompt_cache_default"] = prompt_cache("default", 800)
        if args.clients:
            results["clients"] = clients(3 if args.quick else 7)
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
        print(f"\n{key}: in-process end to end {s['in_process_e2e_tps']:.1f} tok/s, decode-only {s['in_process_tps']:.1f} tok/s, "
              f"ttft {s['in_process_ttft_ms']:.1f} ms ({s['max_tokens']} tokens, {s['reps']} reps)")
        print(f"{'framing':<9} {'e2e tok/s':>10} {'e2e ratio':>10} {'paired':>7} {'decode-only':>12} {'ratio':>7} {'ttft ms':>8} {'Δttft ms':>9}")
        for f in FRAMINGS:
            if f in s:
                v = s[f]
                print(f"{f:<9} {v['e2e_tps']:>10.1f} {v['e2e_ratio']:>10.3f} {v['e2e_ratio_paired_median']:>7.3f} {v['tps']:>12.1f} "
                      f"{v['ratio']:>7.3f} {v['ttft_ms']:>8.2f} {v['ttft_minus_in_process_ms']:>9.2f}")
    d = r.get("default_model")
    if d:
        print(f"\ndefault model (SmolLM2-135M, float32): {d['prompt_tokens']}-token prompt, {d['gen_tokens']} tokens, {d['reps']} reps")
        print(f"{'':<12} {'in-process':>11} {'sidecar':>9} {'ratio':>7}")
        for k in ("e2e_tps", "prefill_tps", "decode_tps", "ttft_ms"):
            if k in d:
                print(f"{k:<12} {d[k]['in_process']:>11.1f} {d[k]['sidecar']:>9.1f} {d[k]['ratio']:>7.3f}")
        print(f"decode limit: {d['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token ÷ {d['copy_gb_s']:.1f} GB/s copy bandwidth"
              f" = {d['decode_limit_tps']:.0f} tok/s; the sidecar reaches {d['decode_fraction_of_limit']:.0%}")
    for name, c in (r.get("clients") or {}).items():
        if "error" in c:
            print(f"\n{name} client bench failed: {c['error'][-300:]}")
            continue
        g, pg = c["generate"], c["ping"]
        print(f"\n{name} client ÷ raw pipe: generate {g['ratio']:.3f} (wall÷engine {g['delivery_ratio']:.3f}), pings/s {pg['ratio']:.3f}"
              f" ({pg['client_per_s_median']:.0f} vs {pg['raw_per_s_median']:.0f})")
    for key in ("prompt_cache_small", "prompt_cache_default"):
        c = r.get(key)
        if c:
            print(f"\n{key}: {c['prompt_tokens']}-token prompt; time to first token {c['ttft_cold_ms']:.0f} ms cold, "
                  f"{c['ttft_shared_prefix_ms']:.0f} ms for a new question sharing its prefix ({c['cached_tokens']} tokens cached)")
    if "batch_small" in r:
        print_batch("batch_small (24M-parameter random llama)", r["batch_small"])


if __name__ == "__main__":
    raise SystemExit(main())
