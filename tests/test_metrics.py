"""runtime/metrics counts what the runtime answered (issue 12's counters, gauges and latencies)."""


def test_counts_match_what_was_sent(loaded):
    p = loaded
    for _ in range(3):
        answer, _ = p.request("generate", {"model": "m", "prompt": "Hi", "max_tokens": 5})
        assert answer["result"]["usage"]["completion_tokens"] == 5
    p.request("generate", {"model": "m", "prompt": "Hi", "max_tokens": 5, "temperature": -1})    # invalid params
    p.request("generate", {"model": "nope", "prompt": "Hi"})                                     # model not found
    p.request("no/such")                                                                          # method not found
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000})
    while p.recv().get("method") != "generate/chunk":
        pass
    p.notify("$/cancelRequest", {"id": gid})
    answer, _ = p.wait(gid)
    assert answer["error"]["data"]["type"] == "cancelled"
    cancelled_tokens = answer["error"]["data"]["usage"]["completion_tokens"]
    prompt_tokens = answer["error"]["data"]["usage"]["prompt_tokens"]

    m, _ = p.request("runtime/metrics")
    m = m["result"]
    gen = m["requests"]["generate"]
    assert gen == {"ok": 3, "invalid_params": 1, "model_not_found": 1, "cancelled": 1}
    assert m["requests"]["no/such"] == {"method_not_found": 1}
    assert m["requests"]["model/load"] == {"ok": 1}
    assert m["errors"] == {"-32602": 1, "-32000": 1, "-32601": 1, "-32800": 1}
    assert m["cancellations"] == 1 and m["overloads"] == 0
    assert m["tokens"]["completion"] == 15 + cancelled_tokens
    assert m["tokens"]["prompt"] == 4 * prompt_tokens
    lat = m["latency_ms"]
    assert lat["ttft"]["count"] == 4 and lat["queue_wait"]["count"] == 4
    assert lat["inter_token"]["count"] == 3 * 4 + cancelled_tokens - 1  # gaps between tokens
    assert 0 <= lat["ttft"]["p50"] <= lat["ttft"]["p95"] <= lat["ttft"]["p99"] <= lat["ttft"]["max"]
    g = m["gauges"]
    assert g["requests_in_flight"] == 1 and g["generating"] == 0 and g["streams"] == {}


def test_gauges_see_running_streams(loaded):
    p = loaded
    ids = [p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000}) for _ in range(3)]
    seen = set()
    while len(seen) < 3:
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            seen.add(msg["params"]["id"])
    m = p.request("runtime/metrics")[0]["result"]
    assert m["gauges"]["streams"]["m"]["running"] + m["gauges"]["streams"]["m"]["waiting"] == 3
    assert m["gauges"]["requests_in_flight"] == 4
    for i in ids:
        p.notify("$/cancelRequest", {"id": i})
    for i in ids:
        p.wait(i)
