"""Many requests at once: continuous batching, cancellation inside a batch, overload, seeded
determinism, prompt-cache reuse and backpressure, all against the real runtime."""

import os
import time

import pytest

from conftest import chunks_of, collect


def test_concurrent_streams_each_get_their_own_complete_output(loaded):
    p = loaded
    params = [{"model": "m", "prompt": f"Request number {i}", "max_tokens": 40 + i, "temperature": 0,
               "stream_options": {"chunk_tokens": 4}} for i in range(6)]
    ids = [p.start("generate", q) for q in params]
    out = collect(p, ids)
    for i, q in zip(ids, params):
        answer, chunks = out[i]
        result = answer["result"]
        assert result["usage"]["completion_tokens"] == q["max_tokens"]
        assert [c["index"] for c in chunks] == list(range(len(chunks)))
        assert "".join(c["text"] for c in chunks) == result["text"]
        # Same text as the request alone: batching does not change greedy output.
        alone, _ = p.request("generate", {**q, "stream": False})
        assert alone["result"]["text"] == result["text"]


def test_requests_join_a_running_batch(loaded):
    p = loaded
    long = p.start("generate", {"model": "m", "prompt": "Long", "max_tokens": 3000, "temperature": 0})
    while p.recv().get("method") != "generate/chunk":
        pass
    short = p.start("generate", {"model": "m", "prompt": "Short", "max_tokens": 10, "temperature": 0})
    order = []
    while len(order) < 2:
        msg = p.recv()
        if "id" in msg:
            order.append(msg["id"])
    assert order == [short, long]  # the short one joined and finished while the long one ran


def test_info_counts_generations(loaded):
    p = loaded
    ids = [p.start("generate", {"model": "m", "prompt": "x", "max_tokens": 100000}) for _ in range(3)]
    while p.recv().get("method") != "generate/chunk":
        pass
    flight = p.request("runtime/info")[0]["result"]["in_flight"]
    # Streams end at the 1024-token context, so some may be done; and a stream that has just ended
    # is still a request until its answer is queued: the engine's counts never exceed the requests.
    assert flight["generating"] >= 1
    assert flight["generating"] + flight["queued"] <= flight["requests"] - 1  # minus runtime/info itself
    for i in ids:
        p.notify("$/cancelRequest", {"id": i})
    out = collect(p, ids)
    assert all("result" in a or a["error"]["code"] == -32800 for a, _ in out.values())


def test_cancel_inside_a_batch_leaves_the_others_alone(loaded):
    p = loaded
    keep = [p.start("generate", {"model": "m", "prompt": f"keep {i}", "max_tokens": 300, "temperature": 0}) for i in range(3)]
    victim = p.start("generate", {"model": "m", "prompt": "victim", "max_tokens": 100000, "temperature": 0,
                                  "stream_options": {"chunk_tokens": 2}})
    early = []
    while len(early) < 3:
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == victim:
            early.append(msg["params"])
    p.notify("$/cancelRequest", {"id": victim})
    out = collect(p, keep + [victim])
    v, chunks = out[victim]
    chunks = early + chunks
    assert v["error"]["code"] == -32800
    assert v["error"]["data"]["usage"]["completion_tokens"] < 100000
    assert "".join(c["text"] for c in chunks) == v["error"]["data"]["text"]
    for i in keep:
        assert out[i][0]["result"]["usage"]["completion_tokens"] == 300


def test_seeded_request_is_the_same_alone_and_in_a_batch(loaded):
    p = loaded
    seeded = {"model": "m", "prompt": "The capital of", "max_tokens": 60, "temperature": 1.0, "seed": 1234}
    alone = p.request("generate", seeded)[0]["result"]["text"]
    others = [p.start("generate", {"model": "m", "prompt": f"noise {i} " * (i + 1), "max_tokens": 80, "temperature": 1.0})
              for i in range(5)]
    target = p.start("generate", seeded)
    out = collect(p, others + [target])
    assert out[target][0]["result"]["text"] == alone
    # And a different seed gives a different text, so the check above means something.
    other = p.request("generate", {**seeded, "seed": 4321})[0]["result"]["text"]
    assert other != alone


def test_overloaded_is_immediate(spawn, tiny_model):
    p = spawn(args=["--max-batch", "2", "--max-queue", "1"])
    p.request("model/load", {"model": tiny_model, "id": "m"})
    ids = [p.start("generate", {"model": "m", "prompt": "x", "max_tokens": 100000}) for _ in range(3)]
    answer, _ = p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 5})
    assert answer["error"]["code"] == -32003 and answer["error"]["data"]["type"] == "overloaded"
    assert answer["error"]["data"]["limit"] == 3
    for i in ids:
        p.notify("$/cancelRequest", {"id": i})
    collect(p, ids)
    # Capacity is back once they are answered.
    assert p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 5})[0]["result"]["usage"]["completion_tokens"] == 5


