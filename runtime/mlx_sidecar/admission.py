"""Memory-aware admission: what a request's KV cache will cost, how much memory the runtime may
spend on KV caches, and whether a request may start now, must wait, or can never run.

A request reserves KV bytes for its whole length (prompt + max_tokens) when it starts and gives
them back when it ends, so the sum of reservations never passes the budget and a running request
never runs out of room half-way. Engine thread only, except the read-only reports (metrics)."""

import logging
import os
import sys
import time
import weakref
from dataclasses import dataclass, field

from .errors import INVALID_PARAMS, RpcError

log = logging.getLogger(__name__)

MARGIN_FRACTION = 0.10      # of the machine's memory kept free for activations, Python, the OS
MIN_MARGIN = 512 << 20      # but at least this much
REFRESH_S = 1.0             # the machine's free memory is re-read at most this often


@dataclass
class KVShape:
    """A model's KV cache cost: `per_token` bytes per token in each growing layer group, up to
    `cap` tokens for sliding-window layers (None: no cap), plus `fixed` bytes of per-request
    state (recurrent layers)."""
    layers: list = field(default_factory=list)   # [(bytes per token, cap in tokens or None)]
    fixed: int = 0

    @property
    def per_token(self) -> int:
        return sum(b for b, _ in self.layers)

    def bytes_for(self, tokens: int) -> int:
        return self.fixed + sum(b * (tokens if cap is None else min(tokens, cap)) for b, cap in self.layers)


# Architectures whose attention caches hold kv_heads x head_dim keys and values per token, as
# their config says: their cost needs no forward pass (which would stall other streams at load).
PLAIN_ATTENTION = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "starcoder2"}

_MEASURED: dict = {}  # id(model) → (weak reference, KVShape): each model is measured once


def measure(model, config: dict) -> KVShape:
    """A model's KV cost: from its cache types and config for plain attention, else read from
    mlx-lm's own caches after one token (so sliding windows, quantized and recurrent caches count
    as they really are), else from the config alone. Remembered per model."""
    key = id(model)
    hit = _MEASURED.get(key)
    if hit is not None and hit[0]() is model:
        return hit[1]
    shape = from_cache_types(model, config) or measure_forward(model, config)
    try:
        _MEASURED[key] = (weakref.ref(model, lambda _, k=key: _MEASURED.pop(k, None)), shape)
    except TypeError:
        pass
    return shape


def from_cache_types(model, config: dict) -> KVShape | None:
    """Without running the model: each layer's cache type (plain or sliding window) from mlx-lm,
    its bytes per token from the config. None where that is not known to be exact."""
    cfg = config.get("text_config") or config
    if cfg.get("model_type") not in PLAIN_ATTENTION:
        return None
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

        dtypes = {a.dtype for _, a in tree_flatten(model.parameters())}
        if len(dtypes) != 1 or not mx.issubdtype(next(iter(dtypes)), mx.floating):
            return None  # quantized or mixed weights: the activations' dtype is not obvious
        leaves = list(_leaves(make_prompt_cache(model)))
    except Exception:
        return None
    heads = cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size") // heads if isinstance(heads, int) and heads > 0 and isinstance(cfg.get("hidden_size"), int) else None)
    if not leaves or any(type(c) not in (KVCache, RotatingKVCache) for c in leaves) \
            or not all(isinstance(v, int) and v > 0 for v in (kv_heads, head_dim)):
        return None
    per = kv_heads * head_dim * 2 * next(iter(dtypes)).size
    return KVShape([(per, c.max_size if type(c) is RotatingKVCache else None) for c in leaves])


