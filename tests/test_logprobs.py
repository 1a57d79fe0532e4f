"""generate's logprobs/top_logprobs against in-process mlx-lm (solo and batched, within 1e-4), chunk
alignment, the result's OpenAI shape, and the numpy top-k against a full sort."""

import math

import numpy as np
import pytest

from conftest import chunks_of

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_model):
    """In-process mlx-lm on the same model: token ids and full logprob rows of a greedy run."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = load(tiny_model)

    def run(prompt: str, n: int, repetition_penalty=None):
        ids = tokenizer.encode(prompt)
        procs = make_logits_processors(repetition_penalty=repetition_penalty)
        out = []
        for token, row in generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1),
                                        logits_processors=procs):
            out.append((int(token), np.array(row.astype(mx.float32))))
        return out

    return run


def check_against(result, ref, k):
    content = result["logprobs"]["content"]
    assert len(content) == len(ref) == result["usage"]["completion_tokens"]
    for item, (token, row) in zip(content, ref):
        assert item["token_id"] == token
        assert abs(item["logprob"] - float(row[token])) < TOL, (item["logprob"], float(row[token]))
        assert bytes(item["bytes"]).decode("utf-8", errors="replace") == item["token"]
        tops = item["top_logprobs"]
        assert len(tops) == k
        want = np.argsort(-row, kind="stable")[:k]
        for alt, tid in zip(tops, want):
            assert abs(alt["logprob"] - float(row[tid])) < TOL
            # Ties may pick another id with the same value; the value is what must match.
            assert alt["token_id"] == int(tid) or abs(float(row[alt["token_id"]]) - float(row[tid])) < TOL
        values = [a["logprob"] for a in tops]
        assert values == sorted(values, reverse=True)


def check_chunks(answer, chunks):
    items = []
    for c in chunks:
        assert len(c["logprobs"]) == len(c["token_ids"])
        assert [i["token_id"] for i in c["logprobs"]] == c["token_ids"]
        items.extend(c["logprobs"])
    assert items == answer["result"]["logprobs"]["content"]


def test_solo_logprobs_match_mlx_lm(loaded, reference):
    answer, notes = loaded.request("generate", {"model": "m", "prompt": "Hello world", "max_tokens": 12, "temperature": 0,
                                                "logprobs": True, "top_logprobs": 5, "stream_options": {"chunk_tokens": 4}})
    result = answer["result"]
    check_against(result, reference("Hello world", 12), 5)
    check_chunks(answer, chunks_of(notes, answer["id"]))
    assert sum(1 for i in result["logprobs"]["content"] if i["logprob"] <= 0) == 12


def test_batched_logprobs_match_mlx_lm(loaded, reference):
    """Four requests at once decode in one batch: each with its own top_logprobs (or none), one
    with a logits processor (values are after processors), each equal to mlx-lm alone."""
    cases = [
        ("Hello world", {"logprobs": True, "top_logprobs": 5}, 5, None),
        ("The capital", {"logprobs": True, "repetition_penalty": 1.3}, 0, 1.3),
        ("Numbers: 1 2", {}, None, None),
        ("A sidecar speaks", {"logprobs": True, "top_logprobs": 20}, 20, None),
    ]
    ids = [loaded.start("generate", {"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0, **extra})
           for prompt, extra, _, _ in cases]
    answers, notes = {}, []
    while len(answers) < len(ids):
        msg = loaded.recv(60)
        if msg.get("id") in ids:
            answers[msg["id"]] = msg
        else:
            notes.append(msg)
    for id, (prompt, _, k, penalty) in zip(ids, cases):
        answer = answers[id]
        if k is None:
            assert "logprobs" not in answer["result"]
            assert all("logprobs" not in c for c in chunks_of(notes, id))
            continue
        check_against(answer["result"], reference(prompt, 16, penalty), k)
        check_chunks(answer, chunks_of(notes, id))


def test_logprobs_off_by_default_and_top_logprobs_needs_logprobs(loaded):
    answer, notes = loaded.request("generate", {"model": "m", "prompt": "Hi", "max_tokens": 3})
    assert "logprobs" not in answer["result"]
    assert all("logprobs" not in c for c in chunks_of(notes, answer["id"]))
    answer, _ = loaded.request("generate", {"model": "m", "prompt": "Hi", "max_tokens": 3, "top_logprobs": 2})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/top_logprobs"
    answer, _ = loaded.request("generate", {"model": "m", "prompt": "Hi", "logprobs": True, "top_logprobs": 21})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/top_logprobs"


def test_masked_alternatives_are_left_out(loaded):
    """Under a regex that allows two tokens' worth of choices, -inf alternatives are not listed."""
    answer, _ = loaded.request("generate", {"model": "m", "prompt": "Hi", "max_tokens": 4, "temperature": 0,
                                            "logprobs": True, "top_logprobs": 20,
                                            "response_format": {"type": "regex", "pattern": "(a|b)"}})
    content = answer["result"]["logprobs"]["content"]
    assert content and all(math.isfinite(a["logprob"]) and a["logprob"] > -9999 for i in content for a in i["top_logprobs"])
    assert len(content[0]["top_logprobs"]) < 20


