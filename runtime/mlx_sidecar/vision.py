"""Vision models through mlx-vlm: loading them offline, turning a request (messages with image
parts, or a raw prompt with `images`) into the model's inputs with its own chat template and
processor, and the runner that decodes them on the engine thread.

A request alone runs through mlx-vlm's generate_step (streamed token by token; cancel is seen
between tokens), and reuses earlier requests' KV caches, kept bounded by bytes: a prompt that shares
a prefix with one (the same image, by content hash, then a new text question) prefills only its new
text. Requests that arrive together and share a sampler decode together in mlx-vlm's
BatchGenerator (no prompt cache there); the others wait and run alone."""

import collections
import contextlib
import logging
from dataclasses import dataclass, field

from . import logprobs
from .admission import UNLIMITED
from .errors import CANCELLED, GENERATION_FAILED, INVALID_PARAMS, MODEL_LOAD_FAILED, RpcError
from .sampling import heal_random_state

log = logging.getLogger(__name__)

PREFILL_STEP = 512
CACHE_ENTRIES = 8            # KV caches kept per vision model (also bounded by bytes)
MIGRATE_MIN_LEFT = 16        # a lone request moves into a new batch only with this many tokens to go
PIXEL_CACHE_BYTES = 64 << 20 # the processor's prepared pixels kept per vision model, by image


def is_vision_config(config: dict) -> bool:
    return isinstance(config.get("vision_config"), dict)


# ---- loading ----
@contextlib.contextmanager
def _hub_offline():
    """While a local directory loads, the hub client refuses every request: a missing processor
    file is then a local miss, never a surprise download."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def load_parts(path, source: str, config: dict, trust_remote_code: bool):
    """(model, mlx-lm tokenizer wrapper, processor) for a vision model directory."""
    try:
        from mlx_vlm.utils import get_model_and_args, load as vlm_load
    except ImportError:
        raise RpcError(MODEL_LOAD_FAILED, f"{source!r} is a vision model ({config.get('model_type')}) but mlx-vlm is not installed; "
                       "install the vlm extra (pip install 'mlx-sidecar[vlm]')", type="unsupported_architecture", model=source) from None
    try:
        get_model_and_args(dict(config))
    except ValueError:
        raise RpcError(MODEL_LOAD_FAILED, f"{source!r} is a vision model of type {config.get('model_type')!r}, which mlx-vlm does not support",
                       type="unsupported_architecture", model=source) from None
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    try:
        with _hub_offline():
            model, processor = vlm_load(str(path), lazy=True, trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(path, {"trust_remote_code": True} if trust_remote_code else None, eos_token_ids=eos)
    except RpcError:
        raise
    except Exception as e:
        text = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        kind = "trust_remote_code_required" if "trust_remote_code" in text else "invalid_model"
        raise RpcError(MODEL_LOAD_FAILED, f"could not load the vision model {source!r}: {text}", type=kind, model=source) from None
    return model, tokenizer, processor


# ---- loading off the engine thread: `read` on the loader thread, `build` on the engine thread ----
@dataclass
class Prepared:
    """What the loader thread read for a vision model; `build` makes the model from it."""
    base: object                 # models.Prepared: source, id, dtype, timing, (path, config), progress
    model_class: object          # mlx-vlm's module for the architecture
    model_config: object         # its ModelConfig
    vlm_config: dict             # mlx-vlm's reading of config.json (generation_config merged)
    weights: dict                # name → evaluated mx.array (target dtype)
    dequantized: bool
    declared_keys: set | None    # the index's weight names: modules it leaves out are dropped
    tokenizer: object
    processor: object


def _vlm_weight_files(path) -> tuple[list, set | None]:
    """The weight files mlx-vlm's loader would read, and the names the index declares."""
    import json

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({str(path / f) for f in weight_map.values() if (path / f).exists()})
            if files:
                return files, set(weight_map)
        except (ValueError, OSError):
            pass
    return sorted(str(f) for f in path.glob("*.safetensors") if f.name != "consolidated.safetensors"), None


