"""One forward per batch step: the decoding rows and a waiting prompt's slice together.

mlx-lm's BatchGenerator runs a step as two model calls, the decode rows' and then the prompt
slice's, and each reads every weight. On a machine where that read is most of a decode step, a
running stream's gap is two forwards and a long prompt pays a whole extra forward per slice.
Here, when a step is a plain slice beside decoding rows, both go through the model as one
sequence: embeddings, norms, MLPs and the attention projections see decode and slice tokens in one
matmul; rope, the KV cache and attention run per part with that part's cache and mask; the last
norm keeps only the decode rows, so the vocabulary projection runs for them alone. mlx-lm's own
step logic stays as it is: the model it holds is a `FusingModel`, told before `next()` which slice
the step will take; it serves the decode call with the fused forward and the slice's call from
what that forward wrote.

Only architectures whose layout this was checked against (tests/test_fused.py) take this path."""

from __future__ import annotations

import logging

import mlx.core as mx

log = logging.getLogger(__name__)

# model_type values whose modules follow the layout used here: layers[i].self_attn(x, mask, cache)
# with llama's projections, heads and rope (qwen3: plus per-head norms), and a final `model.norm`
# right before the vocabulary projection.
ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

_rows = None  # decode rows of the fused forward running now (the engine thread is the only caller)


class _Parts:
    """A layer's cache for the fused forward: the decode rows' cache and the slice's."""

    def __init__(self, gen, prompt, rows: int, prompts: int, length: int):
        self.gen, self.prompt = gen, prompt
        self.rows, self.prompts, self.length = rows, prompts, length

    def make_mask(self, n, return_array=False, window_size=None):
        # Called once per mask kind before any layer runs: both parts' masks, from their own offsets.
        return _Masks(self.gen.make_mask(1, return_array=return_array, window_size=window_size),
                      self.prompt.make_mask(self.length, return_array=return_array, window_size=window_size))


class _Masks:
    def __init__(self, gen, prompt):
        self.gen, self.prompt = gen, prompt


def _attention_call(base):
    def __call__(self, x, mask=None, cache=None, **kwargs):
        if not isinstance(cache, _Parts):
            return base(self, x, mask, cache, **kwargs)
        masks = (mask.gen, mask.prompt) if isinstance(mask, _Masks) else (mask, mask)
        # The projections see both parts at once (each weight read once); rope, the cache and the
        # attention itself run per part, as mlx-lm's Attention.__call__ does for one batch.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        shapes = ((cache.rows, 1), (cache.prompts, cache.length))
        out, at = [], 0
        for (rows, length), part_mask, part_cache in zip(shapes, masks, (cache.gen, cache.prompt)):
            end = at + rows * length
            out.append(_attend(self, q[:, at:end], k[:, at:end], v[:, at:end], rows, length, part_mask, part_cache))
            at = end
        return self.o_proj(mx.concatenate(out, axis=1))
    return __call__


