"""The protocol spec as data: loads protocol/ and validates params against its JSON Schemas."""

import json
import math
from functools import lru_cache
from pathlib import Path

from .errors import INVALID_PARAMS, RpcError


def protocol_dir() -> Path:
    """protocol/ inside an installed wheel, else the one at the root of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "protocol", here.parents[1] / "protocol"):
        if (candidate / "protocol.json").is_file():
            return candidate
    raise FileNotFoundError("protocol/protocol.json not found next to mlx_sidecar or at the repository root")


@lru_cache(maxsize=1)
def index() -> dict:
    return json.loads((protocol_dir() / "protocol.json").read_text())


@lru_cache(maxsize=1)
def _registry():
    from referencing import Registry, Resource

    resources = []
    for path in sorted((protocol_dir() / "schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


MAX_DEPTH = 100  # nesting of arrays/objects in params; deeper is refused before schema checks


@lru_cache(maxsize=1)
def _strict_validator_class():
    """Draft 2020-12 with stricter types: an integer must be written as one (1.0 is not), and a
    number must be finite (MessagePack can carry NaN and infinities; JSON Schema alone lets them in)."""
    from jsonschema import Draft202012Validator, validators

    def is_integer(_, v):
        return type(v) is int

    def is_number(_, v):
        return type(v) is int or (type(v) is float and math.isfinite(v))

    checker = Draft202012Validator.TYPE_CHECKER.redefine_many({"integer": is_integer, "number": is_number})
    return validators.extend(Draft202012Validator, type_checker=checker)


@lru_cache(maxsize=None)
def _validator(schema_file: str):
    schema = json.loads((protocol_dir() / schema_file).read_text())
    return _strict_validator_class()(schema, registry=_registry())


def check_shape(value) -> None:
    """Refuse what no schema should have to see: nesting deeper than MAX_DEPTH, non-finite
    numbers and non-string object keys, anywhere. Iterative, so no input can overflow the stack."""
    stack = [(value, 0, ())]
    while stack:
        v, depth, path = stack.pop()
        if type(v) is float:
            if not math.isfinite(v):
                raise RpcError(INVALID_PARAMS, f"{_pointer(path) or 'params'}: {v} is not a finite number; send a finite value",
                               path=_pointer(path))
            continue
        if isinstance(v, dict):
            items = v.items()
        elif isinstance(v, list):
            items = enumerate(v)
        else:
            continue
        if depth >= MAX_DEPTH:
            raise RpcError(INVALID_PARAMS, f"params are nested more than {MAX_DEPTH} levels deep at {_pointer(path) or '/'}; flatten them",
                           path=_pointer(path))
        for k, item in items:
            if isinstance(v, dict) and type(k) is not str:
                raise RpcError(INVALID_PARAMS, f"{_pointer(path) or 'params'} has a key of type {type(k).__name__}; object keys must be strings",
                               path=_pointer(path))
            stack.append((item, depth + 1, path + (k,)))


@lru_cache(maxsize=None)
def _empty_ok(schema_file: str) -> bool:
    """Whether {} is valid, so the hot path (runtime/ping) can skip validation."""
    return _validator(schema_file).is_valid({})


def schema_file(method: str, part: str = "params") -> str | None:
    """The schema path (relative to protocol/) for a method's or notification's params/result."""
    ix = index()
    for table in ("methods", "client_notifications", "server_notifications"):
        entry = ix[table].get(method)
        if entry is not None:
            return entry.get(part)
    return None


def validate(method: str, part: str, value) -> None:
    """Raise -32602 naming the failing field's JSON Pointer when value breaks the schema."""
    file = schema_file(method, part)
    if file is None or (not value and _empty_ok(file)):
        return
    check_shape(value)
    validator = _validator(file)
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is not None:
        path, message = _describe(error, value)
        raise RpcError(INVALID_PARAMS, f"invalid params for {method}: {message}", path=path)


def _pointer(parts) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _describe(error, root) -> tuple[str, str]:
    """A JSON Pointer and a message that says what to change."""
    parts = list(error.absolute_path)
    if "propertyNames" in error.absolute_schema_path and isinstance(error.instance, str):
        parts.append(error.instance)  # a bad key: point at the key itself
    where = _pointer(parts)
    v = error.validator
    if v == "required":
        missing = [k for k in error.validator_value if not (isinstance(error.instance, dict) and k in error.instance)]
        name = missing[0] if missing else error.validator_value[0]
        return _pointer(parts + [name]), f"{_pointer(parts + [name])} is required"
    if v == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        name = extra[0] if extra else "?"
        known = ", ".join(sorted(allowed)) or "none"
        return _pointer(parts + [name]), f"unknown field {_pointer(parts + [name])} (known fields: {known})"
    if v == "anyOf" and all(set(s) == {"required"} for s in error.validator_value):
        names = " or ".join(s["required"][0] for s in error.validator_value)
        return where or "", f"give {names}"
    if v == "not" and "required" in error.validator_value:
        other = error.validator_value["required"][0]
        path = list(error.schema_path)
        first = path[path.index("dependentSchemas") + 1] if "dependentSchemas" in path else "?"
        return _pointer(parts + [other]), f"give {first} or {other}, not both"
    message = error.message
    if len(message) > 300:  # jsonschema quotes the whole offending value
        message = message[:300] + "…"
    return where or "", f"{where or 'params'}: {message}"


@lru_cache(maxsize=None)
def default(method: str, *path: str):
    """A param's default, from the "default" keyword in the method's params schema (the one source)."""
    schema = json.loads((protocol_dir() / schema_file(method, "params")).read_text())
    for name in path:
        schema = schema["properties"][name]
    return schema["default"]


def problem(method: str, part: str, value) -> str | None:
    """What is wrong with value under the method's params/result schema, or None (for test clients)."""
    file = schema_file(method, part)
    if file is None:
        return None
    from jsonschema.exceptions import best_match

    error = best_match(_validator(file).iter_errors(value))
    return None if error is None else f"{_pointer(error.absolute_path) or '/'}: {error.message[:300]}"
