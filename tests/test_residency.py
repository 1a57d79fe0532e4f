"""Models that come and go: loads off the engine thread, --idle-unload with reload on demand, and
--max-models (least recently used first, never a model with requests in flight). Real runtimes,
tiny models; assertions on states and order, never on timings."""

import time

import pytest

from mlx_sidecar.testing import make_model

STREAM = {"chunk_tokens": 1, "max_latency_ms": 0}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    """~24M parameters: its load takes long enough for a tiny model's stream to decode beside it."""
    return str(make_model(tmp_path_factory.mktemp("small"), preset="small"))


def states(p) -> dict:
    return {m["id"]: m.get("state") for m in p.request("model/list")[0]["result"]["models"]}


def wait_for_state(p, model_id, state, limit=30.0):
    deadline = time.monotonic() + limit
    while states(p).get(model_id) != state:
        assert time.monotonic() < deadline, f"{model_id} never became {state}: {states(p)}"
        time.sleep(0.05)


def greedy(p, model_id, n=8):
    answer, notes = p.request("generate", {"model": model_id, "prompt": "Once upon a time", "max_tokens": n, "temperature": 0})
    assert "result" in answer, answer
    return answer, notes


def test_idle_unload_then_reload_on_demand(spawn, tiny_model):
    p = spawn(args=["--idle-unload", "0.3"])
    info = p.request("model/load", {"model": tiny_model, "id": "m"})[0]["result"]
    assert info["state"] == "loaded"
    before, _ = greedy(p, "m")
    wait_for_state(p, "m", "unloaded")
    listed = next(m for m in p.request("model/list")[0]["result"]["models"] if m["id"] == "m")
    assert listed["path"] == info["path"] and listed["parameters"] == info["parameters"]
    assert p.request("runtime/info")[0]["result"]["models"] == []  # its memory is given back
    # Named again by the id it was loaded with: reloaded, with $/progress under this request's id.
    after, notes = greedy(p, "m")
    assert after["result"]["text"] == before["result"]["text"]
    kinds = [n["params"]["value"]["kind"] for n in notes if n.get("method") == "$/progress" and n["params"]["token"] == after["id"]]
    assert kinds[0] == "begin" and kinds[-1] == "end"
    assert states(p)["m"] == "loaded"
    # tokenize reloads too; an explicit model/unload forgets the model for good.
    wait_for_state(p, "m", "unloaded")
    assert p.request("tokenize", {"model": "m", "text": "hi"})[0]["result"]["tokens"]
    wait_for_state(p, "m", "unloaded")
    assert p.request("model/unload", {"model": "m"})[0]["result"] == {"id": "m"}
    assert "m" not in states(p)
    assert p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 1})[0]["error"]["code"] == -32000


def test_idle_unload_gives_the_memory_back(spawn, small_model):
    p = spawn(args=["--idle-unload", "0.3"])
    info = p.request("model/load", {"model": small_model, "id": "s"})[0]["result"]
    loaded = p.request("runtime/info")[0]["result"]["memory"]["active_bytes"]
    assert loaded >= info["memory_bytes"]
    wait_for_state(p, "s", "unloaded")
    unloaded = p.request("runtime/info")[0]["result"]["memory"]["active_bytes"]
    assert loaded - unloaded >= info["memory_bytes"] * 0.9, (loaded, unloaded, info["memory_bytes"])


def test_a_failed_reload_fails_the_request_that_needed_it(spawn, tmp_path):
    import shutil

    model = make_model(tmp_path / "gone", preset="tiny")
    p = spawn(args=["--idle-unload", "0.2"])
    p.request("model/load", {"model": str(model), "id": "g"})
    wait_for_state(p, "g", "unloaded")
    shutil.rmtree(model)
    answer, _ = p.request("generate", {"model": "g", "prompt": "x", "max_tokens": 1})
    assert answer["error"]["code"] == -32001 and answer["error"]["data"]["type"] == "model_path_not_found"
    assert p.request("runtime/ping")[0]["result"] == {}


def test_max_models_unloads_the_least_recently_used_idle_model(spawn, tiny_model):
    p = spawn(args=["--max-models", "2"])
    for model_id in ("a", "b"):
        p.request("model/load", {"model": tiny_model, "id": model_id})
    # a streams (its last use is when that request started); b is used after it, so a is the least
    # recently used, but it is busy: loading c must unload b instead.
    run = p.start("generate", {"model": "a", "prompt": "Tell me", "max_tokens": 100000, "stream_options": STREAM})
    while True:
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == run:
            break
    assert p.request("tokenize", {"model": "b", "text": "hi"})[0]["result"]["tokens"]
    answer, notes = p.request("model/load", {"model": tiny_model, "id": "c"})
    assert answer["result"]["state"] == "loaded"
    assert states(p) == {"a": "loaded", "c": "loaded", "b": "unloaded"}
    # a kept streaming through all of it.
    seen = sum(1 for n in notes if n.get("method") == "generate/chunk" and n["params"]["id"] == run)
    while seen < 3:
        msg = p.recv()
        assert msg.get("id") != run, msg  # not ended (a model_unloaded error would end it)
        seen += msg.get("method") == "generate/chunk" and msg["params"]["id"] == run
    p.notify("$/cancelRequest", {"id": run})
    assert p.wait(run)[0]["error"]["code"] == -32800  # cancelled, not model_unloaded
    # b comes back on demand; c (loaded before a's request ended) is now the least recently used.
    greedy(p, "b", 2)
    assert states(p) == {"a": "loaded", "b": "loaded", "c": "unloaded"}


def test_a_stream_keeps_decoding_while_another_model_loads(spawn, tiny_model, small_model):
    p = spawn()
    p.request("model/load", {"model": tiny_model, "id": "t"})
    run = p.start("generate", {"model": "t", "prompt": "Tell me", "max_tokens": 100000, "stream_options": STREAM})
    while True:
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == run:
            break
    # Pipelined: the load, then work on the model it loads, with no wait in between.
    load = p.start("model/load", {"model": small_model, "id": "s"})
    gen = p.start("generate", {"model": "s", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    tok = p.start("tokenize", {"model": "s", "text": "Hi"})
    during, order = 0, []
    while len(order) < 3:
        msg = p.recv(120)
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == run and not order:
            during += len(msg["params"]["token_ids"])
        elif msg.get("id") in (load, gen, tok):
            assert "result" in msg, msg
            order.append(msg["id"])
    assert order[0] == load and set(order) == {load, gen, tok}
    # The tiny model decodes ~100x faster than the small one loads; with the load on the engine
    # thread no token at all would be made while it ran (only ones already written could arrive).
    assert during >= 10, during
    p.notify("$/cancelRequest", {"id": run})
    p.wait(run)


def test_a_load_cancelled_while_queued_never_happens(spawn, tiny_model, small_model):
    p = spawn()
    first = p.start("model/load", {"model": small_model, "id": "s"})
    second = p.start("model/load", {"model": tiny_model, "id": "t"})
    p.notify("$/cancelRequest", {"id": second})
    answers = {}
    while len(answers) < 2:
        msg = p.recv(120)
        if msg.get("id") in (first, second):
            answers[msg["id"]] = msg
    assert "result" in answers[first]
    # Cancelled before the loader reached it (the first load is still reading), or loaded already.
    if "error" in answers[second]:
        assert answers[second]["error"]["code"] == -32800
        assert set(states(p)) == {"s"}
    else:
        assert set(states(p)) == {"s", "t"}
