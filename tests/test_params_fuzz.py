"""Fuzzing params (issue 15's hunt for siblings): random values of every type, size and sign in every
field of generate, tokenize and detokenize, sent over MessagePack (it carries NaN, infinities and
64-bit integers) to a real runtime with a model loaded. Each request must get exactly one answer: a
result or a documented client error, never an internal error or a failed generation, and a
canary request afterwards must give the same text as before.

MLX_SIDECAR_FUZZ_EXAMPLES raises the number of examples for a long run (`make fuzz`)."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_sidecar.testing.pipe import Pipe

EXAMPLES = int(os.environ.get("MLX_SIDECAR_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLIENT_ERRORS = {-32602, -32600, -32000, -32002, -32003}

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1),
    st.sampled_from([0, 1, -1, 2, 419, 420, 421, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 5.0, 1e-300, 1e300, 2.0 ** 63, float("nan"), float("inf")]),
    st.text(max_size=20), st.sampled_from(["", "m", "\x00", "\ud7ff" * 3]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)

GENERATE_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "logit_bias", "stop", "stop_token_ids", "seed", "stream", "stream_options",
                   "messages", "prompt", "response_format"]


def field_value(name):
    """Mostly values of the right type near and past its edges; sometimes anything at all."""
    typed = {
        "stream_options": st.fixed_dictionaries({}, optional={"chunk_tokens": scalars, "max_latency_ms": scalars}),
        "logit_bias": st.dictionaries(st.one_of(st.from_regex(r"\A[0-9]{1,22}\Z"), st.text(max_size=4)), scalars, max_size=3),
        "stop_token_ids": st.lists(scalars, max_size=3),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
                                                   optional={"content": values}), max_size=3),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20)),
    }
    return st.one_of(typed.get(name, scalars), values) if name in typed else st.one_of(scalars, values)


@st.composite
def generate_params(draw):
    params = {"model": "m", "prompt": "fuzz", "max_tokens": 4}
    for name in draw(st.lists(st.sampled_from(GENERATE_FIELDS), max_size=4, unique=True)):
        params[name] = draw(field_value(name))
    if "messages" in params and "prompt" in params and draw(st.booleans()):
        del params["prompt"]
    if isinstance(params.get("max_tokens"), int) and params["max_tokens"] > 64:
        params["max_tokens"] = 64  # keep accepted requests short; the schema's bound is tested elsewhere
    return params


@st.composite
def token_params(draw):
    method = draw(st.sampled_from(["tokenize", "detokenize"]))
    params = {"model": "m"}
    if method == "tokenize":
        params.update(draw(st.fixed_dictionaries({}, optional={"prompt": values, "messages": values, "add_special_tokens": values})))
    else:
        params["tokens"] = draw(st.one_of(st.lists(scalars, max_size=5), values))
    return method, params


@pytest.fixture(scope="module")
def runtime(tiny_model):
    p = Pipe("msgpack", in_process=True)
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "m"})
    assert "result" in answer
    yield p
    p.close()


def canary(p):
    answer, _ = p.request("generate", {"model": "m", "prompt": "canary", "max_tokens": 6, "temperature": 0.8, "seed": 7, "stream": False})
    return answer["result"]["text"]


def check_one_answer(p, method, params):
    answer, _ = p.request(method, params, timeout=60)
    if "error" in answer:
        assert answer["error"]["code"] in CLIENT_ERRORS, (params, answer)
        assert answer["error"]["message"]
    return answer


@FUZZ
@given(params=generate_params())
def test_generate_params(runtime, params):
    before = getattr(test_generate_params, "canary", None) or canary(runtime)
    test_generate_params.canary = before
    check_one_answer(runtime, "generate", params)
    assert canary(runtime) == before


@FUZZ
@given(call=token_params())
def test_tokenize_params(runtime, call):
    check_one_answer(runtime, *call)
    assert runtime.request("runtime/ping")[0]["result"] == {}
