"""One generate request on the engine thread: its prompt, its sampler, and what happens to each
token it gets (text, stop strings, chunks), up to its one response. Where the tokens come from
(a batch of many requests, or a request on its own) is a runner's business: see runners.py."""

import logging
import time

from . import constraints, logprobs, prompts, sampling, spec, speculative, tools
from .errors import GENERATION_FAILED, INVALID_PARAMS, RpcError, model_not_found
from .stops import StopText
from .writer import ChunkBuffer

log = logging.getLogger(__name__)



class Generation:
    metrics = None  # the runtime's Metrics, set by the generate method
    _last_at = 0.0  # when the previous token arrived
    def __init__(self, req, params: dict, writer):
        self.req = req
        self.params = params
        self.writer = writer
        self.model_id = params["model"]
        self.stream = params.get("stream", spec.default("generate", "stream")) and not req.is_notification
        self.loaded = None
        self.buf: ChunkBuffer | None = None
        self.prompt_ids: list[int] = []
        self.tokens: list[int] = []     # generated so far (not counting a final stop token)
        self.cached_tokens = 0
        self.completion = 0
        self.started = self.first_at = None
        self.stops = StopText(_stop_list(params.get("stop")))
        self.detok = None
        self.done = False
        self.constraint = None          # response_format's logits processor (constraints.py)
        self.images = []                # decoded images (images.py), set before the engine sees it
        self.vision = None              # a vision model's prepared inputs (vision.py)
        self.format = params.get("response_format")   # or a forced tool call's grammar (tools.py)
        self.tool_plan = None           # tools.Plan when the request has tools
        self.tool_out = None            # tools.AutoCalls or tools.ForcedCall: calls cut out of the output
        # logprobs: None when not asked for (costs nothing), else top_logprobs (0..20).
        self.top_logprobs = params.get("top_logprobs", 0) if params.get("logprobs") else None
        self.logprob_items: list = []   # OpenAI's logprobs.content, one per generated token
        self.speculative = None         # speculative.Plan when the request speculates
        self.kv_need = 0                # KV bytes it holds at its longest (admission.py)

    # ---- engine thread ----
    def prepare(self, models: dict, admission=None) -> None:
        """Tokenize and check limits; raises RpcError before any compute."""
        loaded = models.get(self.model_id)
        if loaded is None:
            raise model_not_found(self.model_id)
        self.loaded = loaded
        params = self.params
        self.started = time.monotonic()
        if loaded.kind == "vision":
            from . import vision

            if self.tool_plan is not None:
                raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} is a vision model; tools work with text models only", path="/tools")

            self.vision = vision.prepare(loaded, params, self.images)
            self.images = []   # the processor's pixel values carry them from here
            ids = self.vision.ids
        else:
            if params.get("images"):
                raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} takes text only; load a vision model to send images", path="/images/0")
            ids, _ = self._render(loaded)
        if not ids:
            raise RpcError(INVALID_PARAMS, "the prompt is empty after tokenization; send some text",
                           path="/prompt" if "prompt" in params else "/messages")
        ctx = admission.context_limit(loaded) if admission is not None else loaded.context_length
        max_tokens = params.get("max_tokens", spec.default("generate", "max_tokens"))
        if ctx is not None:
            if len(ids) >= ctx:
                # Refused, never truncated: the host decides what to cut.
                raise RpcError(INVALID_PARAMS, f"the prompt has {len(ids)} tokens but the context of model {loaded.id!r} is {ctx} "
                               "(prompt and output together); shorten the prompt", type="context_length_exceeded",
                               path="/prompt" if "prompt" in params else "/messages", prompt_tokens=len(ids), context_length=ctx)
            max_tokens = min(max_tokens, ctx - len(ids))
        if "top_logprobs" in params and not params.get("logprobs"):
            raise RpcError(INVALID_PARAMS, "top_logprobs needs logprobs: true (as in OpenAI's API)", path="/top_logprobs")
        vocab_size = loaded.config.get("vocab_size") or (loaded.config.get("text_config") or {}).get("vocab_size")
        sampling.check_against_model(params, vocab_size)
        self.prompt_ids = ids
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(loaded.tokenizer.eos_token_ids) | frozenset(params.get("stop_token_ids") or ())
        self.sampler = sampling.make_sampler(params, vocab_size)
        self.processors = sampling.make_logits_processors(params)
        if self.format:
            # The format's mask runs last, after any bias or penalty.
            self.constraint = constraints.start(loaded, self.format, self.stop_ids)
            self.processors = list(self.processors) + [self.constraint]
        self.speculative = speculative.plan(loaded, params)
        if admission is not None:
            from .admission import need

            draft = self.speculative.draft if self.speculative is not None and self.speculative.kind == "draft" else None
            self.kv_need = need(loaded, len(ids), max_tokens, draft)
        if self.stream:
            opts = params.get("stream_options") or {}
            self.buf = ChunkBuffer(self.req.id, opts.get("chunk_tokens", loaded.info["chunk_tokens"]),
                                   opts.get("max_latency_ms", spec.default("generate", "stream_options", "max_latency_ms")) / 1000.0,
                                   with_logprobs=self.top_logprobs is not None)
        self.detok = loaded.tokenizer.detokenizer
        if self.top_logprobs is not None:
            self._table = logprobs.table(loaded.tokenizer)

    def _render(self, loaded):
        """Token ids of the prompt; with tools, through the template or the fallback prompt."""
        plan = self.tool_plan
        if plan is None:
            return prompts.render(loaded.tokenizer, self.params, loaded.id)
        tok = loaded.tokenizer
        messages, template_tools = tools.render_messages(tok, plan, self.params["messages"])
        if plan.forced:
            self.tool_out = tools.ForcedCall()
        elif plan.choice == "auto":
            if tools.template_route(tok):
                self.tool_out = tools.AutoCalls(tok.tool_call_start, tok.tool_call_end, tok.tool_parser, plan.tools)
            else:
                from mlx_lm.tool_parsers import json_tools

                self.tool_out = tools.AutoCalls(tools.FALLBACK_START, tools.FALLBACK_END, json_tools.parse_tool_call, plan.tools)
        return prompts.render(tok, {**self.params, "messages": messages}, loaded.id, tools=template_tools)

    def _cut_calls(self, piece: str):
        """(text to send, tool_calls deltas) for newly released text."""
        out = self.tool_out
        if out is None:
            return piece, None
        if isinstance(out, tools.ForcedCall):
            return "", out.feed(piece) or None
        text, deltas = out.feed(piece)
        return text, deltas or None

    def _text(self) -> str:
        out = self.tool_out
        if out is None:
            return self.stops.text
        return "" if isinstance(out, tools.ForcedCall) else out.text

    def begin(self, cached_tokens: int) -> None:
        """The runner starts work on this request (after any wait for a batch slot)."""
        self.started = time.monotonic()
        self.cached_tokens = cached_tokens

    def on_token(self, token: int, lp=None, drafted: bool = False) -> bool:
        """Take one generated token (and, when logprobs were asked for, lp = (its logprob, top
        alternatives) from logprobs.pick; drafted: a speculative draft proposed it); returns True when this
        request has now ended (and answered)."""
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        elif self.metrics is not None:
            self.metrics.inter_token_ms.append((now - self._last_at) * 1000)
        self._last_at = now
        if token in self.stop_ids:
            self.finish("stop")
            return True
        self.completion += 1
        self.tokens.append(token)
        if drafted and self.speculative is not None:
            self.speculative.accepted += 1
        self.detok.add_token(token)
        piece = self.stops.feed(self.detok.last_segment)
        deltas = None
        if self.tool_out is not None:
            piece, deltas = self._cut_calls(piece)
        item = None
        if self.top_logprobs is not None and lp is not None:
            item = logprobs.entry(self._table, token, lp[0], lp[1])
            self.logprob_items.append(item)
        if self.buf is not None:
            extra = None  # other chunk fields; a plain token allocates nothing here
            if deltas or drafted:
                extra = {"tool_calls": deltas} if deltas else {}
                if drafted:
                    extra["draft_tokens"] = 1   # the writer sums these per chunk
            self.writer.add_tokens(self.buf, token, piece, self.completion == 1, item, extra)
        if self.stops.stopped:
            self.finish("stop")
            return True
        if self.constraint is not None:
            if self.constraint.note(token):
                self.finish("stop")  # the format is complete: only an end token could follow
                return True
            if self.constraint.failed:
                self.finish_error(RpcError(GENERATION_FAILED, f"response_format broke: {self.constraint.failed.splitlines()[0]}"))
                return True
        if self.completion >= self.max_tokens:
            self.finish("length")
            return True
        return False

    def _drain_text(self) -> None:
        """Decode what the detokenizer still holds and release text held for stop matching."""
        if self.detok is None:
            return
        self.detok.finalize()
        piece = self.stops.feed(self.detok.last_segment)
        if not self.stops.stopped:
            piece += self.stops.rest()
        deltas = None
        if self.tool_out is not None:
            piece, deltas = self._cut_calls(piece)
            if isinstance(self.tool_out, tools.AutoCalls):
                rest, more = self.tool_out.finish()
                piece, deltas = piece + rest, (deltas or []) + more or None
            elif self.tool_out.result() is None:
                # A forced call cut short (max_tokens, a stop string): its text is the answer.
                piece = self.tool_out.raw
                self.tool_out = None
        if (piece or deltas) and self.buf is not None:
            self.writer.add_tokens(self.buf, (), piece, flush=False, extra={"tool_calls": deltas} if deltas else None)

    def usage(self) -> dict:
        usage = {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.completion,
                 "total_tokens": len(self.prompt_ids) + self.completion}
        if self.cached_tokens:
            usage["cached_tokens"] = self.cached_tokens
        if self.speculative is not None:
            usage.update(self.speculative.usage())
        return usage

    def finish(self, reason: str) -> None:
        self._drain_text()
        now = time.monotonic()
        first = self.first_at or now
        decode_s = now - first
        result = {
            "text": self._text(),
            "finish_reason": reason,
            "usage": self.usage(),
            "timings": {
                "ttft_ms": round((first - self.req.received_at) * 1000, 3),
                "prompt_tps": round((len(self.prompt_ids) - self.cached_tokens) / max(first - self.started, 1e-9), 2),
                "generation_tps": round((self.completion - 1) / decode_s, 2) if self.completion > 1 and decode_s > 0 else 0.0,
                "total_ms": round((now - self.req.received_at) * 1000, 3),
                "queued_ms": round((self.started - self.req.received_at) * 1000, 3),
            },
            "model": self.model_id,
        }
        if self.vision is not None and self.vision.images:
            result["images"] = self.vision.images
        if self.tool_plan is not None:
            self._tool_result(result)
        elif self.constraint is not None:
            result.update(self.constraint.result(result["text"], reason, self.stops.stopped))
        if self.top_logprobs is not None:
            result["logprobs"] = {"content": self.logprob_items}
        self.done = True
        self._record()
        self.req.respond(result, self.buf)

    def finish_error(self, error: RpcError) -> None:
        """End with an error that carries the text so far and usage (cancelled, unloaded, failed)."""
        self._drain_text()
        error.data.setdefault("finish_reason", "cancelled" if error.data.get("type") == "cancelled" else "error")
        error.data["text"] = self._text()
        error.data["usage"] = self.usage()
        self.done = True
        self._record()
        self.req.fail(error, self.buf)

    def _record(self) -> None:
        """Tokens and latencies for runtime/metrics."""
        if self.metrics is None:
            return
        started = self.started or self.req.received_at
        self.metrics.generation_done(
            len(self.prompt_ids), self.cached_tokens, self.completion,
            (self.first_at - self.req.received_at) * 1000 if self.first_at else None,
            (started - self.req.received_at) * 1000)


    def _tool_result(self, result: dict) -> None:
        out = self.tool_out
        calls = []
        if isinstance(out, tools.ForcedCall):
            calls = [out.result()]
        elif isinstance(out, tools.AutoCalls):
            calls = out.calls
            if out.error:
                result["tool_parse_error"] = out.error
        elif self.tool_plan.forced:  # cut short: the partial call is the text
            result["tool_parse_error"] = "the output ended before the tool call was complete; it is left in the text"
            result["text"] = self.stops.text
        if calls:
            result["tool_calls"] = calls
            if result["finish_reason"] == "stop":
                result["finish_reason"] = "tool_calls"


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
