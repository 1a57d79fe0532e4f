"""Loading models, and the facts about them that model/load reports.

A text model is read on the loader thread (`read`: source, config, tokenizer, weights converted to
the target dtype) and built on the engine thread in small pieces (`build`). MLX streams are per
thread (mlx >= 0.31.2): what the loader makes it evaluates itself, so the engine only receives
finished arrays. Vision models are read and built the same way by vision.py (`read`, `build`);
custom model code and legacy quantization formats load in one piece on the engine thread (`load`),
as everything did before."""

import gc
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MODEL_LOAD_FAILED, RpcError

log = logging.getLogger(__name__)

PIECE_BYTES = 32 << 20   # weights finished per engine-thread piece while a model is built
ON_ENGINE_ENV = "MLX_SIDECAR_LOAD_ON_ENGINE"  # "1": the old path, the whole load on the engine thread (benchmarks)


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


def _locate(source: str, progress):
    """(model directory, its config.json) for a model string."""
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
    return path, config


def load(source: str, *, model_id: str, dtype: str, trust_remote_code: bool, device_type: str,
         progress: Callable[[float, str], None], started: float | None = None, located=None) -> LoadedModel:
    """Load a model with mlx-lm (vision models with mlx-vlm), apply the dtype policy, and measure it. Engine thread only."""
    started = time.perf_counter() if started is None else started
    path, config = located or _locate(source, progress)
    from . import vision

    kind, processor = "vision" if vision.is_vision_config(config) else "llm", None
    progress(0.5, "loading weights")
    from . import distributed

    if distributed.GROUP is not None:  # sharded over a group: text models only (distributed.py)
        if kind == "vision":
            raise RpcError(MODEL_LOAD_FAILED, f"{source!r} is a vision model; a distributed group serves text models only", type="unsupported_architecture", model=source)
        model, tokenizer = distributed.GROUP.load(path, source, model_id, dtype, trust_remote_code)
        return distributed.settle(_finish(source, model_id, path, config, kind, model, tokenizer, None, dtype, device_type, started))
    elif kind == "vision":
        model, tokenizer, processor = vision.load_parts(path, source, config, trust_remote_code)
    else:
        model, tokenizer = _load_text(path, source, trust_remote_code)
    return _finish(source, model_id, path, config, kind, model, tokenizer, processor, dtype, device_type, started)


def _load_text(path: Path, source: str, trust_remote_code: bool):
    from mlx_lm.utils import load as mlx_lm_load

    try:
        model, tokenizer = mlx_lm_load(str(path), lazy=True, trust_remote_code=trust_remote_code,
                                       tokenizer_config={"trust_remote_code": True} if trust_remote_code else None)
    except Exception as e:
        raise _load_error(e, source) from None
    return model, tokenizer


def _load_error(e: Exception, source: str) -> RpcError:
    """mlx-lm's load failures as the protocol types them (model_load_failed data.type)."""
    if isinstance(e, RpcError):
        return e
    if isinstance(e, ValueError):
        text = str(e)
        kind = "unsupported_architecture" if "not supported" in text or "Model type" in text else "invalid_model"
        if "trust_remote_code" in text:
            kind = "trust_remote_code_required"
        return RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: {text}", type=kind, model=source)
    if isinstance(e, (FileNotFoundError, RuntimeError)):  # RuntimeError: mlx could not read the weight files
        return RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: {e}", type="invalid_model", model=source)
    return RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: {type(e).__name__}: {e}", type="model_load_failed", model=source)


# ---- split loading: read on the loader thread, build on the engine thread ----

@dataclass
class Prepared:
    """What the loader thread read for one model; `build` turns it into a LoadedModel."""
    source: str
    model_id: str
    dtype: str
    trust_remote_code: bool
    device_type: str
    started: float
    located: tuple | None = None   # (path, config.json); None: everything happens in `build` (the old path)
    model_config: dict | None = None  # mlx-lm's reading of the config (generation_config's eos merged in)
    tokenizer: Any = None
    weights: dict | None = None    # name → finished mx.array; None: build loads the whole model in one piece
    dequantized: bool = False      # quantized weights were expanded to the target dtype while read
    progress: Any = None           # the load's progress callback (a one-piece load reports through it)


