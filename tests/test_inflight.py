"""The one in-flight state: admissions, limits, duplicate ids and the shutdown drain, under threads
and over the real (in-process) pipe."""

import threading

import pytest

from mlx_sidecar.dispatcher import Request
from mlx_sidecar.errors import RpcError
from mlx_sidecar.inflight import InFlight

_MISSING = object()


def make(inflight, id, answers):
    return Request(inflight, id, "x", {}, lambda msg, buf: answers.append(msg), 0.0)


def test_duplicate_id_refused_until_answered():
    f = InFlight(1, 1)
    answers = []
    a = make(f, 1, answers)
    f.admit(a)
    with pytest.raises(RpcError) as e:
        f.admit(make(f, 1, answers))
    assert e.value.data["type"] == "duplicate_id"
    a.respond({})
    f.admit(make(f, 1, answers))  # free again once answered


def test_generation_limit_and_release_under_threads():
    f = InFlight(max_batch=4, max_queue=4)
    admitted, refused = [], []
    lock = threading.Lock()

    def worker():
        for _ in range(50):
            try:
                release = f.admit_generation("m")
            except RpcError as e:
                assert e.data["type"] == "overloaded"
                with lock:
                    refused.append(1)
                continue
            with lock:
                admitted.append(release)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 8 and len(refused) == 400 - 8
    for release in admitted:
        release()
    assert [f.admit_generation("m") for _ in range(8)]  # all slots are free again


def test_shutdown_answered_once_after_the_last_request():
    f = InFlight(1, 1)
    answers = []
    reqs = [make(f, i, answers) for i in range(20)]
    for r in reqs:
        f.admit(r)
    shutdown = make(f, "s", answers)
    f.admit(shutdown)
    drained = []
    f.on_drained = lambda: drained.append(1)
    f.begin_shutdown(shutdown)
    assert f.shutting_down and f.draining()
    threads = [threading.Thread(target=r.respond, args=({},)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a["id"] for a in answers].count("s") == 1
    assert answers[-1]["id"] == "s"  # after every other answer
    assert drained == [1] and not f.draining() and len(f) == 0


def test_shutdown_over_the_pipe_waits_for_generations(loaded):
    p = loaded
    ids = [p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 40, "stream": False}) for _ in range(6)]
    sid = p.start("shutdown")
    order = []
    while len(order) < 7:
        msg = p.recv()
        if "id" in msg:
            order.append(msg["id"])
    assert order[-1] == sid and sorted(order[:-1]) == sorted(ids)
    refused, _ = p.request("runtime/ping")
    assert refused["error"]["data"]["type"] == "shutting_down"
    p.notify("exit")
    assert p.proc.wait(10) == 0
