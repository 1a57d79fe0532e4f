"""model/load, model/unload, model/list and their errors, against the real runtime."""

import json


def test_load_reports_the_model(spawn, tiny_model):
    p = spawn()
    info = p.request("model/load", {"model": tiny_model})[0]["result"]
    assert info["id"] == tiny_model  # default id: the string given
    assert info["architecture"] == "llama" and info["dtype"] == "float32" and info["quantization"] is None
    assert info["parameters"] > 50_000 and info["memory_bytes"] >= info["parameters"] * 4
    assert info["context_length"] == 1024 and info["chunk_tokens"] == 32
    again, notes = p.request("model/load", {"model": tiny_model})
    assert again["result"] == info and notes == []  # answered at once, nothing reloaded


def test_dtype_override(spawn, tiny_model):
    p = spawn()
    info = p.request("model/load", {"model": tiny_model, "id": "h", "dtype": "float16"})[0]["result"]
    assert info["dtype"] == "float16"
    result = p.request("generate", {"model": "h", "prompt": "Hi", "max_tokens": 5, "temperature": 0})[0]["result"]
    assert result["usage"]["completion_tokens"] == 5


def test_id_clash_and_unload(spawn, tiny_model, eos_model):
    p = spawn()
    p.request("model/load", {"model": tiny_model, "id": "a"})
    clash = p.request("model/load", {"model": eos_model, "id": "a"})[0]
    assert clash["error"]["code"] == -32602 and clash["error"]["data"]["path"] == "/id"
    assert p.request("model/unload", {"model": "a"})[0]["result"] == {"id": "a"}
    assert p.request("model/list")[0]["result"] == {"models": []}
    assert p.request("model/unload", {"model": "a"})[0]["error"]["code"] == -32000


def test_unload_fails_requests_on_that_model(spawn, tiny_model):
    p = spawn()
    p.request("model/load", {"model": tiny_model, "id": "a"})
    gid = p.start("generate", {"model": "a", "prompt": "Hi", "max_tokens": 100000})
    while p.recv().get("method") != "generate/chunk":
        pass
    unloaded, notes = p.request("model/unload", {"model": "a"})
    assert unloaded["result"] == {"id": "a"}
    answer = next(n for n in notes if n.get("id") == gid)  # answered before the unload itself
    assert answer["error"]["code"] == -32005 and answer["error"]["data"]["usage"]["completion_tokens"] > 0


def test_load_errors(spawn, tmp_path, tiny_model):
    p = spawn()
    def error(params):
        answer = p.request("model/load", params)[0]
        assert answer["error"]["code"] == -32001, answer
        assert answer["error"]["message"]
        return answer["error"]["data"]["type"]

    assert error({"model": str(tmp_path / "missing")}) == "model_path_not_found"
    (tmp_path / "empty").mkdir()
    assert error({"model": str(tmp_path / "empty")}) == "invalid_model"
    assert error({"model": str(copy_with(tmp_path / "weird", tiny_model, model_type="no_such_arch"))}) == "unsupported_architecture"
    broken = copy_with(tmp_path / "broken", tiny_model)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert error({"model": str(broken)}) == "invalid_model"
    custom = copy_with(tmp_path / "custom", tiny_model, model_file="evil.py")
    (custom / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert error({"model": str(custom)}) == "trust_remote_code_required"
    # The runtime is unaffected.
    assert p.request("model/load", {"model": tiny_model, "id": "ok"})[0]["result"]["id"] == "ok"


def copy_with(dst, src, **config):
    """A copy of a model directory with config.json fields changed."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_ping_answers_while_a_model_loads(spawn, tmp_path):
    from mlx_sidecar.testing import make_model

    small = make_model(tmp_path / "small", preset="small")
    p = spawn()
    lid = p.start("model/load", {"model": str(small), "id": "s"})
    pid = p.start("runtime/ping")
    order = []
    while len(order) < 2:
        msg = p.recv()
        if "id" in msg:
            order.append(msg["id"])
    assert order == [pid, lid]


def test_preload_flag(spawn, tiny_model, tmp_path):
    p = spawn(args=["--model", tiny_model, "--model", str(tmp_path / "missing")])
    # The preloaded model is usable under the string given, with no model/load; a bad one is logged.
    answer, _ = p.request("generate", {"model": tiny_model, "prompt": "Hi", "max_tokens": 3})
    assert answer["result"]["usage"]["completion_tokens"] == 3
    assert [m["id"] for m in p.request("model/list")[0]["result"]["models"]] == [tiny_model]
    p.close()
    assert b"could not preload" in bytes(p.stderr)