def _splittable(path, config: dict) -> bool:
    """Layouts read here and built in pieces; others (custom model code, Hugging Face quantization
    formats, offloaded experts) go through mlx-vlm's own loader, whole, on the engine thread."""
    text = config.get("text_config") or config.get("llm_config") or {}
    if config.get("model_file") or config.get("quantize_activations") or config.get("quantization_config") \
            or text.get("quantization_config") or text.get("ple_storage"):
        return False
    if (path / "hf_quant_config.json").exists() or (path / "offload_index.json").exists():
        return False
    files, _ = _vlm_weight_files(path)
    # models._read_weights reads model*.safetensors: the same files or the old path.
    return bool(files) and files == sorted(str(f) for f in path.glob("model*.safetensors"))


def _check_supported(source: str, config: dict):
    """mlx-vlm's module for this architecture, or the load error the protocol types."""
    try:
        from mlx_vlm.utils import get_model_and_args
    except ImportError:
        raise RpcError(MODEL_LOAD_FAILED, f"{source!r} is a vision model ({config.get('model_type')}) but mlx-vlm is not installed; "
                       "install the vlm extra (pip install 'mlx-sidecar[vlm]')", type="unsupported_architecture", model=source) from None
    try:
        return get_model_and_args(dict(config))[0]
    except ValueError:
        raise RpcError(MODEL_LOAD_FAILED, f"{source!r} is a vision model of type {config.get('model_type')!r}, which mlx-vlm does not support",
                       type="unsupported_architecture", model=source) from None


def _read_failed(e: Exception, source: str) -> RpcError:
    text = f"{type(e).__name__}: {e}".splitlines()[0][:500]
    kind = "trust_remote_code_required" if "trust_remote_code" in text else "invalid_model"
    return RpcError(MODEL_LOAD_FAILED, f"could not load the vision model {source!r}: {text}", type=kind, model=source)


def read(prep, progress, cancelled):
    """Loader thread: config, processor, tokenizer and weights (read and converted to the target
    dtype on a CPU stream, each array evaluated here). Returns a Prepared, or `prep` unchanged
    when the model must load whole on the engine thread (models.load, the old path)."""
    from . import models

    if prep.located is None or models._sharded():
        return prep
    path, config = prep.located
    source, trc = prep.source, prep.trust_remote_code
    model_class = _check_supported(source, config)
    if not _splittable(path, config):
        return prep
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_vlm.utils import load_config, load_image_processor, load_processor

    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    try:
        vlm_config = load_config(path, trust_remote_code=trc)
        progress(0.2, "loading processor")
        with _hub_offline():
            image_processor = load_image_processor(path, trust_remote_code=trc)
            processor = load_processor(path, True, eos_token_ids=vlm_config.get("eos_token_id"), trust_remote_code=trc)
            if image_processor is not None:
                processor.image_processor = image_processor
            tokenizer = load_tokenizer(path, {"trust_remote_code": True} if trc else None, eos_token_ids=eos)
    except RpcError:
        raise
    except Exception as e:
        raise _read_failed(e, source) from None
    progress(0.3, "reading weights")
    import mlx.core as mx

    with mx.stream(mx.cpu):  # as for text models: the accelerator stays the engine thread's
        weights, dequantized = models._read_weights(path, source, config, models._target_dtype(prep.dtype, prep.device_type),
                                                    progress, cancelled)
    if weights is None:
        return prep
    if dequantized:  # the model is then built with plain layers
        vlm_config.pop("quantization", None)
    try:
        model_config = _model_config(model_class, vlm_config, path)
    except Exception as e:
        raise _read_failed(e, source) from None
    return Prepared(prep, model_class, model_config, vlm_config, weights, dequantized, _vlm_weight_files(path)[1], tokenizer, processor)


