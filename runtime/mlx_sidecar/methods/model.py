"""model/load, model/unload and model/list."""

import logging
import sys

from .. import models
from ..errors import INVALID_PARAMS, RpcError, internal, model_not_found
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
    group = getattr(ctx.engine, "group", None)
    if group is not None and group.broken is not None:
        raise group.load_error(req.params["model"])  # at once: the engine may be stuck in a collective
    if "draft_model" in req.params and group is not None:
        raise RpcError(INVALID_PARAMS, "draft_model is not available while models are sharded over a distributed group", path="/draft_model")
    if "num_draft_tokens" in req.params and "draft_model" not in req.params:
        raise RpcError(INVALID_PARAMS, "num_draft_tokens needs draft_model", path="/num_draft_tokens")
    info = _already(ctx, model_id, source, req.params)
    if info is not None:
        return info
    queue_load(ctx, req, source, model_id)
    return PENDING


def queue_load(ctx, req, source, model_id) -> None:
    """Queue a load; until it is answered, generate and tokenize for model_id wait behind it (the
    engine parks them in order), so `model/load` then `generate` can be pipelined."""
    ctx.inflight.load_queued(model_id)
    ctx.engine.load(LoadJob(ctx, req, source, model_id, dict(req.params),
                            always=lambda: ctx.inflight.load_done(model_id)))


def reload_job(ctx, params: dict, trigger):
    """A load that brings back a model unloaded by --idle-unload/--max-models, for the request
    `trigger` naming it; $/progress goes to that request's id."""
    model_id = params.get("id", params["model"])
    ctx.inflight.load_queued(model_id)
    return LoadJob(ctx, LoggedLoad(model_id, trigger), params["model"], model_id, params,
                   always=lambda: ctx.inflight.load_done(model_id), title=f"Reloading {model_id}")


class LoadJob:
    """One model load: `begin` on the engine thread (in order with other work), `read` on the loader
    thread, then `step` on the engine thread once per piece until it is answered."""

    def __init__(self, ctx, req, source, model_id, params, always=None, title=None):
        self.ctx, self.req, self.source, self.model_id, self.params = ctx, req, source, model_id, params
        self.is_reload = getattr(req, "trigger", None) is not None
        self.error = None
        self.over = False
        self._always = always
        self._title = title or f"Loading {source}"
        self._progress = None
        self._main = self._draft = None
        self._pieces = None

    # ---- engine thread ----
    def begin(self, engine) -> bool:
        """True when answered at once (an identical load already done, or a clash)."""
        try:
            info = _already(self.ctx, self.model_id, self.source, None if self.is_reload else self.params)
        except RpcError as e:
            self._end(error=e)
            return True
        if info is not None:
            if self.req.try_start():
                self.req.respond(info)
            self._end()
            return True
        self._device = engine.device["type"]
        return False

    def step(self, engine) -> bool:
        """One piece of the build; True once the load is answered."""
        if self.over:
            return True
        if self._pieces is None:
            if self._main is None:  # cancelled while queued, or the read failed
                self._end(error=self.error)
                return True
            self._pieces = self._build(engine)
        try:
            next(self._pieces)
            return False
        except StopIteration as done:
            loaded = done.value
        except Exception as e:
            if not isinstance(e, RpcError):
                log.exception("model/load failed")
                e = internal("model/load", e)
            self._end(error=e)
            return True
        if loaded.kind == "vision" and self.ctx.images is not None:
            loaded.info["vision"].update(max_image_side=self.ctx.images.max_side, max_images=self.ctx.images.max_images)
        engine.models[self.model_id] = loaded
        engine.residency.loaded(self.model_id, self.params)
        engine.snapshot_memory()  # before answering, so runtime/info right after sees the new model
        log.info("loaded %s as %r in %.0f ms", self.source, self.model_id, loaded.info["load_ms"])
        self._progress(1.0, "done", end=True)
        self.req.respond(loaded.info)
        self._end()
        return True

    def _build(self, engine):
        from .. import vision

        build = vision.build if isinstance(self._main, vision.Prepared) else models.build
        loaded = yield from build(self._main)
        if self._draft is not None:
            self._progress(0.9, f"building draft {self.params['draft_model']}")
            try:
                draft = yield from models.build(self._draft)
                _attach_draft(loaded, draft, self.params)
            except Exception:
                models.release(loaded)
                raise
        return loaded

    def _end(self, error=None) -> None:
        self.over = True
        if error is not None:
            self.error = error
            if self._progress is not None:
                self._progress(1.0, "failed", end=True)
            self.req.fail(error)
        if self._always is not None:
            self._always()

    # ---- loader thread ----
    def read(self) -> None:
        if not self.req.try_start():
            return  # cancelled while queued: already answered
        self._progress = self.ctx.progress_reporter(self.req, self._title)
        opts = dict(dtype=self.params.get("dtype", "auto"), trust_remote_code=self.params.get("trust_remote_code", False),
                    device_type=self._device, cancelled=lambda: self.req.cancel_requested)
        try:
            main = models.read(self.source, model_id=self.model_id, progress=self._progress, **opts)
            from .. import vision

            if main.located is not None and vision.is_vision_config(main.located[1]):
                main = vision.read(main, self._progress, opts["cancelled"])  # a vision.Prepared, or main for the old path
            if "draft_model" in self.params:
                self._progress(0.8, f"loading draft {self.params['draft_model']}")
                self._draft = models.read(self.params["draft_model"], model_id=f"{self.model_id}#draft",
                                          progress=lambda *a, **k: None, **opts)
            self._main = main
        except RpcError as e:
            self.error = e
        except Exception as e:
            log.exception("model/load failed")
            self.error = internal("model/load", e)


