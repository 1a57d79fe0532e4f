"""score: log-probabilities of given text (prompt scoring), on the engine thread between decode steps.

The text runs through the model in steps of PREFILL_STEP tokens with a KV cache; each step's rows
become log-softmax rows, from which the scored tokens' values and one top-k for all rows are read."""

from .. import logprobs, prompts
from ..errors import INVALID_PARAMS, RpcError, model_not_found
from ..runners import PREFILL_STEP, cancelled_error
from . import PENDING


def score(ctx, req):
    ctx.check_model(req.params["model"])
    ctx.engine.call(req, lambda engine: run(engine, req))
    return PENDING


def run(engine, req) -> dict:
    params = req.params
    loaded = engine.models.get(params["model"])
    if loaded is None:
        raise model_not_found(params["model"])
    if loaded.kind != "llm":
        raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} is a {loaded.kind}; score takes a text model", path="/model")
    if getattr(engine, "group", None) is not None:
        raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} is sharded over a distributed group; score is not available there", path="/model")
    tokenizer = loaded.tokenizer
    ids, _ = prompts.render(tokenizer, params, loaded.id)
    completion = list(tokenizer.encode(params["completion"], add_special_tokens=False)) if "completion" in params else []
    if "completion" in params and not completion:
        raise RpcError(INVALID_PARAMS, "completion is empty after tokenization", path="/completion")
    if not ids:
        raise RpcError(INVALID_PARAMS, "the prompt is empty after tokenization; send some text",
                       path="/prompt" if "prompt" in params else "/messages")
    tokens = ids + completion
    ctx_len = engine.admission.context_limit(loaded)
    if ctx_len is not None and len(tokens) > ctx_len:
        raise RpcError(INVALID_PARAMS, f"the text has {len(tokens)} tokens but the context of model {loaded.id!r} is {ctx_len}; shorten it",
                       type="context_length_exceeded", path="/completion" if completion and len(ids) <= ctx_len else
                       ("/prompt" if "prompt" in params else "/messages"), prompt_tokens=len(tokens), context_length=ctx_len)
    k = params.get("top_logprobs", 0)
    first = len(ids) if completion else 1      # the first scored position
    picks = _score(loaded.model, tokens, first, k, req)
    tab = logprobs.table(tokenizer)
    content = [] if completion else [logprobs.entry(tab, tokens[0], None, [])]
    content += [logprobs.entry(tab, t, lp, top) for t, (lp, top) in zip(tokens[first:], picks)]
    total = sum(i["logprob"] for i in content if i["logprob"] is not None)
    return {"logprobs": {"content": content}, "total_logprob": total,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(completion), "total_tokens": len(tokens)},
            "model": loaded.id}


def _score(model, tokens: list[int], first: int, k: int, req) -> list:
    """(logprob, top) for tokens[first:], each under the model given the tokens before it."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = []
    # Row i of the logits predicts token i + 1: feed tokens[:-1] and read rows from first - 1 on.
    feed = tokens[:-1]
    for start in range(0, len(feed), PREFILL_STEP):
        if req.cancel_requested:
            raise cancelled_error()
        piece = feed[start:start + PREFILL_STEP]
        logits = model(mx.array(piece)[None], cache=cache)[0]
        lo = max(first - 1 - start, 0)
        if lo >= len(piece):
            mx.eval([c.state for c in cache])
            continue
        rows = logits[lo:]
        rows = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
        targets = tokens[start + lo + 1: start + len(piece) + 1]
        out.extend(logprobs.pick(rows, targets, [k] * len(targets)))
    return out
