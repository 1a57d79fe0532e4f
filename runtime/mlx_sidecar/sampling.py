"""Turning generate's sampling params into mlx-lm samplers and logits processors."""

from functools import lru_cache

from . import spec
from .errors import INVALID_PARAMS, RpcError


def check_against_model(params: dict, vocab_size: int | None) -> None:
    """What only the model can check: top_k and token ids in logit_bias and stop_token_ids must fit
    its vocabulary. Checked before any compute: a bad value must never reach mlx's compiled samplers."""
    if not vocab_size:
        return
    top_k = params.get("top_k", 0)
    if top_k > vocab_size:
        raise RpcError(INVALID_PARAMS, f"top_k is {top_k}, but the model's vocabulary has {vocab_size} tokens; use 1..{vocab_size}, or 0 to turn it off",
                       path="/top_k")
    for key in params.get("logit_bias") or {}:
        if int(key) >= vocab_size:
            raise RpcError(INVALID_PARAMS, f"logit_bias names token {key}, but the model's vocabulary has {vocab_size} tokens (0..{vocab_size - 1})", path=f"/logit_bias/{key}")
    for i, t in enumerate(params.get("stop_token_ids") or ()):
        if t >= vocab_size:
            raise RpcError(INVALID_PARAMS, f"stop_token_ids names token {t}, but the model's vocabulary has {vocab_size} tokens", path=f"/stop_token_ids/{i}")


def _settings(params: dict, vocab_size: int | None = None):
    top_k = int(params.get("top_k", spec.default("generate", "top_k")))
    if vocab_size and top_k >= vocab_size:
        top_k = 0  # keeping every token is no filter at all (mlx-lm refuses top_k == vocab)
    return (float(params.get("temperature", spec.default("generate", "temperature"))),
            float(params.get("top_p", spec.default("generate", "top_p"))),
            float(params.get("min_p", spec.default("generate", "min_p"))), top_k)


@lru_cache(maxsize=64)
def _shared(temp, top_p, min_p, top_k):
    # One sampler object per setting: BatchGenerator samples a batch in one call when they match.
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    return mlx_make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)


def make_sampler(params: dict, vocab_size: int | None = None):
    temp, top_p, min_p, top_k = _settings(params, vocab_size)
    if "seed" not in params or temp == 0:
        return _shared(temp, top_p, min_p, top_k)
    return _seeded(int(params["seed"]), temp, top_p, min_p, top_k)


def _seeded(seed: int, temp, top_p, min_p, top_k):
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    return SeededSampler(seed, temp, filters)


class SeededSampler:
    """mlx-lm's filters with a random key of the request's own, so its samples are the same alone
    or in a batch. `rewind` takes back the last draw (used when a request moves into a batch)."""

    def __init__(self, seed: int, temp: float, filters):
        import mlx.core as mx

        self._key = mx.random.key(seed & 0xFFFFFFFFFFFFFFFF)
        self._previous = self._key
        self._temp = temp
        self._filters = filters

    def __call__(self, logprobs):
        import mlx.core as mx

        self._previous = self._key
        self._key, sub = mx.random.split(self._key)
        for f in self._filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1 / self._temp), key=sub)

    def rewind(self) -> None:
        self._key = self._previous


def make_logits_processors(params: dict) -> list:
    from mlx_lm.sample_utils import make_logits_processors as mlx_make_processors

    bias = params.get("logit_bias")
    penalty = params.get("repetition_penalty")
    presence = params.get("presence_penalty")
    frequency = params.get("frequency_penalty")
    return mlx_make_processors(
        logit_bias={int(k): float(v) for k, v in bias.items()} if bias else None,
        repetition_penalty=None if penalty in (None, 1, 1.0) else float(penalty),
        presence_penalty=float(presence) if presence else None,
        frequency_penalty=float(frequency) if frequency else None,
    )


def heal_random_state() -> None:
    """mlx's compiled samplers swap mx.random.state for a tracer while they trace; an exception
    there leaves the tracer behind and every later sample fails. Reseed if that happened."""
    import os

    import mlx.core as mx

    try:
        mx.eval(mx.random.uniform(shape=(1,)))
    except Exception:
        mx.random.seed(int.from_bytes(os.urandom(4), "little"))
