"""Cost of logprobs: decode tok/s with `logprobs: true, top_logprobs: 5` ÷ without, through the
runtime, one stream and 8 at once (goal >= 0.9). Chunks are streamed and read as a host would.

    .venv/bin/python bench/logprobs.py [--model default|tiny|small] [--reps 5] [--tokens 64] [--json out.json]

Both sides generate exactly --tokens tokens (end tokens biased away), greedy, runs alternating.
Also times the top-k itself in process (logprobs.pick on 1 and 8 rows of the model's vocabulary)
against a per-row mx.argpartition."""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from mlx_sidecar import blas  # noqa: E402

blas.preload()

from mlx_sidecar.testing.pipe import Pipe  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def decode(p: Pipe, tokens: int, reps: int, width: int, no_eos: dict, k: int) -> dict:
    def run(with_logprobs: bool) -> float:
        ids = []
        for _ in range(width):
            q = {"model": "m", "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "logit_bias": no_eos}
            if with_logprobs:
                q.update(logprobs=True, top_logprobs=k)
            ids.append(p.start("generate", q))
        results = {}
        while len(results) < width:
            msg = p.recv(600)
            if msg.get("id") in ids:
                results[msg["id"]] = msg["result"]
        assert all(r["usage"]["completion_tokens"] == tokens for r in results.values()), results
        if with_logprobs:
            assert all(len(r["logprobs"]["content"]) == tokens for r in results.values())
        return sum(r["timings"]["generation_tps"] for r in results.values())

    run(True), run(False)  # warm-up
    off, on = [], []
    for _ in range(reps):
        off.append(run(False))
        on.append(run(True))
    f, c = statistics.median(off), statistics.median(on)
    return {"width": width, "tokens": tokens, "reps": reps, "top_logprobs": k, "off_tps": round(f, 2), "on_tps": round(c, 2),
            "ratio": round(c / f, 3), "off_runs": [round(x, 2) for x in off], "on_runs": [round(x, 2) for x in on]}


def topk_cost(vocab: int, k: int, n: int = 300) -> dict:
    """Milliseconds per call: logprobs.pick (one numpy two-level top-k for all rows) vs a
    per-row mx.argpartition, on random log-softmax rows."""
    import mlx.core as mx

    from mlx_sidecar import logprobs

    out = {"vocab": vocab, "k": k}
    for rows in (1, 8):
        x = mx.random.normal((rows, vocab)) * 3
        x = x - mx.logsumexp(x, axis=-1, keepdims=True)
        row_list = list(x)
        mx.eval(row_list)
        tokens = [0] * rows

        def ours():
            logprobs.pick(row_list, tokens, [k] * rows)

        def naive():
            for r in row_list:
                idx = mx.argpartition(-r, k - 1)[:k]
                mx.take(r, idx).tolist(), idx.tolist(), r[0].item()

        for name, fn in (("pick", ours), ("per_row_argpartition", naive)):
            for _ in range(10):
                fn()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            out[f"{name}_ms_{rows}"] = round((time.perf_counter() - t) / n * 1000, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default", help="default (SmolLM2-135M, 49k vocabulary), tiny or small (random, 420 tokens)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = args.model
    if model in ("tiny", "small"):
        from mlx_sidecar.testing import make_model

        model = str(make_model(tempfile.mkdtemp(prefix="bench-logprobs-"), preset=model))
    # No schema checks here: validating every chunk would load the 2 cores the runtime runs on.
    p = Pipe("ndjson", args=["--prompt-cache-bytes", "0"], check_schemas=False)
    try:
        answer, _ = p.request("model/load", {"model": model, "id": "m"}, timeout=900)
        info = answer["result"]
        vocab = json.loads((Path(info["path"]) / "config.json").read_text())["vocab_size"]
        eos = p.request("tokenize", {"model": "m", "text": "<|im_end|><|endoftext|>", "add_special_tokens": False})[0]["result"]["tokens"]
        no_eos = {str(t): -100 for t in eos if t < vocab}
        report = {"model": args.model, "parameters": info["parameters"], "vocab": vocab,
                  "topk": topk_cost(vocab, args.top), "decode": []}
        for width in (1, 8):
            r = decode(p, args.tokens, args.reps, width, no_eos, args.top)
            report["decode"].append(r)
            print(f"width {width}: off {r['off_tps']} tok/s, top_logprobs {args.top} {r['on_tps']} tok/s, ratio {r['ratio']}", flush=True)
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        p.close()


if __name__ == "__main__":
    main()