def _model_config(model_class, config: dict, path):
    """mlx-vlm's ModelConfig for a config dict, as its loader makes it (no MLX work)."""
    from mlx_vlm.utils import apply_generation_config_defaults, update_module_configs

    config.setdefault("text_config", config.pop("llm_config", {}))
    config.setdefault("vision_config", {})
    config.setdefault("audio_config", {})
    model_config = model_class.ModelConfig.from_dict(config)
    model_config = update_module_configs(model_config, model_class, config, ["text", "vision", "perceiver", "projector", "audio"])
    model_config = apply_generation_config_defaults(model_config, config)
    if hasattr(model_config, "model_path"):
        model_config.model_path = str(path)
    if "quantization" in config:  # the loader keeps the config's own view of it
        for key in ("quantization", "quantization_config"):
            if getattr(model_config, key, None) is not None:
                config[key] = getattr(model_config, key)
    return model_config


def build(vp: Prepared):
    """Engine thread, a generator (as models.build): make the module tree and load the finished
    arrays (one piece), then evaluate what sanitizing or the dtype policy left lazy, about
    models.PIECE_BYTES per piece. Returns the LoadedModel."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model, get_total_parameters
    from mlx_vlm.utils import load_model_weights, sanitize_weights

    from . import models

    prep = vp.base
    path, config = prep.located
    progress = prep.progress or (lambda *a, **k: None)
    progress(0.85, "building model")
    weights, vp.weights = vp.weights, None
    cls, mc = vp.model_class, vp.model_config
    try:
        model = cls.Model(mc)
    except Exception as e:
        raise _read_failed(e, prep.source) from None
    yield
    try:
        weights = sanitize_weights(model, weights)
        for part, cfg in (("VisionModel", "vision_config"), ("LanguageModel", "text_config"), ("AudioModel", "audio_config")):
            if hasattr(cls, part) and hasattr(mc, cfg):
                weights = sanitize_weights(getattr(cls, part), weights, getattr(mc, cfg))
        model = load_model_weights(model, vp.vlm_config, weights, path, lazy=True, declared_keys=vp.declared_keys,
                                   trust_remote_code=prep.trust_remote_code)
    except Exception as e:
        raise _read_failed(e, prep.source) from None
    del weights
    yield
    parameters = int(get_total_parameters(model))
    quantization = None if vp.dequantized else config.get("quantization")
    want = models._target_dtype(prep.dtype, prep.device_type)
    if want is not None and quantization:
        model, quantization = dequantize_model(model), None
    target = getattr(mx, want) if want else None
    group, size = [], 0
    for name, a in tree_flatten(model.parameters()):
        if target is not None and mx.issubdtype(a.dtype, mx.floating) and a.dtype != target:
            a = a.astype(target)  # made by sanitize, or left quantized: the dtype policy still holds
            model.update(tree_unflatten([(name, a)]))
        group.append(a)
        size += a.nbytes
        if size >= models.PIECE_BYTES:
            mx.eval(group)
            group, size = [], 0
            yield
    mx.eval(group)
    yield
    info = models._info(prep.model_id, path, config, "vision", model, quantization, prep.started, parameters)
    info["vision"] = describe(vp.processor, config)
    return models.LoadedModel(id=prep.model_id, source=prep.source, path=path, kind="vision", model=model,
                              tokenizer=vp.tokenizer, config=config, info=info, processor=vp.processor)


def describe(processor, config: dict) -> dict:
    """What the processor accepts, for model/load and model/list."""
    ip = getattr(processor, "image_processor", None)
    token = getattr(processor, "image_token", None)
    info = {"image_token": token if isinstance(token, str) else None}
    for key in ("min_pixels", "max_pixels", "patch_size", "merge_size"):
        value = getattr(ip, key, None)
        if value is None and isinstance(getattr(ip, "size", None), dict):
            value = ip.size.get({"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}.get(key, key))
        info[key] = int(value) if isinstance(value, (int, float)) else None
    cell = (info["patch_size"] or 0) * (info["merge_size"] or 1)
    for key, pixels in (("min_image_tokens", info["min_pixels"]), ("max_image_tokens", info["max_pixels"])):
        info[key] = max(1, pixels // (cell * cell)) if cell and pixels else None
    return {k: v for k, v in info.items() if v is not None}


# ---- one request's inputs (engine thread) ----
@dataclass
class Inputs:
    ids: list
    input_ids: object
    pixel_values: object
    mask: object
    extra: dict
    image_keys: tuple = ()
    images: list = field(default_factory=list)   # what the result reports per image
    text: str | None = None                      # the rendered chat text (messages only)


def _messages(params: dict, images) -> list:
    """OpenAI messages → mlx-vlm's shape: ordered text and {"type": "image"} parts."""
    out = []
    for i, m in enumerate(params["messages"]):
        content = m.get("content")
        msg = {k: v for k, v in m.items() if k != "content"}
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    if m["role"] != "user":
                        raise RpcError(INVALID_PARAMS, f"/messages/{i}/content/{j}: images go in user messages, not {m['role']} ones",
                                       path=f"/messages/{i}/content/{j}")
                    parts.append({"type": "image"})
            content = parts if any(p["type"] == "image" for p in parts) else "\n".join(p["text"] for p in parts)
        msg["content"] = "" if content is None else content
        out.append(msg)
    return out


