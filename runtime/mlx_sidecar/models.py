"""Loading models on the engine thread, and the facts about them that model/load reports."""

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MODEL_LOAD_FAILED, RpcError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    id: str
    source: str
    path: Path
    kind: str            # "llm" or "vision"
    model: Any
    tokenizer: Any       # mlx-lm's TokenizerWrapper
    config: dict
    info: dict = field(default_factory=dict)   # the ModelInfo the protocol reports
    processor: Any = None  # vision models: mlx-vlm's processor (vision.py)
    draft: Any = None      # a draft model (LoadedModel) for speculative decoding (speculative.py)

    @property
    def context_length(self) -> int | None:
        return self.info["context_length"]


def chunk_tokens_for(parameters: int) -> int:
    """Tokens per chunk by model size: small models are fast, so they batch more tokens."""
    billions = parameters / 1e9
    if billions < 4:
        return 32
    if billions < 15:
        return 16
    if billions < 50:
        return 8
    return 4


def _context_length(config: dict) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length", "context_length"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


# sources.py's error types, as the protocol names them (protocol.json, -32001).
_SOURCE_TYPES = {"model_not_found": "model_path_not_found", "unsupported_model": "unsupported_architecture"}


def _resolve(source: str, progress) -> Path:
    """A local MLX model directory for a model string (paths, aliases, GGUF files, hub ids)."""
    from .sources import SourceError, resolve

    try:
        return Path(resolve(source, progress=progress))
    except SourceError as e:
        kind = getattr(e, "type", "model_load_failed")
        raise RpcError(MODEL_LOAD_FAILED, str(e), type=_SOURCE_TYPES.get(kind, kind), model=source) from None


def load(source: str, *, model_id: str, dtype: str, trust_remote_code: bool, device_type: str,
         progress: Callable[[float, str], None]) -> LoadedModel:
    """Load a model with mlx-lm (vision models with mlx-vlm), apply the dtype policy, and measure it. Engine thread only."""
    started = time.perf_counter()
    path = _resolve(source, progress)
    if not path.is_dir():
        raise RpcError(MODEL_LOAD_FAILED, f"{source!r} is not a model directory (a directory with config.json and *.safetensors)", type="invalid_model", model=source)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RpcError(MODEL_LOAD_FAILED, f"{str(path)!r} has no config.json, so it is not a model directory", type="invalid_model", model=source)
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise RpcError(MODEL_LOAD_FAILED, f"{config_file} is not valid JSON: {e}", type="invalid_model", model=source) from None
    from . import vision

    kind, processor = "vision" if vision.is_vision_config(config) else "llm", None
    progress(0.5, "loading weights")
    if kind == "vision":
        model, tokenizer, processor = vision.load_parts(path, source, config, trust_remote_code)
    else:
        model, tokenizer = _load_text(path, source, trust_remote_code)
    return _finish(source, model_id, path, config, kind, model, tokenizer, processor, dtype, device_type, started)


def _load_text(path: Path, source: str, trust_remote_code: bool):
    from mlx_lm.utils import load as mlx_lm_load

    try:
        model, tokenizer = mlx_lm_load(str(path), lazy=True, trust_remote_code=trust_remote_code,
                                       tokenizer_config={"trust_remote_code": True} if trust_remote_code else None)
    except ValueError as e:
        text = str(e)
        kind = "unsupported_architecture" if "not supported" in text or "Model type" in text else "invalid_model"
        if "trust_remote_code" in text:
            kind = "trust_remote_code_required"
        raise RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: {text}", type=kind, model=source) from None
    except (FileNotFoundError, RuntimeError) as e:  # RuntimeError: mlx could not read the weight files
        raise RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: {e}", type="invalid_model", model=source) from None
    except Exception as e:
        raise RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: {type(e).__name__}: {e}", type="model_load_failed", model=source) from None
    return model, tokenizer


def _finish(source, model_id, path, config, kind, model, tokenizer, processor, dtype, device_type, started) -> LoadedModel:
    """Apply the dtype policy and measure the model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import dequantize_model, get_total_parameters

    parameters = int(get_total_parameters(model))
    quantization = config.get("quantization") or config.get("quantization_config")
    want = dtype
    if want == "auto":
        # On CPU float32 is by far the fastest (and bf16 hurts small models); GPUs keep the weights as they are.
        want = "float32" if device_type == "cpu" else None
    if want is not None:
        if quantization:
            model = dequantize_model(model)
            quantization = None
        target = getattr(mx, want)
        model.update(tree_map(lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    mx.eval(model.parameters())

    params = tree_flatten(model.parameters())
    float_dtypes = {str(a.dtype).replace("mlx.core.", "") for _, a in params if mx.issubdtype(a.dtype, mx.floating)}
    memory_bytes = sum(a.nbytes for _, a in params)
    info = {
        "id": model_id,
        "kind": kind,
        "path": str(path),
        "architecture": str(config.get("model_type", "unknown")),
        "parameters": parameters,
        "context_length": _context_length(config),
        "dtype": "float32" if float_dtypes == {"float32"} else ",".join(sorted(float_dtypes)) or "unknown",
        "quantization": _quantization_info(quantization),
        "memory_bytes": int(memory_bytes),
        "load_ms": round((time.perf_counter() - started) * 1000, 1),
        "chunk_tokens": chunk_tokens_for(parameters),
    }
    if kind == "vision":
        from .vision import describe

        info["vision"] = describe(processor, config)
    return LoadedModel(id=model_id, source=source, path=path, kind=kind, model=model,
                       tokenizer=tokenizer, config=config, info=info, processor=processor)


def _quantization_info(q) -> dict | None:
    if not q or not isinstance(q, dict):
        return None
    out = {"bits": int(q.get("bits", 0)), "group_size": int(q.get("group_size", 0))}
    if q.get("mode"):
        out["mode"] = str(q["mode"])
    return out


def release(loaded: LoadedModel) -> None:
    """Drop a model's arrays and give the memory back."""
    import mlx.core as mx

    if loaded.draft is not None:
        release(loaded.draft)
        loaded.draft = None
    loaded.model = None
    loaded.tokenizer = None
    loaded.processor = None
    gc.collect()
    mx.clear_cache()
