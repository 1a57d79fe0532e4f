"""generate: checked here, then queued for the engine, which streams chunks and answers. Images are
decoded (images.py) and a response_format is checked and compiled (constraints.py) on workers first."""

from .. import constraints, tools, images
from ..generation import Generation
from . import PENDING


def generate(ctx, req):
    ctx.check_model(req.params["model"])
    group = getattr(ctx.engine, "group", None)
    if group is not None and group.broken is not None:
        raise group.broken_error()  # at once, even if the engine is stuck in a collective (distributed.py)
    plan = tools.plan(req.params)  # tools, tool_choice and tool messages: -32602 before anything starts
    req.on_done = ctx.inflight.admit_generation(req.params["model"])
    req.partial = {"finish_reason": "cancelled", "text": "",
                   "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    gen = Generation(req, req.params, ctx.writer)
    gen.metrics = ctx.inflight.metrics
    gen.tool_plan = plan

    def queue():
        if gen.format or plan is not None:  # formats and tool schemas are checked on a worker
            constraints.compile_then_queue(ctx, gen)
        else:
            ctx.engine.generate(gen)

    loaded = ctx.engine.models.get(req.params["model"])
    if images.image_parts(req.params) and (loaded is None or loaded.kind == "vision"):
        images.decode_then(ctx, gen, queue)  # decoded off the engine thread; a text model refuses them there
    else:
        queue()
    return PENDING
