"""Structured output: generate's `response_format` held at every token.

A format becomes an llguidance grammar (JSON Schema, regex or Lark), checked here with a JSON
Pointer for every mistake. Compiling needs the model's vocabulary index (built once per model)
and a matcher per (model, format), kept in a bounded LRU; both are made on a worker thread so the
engine does not wait for them (llguidance drops the GIL while compiling a grammar, though not while
indexing a vocabulary, which happens once per model). Each request gets a copy of the matcher inside a logits processor
that mlx-lm calls once per token, in generate_step and in BatchGenerator alike: it feeds the
previous token to the matcher and masks every token the grammar forbids (plain MLX on CPU,
llguidance's Metal kernel where Metal exists)."""

import collections
import json
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from .errors import INVALID_PARAMS, RpcError, internal

log = logging.getLogger(__name__)

FORMATS = ["json_schema", "json_object", "regex", "grammar"]
GRAMMAR_SYNTAXES = ["lark"]
# String formats llguidance enforces and the tests verify (others are refused, never ignored).
STRING_FORMATS = ["date-time", "time", "date", "email", "ipv4", "ipv6", "uuid"]
# JSON Schema keywords that are enforced (or are annotations that need no enforcing).
SCHEMA_KEYWORDS = [
    "$schema", "$id", "$ref", "$defs", "definitions", "$comment", "title", "description", "default",
    "examples", "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType",
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
    "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern", "format", "anyOf", "allOf",
]
# Every other keyword of JSON Schema (2020-12 and earlier drafts): refused with its path.
_UNSUPPORTED = {
    "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$vocabulary",
    "oneOf", "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
    "propertyNames", "contains", "minContains", "maxContains", "uniqueItems", "additionalItems",
    "unevaluatedItems", "unevaluatedProperties", "contentSchema", "x-guidance",
}
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "allOf")
_SUBSCHEMA_ONE = ("additionalProperties", "items")
# JSON output with fixed separators: a model cannot wander off into whitespace.
_JSON_OPTIONS = {"whitespace_flexible": False}

CACHE_SIZE = 64
_lock = threading.Lock()
_specs: collections.OrderedDict = collections.OrderedDict()      # canonical format → _Spec
_matchers: collections.OrderedDict = collections.OrderedDict()   # (vocab serial, canonical) → LLMatcher
_vocabs: dict = {}                                               # id(loaded) → (weakref, _Vocab)
_stats = {"hits": 0, "misses": 0}
_compile_ms: collections.deque = collections.deque(maxlen=256)
_serial = 0
_pool = None


def capabilities() -> dict:
    return {"response_formats": list(FORMATS), "grammar_syntaxes": list(GRAMMAR_SYNTAXES),
            "json_schema_keywords": list(SCHEMA_KEYWORDS), "string_formats": list(STRING_FORMATS)}


def cache_info() -> dict:
    with _lock:
        return {"entries": len(_matchers), "capacity": CACHE_SIZE, **_stats}


# ---- reading a format: grammar text, or -32602 with a JSON Pointer ----
class _Spec:
    def __init__(self, kind: str, grammar: str, schema=None):
        self.kind = kind           # one of FORMATS
        self.grammar = grammar     # llguidance's grammar text
        self.schema = schema       # the JSON Schema, for JSON formats

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_schema", "json_object")


