"""Speculative decoding (generate's `speculative`, model/load's draft_model) against the real
runtime: greedy output is the same token for token with prompt lookup and with draft models (one
that agrees with the target, one that never does), usage and chunks count the drafts, incompatible
drafts are refused with what differs, structured output holds, cancelling works mid-speculation,
another request is not starved, and sampled output keeps the model's distribution (chi-square
against probabilities computed here with mlx-lm)."""

import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import chunks_of
from mlx_sidecar.testing import make_model

REPEATING = ("The quick brown fox jumps over the lazy dog. Hello world! How are you today? "
             "The quick brown fox jumps over the lazy dog. Hello world! How are you today? The quick")


@pytest.fixture(scope="module")
def draft_dirs(tmp_path_factory, tiny_model):
    """Drafts for the tiny model: another random model with its tokenizer, a copy with two token
    ids swapped (same vocabulary size), and a copy whose special token is renamed."""
    base = tmp_path_factory.mktemp("drafts")
    other = make_model(base / "other", preset="tiny", seed=7)
    swapped = base / "swapped"
    shutil.copytree(other, swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    special = base / "special"
    shutil.copytree(other, special)
    text = (special / "tokenizer.json").read_text().replace("<|im_start|>", "<|im_begin|>")
    (special / "tokenizer.json").write_text(text)
    return {"other": str(other), "swapped": str(swapped), "special": str(special), "ab": (a, b)}


@pytest.fixture
def spec(serve, tiny_model, draft_dirs):
    """A runtime with the tiny model as "m" (no draft), "self" (itself as draft: always agrees)
    and "other" (a random draft with the same tokenizer: almost never agrees)."""
    p = serve()
    for mid, extra in (("m", {}), ("self", {"draft_model": tiny_model, "num_draft_tokens": 4}),
                       ("other", {"draft_model": draft_dirs["other"]})):
        answer, _ = p.request("model/load", {"model": tiny_model, "id": mid, **extra})
        assert "result" in answer, answer
    return p


def run(p, params):
    answer, notes = p.request("generate", params, timeout=300)
    assert "result" in answer, answer
    return answer["result"], chunks_of(notes, answer["id"])


def greedy(prompt=REPEATING, **kw):
    return {"model": "m", "prompt": prompt, "max_tokens": 80, "temperature": 0, **kw}


PROMPTS = [REPEATING, "Hello world! How are you", "a sidecar speaks JSON-RPC over stdin and stdout, one frame at a time. a sidecar"]


def test_prompt_lookup_greedy_is_identical_and_counted(spec):
    for prompt in PROMPTS:
        plain, plain_chunks = run(spec, greedy(prompt, speculative={"type": "none"}, stream=True))
        assert "draft_tokens" not in plain["usage"] and not any("draft_tokens" in c for c in plain_chunks)
        plain_ids = [t for c in plain_chunks for t in c["token_ids"]]
        for k, n in ((8, 3), (1, 1), (16, 5)):
            got, chunks = run(spec, greedy(prompt, stream=True, stream_options={"chunk_tokens": 7},
                                           speculative={"type": "prompt_lookup", "num_draft_tokens": k, "max_ngram": n}))
            assert got["text"] == plain["text"]
            assert [t for c in chunks for t in c["token_ids"]] == plain_ids
            usage = got["usage"]
            assert usage["completion_tokens"] == plain["usage"]["completion_tokens"] == 80
            assert 0 <= usage["accepted_draft_tokens"] <= usage["draft_tokens"]
            # Chunks say how many of their tokens were drafted; together, what usage says.
            assert sum(c.get("draft_tokens", 0) for c in chunks) == usage["accepted_draft_tokens"]
            assert all(0 < c["draft_tokens"] <= len(c["token_ids"]) for c in chunks if "draft_tokens" in c)
    # The repeating prompt gives lookup something to copy: some drafts were taken.
    got, _ = run(spec, greedy(speculative={"type": "prompt_lookup"}))
    assert got["usage"]["accepted_draft_tokens"] > 0


def test_draft_model_greedy_is_identical(spec):
    for prompt in PROMPTS:
        plain, _ = run(spec, greedy(prompt))
        same, chunks = run(spec, greedy(prompt, model="self", stream=True))
        other, _ = run(spec, greedy(prompt, model="other"))
        assert same["text"] == plain["text"] == other["text"]
        # A draft identical to the target proposes what it would pick: (nearly) everything is taken.
        u = same["usage"]
        assert u["draft_tokens"] > 0 and u["accepted_draft_tokens"] >= 0.9 * u["draft_tokens"]
        assert sum(c.get("draft_tokens", 0) for c in chunks) == u["accepted_draft_tokens"]
        assert other["usage"]["draft_tokens"] > 0
        # The request can opt out, or pick prompt lookup instead of the model's draft.
        off, _ = run(spec, greedy(prompt, model="self", speculative={"type": "none"}))
        assert off["text"] == plain["text"] and "draft_tokens" not in off["usage"]
        look, _ = run(spec, greedy(prompt, model="self", speculative={"type": "prompt_lookup"}))
        assert look["text"] == plain["text"]


def test_load_reports_the_draft_and_refuses_incompatible_ones(serve, tiny_model, draft_dirs):
    p = serve()
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "t", "draft_model": draft_dirs["other"], "num_draft_tokens": 5})
    draft = answer["result"]["draft"]
    assert draft["model"] == draft_dirs["other"] and draft["num_draft_tokens"] == 5 and draft["parameters"] > 0

    answer, _ = p.request("model/load", {"model": tiny_model, "id": "x", "draft_model": draft_dirs["swapped"]})
    err = answer["error"]
    assert err["code"] == -32602 and err["data"]["path"] == "/draft_model", err
    a, b = draft_dirs["ab"]
    assert "2 tokens have other ids" in err["message"] and (repr(a) in err["message"] or repr(b) in err["message"]), err

    answer, _ = p.request("model/load", {"model": tiny_model, "id": "x", "draft_model": draft_dirs["special"]})
    err = answer["error"]
    assert err["code"] == -32602 and err["data"]["path"] == "/draft_model" and "<|im_begin|>" in err["message"], err
    # A refused load leaves nothing behind, and the runtime serves on.
    ids = [m["id"] for m in p.request("model/list", {})[0]["result"]["models"]]
    assert ids == ["t"]

    # The same id again: the same draft answers at once; another draft, or none, is refused.
    again, _ = p.request("model/load", {"model": tiny_model, "id": "t", "draft_model": draft_dirs["other"]})
    assert again["result"]["draft"]["model"] == draft_dirs["other"]
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "t"})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/id" and "with draft_model" in answer["error"]["message"]
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "t", "draft_model": tiny_model})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/draft_model"
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "y", "num_draft_tokens": 3})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/num_draft_tokens"
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "y", "draft_model": "/nonexistent/draft"})
    assert "error" in answer
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "m"})
    answer, _ = p.request("generate", {"model": "m", "prompt": "hi", "speculative": {"type": "draft"}})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/speculative/type", answer
    answer, _ = p.request("generate", {"model": "m", "prompt": "hi", "speculative": {"type": "draft", "max_ngram": 2}})
    assert answer["error"]["data"]["path"] == "/speculative/max_ngram", answer
    answer, _ = p.request("generate", {"model": "m", "prompt": "hi", "speculative": {"type": "prompt_lookup", "num_draft_tokens": 0}})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/speculative/num_draft_tokens", answer
    answer, _ = p.request("generate", {"model": "t", "prompt": "hi", "max_tokens": 3})
    assert answer["result"]["usage"]["completion_tokens"] == 3


