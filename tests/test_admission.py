"""Memory-aware admission (admission.py) on the real runtime: a request whose KV cache does not fit
beside the running ones waits and then runs, one that could never fit is refused with -32602
(exceeds_memory), prompts past the context (or --max-context) get -32602 (context_length_exceeded),
a waiting request can be cancelled, and nothing is lost. Budgets are set with --kv-budget-bytes in
multiples of the tiny model's KV bytes per token; every assertion is on order and counts."""

import json
from pathlib import Path

PROMPT = "Hello"


def kv_per_token(model_dir: str) -> int:
    """layers x kv heads x head dim x (keys + values) x float32, from the model's config."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    return c["num_hidden_layers"] * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 2 * 4


def start(spawn, model_dir, *args, ids=("m",)):
    p = spawn(args=list(args))
    for mid in ids:
        answer, _ = p.request("model/load", {"model": model_dir, "id": mid})
        assert "result" in answer, answer
    return p


def prompt_tokens(p, text=PROMPT) -> int:
    return len(p.request("tokenize", {"model": "m", "text": text})[0]["result"]["tokens"])


def gen_params(model="m", prompt=PROMPT, **kw):
    return {"model": model, "prompt": prompt, "temperature": 0, "stream": True, **kw}


def run(p, ids, watch=None, until_waiting=None):
    """Read until every request in ids has its answer. Returns (events, answers, snapshots):
    events in arrival order ("chunk" | "answer", id), and the runtime/metrics results read
    while `watch` (an id) had not ended, or until `until_waiting` (a model) had a waiting one."""
    events, answers, snapshots = [], {}, []
    pending_metrics = None
    while len(answers) < len(ids):
        if pending_metrics is None and watch is not None and watch not in answers:
            pending_metrics = p.start("runtime/metrics")
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            events.append(("chunk", msg["params"]["id"]))
        elif "id" in msg and msg["id"] == pending_metrics:
            snapshots.append(msg["result"])
            pending_metrics = None
            row = msg["result"]["gauges"]["streams"].get(until_waiting, {})
            if until_waiting and row.get("running") and row.get("waiting"):
                return events, answers, snapshots
        elif "id" in msg and msg["id"] in ids:
            answers[msg["id"]] = msg
            events.append(("answer", msg["id"]))
    if pending_metrics is not None:
        p.wait(pending_metrics)
    return events, answers, snapshots


def first(events, kind, id):
    return next(i for i, e in enumerate(events) if e == (kind, id))


def test_kv_bytes_per_token_is_reported(spawn, tiny_model):
    p = start(spawn, tiny_model)
    info = p.request("model/list")[0]["result"]["models"][0]
    assert info["kv_bytes_per_token"] == kv_per_token(tiny_model) == 512
    gauges = p.request("runtime/metrics")[0]["result"]["gauges"]
    assert gauges["kv"]["budget_bytes"] > 0 and gauges["kv"]["reserved_bytes"] == 0 and gauges["kv"]["source"]


def test_a_request_that_does_not_fit_now_waits_then_runs(spawn, serve, tiny_model):
    per = kv_per_token(tiny_model)
    budget = per * 450           # one request of 3 + 300 tokens fits, two do not
    p = start(spawn, tiny_model, "--kv-budget-bytes", str(budget))
    n = prompt_tokens(p)
    need = per * (n + 300)
    a = p.start("generate", gen_params(max_tokens=300))
    b = p.start("generate", gen_params(max_tokens=300))
    events, answers, snaps = run(p, {a, b}, watch=a)
    ra, rb = answers[a]["result"], answers[b]["result"]
    # Nothing lost: both ran to their length, and the same prompt gave the same greedy text.
    assert ra["usage"]["completion_tokens"] == rb["usage"]["completion_tokens"] == 300
    assert ra["text"] == rb["text"]
    # b produced nothing until a had ended and given its KV budget back.
    assert first(events, "chunk", b) > first(events, "answer", a)
    # While a ran, b waited and a's prompt + max_tokens were reserved. (The gauges are read on
    # another thread than the engine's: a snapshot may fall between a's end and b's start.)
    both = [s["gauges"] for s in snaps if s["gauges"]["streams"].get("m", {}).get("waiting") == 1
            and s["gauges"]["streams"]["m"]["running"] == 1]
    assert both, snaps[:3]
    assert any(g["streams"]["m"]["kv_reserved_bytes"] == need and g["kv"]["reserved_bytes"] == need for g in both)
    assert any(per * n < g["streams"]["m"]["kv_bytes"] <= need for g in both)  # filled: prompt + tokens so far
    assert all(g["kv"]["budget_bytes"] == budget and g["kv"]["source"] == "--kv-budget-bytes" for g in both)
    after = p.request("runtime/metrics")[0]["result"]["gauges"]
    assert after["kv"]["reserved_bytes"] == 0 and after["streams"] == {}

    # The control: with the machine's budget the same two requests decode together.
    q = serve()
    assert "result" in q.request("model/load", {"model": tiny_model, "id": "m"})[0]
    a = q.start("generate", gen_params(max_tokens=300))
    b = q.start("generate", gen_params(max_tokens=300))
    events, _, _ = run(q, {a, b})
    assert first(events, "chunk", b) < first(events, "answer", a)


def test_a_request_that_never_fits_is_refused(spawn, tiny_model):
    per = kv_per_token(tiny_model)
    p = start(spawn, tiny_model, "--kv-budget-bytes", str(per * 100))
    n = prompt_tokens(p)
    err = p.request("generate", gen_params(max_tokens=200))[0]["error"]
    assert err["code"] == -32602 and err["data"]["type"] == "exceeds_memory" and err["data"]["path"] == "/max_tokens"
    assert err["data"]["kv_budget_bytes"] == per * 100 and err["data"]["kv_bytes_needed"] == per * (n + 200)
    assert err["data"]["max_tokens_that_fit"] == 100 - n
    # The figure it gives fits.
    result = p.request("generate", gen_params(max_tokens=err["data"]["max_tokens_that_fit"], stream=False))[0]["result"]
    assert result["usage"]["total_tokens"] == 100
    # A prompt that alone is too big: the prompt is what to shorten.
    messages = [{"role": "user", "content": "Hello world " * 60}]
    err = p.request("generate", {"model": "m", "messages": messages, "max_tokens": 1})[0]["error"]
    assert err["code"] == -32602 and err["data"]["type"] == "exceeds_memory" and err["data"]["path"] == "/messages"
    assert "max_tokens_that_fit" not in err["data"]
    assert "result" in p.request("runtime/ping")[0]


def test_max_context_and_too_long_prompts(spawn, tiny_model):
    p = start(spawn, tiny_model, "--max-context", "40")
    err = p.request("generate", gen_params(prompt="Hello world " * 20))[0]["error"]
    assert err["code"] == -32602 and err["data"]["type"] == "context_length_exceeded"
    assert err["data"]["path"] == "/prompt" and err["data"]["context_length"] == 40 and err["data"]["prompt_tokens"] > 40
    err = p.request("generate", {"model": "m", "messages": [{"role": "user", "content": "Hello world " * 20}]})[0]["error"]
    assert err["data"]["type"] == "context_length_exceeded" and err["data"]["path"] == "/messages"
    # max_tokens is clipped to the capped context, as to the model's own.
    result = p.request("generate", gen_params(max_tokens=500, stream=False))[0]["result"]
    assert result["finish_reason"] == "length" and result["usage"]["total_tokens"] == 40
    err = p.request("score", {"model": "m", "prompt": "Hello world " * 20})[0]["error"]
    assert err["code"] == -32602 and err["data"]["type"] == "context_length_exceeded" and err["data"]["context_length"] == 40


def test_cancelling_a_waiting_request(spawn, tiny_model):
    per = kv_per_token(tiny_model)
    p = start(spawn, tiny_model, "--kv-budget-bytes", str(per * 1100))
    a = p.start("generate", gen_params(max_tokens=1000))    # holds ~1,000 tokens of KV
    b = p.start("generate", gen_params(max_tokens=200))     # fits alone, not beside a
    events, answers, snaps = run(p, {a, b}, watch=a, until_waiting="m")
    assert a not in answers and snaps[-1]["gauges"]["streams"]["m"]["waiting"] == 1, "b was never seen waiting"
    p.notify("$/cancelRequest", {"id": b})
    more, answers, _ = run(p, {a, b})
    events += more
    err = answers[b]["error"]
    assert err["code"] == -32800 and err["data"]["usage"]["completion_tokens"] == 0
    assert ("chunk", b) not in events
    assert answers[a]["result"]["usage"]["completion_tokens"] == 1000
    # The budget is whole again: a request as large as a runs.
    result = p.request("generate", gen_params(max_tokens=1000, stream=False))[0]["result"]
    assert result["usage"]["completion_tokens"] == 1000
    assert p.request("runtime/metrics")[0]["result"]["gauges"]["kv"]["reserved_bytes"] == 0


def test_an_older_waiting_request_is_not_overtaken(spawn, tiny_model):
    """A small request for another model that would fit now still waits behind an older request
    that is waiting for room, so large requests are never starved by a stream of small ones."""
    per = kv_per_token(tiny_model)
    p = start(spawn, tiny_model, "--kv-budget-bytes", str(per * 1000), ids=("m", "n"))
    a = p.start("generate", gen_params(max_tokens=600))              # runs
    b = p.start("generate", gen_params(max_tokens=500))              # does not fit beside a: waits
    _, answers, _ = run(p, {a, b}, watch=a, until_waiting="m")
    assert a not in answers, "a ended before b was seen waiting"
    c = p.start("generate", gen_params(model="n", max_tokens=100))   # fits beside a, not beside a and b
    events, answers, _ = run(p, {a, b, c})
    assert all(answers[i]["result"]["finish_reason"] == "length" for i in (a, b, c))
    assert first(events, "chunk", c) > first(events, "answer", a)
    assert first(events, "chunk", b) > first(events, "answer", a)


def test_kv_shape_of_a_model_with_sliding_window_layers():
    """measure() reads mlx-lm's own caches: sliding-window layers cost at most their window, and
    each full layer's figure is what its cache really holds."""
    import mlx.core as mx
    from mlx_lm.models import gemma3_text
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from mlx_sidecar.admission import from_config, measure

    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=32, num_hidden_layers=4, intermediate_size=64,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                                 sliding_window=8, sliding_window_pattern=2)
    model = gemma3_text.Model(args)
    shape = measure(model, {})
    per_layer = 2 * 1 * 16 * 4  # keys and values x kv heads x head dim x float32
    assert shape.layers == [(per_layer, 8), (per_layer, None), (per_layer, 8), (per_layer, None)]
    assert shape.per_token == 4 * per_layer
    assert shape.bytes_for(100) == 2 * per_layer * 8 + 2 * per_layer * 100
    cache = make_prompt_cache(model)
    model(mx.array([[1] * 256]), cache=cache)
    full = [c for c in cache if type(c) is KVCache]
    mx.eval([c.state for c in full])
    assert len(full) == 2 and all(c.nbytes == 256 * per_layer for c in full)
    # The config's formula agrees where there are no windows.
    cfg = {"num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "hidden_size": 32}
    assert from_config(cfg, 4).per_token == shape.per_token


def test_kv_shape_without_a_forward_pass_matches_the_measured_one(tiny_model):
    """For plain attention the KV cost comes from the cache types and the config (no forward pass
    at load, which would stall other streams); it must equal what one token really costs."""
    import json
    from pathlib import Path

    from mlx_lm.models import gemma3_text
    from mlx_lm.utils import load as mlx_lm_load

    from mlx_sidecar.admission import from_cache_types, measure_forward

    model, _ = mlx_lm_load(tiny_model)
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    fast = from_cache_types(model, config)
    assert fast is not None and fast.layers == measure_forward(model, {}).layers
    cfg = dict(model_type="gemma3_text", hidden_size=32, num_hidden_layers=4, intermediate_size=64,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
               sliding_window=8, sliding_window_pattern=2)
    windowed = gemma3_text.Model(gemma3_text.ModelArgs(**cfg))
    fast = from_cache_types(windowed, cfg)
    assert fast is not None and fast.layers == measure_forward(windowed, {}).layers
    assert from_cache_types(windowed, {**cfg, "model_type": "deepseek_v3"}) is None  # unknown: measured