def _image_runs(ids, image_ids) -> list:
    """(start, end) of each run of image placeholder tokens: one run per image."""
    runs, start = [], None
    for n, t in enumerate(ids):
        if t in image_ids:
            if start is None:
                start = n
        elif start is not None:
            runs.append((start, n))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def media_token_ids(model) -> frozenset:
    cfg = model.config
    ids = set()
    for key in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            ids.add(value)
    return frozenset(ids)


def prepare(loaded, params: dict, images) -> Inputs:
    """Render the prompt with the model's own template and run its processor over the images."""
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    processor, model = loaded.processor, loaded.model
    if "messages" in params and params.get("images"):
        raise RpcError(INVALID_PARAMS, "images go with prompt; with messages, put image parts in the messages' content", path="/images")
    if "messages" in params:
        try:
            text = apply_chat_template(processor, model.config, _messages(params, images), num_images=len(images))
        except RpcError:
            raise
        except Exception as e:
            raise RpcError(INVALID_PARAMS, f"the chat template of {loaded.id!r} rejected these messages: {e}", path="/messages") from None
        if not isinstance(text, str):
            raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} has no chat template; send prompt (raw text) with images instead", path="/messages")
    else:
        text = params["prompt"]
        token = getattr(processor, "image_token", None)
        if images and isinstance(token, str) and text.count(token) != len(images):
            raise RpcError(INVALID_PARAMS, f"the prompt has {text.count(token)} image placeholders ({token!r}) but {len(images)} images were sent; "
                           f"write one {token!r} where each image goes (this model's convention)", path="/images")
    pils = [im.pil for im in images]
    keys = tuple(f"{im.sha256}:{im.size[0]}x{im.size[1]}" for im in images)
    try:
        with _pixels_cached(processor, keys, pils):
            inputs = prepare_inputs(processor, images=pils or None, prompts=text,
                                    image_token_index=getattr(model.config, "image_token_index", None),
                                    add_special_tokens=should_add_special_tokens(model.config.model_type, processor))
    except Exception as e:
        where = images[0].path if images else ("/messages" if "messages" in params else "/prompt")
        raise RpcError(INVALID_PARAMS, f"the processor of {loaded.id!r} refused these inputs: {type(e).__name__}: {e}", path=where) from None
    input_ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    ids = input_ids[0].tolist()
    runs = _image_runs(ids, media_token_ids(model))
    grid = extra.get("image_grid_thw")
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    reported = []
    for n, im in enumerate(images):
        entry = {"width": im.size[0], "height": im.size[1], "source_width": im.source_size[0], "source_height": im.source_size[1]}
        if n < len(runs) and len(runs) == len(images):
            entry["tokens"] = runs[n][1] - runs[n][0]
        if grid is not None and patch and n < grid.shape[0]:
            entry["processed_width"] = int(grid[n, 2].item()) * int(patch)
            entry["processed_height"] = int(grid[n, 1].item()) * int(patch)
        reported.append(entry)
    return Inputs(ids=ids, input_ids=input_ids, pixel_values=inputs.get("pixel_values"), mask=inputs.get("attention_mask"),
                  extra=extra, image_keys=keys, images=reported, text=text if "messages" in params else None)