def test_structured_output_holds_under_speculation(spec):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    prompt = 'JSON: {"name": "fox", "n": 12} and {"name": "dog", "n": 34} and '
    plain, _ = run(spec, greedy(prompt, response_format=fmt, max_tokens=60))
    for extra in ({"speculative": {"type": "prompt_lookup", "max_ngram": 2}}, {"model": "self"}, {"model": "other"}):
        got, _ = run(spec, greedy(prompt, response_format=fmt, max_tokens=60, **extra))
        assert got["text"] == plain["text"] and got["format_complete"] == plain["format_complete"]
        assert got["usage"]["draft_tokens"] > 0
    if plain["format_complete"]:
        assert set(json.loads(plain["text"])) == {"name", "n"}
    # Sampled: each output still follows the format (the grammar is never fed a rejected draft).
    for seed in range(4):
        got, _ = run(spec, {"model": "self", "prompt": prompt, "max_tokens": 60, "temperature": 0.8, "top_k": 20,
                            "seed": seed, "response_format": fmt})
        if got["finish_reason"] == "stop":
            assert got["format_complete"] and set(got["parsed"]) == {"name", "n"}, got
    regex = {"type": "regex", "pattern": "(fox|dog)( (fox|dog)){5,9}"}
    plain, _ = run(spec, greedy("fox dog fox dog fox dog", response_format=regex))
    got, _ = run(spec, greedy("fox dog fox dog fox dog", response_format=regex, speculative={"type": "prompt_lookup"}))
    assert got["text"] == plain["text"] and got["usage"]["accepted_draft_tokens"] > 0