def _bad(message: str, path: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid response_format: {message}", path=path)


def _check_grammar(grammar: str, path: str, what: str) -> None:
    from llguidance import LLMatcher

    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise _bad(f"{what}: {messages[0].strip()}", path)


def _pointer(parts) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve_ref(root, ref: str) -> bool:
    if not ref.startswith("#"):
        return False
    node = root
    for part in [p.replace("~1", "/").replace("~0", "~") for p in ref[1:].split("/")[1:]]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _walk_schema(root, node, path: str) -> None:
    """Refuse what cannot be enforced, naming where it is."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise _bad("a schema must be an object or a boolean", path)
    for key, value in node.items():
        where = f"{path}/{_pointer([key])[1:]}"
        if key in _UNSUPPORTED:
            raise _bad(f"the JSON Schema keyword {key!r} is not supported (supported: {', '.join(SCHEMA_KEYWORDS)})", where)
        if key == "format" and value not in STRING_FORMATS:
            raise _bad(f"the string format {value!r} is not supported (supported: {', '.join(STRING_FORMATS)})", where)
        if key == "$ref" and not _resolve_ref(root, value):
            raise _bad(f"$ref {value!r} does not point into this schema (only local refs like #/$defs/Name)", where)
        if key == "pattern":
            _check_pattern(value, where)
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                if key == "patternProperties":
                    _check_pattern(name, f"{where}/{_pointer([name])[1:]}")
                _walk_schema(root, sub, f"{where}/{_pointer([name])[1:]}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                _walk_schema(root, sub, f"{where}/{i}")
        elif key in _SUBSCHEMA_ONE and isinstance(value, (dict, bool)):
            _walk_schema(root, value, where)


def _check_pattern(pattern: str, path: str) -> None:
    from llguidance import LLMatcher

    _check_grammar(LLMatcher.grammar_from_regex(pattern), path, f"the pattern {pattern!r} does not compile")


def _json_spec(schema, path: str, kind: str) -> _Spec:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from llguidance import LLMatcher

    if not isinstance(schema, (dict, bool)):
        raise _bad("the schema must be a JSON object", path)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise _bad(f"the schema is not valid JSON Schema: {e.message}", path + _pointer(e.absolute_path)) from None
    _walk_schema(schema, schema, path)
    grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    _check_grammar(grammar, path, "the schema cannot be enforced")
    return _Spec(kind, grammar, schema)


def _parse(fmt: dict) -> _Spec:
    from llguidance import LLMatcher

    kind = fmt["type"]
    if kind == "json_schema":
        return _json_spec(fmt["json_schema"]["schema"], "/response_format/json_schema/schema", kind)
    if kind == "json_object":
        return _json_spec({"type": "object"}, "/response_format", kind)
    if kind == "regex":
        grammar = LLMatcher.grammar_from_regex(fmt["pattern"])
        _check_grammar(grammar, "/response_format/pattern", "the regex does not compile")
        return _Spec(kind, grammar)
    grammar = LLMatcher.grammar_from_lark(fmt["grammar"])
    _check_grammar(grammar, "/response_format/grammar", "the Lark grammar has an error")
    return _Spec(kind, grammar)


def _canonical(fmt: dict) -> str:
    # strict and name do not change the grammar; everything else does.
    slim = dict(fmt)
    if "json_schema" in slim:
        slim["json_schema"] = slim["json_schema"].get("schema")
    return json.dumps(slim, sort_keys=True, separators=(",", ":"))


def spec_for(fmt: dict) -> tuple[str, _Spec]:
    key = _canonical(fmt)
    with _lock:
        spec = _specs.get(key)
        if spec is not None:
            _specs.move_to_end(key)
            return key, spec
    spec = _parse(fmt)
    with _lock:
        _specs[key] = spec
        while len(_specs) > CACHE_SIZE:
            _specs.popitem(last=False)
    return key, spec


# ---- the vocabulary index and compiled matchers ----
class _Vocab:
    def __init__(self, loaded):
        from llguidance import LLTokenizer

        global _serial
        tokenizer = loaded.tokenizer
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        backend = getattr(hf, "backend_tokenizer", None)
        config = loaded.config
        n_vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if backend is None or not n_vocab:
            raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} has no fast (tokenizers) tokenizer, so response_format cannot be enforced on it",
                           path="/response_format")
        eos = [t for t in sorted(tokenizer.eos_token_ids) if 0 <= t < n_vocab]
        try:
            self.lltok = LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos or None)
        except Exception as e:
            raise RpcError(INVALID_PARAMS, f"the tokenizer of model {loaded.id!r} cannot be indexed for response_format: {e}",
                           path="/response_format") from None
        self.n_vocab = n_vocab
        with _lock:
            _serial += 1
            self.serial = _serial


def _vocab(loaded) -> _Vocab:
    with _lock:
        entry = _vocabs.get(id(loaded))
        if entry is not None and entry[0]() is loaded:
            return entry[1]
    started = time.perf_counter()
    vocab = _Vocab(loaded)
    log.info("indexed the vocabulary of %s for structured output in %.0f ms", loaded.id, (time.perf_counter() - started) * 1000)
    with _lock:
        # Models gone since (unloaded): drop their index and compiled matchers.
        dead = {k: v.serial for k, (ref, v) in _vocabs.items() if ref() is None or ref() is loaded}
        for k in dead:
            del _vocabs[k]
        for key in [key for key in _matchers if key[0] in dead.values()]:
            del _matchers[key]
        _vocabs[id(loaded)] = (weakref.ref(loaded), vocab)
    return vocab


def _template(loaded, fmt: dict):
    """(vocab, spec, a pristine matcher) for a model and a format, from the caches when possible."""
    from llguidance import LLMatcher

    key, spec = spec_for(fmt)
    vocab = _vocab(loaded)
    mkey = (vocab.serial, key)
    with _lock:
        matcher = _matchers.get(mkey)
        if matcher is not None:
            _matchers.move_to_end(mkey)
            _stats["hits"] += 1
            return vocab, spec, matcher
        _stats["misses"] += 1
    started = time.perf_counter()
    matcher = LLMatcher(vocab.lltok, spec.grammar, log_level=0)  # drops the GIL while compiling
    _compile_ms.append((time.perf_counter() - started) * 1000)
    if matcher.is_error():
        raise _bad(matcher.get_error().splitlines()[0], "/response_format")
    with _lock:
        _matchers[mkey] = matcher
        while len(_matchers) > CACHE_SIZE:
            _matchers.popitem(last=False)
    return vocab, spec, matcher


def compile_ms() -> list[float]:
    return list(_compile_ms)


# ---- off the engine thread: check and compile, then queue ----
def compile_then_queue(server, gen) -> None:
    """Check and compile gen's format (response_format or a forced tool call) on the worker, then hand gen to the engine; a bad
    format is answered -32602 there and never reaches the engine."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-sidecar-compile")
    _pool.submit(_compile_job, server, gen)