def _attend(self, q, k, v, rows, length, mask, cache):
    """One part's attention, from its projections: what llama's, qwen2's and qwen3's Attention do
    between their projections and o_proj (qwen3 adds the per-head norms)."""
    from mlx_lm.models.base import scaled_dot_product_attention

    q = q.reshape(rows, length, self.n_heads, -1)
    k = k.reshape(rows, length, self.n_kv_heads, -1)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    v = v.reshape(rows, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
    k, v = cache.update_and_fetch(k, v)
    o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
    return o.transpose(0, 2, 1, 3).reshape(1, rows * length, -1)


def _final_norm_call(base):
    def __call__(self, x, *args, **kwargs):
        if _rows is not None and x.ndim == 3 and x.shape[0] == 1 and x.shape[1] > _rows:
            x = x[:, :_rows].reshape(_rows, 1, x.shape[-1])  # only the decode rows need logits
        return base(self, x, *args, **kwargs)
    return __call__


_classes: dict = {}


def _swap_class(module, make) -> None:
    """Give one module instance a subclass whose __call__ is make(base __call__); its parameters,
    their names and every other instance of the class stay as they are."""
    cls = type(module)
    if getattr(cls, "_sidecar_fused", False):
        return
    key = (cls, make)
    if key not in _classes:
        _classes[key] = type(cls.__name__, (cls,), {"__call__": make(cls.__call__), "_sidecar_fused": True})
    module.__class__ = _classes[key]


def prepare(model) -> bool:
    """Make `model` able to run fused steps; False when its architecture is not one checked here."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    inner = getattr(model, "model", None)
    if getattr(model, "model_type", None) not in ARCHITECTURES or inner is None:
        return False
    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        return False  # sliding windows, quantized or recurrent caches: masks and offsets differ
    norm, layers = getattr(inner, "norm", None), getattr(inner, "layers", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads", "scale", "rope")
    if norm is None or not layers or not all(all(hasattr(getattr(layer, "self_attn", None), a) for a in needed)
                                             for layer in layers):
        return False
    for layer in layers:
        _swap_class(layer.self_attn, _attention_call)
    _swap_class(norm, _final_norm_call)
    return True


def forward(model, inputs, gen_cache, tokens, prompt_cache):
    """Decode logits (rows, 1, vocab) for `inputs` (rows, 1) and the slice `tokens` (prompts, length)
    written into `prompt_cache`, in one pass through `model` (prepared with `prepare`)."""
    global _rows
    rows = inputs.shape[0]
    prompts, length = tokens.shape
    sequence = mx.concatenate([inputs.reshape(1, rows), tokens.astype(inputs.dtype).reshape(1, prompts * length)], axis=1)
    parts = [_Parts(g, p, rows, prompts, length) for g, p in zip(gen_cache, prompt_cache)]
    _rows = rows
    try:
        return model(sequence, cache=parts)
    finally:
        _rows = None


def planned_slice(generator):
    try:
        return _planned_slice(generator)
    except AttributeError:  # an mlx-lm whose BatchGenerator is laid out otherwise: mlx-lm's own steps
        global _unknown_layout
        if not _unknown_layout:
            _unknown_layout = True
            log.warning("mlx-lm's BatchGenerator is not laid out as fused.py expects: prompt slices run as their own forwards")
        return None


_unknown_layout = False


def _planned_slice(generator):
    """The prompt tokens the generator's next step will prefill, per prompt, when that step is a plain
    slice beside decoding rows (equal lengths, no prompt joining or leaving the prompt batch); None
    when it is anything else. Mirrors what BatchGenerator._next decides before it prefills."""
    g = generator
    decoding, prompting = len(g._generation_batch), len(g._prompt_batch)
    if not decoding or not prompting or decoding >= g.completion_batch_size or g.prefill_step_size <= 0:
        return None
    joining = min(g.prefill_batch_size - prompting, g.completion_batch_size - decoding, len(g._unprocessed_sequences))
    if joining > 0 or len(g._currently_processing) != prompting:
        return None
    rows = []
    for segments, _, _ in g._currently_processing:
        if not segments or (len(segments) == 1 and len(segments[0]) == 1):
            return None  # this prompt moves to decoding this step
        rows.append(segments[0][: g.prefill_step_size])
    if len({len(r) for r in rows}) != 1 or not rows[0] or len(rows[0]) > g._prompt_batch.prefill_step_size:
        return None
    return rows


class FusingModel:
    """What the BatchGenerator holds instead of the model: plain calls pass through; after `arm`,
    the next decode call runs the fused forward and the slice's call that follows is already done."""

    def __init__(self, model):
        self.model = model
        self._plan = None   # (gen cache list, prompt cache list, tokens array); None when disarmed
        self._fired = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def arm(self, generator, rows) -> None:
        self._plan = (generator._generation_batch.prompt_cache, generator._prompt_batch.prompt_cache, mx.array(rows))
        self._fired = False

    def disarm(self) -> bool:
        """Forget the plan; False when the fused forward ran but the slice's call never came (the
        prompt caches then hold a slice the generator does not know of)."""
        broken = self._plan is not None and self._fired
        self._plan, self._fired = None, False
        return not broken

    def __call__(self, inputs, cache=None, **kwargs):
        plan = self._plan
        if plan is not None:
            gen_cache, prompt_cache, tokens = plan
            if not self._fired and cache is gen_cache and inputs.ndim == 2 and inputs.shape[1] == 1:
                self._fired = True
                return forward(self.model, inputs, gen_cache, tokens, prompt_cache)
            if self._fired and cache is prompt_cache:
                if tuple(inputs.shape) != tuple(tokens.shape):
                    raise RuntimeError(f"fused step: the batch prefilled {tuple(inputs.shape)}, "
                                       f"not the planned {tuple(tokens.shape)}")
                self._plan, self._fired = None, False
                return None  # the fused forward wrote this slice into the cache already
        return self.model(inputs, cache=cache, **kwargs)
