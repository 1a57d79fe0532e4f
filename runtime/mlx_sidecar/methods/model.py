"""model/load, model/unload and model/list."""

import logging
import sys

from .. import models
from ..errors import INVALID_PARAMS, RpcError, model_not_found
from . import PENDING

log = logging.getLogger(__name__)


def _already(ctx, model_id: str, source: str, params=None):
    loaded = ctx.engine.models.get(model_id)
    if loaded is None:
        return None
    if loaded.source != source:
        raise RpcError(INVALID_PARAMS, f"id {model_id!r} is already used by the model loaded from {loaded.source!r}; unload it first or pick another id", path="/id")
    draft = (loaded.info.get("draft") or {}).get("model")
    if params is not None and params.get("draft_model") != draft:
        have = f"with draft_model {draft!r}" if draft else "without a draft_model"
        raise RpcError(INVALID_PARAMS, f"id {model_id!r} is already loaded {have}; unload it first or pick another id",
                       path="/draft_model" if "draft_model" in params else "/id")
    return loaded.info


def load(ctx, req):
    source = req.params["model"]
    model_id = req.params.get("id", source)
    if "draft_model" in req.params and getattr(ctx.engine, "group", None) is not None:
        raise RpcError(INVALID_PARAMS, "draft_model is not available while models are sharded over a distributed group", path="/draft_model")
    if "num_draft_tokens" in req.params and "draft_model" not in req.params:
        raise RpcError(INVALID_PARAMS, "num_draft_tokens needs draft_model", path="/num_draft_tokens")
    info = _already(ctx, model_id, source, req.params)
    if info is not None:
        return info
    queue_load(ctx, req, source, model_id)
    return PENDING


def queue_load(ctx, req, source, model_id) -> None:
    """Queue a load on the engine; until it has run, generate and tokenize for model_id may queue behind it."""
    ctx.inflight.load_queued(model_id)

    ctx.engine.call(req, lambda engine: _load(ctx, engine, req, source, model_id),
                    always=lambda: ctx.inflight.load_done(model_id))


def _load(ctx, engine, req, source, model_id):
    info = _already(ctx, model_id, source, getattr(req, "params", None))  # an identical load queued earlier may have done it
    if info is not None:
        return info
    progress = ctx.progress_reporter(req, f"Loading {source}")
    try:
        loaded = models.load(
            source, model_id=model_id,
            dtype=req.params.get("dtype", "auto"),
            trust_remote_code=req.params.get("trust_remote_code", False),
            device_type=engine.device["type"],
            progress=progress,
        )
    except Exception:
        progress(1.0, "failed", end=True)
        raise
    if "draft_model" in req.params:
        try:
            _attach_draft(loaded, req.params, engine, progress)
        except Exception:
            models.release(loaded)
            progress(1.0, "failed", end=True)
            raise
    progress(1.0, "done", end=True)
    if loaded.kind == "vision" and ctx.images is not None:
        loaded.info["vision"].update(max_image_side=ctx.images.max_side, max_images=ctx.images.max_images)
    engine.models[model_id] = loaded
    log.info("loaded %s as %r in %.0f ms", source, model_id, loaded.info["load_ms"])
    return loaded.info


def _attach_draft(loaded, params, engine, progress) -> None:
    """Load the draft model and keep it on the target once its tokenizer is known to match."""
    from .. import speculative

    source = params["draft_model"]
    progress(0.8, f"loading draft {source}")
    draft = models.load(source, model_id=f"{loaded.id}#draft", dtype=params.get("dtype", "auto"),
                        trust_remote_code=params.get("trust_remote_code", False),
                        device_type=engine.device["type"], progress=lambda *a, **k: None)
    try:
        speculative.check_compatible(loaded, draft, source)
    except Exception:
        models.release(draft)
        raise
    loaded.draft = draft
    loaded.info["draft"] = {"model": source, "path": str(draft.path), "parameters": draft.info["parameters"],
                            "num_draft_tokens": params.get("num_draft_tokens", speculative.DEFAULT_DRAFT_TOKENS)}


def unload(ctx, req):
    model_id = req.params["model"]
    ctx.check_model(model_id)
    ctx.engine.call(req, lambda engine: _unload(engine, model_id))
    return PENDING


def _unload(engine, model_id):
    loaded = engine.models.pop(model_id, None)
    if loaded is None:
        raise model_not_found(model_id)
    engine.abort_model(model_id)
    models.release(loaded)
    return {"id": model_id}


def list_models(ctx, req):
    return {"models": [m.info for m in list(ctx.engine.models.values())]}
