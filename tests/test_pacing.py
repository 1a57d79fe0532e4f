"""Head-of-line: while a long prompt joins, running streams keep getting tokens (pacing.py). Counted
in tokens and ordering, never wall-clock: how many tokens a running stream gets between the long
prompt's arrival and the long prompt's first token."""

import pytest

from conftest import collect

LONG = " ".join(f"w{i % 50}" for i in range(300))  # ~850 of the tiny model's 1,024 context


def tokens_while_long_prompt_prefills(p):
    run = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000, "stream_options": {"chunk_tokens": 1, "max_latency_ms": 0}})
    seen = 0
    while seen < 10:  # a few decode steps alone first: the pacer measures them
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            seen += len(msg["params"]["token_ids"])
    long = p.start("generate", {"model": "m", "prompt": LONG, "max_tokens": 2, "stream_options": {"chunk_tokens": 1, "max_latency_ms": 0}})
    got = 0
    while True:
        msg = p.recv()
        if msg.get("method") != "generate/chunk":
            continue
        if msg["params"]["id"] == long:
            break
        got += len(msg["params"]["token_ids"])
    p.notify("$/cancelRequest", {"id": run})
    collect(p, [long, run])  # either may be answered first
    return got


def load(serve, tiny_model, *args):
    p = serve(args=list(args))
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "m"})
    assert "result" in answer
    return p


def test_running_stream_keeps_flowing_while_a_long_prompt_prefills(serve, tiny_model):
    # A tiny factor: the slice shrinks to its 16-token floor whatever the machine's speed, so the
    # count does not depend on timing (the default factor, 2, is measured in bench/head_of_line.py).
    p = load(serve, tiny_model, "--prefill-slice-factor", "0.05")
    n = p.request("tokenize", {"model": "m", "text": LONG})[0]["result"]["tokens"]
    assert len(n) > 600
    # Paced: the prompt is prefilled in many small slices, a decode step between each.
    got = tokens_while_long_prompt_prefills(p)
    assert got >= 12, got


def test_without_pacing_the_prompt_goes_in_big_steps(serve, tiny_model):
    # The same with pacing off (--prefill-slice-factor 0): 512-token steps, so the running stream
    # gets only a few tokens before the long prompt's first token. This is what the test above
    # guards against.
    p = load(serve, tiny_model, "--prefill-slice-factor", "0")
    # Tokens that come before the engine has even read the long request only add to the count (a busy
    # machine can delay the reader by dozens of ~1 ms tokens), so the fewest of three tries is the
    # structural figure: ~2 steps.
    got = min(tokens_while_long_prompt_prefills(p) for _ in range(3))
    assert got <= 7, got


def test_a_running_stream_is_unchanged_by_a_long_prompt_joining(serve, tiny_model):
    # The join moves the running request into the batch (one step re-feeds its last token, with no
    # prompt slice), then the long prompt goes in many small slices and joins generation: the
    # running stream's greedy tokens must be exactly those it makes alone, in order. The long prompt
    # rides in the stream's forwards (fused.py) in slices down to 4 tokens: the stream outlasts it.
    p = load(serve, tiny_model, "--prefill-slice-factor", "0.05", "--prompt-cache-bytes", "0")
    params = {"model": "m", "prompt": "Hi", "max_tokens": 320, "temperature": 0, "stream_options": {"chunk_tokens": 1, "max_latency_ms": 0}}
    alone = p.request("generate", params)[0]["result"]
    long_params = {"model": "m", "prompt": LONG, "max_tokens": 2, "temperature": 0}
    long_alone = p.request("generate", long_params)[0]["result"]
    run = p.start("generate", params)
    tokens, long, long_first, answers = [], None, None, {}
    while True:
        msg = p.recv()
        if "id" in msg:
            answers[msg["id"]] = msg
        if msg.get("id") == run:
            break
        if msg.get("method") != "generate/chunk":
            continue
        if msg["params"]["id"] == run:
            tokens += msg["params"]["token_ids"]
            if len(tokens) >= 10 and long is None:
                long = p.start("generate", long_params)
        elif msg["params"]["id"] == long and long_first is None:
            long_first = len(tokens)  # how far the running stream was when the long prompt's first token came
    assert msg["result"]["text"] == alone["text"]
    assert msg["result"]["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"] == len(tokens)
    assert long_first is not None and long_first > 10 + 12, long_first  # it kept flowing through the prefill
    # The prompt prefilled in slices beside the stream answers as it does alone.
    assert (answers.get(long) or p.wait(long)[0])["result"]["text"] == long_alone["text"]


def test_the_pacer_starts_each_new_prompt_at_the_floor_and_drops_cancelled_ones():
    # pacing.py on its own (no model): slices cheaper than the budget grow (at most 2x a step); a
    # prompt that stops answering (cancelled, failed) is forgotten, so the next one starts at the floor.
    from types import SimpleNamespace as Response

    from mlx_sidecar.pacing import MIN_SLICE, PrefillPacer

    pacer = PrefillPacer(2.0)
    pacer.observe_decode(0.010)  # a running stream's decode step
    assert pacer.slice(True, 1) == MIN_SLICE
    pacer.observe([Response(uid=1, progress=(MIN_SLICE, 1000), end_of_segment=False)], 0.012, True)
    assert pacer.slice(True, 1) == 2 * MIN_SLICE
    pacer.observe([], 0.010, True)  # uid 1 is gone without finishing
    assert pacer.slice(True, 1) == MIN_SLICE
    assert pacer.slice(False, 1) == 512  # nobody decoding: full steps
