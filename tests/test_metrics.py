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


def _metrics_notes(msgs):
    return [m["params"] for m in msgs if isinstance(m, dict) and m.get("method") == "$/metrics"]


def test_periodic_metrics_match_what_was_sent(loaded):
    """initialize's metrics_interval_ms starts $/metrics; each one is runtime/metrics' body (the Pipe
    checks every notification against protocol/), and they follow what the test sent."""
    p = loaded
    assert "result" in p.request("initialize", {"metrics_interval_ms": 50})[0]
    answer, seen = p.request("generate", {"model": "m", "prompt": "Hi", "max_tokens": 5})
    prompt_tokens = answer["result"]["usage"]["prompt_tokens"]
    # Read on until a snapshot taken after the generate was answered.
    while not any(m["requests"].get("generate") for m in _metrics_notes(seen)):
        seen.append(p.recv())
    notes = _metrics_notes(seen)
    last = notes[-1]
    assert last["requests"] == {"model/load": {"ok": 1}, "initialize": {"ok": 1}, "generate": {"ok": 1}}
    assert last["tokens"] == {"prompt": prompt_tokens, "cached": 0, "completion": 5}
    assert last["latency_ms"]["ttft"]["count"] == 1 and last["latency_ms"]["inter_token"]["count"] == 4
    assert last["gauges"]["requests_in_flight"] == 0 and last["gauges"]["generating"] == 0
    uptimes = [m["uptime_ms"] for m in notes]
    assert uptimes == sorted(uptimes)


def test_periodic_metrics_stop_at_shutdown(loaded):
    p = loaded
    p.request("initialize", {"metrics_interval_ms": 50})
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 1000})
    while True:  # a snapshot that sees the stream running
        msg = p.recv()
        if msg.get("method") == "$/metrics" and msg["params"]["gauges"]["generating"] == 1:
            break
    sid = p.start("shutdown")
    answer, notes = p.wait(sid)
    assert answer["result"] == {}
    gen = [n for n in notes if n.get("id") == gid]
    assert gen and gen[0]["result"]["usage"]["completion_tokens"] == 1000
    # Once shutdown has arrived it is in flight beside the stream (2): no snapshot may show that.
    assert not [m for m in _metrics_notes(notes) if m["gauges"]["requests_in_flight"] > 1]
    p.notify("exit")
    assert p.proc.wait(5) == 0
    rest = []
    while True:
        try:
            rest.append(p.recv(5))
        except EOFError:
            break
    assert _metrics_notes(rest) == []


def test_metrics_interval_is_checked(serve):
    p = serve()
    for bad, message in ((10, "at least 50"), (-1, None), (1.5, None), ("1000", None)):
        answer, _ = p.request("initialize", {"metrics_interval_ms": bad})
        err = answer["error"]
        assert err["code"] == -32602 and err["data"]["path"] == "/metrics_interval_ms", answer
        assert message is None or message in err["message"]
    assert "result" in p.request("initialize", {"metrics_interval_ms": 0})[0]


def test_ticker_sends_until_stopped():
    import threading

    from mlx_sidecar.metrics import Ticker

    sent, got_two = [], threading.Event()

    def send(msg):
        sent.append(msg)
        if len(sent) >= 2:
            got_two.set()

    ticker = Ticker(lambda: {"n": len(sent)}, send)
    ticker.set_interval(Ticker.MIN_INTERVAL_MS)
    assert got_two.wait(30)
    ticker.stop()
    count = len(sent)
    ticker._thread.join(5)
    assert not ticker._thread.is_alive() and len(sent) == count
    assert sent[0] == {"jsonrpc": "2.0", "method": "$/metrics", "params": {"n": 0}}
    ticker.set_interval(100)  # after stop: stays stopped
    assert ticker._thread is not None and not ticker._thread.is_alive()