def test_seed_stop_and_max_tokens_hold(spec):
    for seed in (1, 2, 3):
        base = {"model": "m", "prompt": REPEATING, "max_tokens": 40, "temperature": 0.7, "top_k": 5, "seed": seed}
        plain, _ = run(spec, base)
        # One sampler call per emitted token: the same seed draws the same keys.
        assert run(spec, {**base, "model": "self"})[0]["text"] == plain["text"]
        assert run(spec, {**base, "speculative": {"type": "prompt_lookup"}})[0]["text"] == plain["text"]
    plain, _ = run(spec, greedy(max_tokens=50))
    stop = plain["text"][20:24]
    cut, _ = run(spec, greedy(max_tokens=50, stop=[stop], speculative={"type": "prompt_lookup"}))
    ref, _ = run(spec, greedy(max_tokens=50, stop=[stop]))
    assert cut["text"] == ref["text"] and cut["finish_reason"] == "stop"
    for n in (1, 2, 5, 9):
        got, _ = run(spec, greedy(max_tokens=n, model="self"))
        assert got["usage"]["completion_tokens"] == n and got["finish_reason"] == "length"


def test_logprobs_under_speculation(spec):
    base = greedy(max_tokens=40, logprobs=True, top_logprobs=3, stream=True)
    plain, plain_chunks = run(spec, base)
    for extra in ({"speculative": {"type": "prompt_lookup"}}, {"model": "self"}):
        got, chunks = run(spec, {**base, **extra})
        assert got["usage"]["accepted_draft_tokens"] > 0
        assert [c["token"] for c in got["logprobs"]["content"]] == [c["token"] for c in plain["logprobs"]["content"]]
        for a, b in zip(got["logprobs"]["content"], plain["logprobs"]["content"]):
            assert abs(a["logprob"] - b["logprob"]) < 1e-3
            assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]
        assert sum(len(c["logprobs"]) for c in chunks) == 40


def test_cancel_mid_speculation(spec):
    rid = spec.start("generate", greedy(max_tokens=900, stream=True, model="self", stream_options={"chunk_tokens": 4}))
    while True:
        msg = spec.recv(60)
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == rid:
            first = msg["params"]
            break
    spec.notify("$/cancelRequest", {"id": rid})
    answer, notes = spec.wait(rid, 60)
    err = answer["error"]
    assert err["data"]["finish_reason"] == "cancelled", err
    usage = err["data"]["usage"]
    assert 0 < usage["completion_tokens"] < 900 and usage["draft_tokens"] > 0
    streamed = [t for c in [first] + chunks_of(notes, rid) for t in c["token_ids"]]
    assert len(streamed) == usage["completion_tokens"]  # every token is streamed before the answer
    # The runtime serves on, and the same request again gives the plain greedy text.
    plain, _ = run(spec, greedy(max_tokens=30))
    again, _ = run(spec, greedy(max_tokens=30, model="self"))
    assert again["text"] == plain["text"]


def test_another_request_is_not_starved(spec):
    first = greedy(max_tokens=900, speculative={"type": "prompt_lookup"}, stream=True)
    plain_first, _ = run(spec, {**first, "speculative": {"type": "none"}, "stream": False})
    second = greedy("Hello world! How are you", max_tokens=6)
    plain_second, _ = run(spec, second)
    a = spec.start("generate", first)
    while True:  # the first is decoding alone (speculating) once its first chunk is out
        msg = spec.recv(60)
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == a:
            break
    b = spec.start("generate", second)
    order = []
    while len(order) < 2:
        msg = spec.recv(120)
        if msg.get("id") in (a, b):
            order.append(msg["id"])
            if msg["id"] == a:
                got_a = msg["result"]
            else:
                got_b = msg["result"]
    # The second finished while the first was still going (it moved into the batch), and neither
    # output changed.
    assert order == [b, a]
    assert got_b["text"] == plain_second["text"]
    assert got_a["text"] == plain_first["text"] and got_a["usage"]["completion_tokens"] == 900


# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}
TOP_K = 3