def _target_dtype(dtype: str, device_type: str):
    # On CPU float32 is by far the fastest (and bf16 hurts small models); GPUs keep the weights as they are.
    if dtype == "auto":
        return "float32" if device_type == "cpu" else None
    return dtype


def read(source: str, *, model_id: str, dtype: str, trust_remote_code: bool, device_type: str,
         progress: Callable[[float, str], None], cancelled: Callable[[], bool] = lambda: False) -> Prepared:
    """Loader thread: resolve the source, parse the config, load the tokenizer, read the weights and
    convert them to the target dtype, evaluating every array here."""
    prep = Prepared(source, model_id, dtype, trust_remote_code, device_type, time.perf_counter(), progress=progress)
    if os.environ.get(ON_ENGINE_ENV) == "1":
        return prep
    # A load makes many Python objects (a tokenizer's vocabulary), which sets off full garbage
    # collections that stop every thread: freezing what exists keeps those short. release() unfreezes.
    gc.freeze()
    prep.located = path, config = _locate(source, progress)
    from . import vision

    if _sharded() or vision.is_vision_config(config) or config.get("model_file") or config.get("quantize_activations") \
            or (config.get("quantization_config") and not config.get("quantization")):
        return prep  # vision models (vision.read takes them from here), custom model code, legacy quantization: on the engine
    from mlx_lm.utils import load_config, load_tokenizer

    try:
        prep.model_config = load_config(path)
        progress(0.2, "loading tokenizer")
        prep.tokenizer = load_tokenizer(path, {"trust_remote_code": True} if trust_remote_code else None,
                                        eos_token_ids=prep.model_config.get("eos_token_id"))
    except Exception as e:
        raise _load_error(e, source) from None
    progress(0.3, "reading weights")
    import mlx.core as mx

    with mx.stream(mx.cpu):  # reading and converting on the CPU: the accelerator stays the engine thread's
        prep.weights, prep.dequantized = _read_weights(path, source, config, _target_dtype(dtype, device_type), progress, cancelled)
    return prep


def _sharded() -> bool:
    # Models sharded over a distributed group load through distributed.py, in one piece.
    return getattr(sys.modules.get(f"{__package__}.distributed"), "GROUP", None) is not None


