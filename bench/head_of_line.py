"""Head-of-line: what a running stream feels while a long prompt joins, for several prefill slice
factors (--prefill-slice-factor), through the real runtime.

    .venv/bin/python bench/head_of_line.py [--default-model | --preset small] [--prompt-tokens 2500]

For each factor: one stream decodes (chunk per token); after 8 of its tokens a long prompt is sent.
Reported: the stream's median gap before the join, its worst gap while the long prompt prefills
(÷ median), the long prompt's time to first token (÷ its time alone, same runtime and factor), and
the aggregate work while it prefilled: its prompt tokens + the stream's tokens per second, and the
"work rate" (that work at each part's solo cost ÷ the time it took together; 1.0 = interleaving
cost nothing, below 1 = the overhead of small steps).
`MLX_SIDECAR_FUSED=0` in the environment runs mlx-lm's two forwards per step instead of fused.py's one.

    .venv/bin/python bench/head_of_line.py --slice-costs [--default-model | --preset small]

In-process, no runtime: what a running stream's batch step costs with a k-token prompt slice at a
given context, as mlx-lm's two forwards (decode rows, then the slice) and as fused.py's one."""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))

from mlx_sidecar import blas  # noqa: E402

blas.preload()  # --slice-costs runs MLX here: the same BLAS as the runtime, before mlx.core loads

from mlx_sidecar.testing import make_model  # noqa: E402
from mlx_sidecar.testing.pipe import Pipe  # noqa: E402
import metrics_util  # noqa: E402

STREAM = {"chunk_tokens": 1, "max_latency_ms": 0}


def long_prompt(p, model_id, tokens):
    words = " ".join(f"item {i} says {i * 7 % 97}." for i in range(tokens))
    ids = p.request("tokenize", {"model": model_id, "text": words})[0]["result"]["tokens"]
    text = p.request("detokenize", {"model": model_id, "tokens": ids[:tokens]})[0]["result"]["text"]
    return text


def first_chunk_time(p, id):
    while True:
        msg = p.recv(600)
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == id:
            return time.monotonic()


def one(model, factor, tokens):
    # A fixed KV budget: one read from the machine's free memory (shared with other work) could make
    # the long prompt wait behind the endless stream instead of joining it.
    p = Pipe("ndjson", args=["--prefill-slice-factor", str(factor), "--prompt-cache-bytes", "0",
                             "--kv-budget-bytes", str(8 << 30)], check_schemas=False)
    info = p.request("model/load", {"model": model, "id": "m"}, timeout=600)[0]["result"]
    # The running stream must outlast the long prompt's prefill: its end tokens are banned.
    from mlx_lm.utils import load_tokenizer

    no_end = {str(t): -100 for t in load_tokenizer(Path(info["path"])).eos_token_ids}
    text = long_prompt(p, "m", tokens)
    # The long prompt alone (its solo time to first token), then with a running stream.
    sent = time.monotonic()
    solo = p.start("generate", {"model": "m", "prompt": text, "max_tokens": 1, "stream_options": STREAM})
    solo_ttft = first_chunk_time(p, solo) - sent
    p.wait(solo, 600)
    run = p.start("generate", {"model": "m", "prompt": "Tell me a story.", "max_tokens": 100000, "logit_bias": no_end,
                               "stream_options": STREAM})
    times = []
    long_id = long_sent = long_first = None
    answered = set()
    while long_first is None:
        msg = p.recv(600)
        if "id" in msg:
            answered.add(msg["id"])
            if msg["id"] in (run, long_id) and "error" in msg or msg["id"] == run:
                raise RuntimeError(f"a request ended early: {str(msg)[:300]}")
        if msg.get("method") != "generate/chunk":
            continue
        if msg["params"]["id"] == run:
            times.append(time.monotonic())
            if len(times) == 8 and long_id is None:
                long_sent = time.monotonic()
                long_id = p.start("generate", {"model": "m", "prompt": text, "max_tokens": 1, "stream_options": STREAM})
        elif msg["params"]["id"] == long_id:
            long_first = time.monotonic()
    # A few more tokens after the join, then stop.
    while len(times) < len([t for t in times if t <= long_first]) + 4:
        msg = p.recv(600)
        if "id" in msg:
            answered.add(msg["id"])
            if msg["id"] in (run, long_id) and "error" in msg or msg["id"] == run:
                raise RuntimeError(f"a request ended early: {str(msg)[:300]}")
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == run:
            times.append(time.monotonic())
    p.notify("$/cancelRequest", {"id": run})
    for id in (run, long_id):
        if id not in answered:
            p.wait(id, 600)
    metrics_util.show(p, f"factor {factor:g}", out=sys.stderr)  # the runtime's own view; the table below is the host's
    p.close()
    before = [b - a for a, b in zip(times, times[1:]) if b <= long_sent]
    during = [b - a for a, b in zip(times, times[1:]) if b > long_sent]
    # Where the slowest gaps fell, by the stream token that ended them: n-th after the long prompt
    # was sent, or the join (the first after the long prompt's first token) and the ones after it.
    streamed = sum(1 for t in times if long_sent < t <= long_first)  # the stream's tokens during the prefill
    worst = sorted(range(len(during)), key=lambda i: -during[i])[:3]
    print(f"factor {factor:g}: slowest gaps " + ", ".join(
        f"{during[i] * 1000:.0f} ms ({'sent+%d' % (i + 1) if i < streamed else 'join+%d' % (i - streamed)})" for i in worst),
        file=sys.stderr)
    median = statistics.median(before)
    took = long_first - long_sent
    return {"factor": factor, "median_gap_ms": round(median * 1000, 1), "worst_gap_ms": round(max(during) * 1000, 1),
            "worst_over_median": round(max(during) / median, 1), "long_ttft_s": round(took, 2),
            "solo_ttft_s": round(solo_ttft, 2), "ttft_over_solo": round(took / solo_ttft, 2),
            "stream_tokens_during_prefill": streamed,
            # Work done per second while the long prompt prefilled: its prompt tokens and the stream's tokens.
            "aggregate_tok_s": round((tokens + streamed) / took, 1),
            # The same work in each part's solo cost (stream tokens at their median gap, the prompt at its
            # time alone) ÷ the time it took together: 1.0 = interleaving cost nothing.
            "work_rate": round((streamed * median + solo_ttft) / took, 2)}


