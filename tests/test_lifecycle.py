"""Start, stop, shutdown/exit, EOF, SIGTERM, and stdout carrying frames only."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import chunks_of


def test_initialize_is_optional_and_fast_path_imports_stay_light():
    # What keeps initialize under 0.5 s: the start-up path never imports mlx-lm, transformers or outlines,
    # and leaves the handlers' own modules (and jsonschema, numpy) for after the first answer (server.py).
    code = ("import sys, mlx_sidecar.cli, mlx_sidecar.server, mlx_sidecar.dispatcher, mlx_sidecar.framing.ndjson, "
            "mlx_sidecar.framing.lsp, mlx_sidecar.framing.msgpack; "
            "heavy = [m for m in ('mlx_lm', 'mlx_vlm', 'transformers', 'outlines', 'mlx.core', "
            "'mlx_sidecar.methods.generate', 'mlx_sidecar.methods.model', 'mlx_sidecar.generation', "
            "'mlx_sidecar.runners', 'mlx_sidecar.models', 'mlx_sidecar.distributed', 'jsonschema', 'numpy') "
            "if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_initialize_answers(spawn):
    p = spawn()
    answer, _ = p.request("initialize", {"protocol_version": "1.0", "client_info": {"name": "t", "version": "1"}})
    caps = answer["result"]["capabilities"]
    assert set(caps["methods"]) >= {"generate", "model/load", "runtime/ping", "tokenize", "detokenize", "shutdown"}
    assert caps["device"]["type"] in ("cpu", "gpu")
    assert caps["versions"]["mlx"] and caps["versions"]["mlx_lm"]


def test_runtime_info(loaded_process):
    loaded = loaded_process
    info = loaded.request("runtime/info")[0]["result"]
    assert info["pid"] == loaded.proc.pid
    assert [m["id"] for m in info["models"]] == ["m"]
    assert info["memory"]["rss_bytes"] > 0 and info["memory"]["active_bytes"] > 0
    assert info["in_flight"]["requests"] == 1  # this very request


def test_eof_cancels_in_flight_and_exits_zero_quickly(loaded):
    p = loaded
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000, "stream_options": {"chunk_tokens": 4}})
    while p.recv().get("method") != "generate/chunk":
        pass
    t = time.monotonic()
    p.close_stdin()
    assert p.proc.wait(5) == 0
    assert time.monotonic() - t < 1.0
    answer, _ = p.wait(gid, timeout=5)
    assert answer["error"]["code"] == -32800
    assert answer["error"]["data"]["finish_reason"] == "cancelled"


def test_sigterm_cancels_and_exits_zero(loaded_process):
    loaded = loaded_process
    p = loaded
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000})
    while p.recv().get("method") != "generate/chunk":
        pass
    t = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(5) == 0
    assert time.monotonic() - t < 1.0
    assert p.wait(gid, timeout=5)[0]["error"]["code"] == -32800


def test_shutdown_drains_then_exit_zero(loaded):
    p = loaded
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 200})
    sid = p.start("shutdown")
    answer, notes = p.wait(sid)
    assert answer["result"] == {}
    # The generation was answered before shutdown's answer, and completely.
    gen = [n for n in notes if n.get("id") == gid]
    assert gen and gen[0]["result"]["usage"]["completion_tokens"] == 200
    later, _ = p.request("runtime/ping")
    assert later["error"]["code"] == -32600 and later["error"]["data"]["type"] == "shutting_down"
    p.notify("exit")
    assert p.proc.wait(5) == 0


def test_exit_without_shutdown_is_code_one(spawn):
    p = spawn()
    p.request("runtime/ping")
    p.notify("exit")
    assert p.proc.wait(5) == 1


def test_shutdown_then_eof_finishes_work(loaded):
    """A script can pipe requests, then shutdown, then close stdin: the work still completes."""
    p = loaded
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 300})
    sid = p.start("shutdown")
    p.close_stdin()
    answer, notes = p.wait(gid, timeout=30)
    assert answer["result"]["usage"]["completion_tokens"] == 300
    assert p.wait(sid)[0]["result"] == {}
    assert p.proc.wait(5) == 0


@pytest.mark.parametrize("framing", ["ndjson", "lsp", "msgpack"])
def test_stdout_holds_only_frames_at_debug_level(spawn, tiny_model, framing):
    p = spawn(framing, args=["--log-level", "debug"])
    p.request("initialize")
    p.request("model/load", {"model": tiny_model, "id": "m"})
    p.request("generate", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50})
    p.request("model/load", {"model": "/nope"})
    p.request("runtime/info")
    p.close()
    raw = bytes(p.raw_stdout)
    assert raw
    # Every byte of stdout decodes as frames, nothing else.
    if framing == "ndjson":
        for line in raw.split(b"\n")[:-1]:
            json.loads(line)
        assert raw.endswith(b"\n")
    elif framing == "lsp":
        rest = raw
        while rest:
            head, _, rest = rest.partition(b"\r\n\r\n")
            assert head.startswith(b"Content-Length: ")
            n = int(head.split(b": ")[1])
            json.loads(rest[:n])
            rest = rest[n:]
    else:
        import msgpack

        u = msgpack.Unpacker(raw=False)
        u.feed(raw)
        assert all(isinstance(m, (dict, list)) for m in u)
    assert b"DEBUG" in bytes(p.stderr) or b"INFO" in bytes(p.stderr)


def test_control_requests_answer_while_generating(loaded):
    p = loaded
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 3000, "stream_options": {"chunk_tokens": 64}})
    while p.recv().get("method") != "generate/chunk":
        pass
    pid = p.start("runtime/ping")
    iid = p.start("runtime/info")
    tid = p.start("tokenize", {"model": "m", "text": "Hello"})
    order = []
    while len(order) < 4:
        msg = p.recv()
        if "id" in msg:
            order.append(msg["id"])
    assert order[-1] == gid, order  # ping, info and tokenize all overtook the generation


def test_cancel_mid_stream(loaded):
    p = loaded
    gid = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000, "stream_options": {"chunk_tokens": 8}})
    chunks = []
    while len(chunks) < 3:
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            chunks.append(msg["params"])
    p.notify("$/cancelRequest", {"id": gid})
    answer, notes = p.wait(gid)
    chunks += chunks_of(notes, gid)
    data = answer["error"]["data"]
    assert answer["error"]["code"] == -32800 and data["finish_reason"] == "cancelled"
    assert data["text"] == "".join(c["text"] for c in chunks)
    assert data["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in chunks) < 100000
    # Cancelling again (now finished) or an unknown id is ignored; the runtime keeps serving.
    p.notify("$/cancelRequest", {"id": gid})
    p.notify("$/cancelRequest", {"id": "never"})
    assert p.request("runtime/ping")[0]["result"] == {}


def test_cancel_while_queued(loaded):
    p = loaded
    first = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 100000})
    second = p.start("generate", {"model": "m", "prompt": "Hi", "max_tokens": 10})
    p.notify("$/cancelRequest", {"id": second})
    answer, notes = p.wait(second)
    assert answer["error"]["code"] == -32800
    assert answer["error"]["data"]["usage"]["completion_tokens"] == 0
    assert chunks_of(notes, second) == []
    p.notify("$/cancelRequest", {"id": first})
    assert p.wait(first)[0]["error"]["code"] == -32800


def test_work_still_running_at_exit_is_answered(spawn, tmp_path):
    """A model load that cannot finish within the stop budget still gets its one answer."""
    from mlx_sidecar.testing import make_model

    small = make_model(tmp_path / "small", preset="small")
    p = spawn()
    p.request("runtime/ping")
    lid = p.start("model/load", {"model": str(small), "id": "s", "dtype": "float16"})
    p.close_stdin()
    answer, _ = p.wait(lid, timeout=10)
    assert "result" in answer or answer["error"]["code"] == -32800
    assert p.proc.wait(5) == 0