# ---- the processor's pixels for images seen before ----
_pixel_caches: "weakref.WeakKeyDictionary" = None


class _PixelCache:
    """The image processor's outputs by image set (content hash and size), newest last, bounded by bytes."""

    def __init__(self, max_bytes: int = PIXEL_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict = collections.OrderedDict()   # key → (outputs, nbytes)

    def get(self, key):
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit[0]
        return None

    def put(self, key, outputs) -> None:
        size = sum(getattr(v, "nbytes", 0) for v in outputs.values())
        if size > self.max_bytes:
            return
        self.entries[key] = (outputs, size)
        while sum(n for _, n in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)


class _CachingImageProcessor:
    """Stands in for a processor's image_processor during one prepare: called with exactly this
    request's images, it answers from the cache when they were prepared before (a second
    question about one screenshot skips the resize and normalisation)."""

    def __init__(self, inner, keys, pils, cache):
        self._inner, self._keys, self._pils, self._cache = inner, keys, pils, cache

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        images = kwargs.get("images", args[0] if args else None)
        mine = (isinstance(images, list) and len(images) == len(self._pils)
                and all(a is b for a, b in zip(images, self._pils)) and len(args) <= 1)
        if not mine:
            return self._inner(*args, **kwargs)
        key = (self._keys, repr(sorted((k, v) for k, v in kwargs.items() if k != "images")))
        outputs = self._cache.get(key)
        if outputs is None:
            outputs = self._inner(*args, **kwargs)
            self._cache.put(key, outputs)
        return outputs


@contextlib.contextmanager
def _pixels_cached(processor, keys, pils):
    global _pixel_caches
    inner = getattr(processor, "image_processor", None)
    if not pils or inner is None or PIXEL_CACHE_BYTES <= 0:
        yield
        return
    import weakref

    if _pixel_caches is None:
        _pixel_caches = weakref.WeakKeyDictionary()
    cache = _pixel_caches.get(processor)
    if cache is None:
        cache = _pixel_caches[processor] = _PixelCache()
    processor.image_processor = _CachingImageProcessor(inner, keys, pils, cache)
    try:
        yield
    finally:
        processor.image_processor = inner


# ---- KV caches of earlier requests ----
class _Entry:
    def __init__(self, ids, image_keys, cache):
        self.ids = ids
        self.image_keys = image_keys
        self.cache = cache
        self.nbytes = sum(getattr(c, "nbytes", 0) for c in cache)


class VisionPromptCache:
    """KV caches of earlier requests, newest last, bounded by count and bytes. A hit takes the
    entry out (its cache is trimmed and extended in place) and the request puts it back at its end."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: collections.deque = collections.deque()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def take(self, inputs: Inputs, media_ids):
        """(cache, prefix length) to continue from, or (None, 0)."""
        ids, keys = inputs.ids, inputs.image_keys
        runs = _image_runs(ids, media_ids)
        # The suffix to prefill must be text: the prefix reaches past the last image.
        floor = runs[-1][1] if runs else 1
        best, best_len = None, 0
        for e in self.entries:
            n = 0
            limit = min(len(e.ids), len(ids) - 1)   # keep at least one token to feed for logits
            while n < limit and e.ids[n] == ids[n]:
                n += 1
            if n < floor or n <= best_len:
                continue
            # The same placeholder tokens stand for any picture of that size: the images must match by
            # content and size, and an entry's images are never cut off (it stays for others).
            if e.image_keys != keys:
                continue
            best, best_len = e, n
        if best is None:
            return None, 0
        drop = max(getattr(c, "offset", 0) for c in best.cache) - best_len
        if drop and not all(c.is_trimmable() for c in best.cache):
            return None, 0
        self.entries.remove(best)
        for c in best.cache:
            if drop:
                c.trim(drop)
        return best.cache, best_len

    def put(self, ids, image_keys, cache) -> None:
        if self.max_bytes <= 0:
            return
        offset = max(getattr(c, "offset", 0) for c in cache)
        ids = list(ids[:offset])
        if offset > len(ids):
            for c in cache:
                c.trim(offset - len(ids))
        entry = _Entry(ids, image_keys, cache)
        if entry.nbytes > self.max_bytes:
            return
        self.entries.append(entry)
        while len(self.entries) > CACHE_ENTRIES or self.nbytes > self.max_bytes:
            self.entries.popleft()


# ---- the runner (engine thread) ----
class _Cancelled(Exception):
    """Raised between prefill chunks to abandon a cancelled request mid-prefill."""


def _cancelled(why: str = "request cancelled") -> RpcError:
    return RpcError(CANCELLED, why, finish_reason="cancelled")


class VisionRunner:
    """The engine's runner for one vision model (the same verbs as runners.ModelRunner)."""

    admission = UNLIMITED  # the engine's Admission (admission.py): requests start only when their KV fits

    def __init__(self, loaded, max_batch: int, cache_bytes: int):
        self.loaded = loaded
        self.max_batch = max_batch
        self.prompt_cache = VisionPromptCache(cache_bytes)
        self.media_ids = media_token_ids(loaded.model)
        self.waiting: collections.deque = collections.deque()
        self.active: dict = {}        # BatchGenerator uid → Generation
        self.generator = None         # mlx-vlm's BatchGenerator while a batch runs
        self._batch_sampler = None    # the one sampler its rows share
        self.solo = None
        self._tokens = None           # generate_step's iterator
        self._cache = None            # its KV cache
        self._fed: list = []          # tokens generate_step has yielded (all fed into the cache)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.active) + (self.solo is not None)

    def add(self, gen) -> None:
        self.waiting.append(gen)

    def step(self) -> None:
        self._sweep_cancelled()
        # Waiting requests start in arrival order, each once its KV fits in the budget (admission.py).
        if self.solo is not None and self.waiting and self._joinable(self.solo, self.waiting[0]) and self.admission.fits(self.waiting[0]):
            self._move_solo_into_batch()
        if self.solo is None and self.waiting and self.admission.fits(self.waiting[0]):
            if self.generator is not None or (self.max_batch > 1 and len(self.waiting) > 1 and self._batchable(self.waiting[0])
                                              and self._two_fit()):
                self._fill_batch()
            if self.generator is None and self.waiting and self.admission.fits(self.waiting[0]):
                gen = self.waiting.popleft()
                self.admission.reserve(gen)
                self._start(gen)
        if self.solo is not None:
            self._step()
        if self.active:
            self._step_batch()

    def _two_fit(self) -> bool:
        # A new batch only when its first two requests fit together; else the first runs alone.
        return self.admission.fits(self.waiting[0], also=self.waiting[1])

    def abort(self, error_factory) -> None:
        for gen in list(self.waiting) + list(self.active.values()) + ([self.solo] if self.solo else []):
            if not gen.done:
                gen.finish_error(error_factory())
        self.waiting.clear()
        self.active.clear()
        self._close_batch()
        self.solo = self._tokens = self._cache = None

    def _sweep_cancelled(self) -> None:
        for gen in [g for g in self.waiting if g.req.cancel_requested]:
            self.waiting.remove(gen)
            gen.finish_error(_cancelled())
        if self.solo is not None and self.solo.req.cancel_requested:
            self._end(_cancelled())
        for uid in [u for u, g in self.active.items() if g.req.cancel_requested]:
            self.generator.remove(uid)
            self.active.pop(uid).finish_error(_cancelled())
        if self.generator is not None and not self.active:
            self._close_batch()

    # ---- several requests at once: mlx-vlm's BatchGenerator ----
    def _batchable(self, gen, sampler=None) -> bool:
        """mlx-vlm's batch draws every row with one sampler: requests join when theirs is the same
        shared object (no seed), and they ask for no logprobs; others run alone, one at a time."""
        from .sampling import SeededSampler

        if isinstance(gen.sampler, SeededSampler) or getattr(gen, "top_logprobs", None) is not None:
            return False
        return sampler is None or gen.sampler is sampler

    def _joinable(self, solo, waiting) -> bool:
        """Whether the lone request should move into a batch with a newcomer: both can batch with
        one sampler, the lone one holds no stateful processor (a response_format), and enough of
        its tokens are left to pay for prefilling its prompt again."""
        return (self.max_batch > 1 and self._batchable(solo) and self._batchable(waiting, solo.sampler)
                and solo.constraint is None and solo.max_tokens - solo.completion >= MIGRATE_MIN_LEFT and self._fed)

    def _move_solo_into_batch(self) -> None:
        """mlx-vlm's batch takes no KV cache: the lone request joins it as its prompt plus the
        tokens it has made so far (prefilled again), and goes on from there; its cache is kept."""
        import mlx.core as mx

        gen, fed, cache = self.solo, list(self._fed), self._cache
        self.solo = self._tokens = self._cache = None
        with contextlib.suppress(Exception):
            self.prompt_cache.put(gen.vision.ids + fed, gen.vision.image_keys, cache)
        self._new_batch(gen.sampler)
        inputs = gen.vision
        ids = inputs.ids + fed
        mask = inputs.mask
        if mask is not None:
            mask = mx.concatenate([mask, mx.ones((1, len(fed)), dtype=mask.dtype)], axis=1)
        try:
            uid = self._insert(gen, ids=ids, mask=mask, left=gen.max_tokens - gen.completion)
        except Exception as e:
            log.exception("could not move a vision request into the batch")
            heal_random_state()
            gen.finish_error(RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
            return
        self.active[uid] = gen

    def _new_batch(self, sampler) -> None:
        from mlx_vlm.generate.ar import BatchGenerator

        self.generator = BatchGenerator(self.loaded.model.language_model, self.loaded.processor,
                                        sampler=sampler, completion_batch_size=self.max_batch,
                                        prefill_batch_size=min(self.max_batch, 8), prefill_step_size=PREFILL_STEP,
                                        compute_logprobs=False)
        self._batch_sampler = sampler

    def _fill_batch(self) -> None:
        if self.generator is None:
            self._new_batch(self.waiting[0].sampler)
        # Joiners in arrival order while they fit; the first that cannot join waits for the batch to end.
        while self.waiting and len(self.active) < self.max_batch and self._batchable(self.waiting[0], self._batch_sampler) \
                and self.admission.fits(self.waiting[0]):
            gen = self.waiting.popleft()
            self.admission.reserve(gen)
            try:
                uid = self._insert(gen)
            except Exception as e:
                log.exception("could not add a vision request to the batch")
                heal_random_state()
                gen.finish_error(RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
                continue
            self.active[uid] = gen
        if not self.active:
            self._close_batch()

    def _insert(self, gen, ids=None, mask=None, left=None) -> int:
        """Run the vision encoder for one request and queue its embeddings in the batch."""
        import mlx.core as mx

        inputs = gen.vision
        if ids is None:
            ids, mask, left = inputs.ids, inputs.mask, gen.max_tokens
            gen.begin(0)
        with mx.stream(self.generator._stream):
            embedded = self.loaded.model.get_input_embeddings(mx.array([ids]), inputs.pixel_values, mask=mask, **inputs.extra)
        kwargs = {**inputs.extra, **{k: v for k, v in embedded.to_dict().items() if v is not None}}
        return self.generator.insert([ids], max_tokens=[left], prompt_kwargs=[kwargs],
                                     logits_processors=[list(gen.processors)])[0]

    def _step_batch(self) -> None:
        try:
            _, responses = self.generator.next()
        except Exception as e:
            log.exception("batched vision generation failed")
            heal_random_state()
            for gen in self.active.values():
                gen.finish_error(RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
            self.active.clear()
            self._close_batch()
            return
        for r in responses:
            gen = self.active.get(r.uid)
            if gen is None or r.token is None:
                continue
            token = int(r.token.item() if hasattr(r.token, "item") else r.token)
            if gen.on_token(token) or r.finish_reason is not None:
                if not gen.done:   # the batch's own length or end-of-sequence limit
                    gen.finish("stop" if r.finish_reason == "stop" else "length")
                del self.active[r.uid]
                if r.finish_reason is None:
                    self.generator.remove(r.uid)
        if not self.active:
            self._close_batch()

    def _close_batch(self) -> None:
        if self.generator is not None:
            with contextlib.suppress(Exception):
                self.generator.close()
        self.generator = self._batch_sampler = None

    def _start(self, gen) -> None:
        from mlx_vlm.generate.ar import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        model, inputs = self.loaded.model, gen.vision
        kwargs = dict(inputs.extra)
        input_ids, pixel_values = inputs.input_ids, inputs.pixel_values
        cache, prefix = self.prompt_cache.take(inputs, self.media_ids)
        if cache is not None and not _prime_positions(model, inputs, kwargs):
            cache, prefix = None, 0
        if cache is not None:
            input_ids, pixel_values = input_ids[:, prefix:], None
        else:
            cache = make_prompt_cache(model.language_model)
        gen.begin(prefix)
        self._cache, self._fed = cache, []

        def check(done, _cache):
            # Called between prefill chunks (every PREFILL_STEP tokens): a cancel ends a long prefill there.
            if gen.req.cancel_requested:
                raise _Cancelled()

        self._tokens = generate_step(input_ids, model, pixel_values, inputs.mask, max_tokens=gen.max_tokens,
                                     sampler=gen.sampler, logits_processors=list(gen.processors), prompt_cache=cache,
                                     prefill_step_size=PREFILL_STEP, prompt_cache_checkpoint=check,
                                     prompt_cache_checkpoint_lengths=list(range(PREFILL_STEP, input_ids.shape[1], PREFILL_STEP)),
                                     **kwargs)
        self.solo = gen

    def _step(self) -> None:
        gen = self.solo
        try:
            token, row = next(self._tokens)
            lp = logprobs.pick([row], [int(token)], [gen.top_logprobs])[0] if gen.top_logprobs is not None else None
        except StopIteration:
            gen.finish("length")
            return self._end()
        except _Cancelled:
            return self._end(_cancelled(), keep=False)
        except Exception as e:
            log.exception("vision generation failed")
            heal_random_state()
            return self._end(RpcError(GENERATION_FAILED, f"generation failed: {type(e).__name__}: {e}"))
        self._fed.append(int(token))
        if gen.on_token(int(token), lp):
            self._end()

    def _end(self, error=None, keep: bool = True) -> None:
        gen, cache = self.solo, self._cache
        self.solo = self._tokens = self._cache = None
        if error is not None:
            gen.finish_error(error)
        # Keep the KV cache for a later prompt that shares its prefix (not after a failure).
        if keep and (error is None or error.code == CANCELLED) and cache is not None and self._fed:
            try:
                self.prompt_cache.put(gen.vision.ids + self._fed, gen.vision.image_keys, cache)
            except Exception:
                log.exception("could not keep a vision prompt cache")


def _prime_positions(model, inputs: Inputs, kwargs: dict) -> bool:
    """Qwen-style models keep multimodal rope positions on the model: derive them from the full
    prompt before continuing from a cached prefix (mlx-vlm's own helper for its prompt cache)."""
    try:
        from mlx_vlm.generate.dispatch import _prime_cached_prefix_rope_state
    except ImportError:
        return False
    return bool(_prime_cached_prefix_rope_state(model, inputs.input_ids, inputs.mask, kwargs))
