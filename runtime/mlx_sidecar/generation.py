"""One generate request on the engine thread: prompt → tokens → streamed chunks → one response."""

import logging
import time

from . import prompts, sampling
from .errors import CANCELLED, CONTEXT_LENGTH_EXCEEDED, GENERATION_FAILED, RpcError, model_not_found
from .stops import StopText
from .writer import ChunkBuffer

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_LATENCY_MS = 20.0
PREFILL_STEP = 512  # prompt tokens per prefill step; cancellation is checked between steps


class _Stop(Exception):
    """Raised from the prefill progress callback to abandon a request mid-prefill."""


class Generation:
    def __init__(self, req, params: dict, writer):
        self.req = req
        self.model_id = params["model"]
        self.loaded = None
        self.params = params
        self.writer = writer
        self.stream = params.get("stream", True) and not req.is_notification
        self.buf: ChunkBuffer | None = None
        self.prompt_tokens = 0
        self.completion = 0
        self.started = self.first_at = None
        self.stops = StopText(_stop_list(params.get("stop")))
        self.stop_ids = frozenset(params.get("stop_token_ids") or ())
        self.tokens = None  # mlx-lm's token generator
        self.detok = None
        self.done = False

    # ---- engine thread ----
    def start(self, models: dict) -> None:
        """Tokenize, check limits, and set up the token generator. Raises RpcError before any compute."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        loaded = models.get(self.model_id)
        if loaded is None:
            raise model_not_found(self.model_id)
        self.loaded = loaded
        params = self.params
        self.started = time.monotonic()
        ids, _ = prompts.render(loaded.tokenizer, params, loaded.id)
        if not ids:
            raise RpcError(-32602, "the prompt is empty after tokenization; send some text", path="/prompt" if "prompt" in params else "/messages")
        self.prompt_tokens = len(ids)
        ctx = loaded.context_length
        max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
        if ctx is not None:
            if len(ids) >= ctx:
                raise RpcError(CONTEXT_LENGTH_EXCEEDED, f"the prompt has {len(ids)} tokens but model {loaded.id!r} has a context of {ctx}; shorten the prompt",
                               prompt_tokens=len(ids), context_length=ctx)
            max_tokens = min(max_tokens, ctx - len(ids))
        self.max_tokens = max_tokens
        sampling.check_token_ids(params, loaded.config.get("vocab_size") or (loaded.config.get("text_config") or {}).get("vocab_size"))
        if "seed" in params:
            mx.random.seed(params["seed"])
        if self.stream:
            opts = params.get("stream_options") or {}
            self.buf = ChunkBuffer(self.req.id, opts.get("chunk_tokens", loaded.info["chunk_tokens"]),
                                   opts.get("max_latency_ms", DEFAULT_MAX_LATENCY_MS) / 1000.0)
        self.eos = loaded.tokenizer.eos_token_ids
        self.detok = loaded.tokenizer.detokenizer
        self.tokens = generate_step(
            mx.array(ids), loaded.model,
            max_tokens=max_tokens,
            sampler=sampling.make_sampler(params),
            logits_processors=sampling.make_logits_processors(params),
            prefill_step_size=PREFILL_STEP,
            prompt_progress_callback=self._check_prefill,
        )

    def _check_prefill(self, done: int, total: int) -> None:
        if self.req.cancel_requested:
            raise _Stop()

    def step(self) -> None:
        """Decode one token and hand it to the writer; finishes the request when it ends."""
        if self.req.cancel_requested:
            return self.finish_error(RpcError(CANCELLED, "request cancelled", finish_reason="cancelled"))
        try:
            token, _ = next(self.tokens)
        except StopIteration:
            return self.finish("length")
        except _Stop:
            return self.finish_error(RpcError(CANCELLED, "request cancelled", finish_reason="cancelled"))
        except Exception as e:
            log.exception("generation failed")
            return self.finish_error(RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
        if self.first_at is None:
            self.first_at = time.monotonic()
        if token in self.eos or token in self.stop_ids:
            return self.finish("stop")
        self.completion += 1
        self.detok.add_token(token)
        piece = self.stops.feed(self.detok.last_segment)
        if self.buf is not None:
            self.writer.add_tokens(self.buf, token, piece, flush=self.completion == 1)
        if self.stops.stopped:
            return self.finish("stop")
        if self.completion >= self.max_tokens:
            return self.finish("length")

    def _drain_text(self) -> str:
        """Decode what the detokenizer still holds and release text held for stop matching."""
        if self.detok is None:
            return ""
        self.detok.finalize()
        piece = self.stops.feed(self.detok.last_segment)
        if not self.stops.stopped:
            piece += self.stops.rest()
        return piece

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion,
                "total_tokens": self.prompt_tokens + self.completion}

    def finish(self, reason: str) -> None:
        tail = self._drain_text()
        if tail and self.buf is not None:
            self.writer.add_tokens(self.buf, (), tail, flush=False)
        now = time.monotonic()
        first = self.first_at or now
        prefill_s = max(first - self.started, 1e-9)
        decode_s = now - first
        result = {
            "text": self.stops.text,
            "finish_reason": reason,
            "usage": self._usage(),
            "timings": {
                "ttft_ms": round((first - self.req.received_at) * 1000, 3),
                "prompt_tps": round(self.prompt_tokens / prefill_s, 2),
                "generation_tps": round((self.completion - 1) / decode_s, 2) if self.completion > 1 and decode_s > 0 else 0.0,
                "total_ms": round((now - self.req.received_at) * 1000, 3),
                "queued_ms": round((self.started - self.req.received_at) * 1000, 3),
            },
            "model": self.model_id,
        }
        self.done = True
        self.req.respond(result, self.buf)

    def finish_error(self, error: RpcError) -> None:
        """End with an error that carries the text so far and usage (cancelled, unloaded, failed)."""
        tail = self._drain_text()
        if tail and self.buf is not None:
            self.writer.add_tokens(self.buf, (), tail, flush=False)
        error.data.setdefault("finish_reason", error.data.get("type"))
        error.data["text"] = self.stops.text
        error.data["usage"] = self._usage()
        self.done = True
        self.req.fail(error, self.buf)


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
