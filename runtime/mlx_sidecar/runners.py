"""Where tokens come from. Each loaded model has one ModelRunner on the engine thread.

A request alone runs through mlx-lm's generate_step (the fastest single stream). When another
request for the same model arrives, the running one moves into mlx-lm's BatchGenerator (its KV
cache goes along) and they decode together: new requests join between steps, finished and
cancelled ones leave at once, each keeps its own sampler and processors. Models whose KV caches
cannot be merged run one request at a time. Earlier prompts' KV caches are reused through
mlx-lm's LRUPromptCache.

A speculative request (speculative.py) speculates while it runs alone. When others arrive it keeps
speculating beside their batch (one step each per engine step) while that gives more tokens per
second overall, measured as it runs; else it moves into the batch and decodes there without
drafts. Either way no stream waits more than one step for it."""

import collections
import logging
import os
import time

from . import defaults, logprobs, pacing, speculative
from .admission import UNLIMITED
from .errors import CANCELLED, GENERATION_FAILED, RpcError
from .sampling import heal_random_state

log = logging.getLogger(__name__)

PREFILL_STEP = 512  # prompt tokens per prefill step; cancellation is seen between steps


def cancelled_error(why: str = "request cancelled") -> RpcError:
    return RpcError(CANCELLED, why, finish_reason="cancelled")


class _Cancelled(Exception):
    """Raised from the prefill progress callback to abandon a request mid-prefill."""


