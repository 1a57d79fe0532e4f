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

The same per-part attention lets a prompt that finishes prefilling join the decoding rows as a
part of their batch (`Parted`, on a CPU) instead of a padded copy of every row, and a prompt fed in
slices gets its KV buffers sized once for the whole prompt (`_reserve`).

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
    """A layer's cache for one fused forward: parts of rows, each with its own cache (a
    BatchKVCache), row count and tokens per row; their tokens lie one after another in the sequence."""

    def __init__(self, parts):
        self.parts = parts  # [(cache, rows, length)]

    def make_mask(self, n, return_array=False, window_size=None):
        # Called once per mask kind before any layer runs: each part's mask, from its own offsets.
        return _Masks([c.make_mask(length, return_array=return_array, window_size=window_size)
                       for c, _, length in self.parts])


class _Masks(list):
    pass


def _attention_call(base):
    def __call__(self, x, mask=None, cache=None, **kwargs):
        if not isinstance(cache, _Parts):
            return base(self, x, mask, cache, **kwargs)
        masks = mask if isinstance(mask, _Masks) else [mask] * len(cache.parts)
        # The projections see every part at once (each weight read once); rope, the cache and the
        # attention itself run per part, as mlx-lm's Attention.__call__ does for one batch.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out, at = [], 0
        for (part_cache, rows, length), part_mask in zip(cache.parts, masks):
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
        if _rows is not None and x.ndim == 3 and x.shape[0] == 1:
            x = x[:, :_rows].reshape(_rows, 1, x.shape[-1])  # only the decode rows need logits, one row each
        return base(self, x, *args, **kwargs)
    return __call__


_classes: dict = {}


def _swap_class(obj, make, method: str = "__call__") -> None:
    """Give one instance a subclass whose `method` is make(the base method); its parameters, their
    names and every other instance of the class stay as they are."""
    cls = type(obj)
    if getattr(cls, "_sidecar_fused", False):
        return
    key = (cls, make)
    if key not in _classes:
        _classes[key] = type(cls.__name__, (cls,), {method: make(getattr(cls, method)), "_sidecar_fused": True})
    obj.__class__ = _classes[key]


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


def forward(model, inputs, gen_cache, tokens=None, prompt_cache=None):
    """Decode logits (rows, 1, vocab) for `inputs` (rows, 1) against `gen_cache` (per layer a
    BatchKVCache or a Parted), and, when given, the slice `tokens` (prompts, length) written into
    `prompt_cache`: all in one pass through `model` (prepared with `prepare`)."""
    global _rows
    rows = inputs.shape[0]
    sequence = [inputs.reshape(1, rows)]
    layers = [[(c, _batch_rows(c), 1) for c in (g.parts if isinstance(g, Parted) else [g])] for g in gen_cache]
    if tokens is not None:
        prompts, length = tokens.shape
        sequence.append(tokens.astype(inputs.dtype).reshape(1, prompts * length))
        for parts, p in zip(layers, prompt_cache):
            parts.append((p, prompts, length))
    _rows = rows
    try:
        return model(mx.concatenate(sequence, axis=1), cache=[_Parts(parts) for parts in layers])
    finally:
        _rows = None


def _batch_rows(cache) -> int:
    return cache.offset.shape[0]


MAX_PARTS = 4  # parts per decoding batch; past this the two adjacent ones closest in length merge


class Parted:
    """A decoding batch's KV cache for one layer, kept as parts (BatchKVCaches) instead of one block.

    mlx-lm joins prompts to the decoding rows by left-padding every row to the longest and copying
    all of them into one buffer (BatchKVCache.extend). When a 2,500-token prompt joins a 300-token
    chat, that copy is the slowest step the chat sees, and from then on its row attends over 2,500
    positions, mostly padding. Here a join adds a part: nothing is copied, each part's attention
    runs over its own length (forward above), and only past MAX_PARTS are two neighbouring parts
    merged mlx-lm's way. Rows keep their order: part after part, as the batch lists them."""

    def __init__(self, parts):
        self.parts = list(parts)

    def extend(self, other) -> None:
        self.parts.extend(other.parts if isinstance(other, Parted) else [other])
        while len(self.parts) > MAX_PARTS:
            gaps = [abs(a._idx - b._idx) for a, b in zip(self.parts, self.parts[1:])]
            self._merge(gaps.index(min(gaps)))

    def _merge(self, i: int) -> None:
        self.parts[i].extend(self.parts.pop(i + 1))

    def filter(self, keep) -> None:
        if any(a >= b for a, b in zip(keep, keep[1:])):  # rows reordered: one block, filtered mlx-lm's way
            while len(self.parts) > 1:
                self._merge(0)
            self.parts[0].filter(keep)
            return
        parts, start = [], 0
        for part in self.parts:
            n = _batch_rows(part)
            mine = [i - start for i in keep if start <= i < start + n]
            if mine:
                if len(mine) < n:
                    part.filter(mine)
                parts.append(part)
            start += n
        self.parts = parts

    def extract(self, idx: int):
        for part in self.parts:
            n = _batch_rows(part)
            if idx < n:
                return part.extract(idx)
            idx -= n
        raise IndexError("row not in this batch")

    @property
    def nbytes(self) -> int:  # BatchGenerator.prompt_cache_nbytes sums this over the decoding batch
        return sum(part.nbytes for part in self.parts)


def _parted_extend(base):
    def extend(self, batch):
        # A join: the decoding rows' caches become Parted, whose extend keeps the newcomers apart.
        if self.prompt_cache and batch.prompt_cache:
            self.prompt_cache = [c if isinstance(c, Parted) else Parted([c]) for c in self.prompt_cache]
        return base(self, batch)
    return extend


def join_in_parts(generator) -> None:
    """Make the generator's decoding batch take joining prompts as parts (Parted) from now on. Only
    on a CPU, where the copy costs what it measured: on a GPU it is cheap and each part would add
    kernel launches to every step, so there the batch stays one block, as mlx-lm keeps it."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return
    try:
        _swap_class(generator._generation_batch, _parted_extend, "extend")
    except AttributeError:
        log.warning("mlx-lm's BatchGenerator is not laid out as fused.py expects: joins pad and copy the batch")


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


def _reserve(caches, more: int) -> None:
    """Grow each BatchKVCache's buffers at once to hold `more` tokens beyond what they hold now.
    BatchKVCache grows 256 positions at a time, copying all it holds: a long prompt fed in small
    slices would pay that copy, at its whole context, inside one running stream's gap every 256
    tokens. Here it is paid once, early, when the context is still short."""
    for c in caches:
        keys, values, held = getattr(c, "keys", None), getattr(c, "values", None), getattr(c, "_idx", None)
        if keys is None or held is None or held + more <= keys.shape[2]:
            continue
        size = -(-(held + more) // c.step) * c.step
        grown = []
        for a in (keys, values):
            b = mx.zeros((*a.shape[:2], size, a.shape[3]), a.dtype)
            b[..., :held, :] = a[..., :held, :]
            grown.append(b)
        c.keys, c.values = grown


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
        prompt_cache = generator._prompt_batch.prompt_cache
        _reserve(prompt_cache, max(sum(len(s) for s in seq[0]) for seq in generator._currently_processing))
        self._plan = (generator._generation_batch.prompt_cache, prompt_cache, mx.array(rows))
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
        if cache and isinstance(cache[0], Parted):  # the decoding batch, in parts
            if len(cache[0].parts) > 1:
                return forward(self.model, inputs, cache)
            cache = [c.parts[0] for c in cache]
        return self.model(inputs, cache=cache, **kwargs)
