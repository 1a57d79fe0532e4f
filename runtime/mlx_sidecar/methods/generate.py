"""generate: checked here, then queued for the engine, which streams chunks and answers. A
response_format is checked and compiled on a worker first (constraints.py)."""

from .. import constraints
from ..generation import Generation
from . import PENDING


def generate(ctx, req):
    ctx.check_model(req.params["model"])
    req.on_done = ctx.inflight.admit_generation(req.params["model"])
    req.partial = {"finish_reason": "cancelled", "text": "",
                   "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    gen = Generation(req, req.params, ctx.writer)
    if req.params.get("response_format"):
        constraints.compile_then_queue(ctx, gen)
    else:
        ctx.engine.generate(gen)
    return PENDING
