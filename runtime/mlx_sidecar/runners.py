"""Where tokens come from. Each loaded model has one runner on the engine thread:

- `ModelBatch`: mlx-lm's BatchGenerator. Concurrent requests decode together; new ones join between
  steps, finished and cancelled ones leave at once; each keeps its own sampler and processors.
- `Solo`: one request at a time through mlx-lm's generate_step, for models whose caches cannot be
  batched (e.g. chunked attention caches).

Both keep at most `max_batch` requests running and the rest waiting in order, and reuse KV caches of
earlier prompts through mlx-lm's LRUPromptCache."""

import collections
import logging

from .errors import CANCELLED, GENERATION_FAILED, RpcError

log = logging.getLogger(__name__)

PREFILL_STEP = 512  # prompt tokens per prefill step; cancellation is seen between steps


def cancelled_error(why: str = "request cancelled") -> RpcError:
    return RpcError(CANCELLED, why, finish_reason="cancelled")


def is_batchable(model) -> bool:
    from mlx_lm.models.cache import make_prompt_cache

    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def make_runner(loaded, max_batch: int, cache_bytes: int):
    cls = ModelBatch if is_batchable(loaded.model) else Solo
    return cls(loaded, max_batch, cache_bytes)


class _Runner:
    def __init__(self, loaded, max_batch: int, cache_bytes: int):
        from mlx_lm.models.cache import LRUPromptCache

        self.loaded = loaded
        self.max_batch = max_batch
        self.waiting: collections.deque = collections.deque()
        self.active: dict = {}  # key → Generation
        self.prompt_cache = LRUPromptCache(max_size=64, max_bytes=cache_bytes) if cache_bytes > 0 else None

    def __len__(self) -> int:
        return len(self.waiting) + len(self.active)

    def add(self, gen) -> None:
        self.waiting.append(gen)

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
            self.prompt_cache.insert_cache(self.loaded.id, list(tokens), cache)

    def _sweep_waiting(self) -> None:
        for gen in [g for g in self.waiting if g.req.cancel_requested]:
            self.waiting.remove(gen)
            gen.finish_error(cancelled_error())

    def abort(self, error_factory) -> None:
        """End every request of this runner with an error (engine stopping, model unloaded)."""
        for gen in list(self.active.values()) + list(self.waiting):
            if not gen.done:
                gen.finish_error(error_factory())
        self.active.clear()
        self.waiting.clear()


class ModelBatch(_Runner):
    def __init__(self, loaded, max_batch, cache_bytes):
        super().__init__(loaded, max_batch, cache_bytes)
        self._new_generator()

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator

        self.generator = BatchGenerator(self.loaded.model, completion_batch_size=self.max_batch,
                                        prefill_batch_size=min(self.max_batch, 8), prefill_step_size=PREFILL_STEP)

    def step(self) -> None:
        from mlx_lm.generate import StopSequences

        self._sweep_waiting()
        cancelled = [uid for uid, g in self.active.items() if g.req.cancel_requested]
        if cancelled:
            caches = self.generator.remove(cancelled, return_prompt_caches=True)
            for uid in cancelled:
                self.active.pop(uid).finish_error(cancelled_error())
                if uid in caches:
                    self._remember(caches[uid][1], caches[uid][0])
        while self.waiting and len(self.active) < self.max_batch:
            gen = self.waiting.popleft()
            cache, rest = self._cached(gen.prompt_ids)
            gen.cached_tokens = len(gen.prompt_ids) - len(rest)
            uid = self.generator.insert(
                [rest], max_tokens=[gen.max_tokens],
                caches=[cache] if cache is not None else None,
                all_tokens=[gen.prompt_ids[: gen.cached_tokens]] if cache is not None else None,
                samplers=[gen.sampler], logits_processors=[gen.processors],
                stop_sequences=[StopSequences([[t] for t in gen.stop_ids])],
            )[0]
            self.active[uid] = gen
        if not self.active:
            return
        try:
            _, responses = self.generator.next()
        except Exception as e:
            log.exception("batched generation failed")
            err = lambda: RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}")
            for gen in self.active.values():
                gen.finish_error(err())
            self.active.clear()
            self._new_generator()
            return
        ended = []
        for r in responses:
            gen = self.active.get(r.uid)
            if gen is None:
                continue
            if gen.on_token(r.token) or r.finish_reason is not None:
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


class Solo(_Runner):
    """One request at a time (models whose KV caches cannot be merged into a batch)."""

    def __init__(self, loaded, max_batch, cache_bytes):
        super().__init__(loaded, 1, cache_bytes)
        self._tokens = None
        self._cache = None

    def step(self) -> None:
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        self._sweep_waiting()
        gen = next(iter(self.active.values()), None)
        if gen is None:
            if not self.waiting:
                return
            gen = self.waiting.popleft()
            import mlx.core as mx

            cache, rest = self._cached(gen.prompt_ids)
            gen.cached_tokens = len(gen.prompt_ids) - len(rest)
            self._cache = cache if cache is not None else make_prompt_cache(self.loaded.model)

            def check(done, total, gen=gen):
                if gen.req.cancel_requested:
                    raise _Cancelled()

            self._tokens = generate_step(mx.array(rest), self.loaded.model, max_tokens=gen.max_tokens,
                                         sampler=gen.sampler, logits_processors=gen.processors,
                                         prompt_cache=self._cache, prefill_step_size=PREFILL_STEP,
                                         prompt_progress_callback=check)
            self.active[0] = gen
        if gen.req.cancel_requested:
            return self._end(gen, cancelled_error())
        try:
            token, _ = next(self._tokens)
        except StopIteration:
            gen.finish("length")
            return self._end(gen)
        except _Cancelled:
            return self._end(gen, cancelled_error())
        except Exception as e:
            log.exception("generation failed")
            return self._end(gen, RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
        if gen.on_token(token):
            self._end(gen)

    def _end(self, gen, error=None) -> None:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if error is not None:
            gen.finish_error(error)
        self.active.clear()
        self._tokens = None
        cache, self._cache = self._cache, None
        # Keep the prompt's part of the KV cache for later prompts that share its prefix.
        if cache is not None and can_trim_prompt_cache(cache):
            extra = cache[0].offset - len(gen.prompt_ids)
            if extra >= 0:
                trim_prompt_cache(cache, extra)
                self._remember(gen.prompt_ids, cache)


class _Cancelled(Exception):
    """Raised from the prefill progress callback to abandon a request mid-prefill."""
