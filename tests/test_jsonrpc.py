"""JSON-RPC 2.0 semantics over the real pipe: ids, batches, notifications, standard errors."""

import pytest


def err(answer):
    return answer["error"]["code"], answer["error"]["data"]["type"]


def test_string_and_number_ids(serve):
    p = serve()
    assert p.request("runtime/ping", id="x-1")[0] == {"jsonrpc": "2.0", "id": "x-1", "result": {}}
    assert p.request("runtime/ping", id=0)[0] == {"jsonrpc": "2.0", "id": 0, "result": {}}


@pytest.mark.parametrize("message, code", [
    ({"jsonrpc": "2.0", "id": 1.5, "method": "runtime/ping"}, -32600),
    ({"jsonrpc": "2.0", "id": None, "method": "runtime/ping"}, -32600),
    ({"jsonrpc": "2.0", "id": True, "method": "runtime/ping"}, -32600),
    ({"jsonrpc": "2.0", "id": [1], "method": "runtime/ping"}, -32600),
    ({"id": 1, "method": "runtime/ping"}, -32600),
    ({"jsonrpc": "2.0", "id": 1, "method": 5}, -32600),
    ({"jsonrpc": "2.0", "id": 1, "method": "runtime/ping", "params": "x"}, -32600),
    ({"jsonrpc": "2.0", "id": 1, "method": "runtime/ping", "params": [1]}, -32602),
    ({"jsonrpc": "2.0", "id": 1, "method": "runtime/ping", "params": {"x": 1}}, -32602),
])
def test_invalid_requests(serve, message, code):
    p = serve()
    p.send(message)
    answer = p.recv()
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]
    p.send({"jsonrpc": "2.0", "id": 99, "method": "runtime/ping"})
    assert p.recv()["id"] == 99  # still serving


def test_invalid_params_name_the_field(serve):
    p = serve()
    cases = {
        "/model": {"prompt": "x"},
        "/temperature": {"model": "m", "prompt": "x", "temperature": -1},
        "/top_p": {"model": "m", "prompt": "x", "top_p": 0},
        "/stop": {"model": "m", "prompt": "x", "stop": 5},
        "/messages/0/role": {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        "/stream_options/max_latency_ms": {"model": "m", "prompt": "x", "stream_options": {"max_latency_ms": -1}},
        "/messages": {"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
    }
    for path, params in cases.items():
        answer, _ = p.request("generate", params)
        assert err(answer) == (-32602, "invalid_params"), answer
        assert answer["error"]["data"]["path"] == path, (path, answer)


def test_unknown_method(serve):
    p = serve()
    answer, _ = p.request("model/explode")
    assert err(answer) == (-32601, "method_not_found")
    assert answer["error"]["data"]["method"] == "model/explode"


def test_notifications_are_never_answered(serve):
    p = serve()
    p.notify("runtime/ping")
    p.notify("no/such/method")
    p.notify("$/setTrace", {"value": "off"})
    p.notify("$/cancelRequest", {"id": 404})
    p.send({"jsonrpc": "2.0", "method": "runtime/ping", "params": [1]})  # malformed notification
    answer, notes = p.request("runtime/ping", id=7)
    assert answer["id"] == 7 and notes == []


def test_batch(serve):
    p = serve()
    p.send([
        {"jsonrpc": "2.0", "id": 1, "method": "runtime/ping"},
        {"jsonrpc": "2.0", "method": "runtime/ping"},
        {"jsonrpc": "2.0", "id": 2, "method": "nope"},
        "garbage",
        {"jsonrpc": "2.0", "id": 3, "method": "generate", "params": {}},
    ])
    answer = p.recv()
    assert isinstance(answer, list) and len(answer) == 4
    by_id = {a["id"]: a for a in answer if a["id"] is not None}
    assert by_id[1]["result"] == {}
    assert by_id[2]["error"]["code"] == -32601
    assert by_id[3]["error"]["code"] == -32602
    assert [a["error"]["code"] for a in answer if a["id"] is None] == [-32600]


def test_empty_batch_and_all_notification_batch(serve):
    p = serve()
    p.send([])
    assert p.recv()["error"]["code"] == -32600
    p.send([{"jsonrpc": "2.0", "method": "runtime/ping"}])
    answer, notes = p.request("runtime/ping", id=5)
    assert answer["id"] == 5 and notes == []  # the all-notification batch got no answer


def test_batch_with_generation_waits_for_it(loaded):
    p = loaded
    p.send([
        {"jsonrpc": "2.0", "id": "g", "method": "generate", "params": {"model": "m", "prompt": "Hi", "max_tokens": 30}},
        {"jsonrpc": "2.0", "id": "p", "method": "runtime/ping"},
    ])
    notes = []
    while True:
        msg = p.recv()
        if isinstance(msg, list):
            break
        notes.append(msg)
    ids = sorted(a["id"] for a in msg)
    assert ids == ["g", "p"]
    gen = next(a for a in msg if a["id"] == "g")
    chunks = [n["params"] for n in notes if n["method"] == "generate/chunk"]
    assert "".join(c["text"] for c in chunks) == gen["result"]["text"]


def test_duplicate_id_in_flight(loaded):
    p = loaded
    p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000}, id="dup")
    p.start("runtime/ping", id="dup")
    seen = []
    while True:
        msg = p.recv()
        if msg.get("id") == "dup" and "error" in msg and msg["error"]["data"]["type"] == "duplicate_id":
            break
        seen.append(msg)
    p.notify("$/cancelRequest", {"id": "dup"})
    answer, _ = p.wait("dup")
    assert answer["error"]["code"] == -32800


def test_query_methods_sent_as_notifications_are_ignored(loaded):
    p = loaded
    p.notify("generate", {"model": "m", "prompt": "x", "max_tokens": 100000})
    info, _ = p.request("runtime/info")
    assert info["result"]["in_flight"]["generating"] == 0 and info["result"]["in_flight"]["queued"] == 0
    # model/unload as a notification still has its effect.
    p.notify("model/unload", {"model": "m"})
    assert p.request("generate", {"model": "m", "prompt": "x"})[0]["error"]["code"] == -32000
