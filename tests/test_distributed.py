"""One model sharded over two real ranks on loopback (mlx.distributed's ring backend): the runtime
under test is rank 0 (a subprocess, --distributed-hostfile) and spawns rank 1 itself. Outputs are
compared with a one-process runtime; cancellation, a killed follower and an idle group's CPU."""

import json
import os
import signal
import time

import pytest

from conftest import collect
from mlx_sidecar.testing.sharded import free_port_pair

def _ring_available() -> bool:
    import mlx.core as mx

    return mx.distributed.is_available()


pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not os.path.exists("/proc/self/stat") or not _ring_available(),
                                 reason="needs Linux /proc and an mlx build with mlx.distributed")]

PROMPTS = ["Hello world", "The capital of France is", "MLX runs language models", "Numbers: 0 1 2"]


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory):
    path = tmp_path_factory.mktemp("group") / "hosts.json"
    path.write_text(json.dumps({"backend": "ring", "hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"]}] * 2}))
    return str(path)


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> str:
    from mlx_sidecar.testing.sharded import make_pipeline_model

    return str(make_pipeline_model(tmp_path_factory.mktemp("qwen2")))


def start_group(hostfile, model, sharding="auto", env=None):
    from mlx_sidecar.testing.pipe import Pipe

    p = Pipe(args=["--distributed-hostfile", hostfile, "--distributed-port", str(free_port_pair()),
                   "--distributed-sharding", sharding], env=env)
    answer, _ = p.request("model/load", {"model": model, "id": "m"}, timeout=90)
    assert "result" in answer, answer
    return p


def stop_group(p):
    follower = [r["pid"] for r in group_info(p)["ranks"][1:]] if p.proc.poll() is None else []
    p.close()
    for pid in follower:  # the follower leaves when rank 0's side channel closes
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "a follower outlived rank 0"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def group_info(p) -> dict:
    return p.request("runtime/info")[0]["result"]["group"]


@pytest.fixture(scope="module")
def tensor_group(hostfile, tmp_path_factory):
    from mlx_sidecar.testing import make_model

    model = str(make_model(tmp_path_factory.mktemp("llama"), preset="tiny"))
    p = start_group(hostfile, model)
    yield p, model
    stop_group(p)


def one_process_texts(serve, model, params_list):
    """The same requests, one at a time, on an ordinary runtime."""
    ref = serve()
    assert "result" in ref.request("model/load", {"model": model, "id": "m"})[0]
    return [ref.request("generate", {**q, "stream": False})[0]["result"]["text"] for q in params_list]


def test_tensor_parallel_batch_matches_one_process(tensor_group, serve):
    p, model = tensor_group
    info = group_info(p)
    assert info["size"] == 2 and info["backend"] == "ring" and info["state"] == "ok"
    assert info["sharding"] == {"m": "tensor"}
    assert [r["rank"] for r in info["ranks"]] == [0, 1] and info["ranks"][1]["pid"] > 0
    params = [{"model": "m", "prompt": q, "max_tokens": 24 + 4 * i, "temperature": 0, "stream_options": {"chunk_tokens": 5}}
              for i, q in enumerate(PROMPTS)]
    ids = [p.start("generate", q) for q in params]   # all at once: they decode as one batch over the group
    out = collect(p, ids)
    expected = one_process_texts(serve, model, params)
    for i, q, want in zip(ids, params, expected):
        answer, chunks = out[i]
        assert answer["result"]["usage"]["completion_tokens"] == q["max_tokens"]
        assert "".join(c["text"] for c in chunks) == answer["result"]["text"]
        assert answer["result"]["text"] == want


def test_sampling_is_decided_on_rank_0(tensor_group):
    # A seeded sampled request twice, the second beside others: rank 1 feeds rank 0's tokens, so
    # the group stays in step and the seed gives the same text.
    p, _ = tensor_group
    seeded = {"model": "m", "prompt": "The quick brown", "max_tokens": 30, "temperature": 1.0, "seed": 7, "stream": False}
    first = p.request("generate", seeded)[0]["result"]["text"]
    ids = [p.start("generate", seeded)] + [p.start("generate", {"model": "m", "prompt": q, "max_tokens": 20, "temperature": 0.9})
                                           for q in PROMPTS[:2]]
    out = collect(p, ids)
    assert out[ids[0]][0]["result"]["text"] == first


