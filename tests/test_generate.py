"""generate over the pipe: every sampling parameter really changes the output, stop strings,
chunking policy, seeds, and the errors raised before any work starts."""

import pytest

from conftest import chunks_of

BASE = {"model": "m", "prompt": "The capital of", "max_tokens": 24}


def gen(p, **params):
    merged = {k: v for k, v in {**BASE, **params}.items() if v is not None}
    answer, notes = p.request("generate", merged)
    assert "result" in answer, answer
    return answer["result"], chunks_of(notes, answer["id"])


def tokens(p, **params):
    result, chunks = gen(p, **params)
    return [t for c in chunks for t in c["token_ids"]]


def test_greedy_is_deterministic_and_temperature_changes_it(loaded):
    greedy = tokens(loaded, temperature=0)
    assert tokens(loaded, temperature=0) == greedy
    assert tokens(loaded, temperature=1.0, seed=1) != greedy


def test_seed_reproduces_and_differs(loaded):
    a = tokens(loaded, temperature=1.0, seed=7)
    assert tokens(loaded, temperature=1.0, seed=7) == a
    assert tokens(loaded, temperature=1.0, seed=8) != a


@pytest.mark.parametrize("param", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_truncation_samplers_collapse_to_greedy(loaded, param):
    greedy = tokens(loaded, temperature=0)
    free = tokens(loaded, temperature=1.5, seed=3)
    assert free != greedy  # without the truncation the seed samples something else
    assert tokens(loaded, temperature=1.5, seed=3, **param) == greedy


@pytest.mark.parametrize("param", [{"repetition_penalty": 1.8}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}])
def test_penalties_change_greedy_output(loaded, param):
    assert tokens(loaded, temperature=0, **param) != tokens(loaded, temperature=0)


def test_logit_bias_forces_a_token(loaded):
    forced = tokens(loaded, temperature=0, logit_bias={"100": 100})
    assert set(forced) == {100}
    banned = tokens(loaded, temperature=0)[0]
    assert tokens(loaded, temperature=0, logit_bias={str(banned): -100})[0] != banned


def test_stop_token_ids(loaded):
    greedy = tokens(loaded, temperature=0, max_tokens=40)
    cut = 5
    result, chunks = gen(loaded, temperature=0, max_tokens=40, stop_token_ids=[greedy[cut]])
    first = greedy.index(greedy[cut])
    assert result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == first


def test_stop_string_is_never_leaked(loaded):
    full, _ = gen(loaded, temperature=1.0, seed=11, max_tokens=60)
    text = full["text"]
    # A stop string that spans several tokens, from the middle of the text.
    stop = text[20:27]
    assert len(stop) == 7 and text.find(stop) >= 0
    for chunk_tokens in (1, 3, 1000):
        result, chunks = gen(loaded, temperature=1.0, seed=11, max_tokens=60, stop=[stop, "never-there"],
                             stream_options={"chunk_tokens": chunk_tokens})
        assert result["finish_reason"] == "stop"
        assert result["text"] == text[: text.find(stop)]
        streamed = "".join(c["text"] for c in chunks)
        assert streamed == result["text"] and stop not in streamed


def test_stream_false_sends_no_chunks(loaded):
    result, chunks = gen(loaded, temperature=0, stream=False)
    assert chunks == [] and result["usage"]["completion_tokens"] == 24
    streamed, _ = gen(loaded, temperature=0)
    assert streamed["text"] == result["text"]


def test_chunking_first_token_alone_then_n(loaded):
    # With a huge latency budget, chunks are exactly: 1 token, then N at a time, then the rest.
    result, chunks = gen(loaded, temperature=0, max_tokens=30, stream_options={"chunk_tokens": 8, "max_latency_ms": 60000})
    assert [len(c["token_ids"]) for c in chunks] == [1, 8, 8, 8, 5]
    assert [c["index"] for c in chunks] == [0, 1, 2, 3, 4]


def test_chunking_default_is_by_model_size(loaded):
    result, chunks = gen(loaded, temperature=0, max_tokens=100, stream_options={"max_latency_ms": 60000})
    assert [len(c["token_ids"]) for c in chunks] == [1, 32, 32, 32, 3]


def test_latency_deadline_flushes_partial_chunks(loaded):
    # Thousands of tokens at ~1 ms each with a 20 ms budget: chunks must go out long before N.
    result, chunks = gen(loaded, temperature=0, max_tokens=1000, stream_options={"chunk_tokens": 100000})
    assert len(chunks) > 3
    assert sum(len(c["token_ids"]) for c in chunks) == 1000


def test_messages_use_the_chat_template(loaded):
    answer, _ = loaded.request("tokenize", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    assert "result" in answer, answer
    assert answer["result"]["text"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    result, _ = gen(loaded, prompt=None, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert result["usage"]["prompt_tokens"] > 10


def test_tokenize_detokenize_round_trip(loaded):
    ids = loaded.request("tokenize", {"model": "m", "text": "Hello world"})[0]["result"]["tokens"]
    assert loaded.request("detokenize", {"model": "m", "tokens": ids})[0]["result"]["text"] == "Hello world"
    bad = loaded.request("detokenize", {"model": "m", "tokens": [10**6]})[0]
    assert bad["error"]["code"] == -32602 and bad["error"]["data"]["path"] == "/tokens/0"


def test_eos_finishes_with_stop(spawn, eos_model):
    p = spawn()
    p.request("model/load", {"model": eos_model, "id": "m"})
    eos = p.request("tokenize", {"model": "m", "text": "<|im_end|>", "add_special_tokens": False})[0]["result"]["tokens"]
    result, chunks = gen(p, logit_bias={str(eos[0]): 100})
    assert result["finish_reason"] == "stop" and result["usage"]["completion_tokens"] == 0 and result["text"] == ""


def test_errors_before_work_starts(loaded):
    p = loaded
    long_prompt = "Hello world " * 2000
    answer, notes = p.request("generate", {**BASE, "prompt": long_prompt})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["type"] == "context_length_exceeded"
    assert answer["error"]["data"]["path"] == "/prompt"
    assert answer["error"]["data"]["context_length"] == 1024 and answer["error"]["data"]["prompt_tokens"] > 1024
    assert notes == []
    answer, _ = p.request("generate", {**BASE, "model": "other"})
    assert answer["error"]["code"] == -32000
    answer, _ = p.request("generate", {**BASE, "logit_bias": {"5000": 1}})
    assert answer["error"]["data"]["path"] == "/logit_bias/5000"
    answer, _ = p.request("generate", {**BASE, "stop_token_ids": [1, 5000]})
    assert answer["error"]["data"]["path"] == "/stop_token_ids/1"
    answer, _ = p.request("generate", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]})
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "/messages/0/content/0"
    # max_tokens past the context is clipped, not an error.
    result, _ = gen(p, temperature=0, max_tokens=5000, stream=False)
    assert result["finish_reason"] == "length" and result["usage"]["total_tokens"] == 1024


def test_timings_and_usage(loaded):
    result, _ = gen(loaded, temperature=0)
    t = result["timings"]
    assert 0 < t["ttft_ms"] <= t["total_ms"] and t["generation_tps"] > 0 and t["prompt_tps"] > 0
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + 24