def _pair_probabilities(model_dir, ids):
    """Exact probabilities of the first two tokens under temperature 1 and top_k 3, from mlx-lm."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(model_dir)

    def top(seq):
        logits = model(mx.array(seq)[None])[0, -1].astype(mx.float32)
        order = mx.argsort(-logits)[:TOP_K].tolist()
        w = mx.softmax(logits[mx.array(order)]).tolist()
        return dict(zip(order, w))

    first = top(ids)
    return {(a, b): pa * pb for a, pa in first.items() for b, pb in top(ids + [a]).items()}, first


def _chi2(counts, probs, n):
    cells = sorted(probs, key=probs.get)
    merged, pool_c, pool_p = [], 0, 0.0
    for cell in cells:  # pool the rare cells so every expected count is at least 5
        pool_c += counts.get(cell, 0)
        pool_p += probs[cell]
        if pool_p * n >= 5:
            merged.append((pool_c, pool_p))
            pool_c, pool_p = 0, 0.0
    if pool_p and merged:
        c, q = merged.pop()
        merged.append((c + pool_c, q + pool_p))
    assert sum(counts.values()) == n and not set(counts) - set(probs), counts
    return sum((c - q * n) ** 2 / (q * n) for c, q in merged), len(merged) - 1


@pytest.mark.parametrize("kind", ["draft", "prompt_lookup"])
def test_sampling_keeps_the_distribution(spec, tiny_model, kind):
    from mlx_sidecar.speculative import lookup

    # A prompt whose first drafted token is one the model may sample, so acceptance is exercised.
    # Random tiny models fall into loops: their own greedy text, cut anywhere, repeats n-grams.
    text = run(spec, greedy(max_tokens=60))[0]["text"]
    for cut in range(len(text), 10, -1):
        prompt = REPEATING + text[:cut]
        ids = spec.request("tokenize", {"model": "m", "text": prompt})[0]["result"]["tokens"]
        probs, first = _pair_probabilities(tiny_model, ids)
        proposal = lookup(ids, 1, 3)[:1] if kind == "prompt_lookup" else [max(first, key=first.get)]
        if proposal and proposal[0] in first and 0.15 < first[proposal[0]] < 0.85:
            break
    else:
        pytest.fail("no prompt gives a draft the model may take")
    n = 600
    params = {"model": "self" if kind == "draft" else "m", "prompt": prompt, "max_tokens": 2,
              "temperature": 1.0, "top_k": TOP_K}
    if kind == "prompt_lookup":
        params["speculative"] = {"type": "prompt_lookup", "num_draft_tokens": 1}
    counts, accepted = {}, 0
    for i in range(n):  # one at a time: each runs alone, so each speculates
        # A seed per sample: independent draws, and a run that gives the same counts every time
        # (an unseeded chi-square test at the 0.1% level fails one run in a thousand by design).
        result, chunks = run(spec, {**params, "stream": True, "seed": 1000 + i})
        accepted += result["usage"]["accepted_draft_tokens"]
        pair = tuple(t for c in chunks for t in c["token_ids"])
        counts[pair] = counts.get(pair, 0) + 1
    stat, dof = _chi2(counts, probs, n)
    assert stat < CHI2_999[dof], (stat, dof, counts, probs)
    assert accepted > 0


def test_lookup_takes_the_latest_longest_match():
    from mlx_sidecar.speculative import lookup

    seq = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 1, 2, 3]
    assert lookup(seq, 3, 3) == [9, 9, 5]            # "1 2 3" occurs at the start
    assert lookup(seq, 3, 2) == [7, 8, 4]            # "2 3": the latest earlier occurrence wins
    assert lookup(seq + [6], 4, 3) == []             # 6 never occurred before
    assert lookup([5, 5], 4, 3) == [5]               # a run copies itself
    assert lookup([4], 4, 3) == []


def test_a_paying_speculation_runs_beside_the_batch(spec):
    # The tiny model's own greedy text loops, so prompt lookup keeps most proposals: speculating
    # alone between batch steps can pay, and then both decode, one step each. Either way (alone
    # or moved into the batch) every output is the plain greedy one and nobody waits for the end.
    prompt = REPEATING + run(spec, greedy(max_tokens=60))[0]["text"]
    first = greedy(prompt, max_tokens=500, speculative={"type": "prompt_lookup"}, stream=True)
    plain_first, _ = run(spec, {**first, "speculative": {"type": "none"}, "stream": False})
    others = [greedy(p, max_tokens=40) for p in PROMPTS]
    plain_others = [run(spec, o)[0]["text"] for o in others]
    a = spec.start("generate", first)
    while True:
        msg = spec.recv(60)
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == a:
            break
    ids = [spec.start("generate", o) for o in others]
    done = {}
    while len(done) < len(ids) + 1:
        msg = spec.recv(120)
        if msg.get("id") in ids + [a]:
            done[msg["id"]] = msg["result"]
    assert list(done)[-1] == a, "the short requests finish before the long one"
    assert [done[i]["text"] for i in ids] == plain_others
    assert done[a]["text"] == plain_first["text"]
