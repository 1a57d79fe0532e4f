"""tokenize and detokenize, run on the engine thread between decode steps."""

from .. import images, prompts
from ..errors import INVALID_PARAMS, RpcError, model_not_found
from . import PENDING


def _model(engine, model_id):
    loaded = engine.models.get(model_id)
    if loaded is None:
        raise model_not_found(model_id)
    return loaded


def tokenize(ctx, req):
    ctx.check_model(req.params["model"])
    job = _Images(req)

    def run(engine):
        loaded = _model(engine, req.params["model"])
        if loaded.kind == "vision":
            # The model's processor: image placeholders expand to the tokens each image becomes.
            from ..vision import prepare

            params = dict(req.params)
            if "text" in params:
                params["prompt"] = params.pop("text")
            inputs = prepare(loaded, params, job.images)
            return {"tokens": inputs.ids} if inputs.text is None else {"tokens": inputs.ids, "text": inputs.text}
        ids, text = prompts.render(loaded.tokenizer, req.params, loaded.id)
        return {"tokens": ids} if text is None else {"tokens": ids, "text": text}

    loaded = ctx.engine.models.get(req.params["model"])
    if images.image_parts(req.params) and (loaded is None or loaded.kind == "vision"):
        images.decode_then(ctx, job, lambda: ctx.engine.call(req, run))  # decoded off the engine thread
    else:
        ctx.engine.call(req, run)
    return PENDING


class _Images:
    """A tokenize request's images, decoded on the image worker (images.decode_then's shape)."""

    def __init__(self, req):
        self.req = req
        self.params = req.params
        self.images = []


def detokenize(ctx, req):
    ctx.check_model(req.params["model"])
    tokens = req.params["tokens"]

    def run(engine):
        loaded = _model(engine, req.params["model"])
        vocab = max(len(loaded.tokenizer), loaded.config.get("vocab_size") or 0)
        for i, t in enumerate(tokens):
            if t >= vocab:
                raise RpcError(INVALID_PARAMS, f"token {t} is outside the vocabulary of {loaded.id!r} (0..{vocab - 1})", path=f"/tokens/{i}")
        return {"text": loaded.tokenizer.decode(tokens)}

    ctx.engine.call(req, run)
    return PENDING