def slice_costs(model_dir, contexts=(16, 1000, 2000, 2500), sizes=(1, 4, 16, 64)) -> None:
    """A running stream's batch step with a k-token prompt slice at a given context, as mlx-lm's two
    forwards (decode rows, then the slice) and as fused.py's one, median of 5 each; and the decode
    step alone. Both as the runtime runs them: BatchKVCache caches, the stream at context 100."""
    import mlx.core as mx
    from mlx_lm.generate import _merge_caches
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_sidecar import fused

    if model_dir == "default":
        import smollm2_speed as sm
        from mlx_sidecar.sources import resolve

        model, _ = sm.load_model(resolve("default"), "float32")  # as the runtime loads it on a CPU
    else:
        from mlx_lm import load

        model, _ = load(model_dir)
    assert fused.prepare(model)

    def filled(n):
        cache = make_prompt_cache(model)
        ids = mx.array([[5 + i % 300 for i in range(n)]])
        for i in range(0, n, 512):
            model(ids[:, i:i + 512], cache=cache)
            mx.eval([c.state for c in cache])
        return _merge_caches([cache])

    def ms(step, gen, prompt, k):
        times = []
        for _ in range(5):
            started = time.perf_counter()
            out = step()
            mx.eval(out, [c.state for c in gen], [c.state for c in prompt])
            times.append(time.perf_counter() - started)
            for c in gen:
                c.trim(1)  # back to the same contexts for the next try
            for c in prompt:
                c.trim(k)
        return statistics.median(times) * 1000

    gen = filled(100)
    decode = ms(lambda: model(mx.array([[3]]), cache=gen), gen, [], 0)
    print(f"decode step alone (context 100): {decode:.1f} ms")
    print("| context | " + " | ".join(f"{k} tokens: two forwards / fused" for k in sizes) + " |")
    print("| ---: |" + " ---: |" * len(sizes))
    for ctx in contexts:
        prompt = filled(ctx)
        cells = []
        for k in sizes:
            toks = mx.array([[7] * k])
            two = ms(lambda: [model(mx.array([[3]]), cache=gen), model(toks, cache=prompt)], gen, prompt, k)
            one = ms(lambda: fused.forward(model, mx.array([[3]]), gen, toks, prompt), gen, prompt, k)
            cells.append(f"{two:.1f} / {one:.1f} ms")
        print(f"| {ctx} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--default-model", action="store_true")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-tokens", type=int, default=2500)
    ap.add_argument("--factors", default="0,0.5,1,2,4")
    ap.add_argument("--json")
    ap.add_argument("--slice-costs", action="store_true", help="in-process forward costs by slice size and context")
    args = ap.parse_args()
    if args.default_model:
        from mlx_sidecar import sources

        model = "default"
        _ = sources
    else:
        model = str(make_model(tempfile.mkdtemp(prefix="hol-"), preset=args.preset))
    if args.slice_costs:
        return slice_costs(model)
    rows = [one(model, float(f), args.prompt_tokens) for f in args.factors.split(",")]
    fused = "two forwards per step (MLX_SIDECAR_FUSED=0)" if os.environ.get("MLX_SIDECAR_FUSED") == "0" else "fused steps"
    print(f"{fused}, {args.prompt_tokens}-token prompt, {'default model' if args.default_model else args.preset}")
    print("| factor | median gap | worst gap | worst ÷ median | stream tokens during prefill | long TTFT | alone | ÷ alone | aggregate tok/s | work rate |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['factor']:g} | {r['median_gap_ms']} ms | {r['worst_gap_ms']} ms | {r['worst_over_median']} | "
              f"{r['stream_tokens_during_prefill']} | {r['long_ttft_s']} s | {r['solo_ttft_s']} s | {r['ttft_over_solo']} | "
              f"{r['aggregate_tok_s']} | {r['work_rate']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