@pytest.mark.parametrize("shape", [(1, 49152), (8, 49159), (3, 100), (2, 64 * 5 + 3)])
def test_top_k_equals_a_full_sort(shape):
    from mlx_sidecar.logprobs import top_k

    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape).astype(np.float32) * 4
    a[0, : shape[1] // 2] = -np.inf  # half a row masked
    for k in (1, 5, 20):
        ids, vals = top_k(a, k)
        want = np.argsort(-a, axis=-1, kind="stable")[:, :k]
        assert (vals == np.take_along_axis(a, want, -1)).all()
        assert (ids == want).all()


@pytest.fixture(scope="module")
def full_rows(tiny_model):
    """In-process: the log-softmax rows of a whole token sequence in one forward pass."""
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(tiny_model)

    def run(tokens):
        logits = model(mx.array(tokens)[None])[0]
        return tokenizer, np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return run


def test_score_a_prompt_matches_one_forward_pass(loaded, full_rows):
    # Longer than a prefill step (512), so the KV-cached steps are checked too.
    text = "The capital of France is Paris. " * 70
    answer, _ = loaded.request("score", {"model": "m", "prompt": text, "top_logprobs": 3})
    result = answer["result"]
    content = result["logprobs"]["content"]
    tokens = [i["token_id"] for i in content]
    assert len(tokens) == result["usage"]["prompt_tokens"] > 512 and result["usage"]["completion_tokens"] == 0
    _, rows = full_rows(tokens)
    assert content[0]["logprob"] is None and content[0]["top_logprobs"] == []
    for pos in range(1, len(tokens)):
        assert abs(content[pos]["logprob"] - rows[pos - 1, tokens[pos]]) < TOL
        want = np.argsort(-rows[pos - 1], kind="stable")[:3]
        got = [a["logprob"] for a in content[pos]["top_logprobs"]]
        assert np.allclose(got, [float(rows[pos - 1, t]) for t in want], atol=TOL, rtol=0)
    assert abs(result["total_logprob"] - sum(rows[p - 1, tokens[p]] for p in range(1, len(tokens)))) < 1e-2


def test_score_a_completion_and_bad_input(loaded, full_rows):
    answer, _ = loaded.request("score", {"model": "m", "prompt": "Hello", "completion": " world"})
    result = answer["result"]
    prompt_ids = loaded.request("tokenize", {"model": "m", "text": "Hello"})[0]["result"]["tokens"]
    content = result["logprobs"]["content"]
    assert result["usage"]["prompt_tokens"] == len(prompt_ids) and len(content) == result["usage"]["completion_tokens"] >= 1
    tokenizer, rows = full_rows(prompt_ids + [i["token_id"] for i in content])
    assert tokenizer.decode([i["token_id"] for i in content]) == " world"
    for j, item in enumerate(content):
        assert abs(item["logprob"] - rows[len(prompt_ids) - 1 + j, item["token_id"]]) < TOL
    assert abs(result["total_logprob"] - sum(i["logprob"] for i in content)) < 1e-6
    for params, path in [({"prompt": "x", "top_logprobs": 21}, "/top_logprobs"), ({"prompt": "x", "completion": ""}, "/completion"),
                         ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "/messages")]:
        answer, _ = loaded.request("score", {"model": "m", **params})
        assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == path, answer
    answer, _ = loaded.request("score", {"model": "nope", "prompt": "x"})
    assert answer["error"]["code"] == -32000


def test_logprobs_unchanged_when_a_running_request_moves_into_a_batch(loaded, reference):
    """A request alone (generate_step) moves into the batch mid-stream when others arrive: its
    items stay one per token, none repeated or lost, equal to mlx-lm alone."""
    p = loaded
    gid = p.start("generate", {"model": "m", "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0,
                               "logprobs": True, "top_logprobs": 3, "stream_options": {"chunk_tokens": 1}})
    notes, seen = [], 0
    while seen < 20:  # let it run alone for a while
        msg = p.recv(60)
        notes.append(msg)
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == gid:
            seen += 1
    others = [p.start("generate", {"model": "m", "prompt": f"other {i}", "max_tokens": 60, "temperature": 0,
                                   "logprobs": True}) for i in range(3)]
    answers = {}
    while len(answers) < 4:
        msg = p.recv(60)
        if msg.get("id") in [gid] + others:
            answers[msg["id"]] = msg
        else:
            notes.append(msg)
    check_against(answers[gid]["result"], reference("Once upon a time", 120), 3)
    check_chunks(answers[gid], chunks_of(notes, gid))
    for i, id in enumerate(others):
        check_against(answers[id]["result"], reference(f"other {i}", 60), 0)