class ModelRunner:
    admission = UNLIMITED  # the engine's Admission (admission.py): requests start only when their KV fits
    # Decode rows and a prompt slice in one forward where the architecture allows (fused.py);
    # MLX_SIDECAR_FUSED=0 keeps mlx-lm's two forwards per step: for bench/head_of_line.py's comparisons only.
    fuse = os.environ.get("MLX_SIDECAR_FUSED", "1") != "0"

    def __init__(self, loaded, max_batch: int, cache_bytes: int):
        from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

        self.loaded = loaded
        self.max_batch = max_batch
        self.pacer = pacing.PrefillPacer(defaults.PREFILL_SLICE_FACTOR)  # prompt slices between decode steps
        self.batchable = all(hasattr(c, "merge") for c in make_prompt_cache(loaded.model))
        self.prompt_cache = LRUPromptCache(max_size=64, max_bytes=cache_bytes) if cache_bytes > 0 else None
        self.waiting: collections.deque = collections.deque()
        self.active: dict = {}        # BatchGenerator uid → Generation
        self.generator = None         # BatchGenerator, made on first use
        self.solo = None              # the Generation running alone, if any
        self._solo_tokens = None      # its generate_step iterator
        self._solo_cache = None       # and its KV cache
        self._solo_spec = False       # True: _solo_tokens is speculative.generate (lists of tokens per step)
        self._batch_s = None          # recent seconds per batch step (moving average)
        self._batch_steps = 0
        self._moved = 0               # steps left without a prompt slice: a lone request just moved into the batch
        self._fusing = False          # the generator holds a fused.FusingModel

    def __len__(self) -> int:
        return len(self.waiting) + len(self.active) + (self.solo is not None)

    def add(self, gen) -> None:
        self.waiting.append(gen)

    # ---- one engine step ----
    def step(self) -> None:
        self._sweep_cancelled()
        if self.waiting and self.admission.fits(self.waiting[0]):
            if self.batchable and (self.solo is not None or self.active or self._two_fit()):
                if self.solo is not None and not self._keep_speculating():
                    self._move_solo_into_batch()
                self._fill_batch()
            elif self.solo is None and not self.active:
                self._start_solo(self.waiting.popleft())
        elif self.solo is not None and self.active and not self._keep_speculating():
            self._move_solo_into_batch()
        if self.solo is not None:
            self._step_solo()
        if self.active:
            started = time.perf_counter()
            self._step_batch()
            took = time.perf_counter() - started
            self._batch_s = took if self._batch_s is None else 0.7 * self._batch_s + 0.3 * took
            self._batch_steps += 1
            if not self.active:  # the batch is gone: its figures with it
                self._batch_s, self._batch_steps = None, 0

    def _two_fit(self) -> bool:
        return len(self.waiting) > 1 and self.admission.fits(self.waiting[0], also=self.waiting[1])

    def _keep_speculating(self) -> bool:
        """A speculating request stays alone beside the batch (one step each per engine step) while
        that gives more tokens per second overall than joining it; once it joins it stays there."""
        if not self._solo_spec or not self.batchable:
            return False
        others = len(self.active) + min(len(self.waiting), self.max_batch - len(self.active))
        return speculative.worth_staying(self.solo.speculative, others, self._batch_s, self._batch_steps)

    def abort(self, error_factory) -> None:
        """End every request of this runner with an error (engine stopping, model unloaded)."""
        gens = list(self.active.values()) + list(self.waiting) + ([self.solo] if self.solo else [])
        for gen in gens:
            if not gen.done:
                gen.finish_error(error_factory())
        self.active.clear()
        self.waiting.clear()
        self.solo = self._solo_tokens = self._solo_cache = None
        self.generator = None

    # ---- prompt cache ----
    def _cached(self, ids: list[int]):
        """(KV cache or None, tokens still to prefill) for a prompt, from earlier requests' caches."""
        if self.prompt_cache is None:
            return None, ids
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self.prompt_cache.fetch_nearest_cache(self.loaded.id, ids)
        if cache is not None and not rest:
            # An exact hit: keep the last prompt token to feed, so the model yields logits.
            if not can_trim_prompt_cache(cache):
                return None, ids
            trim_prompt_cache(cache, 1)
            rest = ids[-1:]
        return cache, rest

    def _remember(self, tokens, cache) -> None:
        if self.prompt_cache is not None and cache is not None and tokens:
            import mlx.core as mx

            # A row taken out of a batch is a lazy copy that holds the whole batch's KV buffers
            # until evaluated: make the copy now, or every kept row pins a full batch (B² memory).
            mx.eval([c.state for c in cache])
            self.prompt_cache.insert_cache(self.loaded.id, list(tokens), cache)

    # ---- cancellation ----
    def _sweep_cancelled(self) -> None:
        for gen in [g for g in self.waiting if g.req.cancel_requested]:
            self.waiting.remove(gen)
            gen.finish_error(cancelled_error())
        if self.solo is not None and self.solo.req.cancel_requested:
            self._end_solo(cancelled_error())
        cancelled = [uid for uid, g in self.active.items() if g.req.cancel_requested]
        if cancelled:
            caches = self.generator.remove(cancelled, return_prompt_caches=True)
            for uid in cancelled:
                self.active.pop(uid).finish_error(cancelled_error())
                if uid in caches:
                    self._remember(caches[uid][1], caches[uid][0])

    # ---- a request alone ----
    def _start_solo(self, gen) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        self.admission.reserve(gen)
        cache, rest = self._cached(gen.prompt_ids)
        gen.begin(len(gen.prompt_ids) - len(rest))
        self._solo_cache = cache if cache is not None else make_prompt_cache(self.loaded.model)

        def check(done, total):
            if gen.req.cancel_requested:
                raise _Cancelled()

        self._solo_spec = getattr(gen, "speculative", None) is not None and speculative.usable(self._solo_cache)
        if self._solo_spec:
            self._solo_tokens = speculative.generate(rest, gen, self._solo_cache, check)
        else:
            self._solo_tokens = generate_step(mx.array(rest), self.loaded.model, max_tokens=gen.max_tokens,
                                              sampler=gen.sampler, logits_processors=gen.processors,
                                              prompt_cache=self._solo_cache, prefill_step_size=PREFILL_STEP,
                                              prompt_progress_callback=check)
        self.solo = gen

    def _step_solo(self) -> None:
        gen = self.solo
        try:
            if self._solo_spec:  # several tokens per step: (token, from the draft, logprobs row)
                return self._take_speculated(gen, next(self._solo_tokens))
            started = time.perf_counter()
            token, row = next(self._solo_tokens)
            if gen.tokens:  # a decode step (the first one also prefilled): what a joiner must not starve
                self.pacer.observe_decode(time.perf_counter() - started)
            lp = logprobs.pick([row], [token], [gen.top_logprobs])[0] if gen.top_logprobs is not None else None
        except StopIteration:
            gen.finish("length")
            return self._end_solo()
        except _Cancelled:
            return self._end_solo(cancelled_error())
        except Exception as e:
            log.exception("generation failed")
            heal_random_state()
            return self._end_solo(RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
        if gen.on_token(token, lp):
            self._end_solo()

    def _take_speculated(self, gen, out) -> None:
        lps = logprobs.pick([r for _, _, r in out], [t for t, _, _ in out], [gen.top_logprobs] * len(out)) \
            if gen.top_logprobs is not None else [None] * len(out)
        for (token, drafted, _), lp in zip(out, lps):
            if gen.on_token(token, lp, drafted=drafted):
                return self._end_solo()

    def _end_solo(self, error=None) -> None:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        gen, cache = self.solo, self._solo_cache
        self.solo = self._solo_tokens = self._solo_cache = None
        if error is not None:
            gen.finish_error(error)
        # Keep the prompt's part of the KV cache for later prompts that share its prefix (not after a
        # failure: the cache may be half-written).
        if (error is None or error.code == CANCELLED) and cache is not None and can_trim_prompt_cache(cache):
            extra = cache[0].offset - len(gen.prompt_ids)
            if extra >= 0:
                trim_prompt_cache(cache, extra)
                self._remember(gen.prompt_ids, cache)

    def _move_solo_into_batch(self) -> None:
        """Hand the lone request to the BatchGenerator mid-stream. generate_step has already fed
        its last token and drawn the next one; drop both (trim the cache by one, rewind the
        sampler) and let the batch feed that token again, so the output is unchanged."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        gen, cache = self.solo, self._solo_cache
        if not gen.tokens or not can_trim_prompt_cache(cache):
            return  # not started yet or cannot rewind: let it finish alone
        self.solo = self._solo_tokens = self._solo_cache = None
        self._moved = 2
        if self._solo_spec:
            # A speculative step ends with its last token not yet fed and nothing drawn ahead:
            # the batch feeds that token, without speculation from here on.
            self._solo_spec = False
            return self._insert(gen, [gen.tokens[-1]], cache, gen.prompt_ids + gen.tokens[:-1], gen.max_tokens - gen.completion)
        trim_prompt_cache(cache, 1)
        if hasattr(gen.sampler, "rewind"):
            gen.sampler.rewind()
        for processor in gen.processors:
            if hasattr(processor, "rewind"):  # stateful ones (response_format) take the call back too
                processor.rewind()
        self._insert(gen, [gen.tokens[-1]], cache, gen.prompt_ids + gen.tokens[:-1], gen.max_tokens - gen.completion)

    # ---- the batch ----
    def _insert(self, gen, prompt, cache, cached_tokens, max_tokens) -> None:
        from mlx_lm.generate import BatchGenerator, StopSequences

        if self.generator is None:
            model = self.loaded.model
            if self.fuse:
                from . import fused

                model = fused.FusingModel(model) if fused.prepare(model) else model
            self._fusing = model is not self.loaded.model
            self.pacer.floor = pacing.FUSED_MIN_SLICE if self._fusing else pacing.MIN_SLICE
            self.generator = BatchGenerator(model, completion_batch_size=self.max_batch,
                                            prefill_batch_size=min(self.max_batch, 8), prefill_step_size=PREFILL_STEP)
            if self._fusing:  # prompts join the decoding rows as parts, without padding or copying (fused.Parted)
                fused.join_in_parts(self.generator)
        uid = self.generator.insert(
            [prompt], max_tokens=[max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[cached_tokens] if cache is not None else None,
            samplers=[gen.sampler], logits_processors=[gen.processors],
            stop_sequences=[StopSequences([[t] for t in gen.stop_ids])],
        )[0]
        self.active[uid] = gen

    def _fill_batch(self) -> None:
        while self.waiting and len(self.active) < self.max_batch and self.admission.fits(self.waiting[0]):
            gen = self.waiting.popleft()
            self.admission.reserve(gen)
            cache, rest = self._cached(gen.prompt_ids)
            gen.begin(len(gen.prompt_ids) - len(rest))
            self._insert(gen, rest, cache, gen.prompt_ids[: gen.cached_tokens], gen.max_tokens)

    def _step_batch(self) -> None:
        # Size this step's prompt slice so running streams are not starved (pacing.py).
        waiting_first = sum(1 for g in self.active.values() if g.first_at is None)
        decoding = waiting_first < len(self.active)
        # The step that takes in a moved request re-feeds its last token and yields nothing for it; the
        # token that forward draws comes out at the end of the next step. A prompt slice in either
        # step would land inside that one gap, already two forwards long.
        size = self.pacer.slice(decoding, waiting_first)
        moving, self._moved = self._moved > 0, max(0, self._moved - 1)
        self.generator.prefill_step_size = 0 if moving else size
        fusing = self._fusing
        try:
            if fusing:  # a plain slice beside decoding rows: one forward for both (fused.py)
                from . import fused

                rows = fused.planned_slice(self.generator)
                if rows is not None:
                    self.generator.model.arm(self.generator, rows)
            started = time.perf_counter()
            prompt_responses, responses = self.generator.next()
            took = time.perf_counter() - started
            if fusing and not self.generator.model.disarm():
                raise RuntimeError("fused step: the prompt slice was computed but the batch never took it")
            # A move's steps also finish its re-fed forward: not a decode step the pacer should learn.
            self.pacer.observe(prompt_responses, took, bool(responses) and not moving)
            if prompt_responses and log.isEnabledFor(logging.DEBUG):  # --log-level debug: what pacing did
                log.debug("batch step %.1f ms: %d decoded, prompt slice %d, prompts at %s", took * 1000, len(responses),
                          self.generator.prefill_step_size, [r.progress for r in prompt_responses])
        except Exception as e:
            log.exception("batched generation failed")
            heal_random_state()
            for gen in self.active.values():
                gen.finish_error(RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
            self.active.clear()
            self.generator = None
            return
        ended = []
        picked = self._pick_logprobs(responses)
        for r in responses:
            gen = self.active.get(r.uid)
            if gen is None:
                continue
            if gen.on_token(r.token, picked.get(r.uid)) or r.finish_reason is not None:
                if not gen.done:  # the generator's own length limit (ours matches it)
                    gen.finish("length")
                del self.active[r.uid]
                if r.finish_reason is not None:
                    self._remember(r.all_tokens, r.prompt_cache)
                else:
                    ended.append(r.uid)  # a stop string: still in the generator
        if ended:
            caches = self.generator.remove(ended, return_prompt_caches=True)
            for uid, (cache, tokens) in caches.items():
                self._remember(tokens, cache)

    def _pick_logprobs(self, responses) -> dict:
        """uid → (logprob, top alternatives) for the requests that asked for logprobs: one top-k
        over all their rows at once. Nothing at all happens when none asked."""
        want = [r for r in responses if r.uid in self.active and self.active[r.uid].top_logprobs is not None]
        if not want:
            return {}
        try:
            picks = logprobs.pick([r.logprobs for r in want], [r.token for r in want],
                                  [self.active[r.uid].top_logprobs for r in want])
        except Exception:
            log.exception("could not compute logprobs")
            return {}
        return {r.uid: p for r, p in zip(want, picks)}