def _compile_job(server, gen) -> None:
    req = gen.req
    if req.cancel_requested:
        return  # cancelled while waiting here: already answered
    try:
        if getattr(gen, "tool_plan", None) is not None:
            # Tool schemas (tools.py); a forced call becomes the format to compile.
            gen.format = gen.tool_plan.check() or gen.format
        fmt = gen.format  # response_format, or a forced tool call's grammar
        if fmt:
            spec_for(fmt)
            loaded = server.engine.models.get(gen.model_id)
            if loaded is not None and loaded.tokenizer is not None:
                _template(loaded, fmt)   # else the model is still loading: the engine compiles it
    except RpcError as e:
        req.fail(e)
        return
    except Exception as e:
        log.exception("could not compile a response_format")
        req.fail(internal("generate", e))
        return
    server.engine.generate(gen)


# ---- per request, on the engine thread ----
def start(loaded, fmt: dict, stop_ids) -> "Constraint":
    vocab, spec, template = _template(loaded, fmt)
    return Constraint(template.deep_copy(), vocab, spec, stop_ids)


class Constraint:
    """An mlx-lm logits processor that holds one request to its format. Call n (from 0) first
    feeds the n-th generated token if nobody has yet; the request's own on_token feeds tokens
    too (`note`), so the matcher never depends on how long the `tokens` history is."""

    def __init__(self, matcher, vocab: _Vocab, spec: _Spec, stop_ids):
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.spec = spec
        self.failed = None         # why the matcher broke (never expected)
        self._calls = 0
        self._fed = 0
        self._generated = 0
        self._mask = allocate_token_bitmask(1, vocab.n_vocab)
        self._words = self._mask.view(np.uint32)
        # End tokens llguidance would allow that do not end this request: never allowed.
        self._blocked = [t for t in vocab.lltok.eos_tokens if t not in stop_ids]

    def __call__(self, tokens, logits):
        n = self._calls
        self._calls += 1
        if n > self._fed:
            self._feed(int(tokens[-1].item()))
        from llguidance.numpy import fill_next_token_bitmask

        if self.matcher.is_stopped():
            # Complete: the request ends on its last token, and this draw is thrown away (an
            # all -inf row would only make NaNs).
            return logits
        fill_next_token_bitmask(self.matcher, self._mask)
        if self.matcher.is_error():
            self.failed = self.failed or self.matcher.get_error()
            return logits
        for t in self._blocked:
            self._words[0, t >> 5] &= ~(1 << (t & 31)) & 0xFFFFFFFF
        return _apply(logits, self._mask)

    def _feed(self, token: int) -> None:
        self._fed += 1
        if not self.matcher.consume_token(token) and self.failed is None:
            self.failed = self.matcher.get_error() or f"token {token} broke the format"

    def note(self, token: int) -> bool:
        """The request took a token (not an end token); True when the format is now complete."""
        self._generated += 1
        if self._fed < self._generated:
            self._feed(token)
        return self.matcher.is_stopped() and self.failed is None

    def rewind(self) -> None:
        """The last call's token will be fed again (a request moving into the batch): it is
        already in the matcher, so only forget the call."""
        self._calls -= 1

    def result(self, text: str, reason: str, cut: bool) -> dict:
        """format_complete, and parsed for JSON formats, for the final result."""
        complete = reason == "stop" and not cut and self.failed is None and self.matcher.is_accepting()
        out = {"format_complete": complete}
        if self.spec.is_json:
            out["parsed"] = None
            if complete:
                try:
                    out["parsed"] = json.loads(text)
                except ValueError:
                    log.warning("constrained JSON output did not parse: %r", text[:200])
                    out["format_complete"] = False
        return out


_metal = None


def _apply(logits, mask):
    """logits where the mask allows the token, -inf elsewhere."""
    import mlx.core as mx
    import numpy as np

    global _metal
    if _metal is None:
        try:
            _metal = bool(mx.metal.is_available())
        except Exception:
            _metal = False
    if _metal:
        try:
            from llguidance.mlx import apply_token_bitmask_kernel

            return apply_token_bitmask_kernel(logits.reshape(1, -1), mx.array(mask)).reshape(logits.shape)
        except Exception:
            log.exception("llguidance's Metal mask failed; using plain MLX from now on")
            _metal = False
    v = logits.shape[-1]
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")
    if allowed.shape[0] < v:
        allowed = np.pad(allowed, (0, v - allowed.shape[0]))
    return mx.where(mx.array(allowed[:v].astype(np.bool_)), logits, mx.array(-np.inf, dtype=logits.dtype))
