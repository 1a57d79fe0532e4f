"""generate: checked here, then queued for the engine, which streams chunks and answers."""

from ..generation import Generation
from . import PENDING


def generate(server, req):
    server.check_model(req.params["model"])
    server.admit_generation(req, req.params["model"])
    req.partial = {"finish_reason": "cancelled", "text": "",
                   "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    server.engine.generate(Generation(req, req.params, server.writer))
    return PENDING
