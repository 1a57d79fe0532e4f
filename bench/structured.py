"""Structured output benchmarks on the default model (SmolLM2-135M-Instruct).

    .venv/bin/python bench/structured.py [--reps 5] [--tokens 64] [--json out.json]

  decode     engine decode tok/s with a response_format ÷ without, one stream and 8 at once
             (end tokens biased away so both sides generate exactly --tokens tokens)
  compile    response_format compile time, p50/p95: cold (a new schema: parse, check, compile the
             matcher) and cached (what a repeated format costs a request), plus the vocabulary index
             and the logits processor's own time per token (49k vocabulary)

    .venv/bin/python bench/structured.py --memory --batch 32 [--seeds 20] [--free]

  memory     the runtime's peak RSS (sampled from /proc every 50 ms) and MLX active memory while it
             serves tests/test_structured.py's default-model workload (11 formats x --seeds seeds at
             temperature 0.7, all sent at once) at --max-batch --batch; --free drops the formats
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from mlx_sidecar import blas  # noqa: E402

blas.preload()

from mlx_sidecar.testing.pipe import Pipe  # noqa: E402

# A long free-text field: the format cannot end before max_tokens, so both sides decode alike.
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": {"type": "string", "minLength": 4000}},
          "required": ["title", "story"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON with a title and the story."}]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def decode(p: Pipe, tokens: int, reps: int, width: int, no_eos: dict) -> dict:
    """Median aggregate engine decode tok/s, constrained and free, alternating runs."""
    def run(constrained: bool) -> float:
        ids = []
        for i in range(width):
            q = {"model": "smol", "messages": MESSAGES, "max_tokens": tokens, "temperature": 0.7, "seed": i,
                 "logit_bias": no_eos, "stream": False}
            if constrained:
                q["response_format"] = FORMAT
            ids.append(p.start("generate", q))
        results = {}
        while len(results) < width:
            msg = p.recv(600)
            if msg.get("id") in ids:
                results[msg["id"]] = msg["result"]
        assert all(r["usage"]["completion_tokens"] == tokens for r in results.values()), results
        return sum(r["timings"]["generation_tps"] for r in results.values())

    run(True), run(False)  # warm-up (and the grammar compiled once)
    free, constrained = [], []
    for _ in range(reps):
        free.append(run(False))
        constrained.append(run(True))
    f, c = statistics.median(free), statistics.median(constrained)
    return {"width": width, "tokens": tokens, "reps": reps, "free_tps": f, "constrained_tps": c, "ratio": c / f,
            "free_runs": free, "constrained_runs": constrained}


def compile_times(model_dir: str, n: int) -> dict:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_sidecar import constraints

    class Loaded:  # what constraints reads off a loaded model
        id = "smol"
        config = json.loads((Path(model_dir) / "config.json").read_text())
        tokenizer = load_tokenizer(Path(model_dir))

    loaded = Loaded()
    t = time.perf_counter()
    constraints._vocab(loaded)
    index_ms = (time.perf_counter() - t) * 1000
    cold, cached = [], []
    for i in range(n):
        schema = json.loads(json.dumps(SCHEMA))
        schema["properties"]["n"] = {"type": "integer", "minimum": i, "maximum": i + 1000}  # a new format each time
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        t = time.perf_counter()
        constraints.start(loaded, fmt, frozenset(loaded.tokenizer.eos_token_ids))
        cold.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        constraints.start(loaded, fmt, frozenset(loaded.tokenizer.eos_token_ids))
        cached.append((time.perf_counter() - t) * 1000)
    # The processor's own cost per token (feed the last token, fill the mask, apply it) on a
    # 49k-vocabulary logits row, walking the story schema with allowed tokens.
    import random

    import mlx.core as mx
    import numpy as np

    c = constraints.start(loaded, FORMAT, frozenset(loaded.tokenizer.eos_token_ids))
    logits = mx.random.normal((1, c._mask.shape[1] * 32))[:, : constraints._vocab(loaded).n_vocab]
    mx.eval(logits)
    rng, tokens, per_token = random.Random(0), mx.array([0]), []
    for _ in range(300):
        t = time.perf_counter()
        masked = c(tokens, logits)
        mx.eval(masked)
        per_token.append((time.perf_counter() - t) * 1000)
        allowed = np.flatnonzero(np.array(masked[0]) > -np.inf)
        tokens = mx.array([int(rng.choice(allowed))])
    return {"vocab_index_ms": index_ms, "n": n,
            "mask_p50_ms": pct(per_token, 0.5), "mask_p95_ms": pct(per_token, 0.95),
            "cold_p50_ms": pct(cold, 0.5), "cold_p95_ms": pct(cold, 0.95),
            "cached_p50_ms": pct(cached, 0.5), "cached_p95_ms": pct(cached, 0.95)}


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def memory(batch: int, seeds: int, constrained: bool) -> dict:
    """Peak RSS and MLX memory of the runtime serving the structured test's default-model workload."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_structured as T

    p = Pipe("ndjson", args=("--max-batch", str(batch), "--max-queue", "1024"))
    pid, peak, done = p.proc.pid, [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _rss_mb(pid))
            except OSError:
                return
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    p.request("model/load", {"model": "default", "id": "smol"}, timeout=900)
    loaded_rss = _rss_mb(pid)
    jobs = [(T.ask(f"Give an example {name} record as JSON."), T.schema_format(schema), 48) for name, schema in T.FEATURES.items()]
    jobs += [(T.ask(question), fmt, max_tokens) for fmt, question, max_tokens in T.OTHER_FORMATS.values()]
    started = time.monotonic()
    left = set()
    for messages, fmt, max_tokens in jobs:
        for s in range(seeds):
            q = {"model": "smol", "messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "seed": s, "stream": False}
            if constrained:
                q["response_format"] = fmt
            left.add(p.start("generate", q))
    n, active_peak, last = len(left), 0, 0.0
    while left:
        try:
            msgs = [p.recv(1)]
        except TimeoutError:
            msgs = []
        if time.monotonic() - last > 2:  # runtime/info's memory snapshot (answers that pass meanwhile are kept)
            last = time.monotonic()
            answer, seen = p.request("runtime/info", timeout=600)
            active_peak = max(active_peak, answer["result"]["memory"]["active_bytes"] >> 20)
            msgs += seen
        for msg in msgs:
            if isinstance(msg, dict) and msg.get("id") in left:
                assert "result" in msg, msg
                left.discard(msg["id"])
    took = time.monotonic() - started
    end = p.request("runtime/info")[0]["result"]["memory"]
    done.set()
    out = {"batch": batch, "requests": n, "constrained": constrained, "seconds": round(took, 1), "loaded_rss_mb": loaded_rss,
           "peak_rss_mb": peak[0], "peak_active_mb": active_peak, "end_active_mb": end["active_bytes"] >> 20,
           "end_prompt_cache_mb": end.get("prompt_cache_bytes", 0) >> 20}
    p.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--compiles", type=int, default=50)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compile-only", action="store_true", help="skip the decode runs")
    ap.add_argument("--memory", action="store_true", help="only the memory run (see above)")
    ap.add_argument("--batch", type=int, default=32, help="--max-batch for --memory")
    ap.add_argument("--seeds", type=int, default=20, help="seeds per format for --memory")
    ap.add_argument("--free", action="store_true", help="--memory without response_format")
    args = ap.parse_args()

    if args.memory:
        out = memory(args.batch, args.seeds, not args.free)
        print(json.dumps(out))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 0

    p = Pipe("ndjson", args=["--prompt-cache-bytes", "0"])
    info = p.request("model/load", {"model": "default", "id": "smol"}, timeout=900)[0]["result"]
    no_eos = {"0": -100, "2": -100}  # SmolLM2's <|endoftext|> and <|im_end|>
    out = {"model": info["path"]}
    if not args.compile_only:
        out["single"] = decode(p, args.tokens, args.reps, 1, no_eos)
        out["batch8"] = decode(p, args.tokens, args.reps, 8, no_eos)
    p.close()
    out["compile"] = compile_times(info["path"], args.compiles)
    for name in [k for k in ("single", "batch8") if k in out]:
        d = out[name]
        print(f"{name:7s} free {d['free_tps']:.1f} tok/s, constrained {d['constrained_tps']:.1f} tok/s: ratio {d['ratio']:.3f}"
              f"  (runs free {[round(x, 1) for x in d['free_runs']]}, constrained {[round(x, 1) for x in d['constrained_runs']]})")
    c = out["compile"]
    print(f"compile vocabulary index {c['vocab_index_ms']:.0f} ms; cold p50 {c['cold_p50_ms']:.2f} ms p95 {c['cold_p95_ms']:.2f} ms;"
          f" cached p50 {c['cached_p50_ms']:.3f} ms p95 {c['cached_p95_ms']:.3f} ms (n={c['n']});"
          f" processor per token p50 {c['mask_p50_ms']:.3f} ms p95 {c['mask_p95_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