def _attach_draft(loaded, draft, params) -> None:
    """Keep the draft model on the target once its tokenizer is known to match."""
    from .. import speculative

    source = params["draft_model"]
    try:
        speculative.check_compatible(loaded, draft, source)
    except Exception:
        models.release(draft)
        raise
    loaded.draft = draft
    loaded.info["draft"] = {"model": source, "path": str(draft.path), "parameters": draft.info["parameters"],
                            "num_draft_tokens": params.get("num_draft_tokens", speculative.DEFAULT_DRAFT_TOKENS)}


class LoggedLoad:
    """A model/load nobody waits for an answer to: a --model preload (trigger None) or a reload on
    demand (progress goes under the id of the request that needed the model, which then gets the
    model or the load's error). Its own answer goes to the log."""

    method = "model/load"
    cancel_requested = False

    def __init__(self, source, trigger=None):
        self.source = source
        self.params = {"model": source}
        self.trigger = trigger
        self.id = trigger.id if trigger is not None else None
        self.is_notification = trigger.is_notification if trigger is not None else True

    def try_start(self):
        return True

    def respond(self, result, buf=None):
        pass

    def fail(self, error, buf=None):
        log.error("could not %s %s: %s", "reload" if self.trigger is not None else "preload", self.source, error.message)


def unload(ctx, req):
    model_id = req.params["model"]
    ctx.check_model(model_id)
    ctx.engine.call(req, lambda engine: _unload(engine, model_id))
    return PENDING


def _unload(engine, model_id):
    known = engine.residency.knows(model_id)
    engine.residency.forget(model_id)  # unloaded by the host: not reloaded on demand
    if engine.drop_model(model_id) is None and not known:
        raise model_not_found(model_id)
    return {"id": model_id}


def list_models(ctx, req):
    """Loaded models, then those unloaded by --idle-unload/--max-models (reloaded on demand)."""
    loaded = [m.info for m in list(ctx.engine.models.values())]
    ids = {m["id"] for m in loaded}
    return {"models": loaded + [m for m in ctx.engine.residency.unloaded_infos() if m["id"] not in ids]}