def test_cancel_in_a_group_leaves_it_in_step(tensor_group, serve):
    p, model = tensor_group
    victim = p.start("generate", {"model": "m", "prompt": "victim", "max_tokens": 100000, "temperature": 0,
                                  "stream_options": {"chunk_tokens": 2}})
    keep = p.start("generate", {"model": "m", "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0})
    while True:
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == victim:
            break
    p.notify("$/cancelRequest", {"id": victim})
    out = collect(p, [victim, keep])
    assert out[victim][0]["error"]["code"] == -32800
    assert out[keep][0]["result"]["usage"]["completion_tokens"] == 40
    # keep joined while victim ran alone: victim moved into a batch mid-stream on both ranks.
    assert out[keep][0]["result"]["text"] == one_process_texts(serve, model, [{"model": "m", "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0}])[0]
    # Still in step after the cancel: a fresh greedy request matches one process.
    q = {"model": "m", "prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0}
    assert p.request("generate", {**q, "stream": False})[0]["result"]["text"] == one_process_texts(serve, model, [q])[0]


def test_rank_0_features_match_one_process(tensor_group, serve):
    # Stop strings, response_format masks, logprobs and penalties run on rank 0 only; the ranks stay
    # in step because rank 1 feeds rank 0's tokens. Requests go together, so they share a batch.
    p, model = tensor_group
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer"}},
              "required": ["color", "n"], "additionalProperties": False}
    base = {"model": "m", "max_tokens": 40, "temperature": 0, "stream": False}
    alone = p.request("generate", {**base, "prompt": PROMPTS[0]})[0]["result"]["text"]
    params = [
        {**base, "prompt": PROMPTS[0], "stop": [alone[6:10]]},
        {**base, "prompt": "Answer in JSON.", "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}},
        {**base, "prompt": PROMPTS[1], "logprobs": True, "top_logprobs": 2, "repetition_penalty": 1.3, "logit_bias": {"196": -100}},
    ]
    ids = [p.start("generate", q) for q in params]
    out = collect(p, ids)
    ref = serve()
    assert "result" in ref.request("model/load", {"model": model, "id": "m"})[0]
    wants = [ref.request("generate", q)[0]["result"] for q in params]
    for i, want in zip(ids, wants):
        got = out[i][0]["result"]
        assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
    assert out[ids[0]][0]["result"]["finish_reason"] == "stop" and len(out[ids[0]][0]["result"]["text"]) < len(alone)
    assert json.loads(out[ids[1]][0]["result"]["text"])["color"] in ("red", "green", "blue")
    got_lp = out[ids[2]][0]["result"]["logprobs"]["content"]
    want_lp = wants[2]["logprobs"]["content"]
    assert [t["token"] for t in got_lp] == [t["token"] for t in want_lp]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-3 for a, b in zip(got_lp, want_lp))
    # The same prompt again is served from the prompt cache on every rank.
    again = p.request("generate", {**base, "prompt": PROMPTS[0]})[0]["result"]
    assert again["text"] == alone and again["usage"].get("cached_tokens", 0) > 0


def test_unload_and_reload_in_a_group(tensor_group, serve):
    p, model = tensor_group
    assert "result" in p.request("model/unload", {"model": "m"})[0]
    assert group_info(p)["sharding"] == {}
    assert p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 2})[0]["error"]["code"] == -32000
    assert "result" in p.request("model/load", {"model": model, "id": "m"}, timeout=90)[0]
    q = {"model": "m", "prompt": PROMPTS[3], "max_tokens": 25, "temperature": 0}
    assert p.request("generate", {**q, "stream": False})[0]["result"]["text"] == one_process_texts(serve, model, [q])[0]


def test_what_a_group_cannot_do_is_refused(tensor_group):
    p, model = tensor_group
    a = p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 4, "speculative": {"type": "prompt_lookup"}})[0]
    assert a["error"]["code"] == -32602 and a["error"]["data"]["path"] == "/speculative"
    a = p.request("score", {"model": "m", "prompt": "x", "completion": "y"})[0]
    assert a["error"]["code"] == -32602 and "distributed group" in a["error"]["message"]
    a = p.request("model/load", {"model": model, "id": "d", "draft_model": model})[0]
    assert a["error"]["code"] == -32602 and a["error"]["data"]["path"] == "/draft_model"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_group_costs_no_cpu(tensor_group):
    p, _ = tensor_group
    assert p.request("generate", {"model": "m", "prompt": "warm", "max_tokens": 8, "stream": False})[0]["result"]
    time.sleep(0.3)  # let the last step's work and memory report finish
    pids = [r["pid"] for r in group_info(p)["ranks"]]
    before = [_cpu_seconds(pid) for pid in pids]
    time.sleep(1.0)
    used = [_cpu_seconds(pid) - b for pid, b in zip(pids, before)]
    # A rank busy-polling inside a collective would use ~1 s here; sleeping ones use ~0.
    assert all(u < 0.3 for u in used), used


def test_pipeline_parallel_matches_one_process(hostfile, qwen_model, serve):
    p = start_group(hostfile, qwen_model, sharding="pipeline")
    try:
        assert group_info(p)["sharding"] == {"m": "pipeline"}
        params = [{"model": "m", "prompt": q, "max_tokens": 20, "temperature": 0} for q in PROMPTS[:3]]
        ids = [p.start("generate", q) for q in params]
        out = collect(p, ids)
        expected = one_process_texts(serve, qwen_model, params)
        assert [out[i][0]["result"]["text"] for i in ids] == expected  # sent together: one batch over both stages
        # A cancel mid-stream leaves both stages in step: the next greedy request still matches.
        victim = p.start("generate", {"model": "m", "prompt": "victim", "max_tokens": 100000, "temperature": 0,
                                      "stream_options": {"chunk_tokens": 2}})
        while True:
            msg = p.recv()
            if msg.get("method") == "generate/chunk" and msg["params"]["id"] == victim:
                break
        p.notify("$/cancelRequest", {"id": victim})
        assert collect(p, [victim])[victim][0]["error"]["code"] == -32800
        assert p.request("generate", {**params[0], "stream": False})[0]["result"]["text"] == expected[0]
    finally:
        stop_group(p)


def test_a_killed_follower_fails_requests_clearly(hostfile, tiny_model):
    p = start_group(hostfile, tiny_model)
    try:
        follower = group_info(p)["ranks"][1]["pid"]
        running = p.start("generate", {"model": "m", "prompt": "long", "max_tokens": 100000, "temperature": 0,
                                       "stream_options": {"chunk_tokens": 1}})
        while p.recv().get("method") != "generate/chunk":
            pass
        os.kill(follower, signal.SIGKILL)
        answer, _ = p.wait(running, timeout=30)   # no hang: the ring reports the lost peer
        err = answer["error"]
        assert err["code"] == -32004 and "group is broken" in err["message"]
        assert err["data"]["finish_reason"] == "error" and err["data"]["usage"]["completion_tokens"] >= 1
        info = group_info(p)
        assert info["state"] == "broken" and "rank 1" in info["error"]
        later = p.request("generate", {"model": "m", "prompt": "again", "max_tokens": 4}, timeout=30)[0]
        assert later["error"]["code"] == -32004 and later["error"]["data"]["group_broken"] is True
        assert p.request("model/load", {"model": tiny_model, "id": "n"}, timeout=30)[0]["error"]["code"] == -32001
        assert p.request("tokenize", {"model": "m", "text": "x"}, timeout=30)[0]["error"]["data"]["group_broken"] is True
        assert "result" in p.request("runtime/ping")[0]
    finally:
        p.close()


def test_a_stuck_follower_fails_requests_instead_of_hanging(hostfile, tiny_model):
    # A stopped follower keeps its sockets open: rank 0 waits inside a collective until the missing
    # heartbeat (3 s here) breaks the group and the watchdog answers the stream.
    p = start_group(hostfile, tiny_model, env={"MLX_SIDECAR_GROUP_TIMEOUT": "3"})
    follower = group_info(p)["ranks"][1]["pid"]
    try:
        running = p.start("generate", {"model": "m", "prompt": "long", "max_tokens": 100000, "temperature": 0,
                                       "stream_options": {"chunk_tokens": 1}})
        while p.recv().get("method") != "generate/chunk":
            pass
        os.kill(follower, signal.SIGSTOP)  # right after token 0, when mlx-lm would clear MLX's cache
        answer, _ = p.wait(running, timeout=40)
        assert answer["error"]["code"] == -32004 and "stopped answering" in answer["error"]["message"]
        info = group_info(p)
        assert info["state"] == "broken" and "rank 1" in info["error"]
        assert p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 2})[0]["error"]["code"] == -32004
    finally:
        os.kill(follower, signal.SIGKILL)
        p.proc.kill()
        p.proc.wait()