def measure_forward(model, config: dict) -> KVShape:
    """Run one token through the model and read what its caches hold."""
    try:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[0]]), cache=cache))
        shape = KVShape()
        for c in _leaves(cache):
            if getattr(c, "keys", None) is not None:
                per = sum(a.nbytes // a.shape[-2] for a in _arrays((c.keys, c.values)))
                cap = getattr(c, "max_size", None) or getattr(c, "chunk_size", None)
                shape.layers.append((int(per), int(cap) if cap else None))
            else:
                shape.fixed += int(getattr(c, "nbytes", 0) or 0)
        del cache
        if shape.layers or shape.fixed:
            return shape
    except Exception as e:
        log.debug("could not measure the KV cache (%s: %s); estimating it from the config", type(e).__name__, e)
    return from_config(config, _itemsize(model))


def from_config(config: dict, itemsize: int = 2) -> KVShape:
    """layers x kv heads x head dim x 2 (keys and values) x dtype bytes, from a (text) config."""
    cfg = config.get("text_config") or config
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    kv_heads = cfg.get("num_key_value_heads") or heads
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or 0
    head_dim = cfg.get("head_dim") or (hidden // heads if heads else 0)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    per = int(layers * kv_heads * head_dim * 2 * itemsize)
    return KVShape([(per, window)] if per else [])


def _leaves(cache):
    for c in cache:
        if hasattr(c, "caches"):   # CacheList: several caches in one layer
            yield from _leaves(c.caches)
        else:
            yield c


def _arrays(tree):
    if isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _arrays(t)
    elif tree is not None:
        yield tree


def _itemsize(model) -> int:
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        for _, a in tree_flatten(model.parameters()):
            if mx.issubdtype(a.dtype, mx.floating):
                return a.dtype.size
    except Exception:
        pass
    return 2


def shape_of(loaded) -> KVShape:
    """The model's KVShape (measured at load; measured now for a model loaded another way)."""
    shape = getattr(loaded, "kv", None)
    if shape is None:
        shape = loaded.kv = measure(loaded.model, loaded.config) if loaded.kind == "llm" else from_config(loaded.config, _itemsize(loaded.model))
    return shape


def need(loaded, prompt_tokens: int, max_tokens: int, draft=None) -> int:
    """KV bytes a request holds at its longest: its model's cache and, when it speculates with a
    draft model, the draft's."""
    total = prompt_tokens + max_tokens
    n = shape_of(loaded).bytes_for(total)
    if draft is not None:
        n += shape_of(draft).bytes_for(total)
    return n


# ---- the machine ----
def machine_bytes(device_type: str) -> tuple[int, str]:
    """(bytes this process may use in all, where the figure comes from)."""
    if device_type == "gpu":
        try:
            import mlx.core as mx

            info = mx.device_info()
            for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
                if info.get(key):
                    return int(info[key]), f"mlx device_info {key}"
        except Exception:
            pass
    if sys.platform.startswith("linux"):
        meminfo = _meminfo()
        if "MemAvailable" in meminfo:
            # What is free plus what we already hold (weights, caches): ours to spend.
            from .engine import _rss_bytes

            total = min(meminfo["MemAvailable"] + _rss_bytes(), meminfo.get("MemTotal", 1 << 62))
            limit = _cgroup_limit()
            if limit is not None and limit < total:
                return limit, "cgroup memory limit"
            return total, "/proc/meminfo MemAvailable + this process's RSS"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return 8 << 30, "a guess (8 GiB): the machine's memory could not be read"


def _meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2, then v1), when there is one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


class Unlimited:
    """No budget: every request fits at once (a group's followers, which mirror rank 0's decisions)."""

    def fits(self, gen, also=None) -> bool:
        return True

    def reserve(self, gen) -> None:
        pass


UNLIMITED = Unlimited()


class Admission:
    """The KV budget and the reservations against it."""

    def __init__(self, budget_bytes: int = 0, max_context: int = 0):
        self.fixed_budget = budget_bytes      # --kv-budget-bytes; 0: from the machine
        self.max_context = max_context        # --max-context; 0: the model's own
        self.engine = None                    # set by the engine: models, device, prompt cache size
        self.reserved: dict = {}              # Generation → KV bytes reserved while it runs
        self._blocked = None                  # the oldest request that did not fit (it goes first)
        self._auto = None                     # (when read, budget, source)

    # ---- the budget ----
    def budget(self) -> int:
        if self.fixed_budget > 0:
            return self.fixed_budget
        now = time.monotonic()
        if self._auto is None or now - self._auto[0] > REFRESH_S:
            self._auto = (now, *self._auto_budget())
        return self._auto[1]

    def describe(self) -> dict:
        """For runtime/metrics: the budget, where it comes from, what is reserved."""
        budget = self.budget()
        source = "--kv-budget-bytes" if self.fixed_budget > 0 else self._auto[2]
        return {"budget_bytes": budget, "reserved_bytes": self.in_use(), "source": source}

    def _auto_budget(self) -> tuple[int, str]:
        """The machine's memory less a safety margin, loaded weights, full prompt caches and
        MLX's buffer cache: what KV caches of running requests may take."""
        from . import defaults

        engine = self.engine
        device = engine.device.get("type", "cpu") if engine is not None else "cpu"
        total, source = machine_bytes(device)
        held = defaults.MLX_CACHE_BYTES
        if engine is not None:
            for loaded in list(engine.models.values()):
                held += int(loaded.info.get("memory_bytes", 0))
                if getattr(loaded, "draft", None) is not None:
                    held += int(loaded.draft.info.get("memory_bytes", 0))
                held += engine.prompt_cache_bytes  # each model's runner keeps up to this much (vision.py's too)
        margin = max(int(total * MARGIN_FRACTION), MIN_MARGIN)
        return max(0, total - margin - held), source

    def context_limit(self, loaded) -> int | None:
        """The model's context, capped by --max-context."""
        ctx = loaded.context_length
        if self.max_context > 0:
            return self.max_context if ctx is None else min(ctx, self.max_context)
        return ctx

    # ---- requests ----
    def in_use(self) -> int:
        return sum(n for g, n in list(self.reserved.items()) if not g.done)

    def refuse_if_never_fits(self, gen) -> None:
        """-32602 (exceeds_memory) for a request that would not fit even with nothing else running."""
        budget = self.budget()
        if gen.kv_need <= budget:
            return
        loaded = gen.loaded
        per = shape_of(loaded).per_token or 1
        prompt = len(gen.prompt_ids)
        where = "/prompt" if "prompt" in gen.params else "/messages"
        data = {"kv_bytes_needed": gen.kv_need, "kv_budget_bytes": budget, "kv_bytes_per_token": per,
                "prompt_tokens": prompt, "max_tokens": gen.max_tokens}
        room = _tokens_that_fit(gen, budget)
        if room > prompt:
            data["max_tokens_that_fit"] = room - prompt
            raise RpcError(INVALID_PARAMS, f"prompt + max_tokens ({prompt} + {gen.max_tokens} tokens) need {gen.kv_need} bytes of KV cache "
                           f"but the runtime's KV budget is {budget}; lower max_tokens to at most {room - prompt}",
                           type="exceeds_memory", path="/max_tokens", **data)
        raise RpcError(INVALID_PARAMS, f"the prompt ({prompt} tokens) needs more KV cache than the runtime's budget of {budget} bytes "
                       f"(about {per} bytes per token); shorten the prompt", type="exceeds_memory", path=where, **data)

    def fits(self, gen, also=None) -> bool:
        """May gen start now (with `also`, a request that would start with it)? Never overtakes
        an older request of any model that is waiting for room; always yes when nothing runs."""
        want = gen.kv_need + (also.kv_need if also is not None else 0)
        blocked = self._blocked
        if blocked is not None and (blocked.done or blocked in self.reserved):
            blocked = self._blocked = None
        older = blocked is not None and blocked is not gen and blocked.req.received_at < gen.req.received_at
        used = self.in_use()
        if used == 0 and also is None and not older:
            return True  # alone it always runs (a budget read from the machine may have shrunk since)
        if older:
            want += blocked.kv_need
        if want <= self.budget() - used:
            return True
        if also is None and (self._blocked is None or gen.req.received_at < self._blocked.req.received_at):
            self._blocked = gen
        return False

    def reserve(self, gen) -> None:
        self.reserved[gen] = gen.kv_need
        for g in [g for g in self.reserved if g.done]:
            del self.reserved[g]

    def by_model(self) -> dict:
        """model id → KV bytes reserved by its running requests and (estimated) filled so far."""
        out: dict = {}
        for gen, n in list(self.reserved.items()):
            if gen.done:
                continue
            row = out.setdefault(gen.model_id, {"kv_reserved_bytes": 0, "kv_bytes": 0})
            row["kv_reserved_bytes"] += n
            shape = getattr(gen.loaded, "kv", None)  # set on the engine thread before it was reserved
            if shape is not None:
                row["kv_bytes"] += shape.bytes_for(len(gen.prompt_ids) + gen.completion)
        return out


def _tokens_that_fit(gen, budget: int) -> int:
    """The longest total length (prompt + output) whose KV fits in budget, by bisection."""
    lo, hi = 0, len(gen.prompt_ids) + gen.max_tokens
    draft = gen.speculative.draft if gen.speculative is not None and gen.speculative.kind == "draft" else None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(gen.loaded, mid, 0, draft) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
