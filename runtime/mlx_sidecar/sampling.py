"""Turning generate's sampling params into mlx-lm samplers and logits processors."""

from .errors import INVALID_PARAMS, RpcError

DEFAULT_TEMPERATURE = 1.0


def check_token_ids(params: dict, vocab_size: int | None) -> None:
    """Token ids in logit_bias and stop_token_ids must exist in the model's vocabulary."""
    if not vocab_size:
        return
    for key in params.get("logit_bias") or {}:
        if int(key) >= vocab_size:
            raise RpcError(INVALID_PARAMS, f"logit_bias names token {key}, but the model's vocabulary has {vocab_size} tokens (0..{vocab_size - 1})", path=f"/logit_bias/{key}")
    for i, t in enumerate(params.get("stop_token_ids") or ()):
        if t >= vocab_size:
            raise RpcError(INVALID_PARAMS, f"stop_token_ids names token {t}, but the model's vocabulary has {vocab_size} tokens", path=f"/stop_token_ids/{i}")


def make_sampler(params: dict):
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    return mlx_make_sampler(
        temp=params.get("temperature", DEFAULT_TEMPERATURE),
        top_p=params.get("top_p", 1.0),
        min_p=params.get("min_p", 0.0),
        top_k=params.get("top_k", 0),
    )


def make_logits_processors(params: dict) -> list:
    from mlx_lm.sample_utils import make_logits_processors as mlx_make_processors

    bias = params.get("logit_bias")
    penalty = params.get("repetition_penalty")
    return mlx_make_processors(
        logit_bias={int(k): float(v) for k, v in bias.items()} if bias else None,
        repetition_penalty=None if penalty in (None, 1, 1.0) else penalty,
        presence_penalty=params.get("presence_penalty") or None,
        frequency_penalty=params.get("frequency_penalty") or None,
    )