def test_models_are_served_fairly(spawn, tiny_model, eos_model):
    p = spawn()
    p.request("model/load", {"model": tiny_model, "id": "a"})
    p.request("model/load", {"model": eos_model, "id": "b"})
    a = p.start("generate", {"model": "a", "prompt": "x", "max_tokens": 100000, "stream_options": {"chunk_tokens": 1}})
    b = p.start("generate", {"model": "b", "prompt": "x", "max_tokens": 100000, "stream_options": {"chunk_tokens": 1},
                             "stop_token_ids": [], "logit_bias": {"2": -100}})
    counts = {a: 0, b: 0}
    while sum(counts.values()) < 400:
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            counts[msg["params"]["id"]] += len(msg["params"]["token_ids"])
    p.notify("$/cancelRequest", {"id": a})
    p.notify("$/cancelRequest", {"id": b})
    collect(p, [a, b])
    assert min(counts.values()) > 0.3 * max(counts.values()), counts


def test_prompt_cache_reuse(loaded):
    p = loaded
    prefix = "You are a helpful assistant. " * 40
    first = p.request("generate", {"model": "m", "prompt": prefix + "First question?", "max_tokens": 5, "temperature": 0})[0]["result"]
    assert first["usage"].get("cached_tokens", 0) == 0
    second = p.request("generate", {"model": "m", "prompt": prefix + "Second question?", "max_tokens": 5, "temperature": 0})[0]["result"]
    assert second["usage"]["cached_tokens"] > 0.8 * first["usage"]["prompt_tokens"]
    # Reusing a cache does not change the output.
    fresh = p.request("generate", {"model": "m", "prompt": prefix + "Second question?", "max_tokens": 5, "temperature": 0})[0]["result"]
    assert fresh["text"] == second["text"]


def test_prompt_cache_off(spawn, tiny_model):
    p = spawn(args=["--prompt-cache-bytes", "0"])
    p.request("model/load", {"model": tiny_model, "id": "m"})
    for _ in range(2):
        r = p.request("generate", {"model": "m", "prompt": "same prompt " * 20, "max_tokens": 3})[0]["result"]
        assert "cached_tokens" not in r["usage"]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_backpressure_pauses_generation_and_loses_nothing(spawn, tiny_model):
    from mlx_sidecar.testing.pipe import Pipe

    p = spawn()
    p.request("model/load", {"model": tiny_model, "id": "m"})
    p.pause_reading()
    gid = p.start("generate", {"model": "m", "prompt": "x", "max_tokens": 100000, "temperature": 0,
                               "stream_options": {"chunk_tokens": 1, "max_latency_ms": 0}})
    time.sleep(3)  # the pipe fills; the runtime must stop generating
    cpu0 = _cpu_seconds(p.proc.pid)
    time.sleep(2)
    busy = _cpu_seconds(p.proc.pid) - cpu0
    assert busy < 0.5, f"the runtime kept working ({busy:.2f} CPU s in 2 s) while nobody read its output"
    p.resume_reading()
    p.notify("$/cancelRequest", {"id": gid})
    answer, notes = p.wait(gid, timeout=60)
    chunks = chunks_of(notes, gid)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == answer["error"]["data"]["text"]
    assert sum(len(c["token_ids"]) for c in chunks) == answer["error"]["data"]["usage"]["completion_tokens"]


@pytest.mark.parametrize("params", [
    {"temperature": 1.0, "seed": 99},
    {"temperature": 0, "repetition_penalty": 1.3},
    {"temperature": 0.8, "seed": 5, "top_k": 20, "presence_penalty": 0.5},
])
def test_moving_a_running_request_into_a_batch_keeps_its_output(loaded, params):
    """A request running alone moves into the batch when others arrive, mid-stream, unchanged."""
    p = loaded
    base = {"model": "m", "prompt": "Once upon a time", "max_tokens": 200, **params,
            "stream_options": {"chunk_tokens": 1}}
    alone = p.request("generate", base)[0]["result"]["text"]
    gid = p.start("generate", base)
    seen = 0
    while seen < 20:  # let it run alone for a while
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == gid:
            seen += 1
    others = [p.start("generate", {"model": "m", "prompt": f"other {i}", "max_tokens": 50}) for i in range(3)]
    out = collect(p, [gid] + others)
    assert out[gid][0]["result"]["text"] == alone
    assert all(out[i][0]["result"]["usage"]["completion_tokens"] == 50 for i in others)


def test_requests_joining_one_by_one_keep_their_output(loaded):
    # Six prompts of different lengths join a running stream at different steps: on a CPU each join
    # adds a part to the decoding batch (fused.Parted; past four, neighbours merge), and rows leave
    # from the middle as they finish or are cancelled. Every answer is what the request gives alone.
    p = loaded
    first = {"model": "m", "prompt": "Begin", "max_tokens": 400, "temperature": 0, "stream_options": {"chunk_tokens": 1}}
    params = [{"model": "m", "prompt": " ".join(["w%d" % (j % 7) for j in range(3 + 25 * i)]), "max_tokens": 30 + 17 * i,
               "temperature": 0} for i in range(6)]
    alone = [p.request("generate", q)[0]["result"]["text"] for q in [first] + params]
    run = p.start("generate", first)
    ids, seen, doomed = [], 0, None
    while len(ids) < len(params):
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == run:
            seen += 1
            if seen % 6 == 0:
                ids.append(p.start("generate", params[len(ids)]))
                if len(ids) == 3:
                    doomed = p.start("generate", {**params[5], "max_tokens": 1000})
    p.notify("$/cancelRequest", {"id": doomed})
    out = collect(p, [run, doomed] + ids)
    assert out[doomed][0]["error"]["data"]["finish_reason"] == "cancelled"
    assert [out[i][0]["result"]["text"] for i in [run] + ids] == alone