def _read_weights(path: Path, source: str, config: dict, want, progress, cancelled):
    """(name → evaluated mx.array in the target dtype, dequantized?) or (None, False) for a layout
    this does not handle (then mlx-lm loads it on the engine thread)."""
    import mlx.core as mx

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise RpcError(MODEL_LOAD_FAILED, f"could not load {source!r}: No safetensors found in {path}", type="invalid_model", model=source)
    lazy = {}
    try:
        for f in files:
            lazy.update(mx.load(str(f)))
    except Exception as e:
        raise _load_error(RuntimeError(str(e)), source) from None
    if any(n.endswith(".global_scale") for n in lazy):
        return None, False
    quantized = [n[:-len(".scales")] for n in lazy if n.endswith(".scales")]
    quant = config.get("quantization")
    dequantize = want is not None and bool(quantized)
    if dequantize and not isinstance(quant, dict):
        return None, False
    target = getattr(mx, want) if want else None
    total, done, shown = sum(a.nbytes for a in lazy.values()) or 1, 0, 0.0
    out = {}

    def finish(name, a, read_bytes):
        nonlocal done, shown
        if cancelled():
            from .runners import cancelled_error

            raise cancelled_error("model/load cancelled")
        mx.eval(a)  # on this thread's stream: the engine gets a finished array
        out[name] = a
        done += read_bytes
        if done / total - shown >= 0.1:
            shown = done / total
            progress(0.3 + 0.5 * shown, "reading weights")

    try:
        if dequantize:
            for p in quantized:
                q = quant.get(p) if isinstance(quant.get(p), dict) else quant
                parts = [lazy.pop(f"{p}.weight"), lazy.pop(f"{p}.scales"), lazy.pop(f"{p}.biases", None)]
                w = mx.dequantize(*parts, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
                finish(f"{p}.weight", w.astype(target), sum(x.nbytes for x in parts if x is not None))
        for name in list(lazy):
            a = lazy.pop(name)
            lazy_bytes = a.nbytes
            if target is not None and mx.issubdtype(a.dtype, mx.floating) and a.dtype != target:
                a = a.astype(target)
            finish(name, a, lazy_bytes)
    except RpcError:
        raise
    except Exception as e:
        raise _load_error(RuntimeError(str(e)), source) from None
    return out, dequantize


def build(prep: Prepared):
    """Engine thread, a generator: builds the model from what `read` prepared, yielding between
    pieces (each about PIECE_BYTES of weights) so running streams decode in between. Returns the
    LoadedModel (as StopIteration's value: `loaded = yield from build(prep)`)."""
    if prep.weights is None:
        return load(prep.source, model_id=prep.model_id, dtype=prep.dtype, trust_remote_code=prep.trust_remote_code,
                    device_type=prep.device_type, progress=prep.progress or (lambda *a, **k: None), started=prep.started,
                    located=prep.located)
        yield  # a generator even when everything happens in one piece
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes, get_total_parameters

    path, config = prep.located
    mcfg, weights = prep.model_config, prep.weights
    prep.weights = None
    try:
        model_class, args_class = _get_classes(config=mcfg)
        model = model_class(args_class.from_dict(mcfg))
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        quantization = mcfg.get("quantization")
        if quantization and not prep.dequantized:
            _quantize_like(model, quantization, weights)
        model.eval()
        model.load_weights(list(weights.items()), strict=True)
    except Exception as e:
        raise _load_error(e, prep.source) from None
    del weights
    yield
    want = _target_dtype(prep.dtype, prep.device_type)
    target = getattr(mx, want) if want else None
    group, size = [], 0
    for name, a in tree_flatten(model.parameters()):
        if target is not None and mx.issubdtype(a.dtype, mx.floating) and a.dtype != target:
            a = a.astype(target)  # made by sanitize or left out of the file: the dtype policy still holds
            model.update(tree_unflatten([(name, a)]))
        group.append(a)
        size += a.nbytes
        if size >= PIECE_BYTES:
            mx.eval(group)
            group, size = [], 0
            yield
    mx.eval(group)
    yield  # measuring it (the KV cost runs the model once) is a piece of its own
    quant = None if prep.dequantized or want is not None else mcfg.get("quantization")
    return LoadedModel(id=prep.model_id, source=prep.source, path=path, kind="llm", model=model, tokenizer=prep.tokenizer,
                       config=config, info=_info(prep.model_id, path, config, "llm", model, quant, prep.started,
                                                 int(get_total_parameters(model))))


def _quantize_like(model, quantization: dict, weights: dict) -> None:
    """Give the model quantized layers where the weights are quantized (as mlx-lm's load does)."""
    import mlx.nn as nn
    from mlx_lm.utils import infer_quant_config

    def predicate(p, m):
        if p in quantization:
            return quantization[p]
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return infer_quant_config(p, m, weights)

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def _finish(source, model_id, path, config, kind, model, tokenizer, processor, dtype, device_type, started) -> LoadedModel:
    """Apply the dtype policy and measure the model."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model, get_total_parameters

    parameters = int(get_total_parameters(model))
    quantization = config.get("quantization") or config.get("quantization_config")
    want = _target_dtype(dtype, device_type)
    if want is not None:
        if quantization:
            model = dequantize_model(model)
            quantization = None
        target = getattr(mx, want)
        model.update(tree_map(lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    mx.eval(model.parameters())
    info = _info(model_id, path, config, kind, model, quantization, started, parameters)
    if kind == "vision":
        from .vision import describe

        info["vision"] = describe(processor, config)
    return LoadedModel(id=model_id, source=source, path=path, kind=kind, model=model,
                       tokenizer=tokenizer, config=config, info=info, processor=processor)


def _info(model_id, path, config, kind, model, quantization, started, parameters) -> dict:
    """The ModelInfo of a model whose weights are in memory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

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
        "state": "loaded",
        "kv_bytes_per_token": _kv_bytes_per_token(model, config, kind),
    }
    return info


def _kv_bytes_per_token(model, config, kind) -> int:
    """KV cache bytes per token, read from mlx-lm's caches (admission.py budgets requests by it)."""
    from . import admission

    shape = admission.measure(model, config) if kind == "llm" else admission.from_config(config, admission._itemsize(model))
    return shape.per_token


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
    gc.unfreeze()  # its objects may have been frozen by a later load (read)
    gc.collect()
    mx.clear_cache()
