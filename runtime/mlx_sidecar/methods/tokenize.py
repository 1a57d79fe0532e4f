"""tokenize and detokenize, run on the engine thread between decode steps."""

from .. import prompts
from ..errors import INVALID_PARAMS, RpcError, model_not_found
from . import PENDING


def _model(engine, model_id):
    loaded = engine.models.get(model_id)
    if loaded is None:
        raise model_not_found(model_id)
    return loaded


def tokenize(ctx, req):
    ctx.check_model(req.params["model"])

    def run(engine):
        loaded = _model(engine, req.params["model"])
        ids, text = prompts.render(loaded.tokenizer, req.params, loaded.id)
        return {"tokens": ids} if text is None else {"tokens": ids, "text": text}

    ctx.engine.call(req, run)
    return PENDING


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
