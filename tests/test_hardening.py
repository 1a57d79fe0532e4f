"""Single inputs that once crashed, wedged or poisoned the runtime (issue 15). Each test sends the
bad input over the real pipe, checks its answer, then checks that the runtime still serves."""

import math

import msgpack
import pytest

from conftest import FRAMINGS


def code(answer):
    return answer["error"]["code"] if "error" in answer else None


def raw_request(framing: str, body_json: bytes, body_msgpack: bytes) -> bytes:
    if framing == "msgpack":
        return body_msgpack
    if framing == "lsp":
        return b"Content-Length: %d\r\n\r\n" % len(body_json) + body_json
    return body_json + b"\n"


def still_serving(p, id=9999):
    answer, _ = p.request("runtime/ping", id=id, timeout=10)
    assert answer == {"jsonrpc": "2.0", "id": id, "result": {}}


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("depth", [150, 1000, 5000])
def test_deeply_nested_params_are_refused(spawn, framing, depth):
    p = spawn(framing)
    body_json = b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"model":' + b"[" * depth + b"]" * depth + b"}}"
    # msgpack: map of 4 with params {"model": [[[...nil]]]}
    nested = b"\x91" * depth + b"\xc0"
    body_mp = (b"\x84\xa7jsonrpc\xa32.0\xa2id\x01\xa6method\xa8tokenize\xa6params\x81\xa5model" + nested)
    p.send_raw(raw_request(framing, body_json, body_mp))
    answer = p.recv(timeout=15)
    assert code(answer) in (-32700, -32600, -32602), answer
    still_serving(p)


@pytest.mark.parametrize("framing", FRAMINGS)
def test_depth_limit_reports_the_path(spawn, framing):
    p = spawn(framing)
    value = []
    for _ in range(120):
        value = [value]
    answer, _ = p.request("tokenize", {"model": "m", "prompt": "x", "x": value})
    assert code(answer) == -32602
    assert "deep" in answer["error"]["message"]
    still_serving(p)


@pytest.mark.parametrize("params, path", [
    ({"top_k": 10 ** 6}, "/top_k"),
    ({"top_k": 421}, "/top_k"),
    ({"top_k": 1.0}, "/top_k"),
    ({"top_k": 5.0}, "/top_k"),
    ({"top_k": 2 ** 31}, "/top_k"),
    ({"top_k": 2 ** 63}, "/top_k"),
    ({"seed": 1.0}, "/seed"),
    ({"seed": 2 ** 64}, "/seed"),
    ({"repetition_penalty": 2 ** 63}, "/repetition_penalty"),
    ({"max_tokens": 2 ** 63}, "/max_tokens"),
    ({"max_tokens": 3.0}, "/max_tokens"),
    ({"stop_token_ids": [5.0]}, "/stop_token_ids/0"),
    ({"stop_token_ids": [2 ** 63]}, "/stop_token_ids/0"),
    ({"logit_bias": {"99999999999999999999": 1}}, "/logit_bias/99999999999999999999"),
    ({"stream_options": {"max_latency_ms": 1e13}}, "/stream_options/max_latency_ms"),
    ({"stream_options": {"max_latency_ms": 1e300}}, "/stream_options/max_latency_ms"),
    ({"stream_options": {"max_latency_ms": 2 ** 63}}, "/stream_options/max_latency_ms"),
    ({"stream_options": {"chunk_tokens": 2 ** 40}}, "/stream_options/chunk_tokens"),
])
def test_out_of_range_values_are_refused_and_do_not_poison(loaded, params, path):
    p = loaded
    answer, _ = p.request("generate", {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": False, **params})
    assert code(answer) == -32602, answer
    assert answer["error"]["data"]["path"] == path, answer
    # The next sampled request, on any setting, is unaffected.
    for extra in ({"temperature": 0.7}, {"temperature": 0.7, "top_k": 3}, {"temperature": 0.7, "seed": 1}):
        ok, _ = p.request("generate", {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": False, **extra})
        assert ok["result"]["usage"]["completion_tokens"] == 3, ok


def test_top_k_equal_to_the_vocabulary_is_no_filter(loaded):
    # The tiny model's vocabulary has 420 rows: top_k 420 keeps every token, like 0.
    a, _ = loaded.request("generate", {"model": "m", "prompt": "hi", "max_tokens": 8, "stream": False, "seed": 3, "top_k": 420})
    b, _ = loaded.request("generate", {"model": "m", "prompt": "hi", "max_tokens": 8, "stream": False, "seed": 3})
    assert a["result"]["text"] == b["result"]["text"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                   "frequency_penalty", "stream_options.max_latency_ms", "logit_bias.5"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(spawn, tiny_model, field, bad):
    # Only MessagePack can carry NaN and infinities.
    p = spawn("msgpack")
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "m"})
    assert "result" in answer
    params = {"model": "m", "prompt": "hi", "max_tokens": 3}
    if "." in field:
        outer, inner = field.split(".")
        params[outer] = {inner: bad}
    else:
        params[field] = bad
    answer, _ = p.request("generate", params)
    assert code(answer) == -32602, answer
    assert answer["error"]["data"]["path"] == "/" + field.replace(".", "/")
    ok, notes = p.request("generate", {"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.5,
                                       "stream_options": {"max_latency_ms": 5}})
    assert ok["result"]["usage"]["completion_tokens"] == 5


def test_json_infinity_cannot_sneak_in(loaded):
    # 1e400 is not a JSON number the runtime accepts (it would be infinity).
    loaded.send_raw(b'{"jsonrpc":"2.0","id":7,"method":"generate","params":{"model":"m","prompt":"x","temperature":1e400}}\n')
    answer = loaded.recv()
    assert code(answer) in (-32700, -32602), answer
    still_serving(loaded)


def test_nan_latency_does_not_wedge_the_writer(spawn, tiny_model):
    p = spawn("msgpack")
    p.request("model/load", {"model": tiny_model, "id": "m"})
    answer, _ = p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 3, "stream_options": {"max_latency_ms": math.nan}})
    assert code(answer) == -32602
    # The latency flush still works for others: a 10-token stream with chunk_tokens 1000 still
    # gets its tokens before the answer (sent by the 1 ms deadline or the final flush).
    answer, notes = p.request("generate", {"model": "m", "prompt": "x", "max_tokens": 10,
                                           "stream_options": {"max_latency_ms": 1, "chunk_tokens": 1000}})
    tokens = [t for n in notes if n.get("method") == "generate/chunk" for t in n["params"]["token_ids"]]
    assert len(tokens) == 10
    still_serving(p)


def test_msgpack_mixed_key_types(spawn):
    p = spawn("msgpack")
    p.send_raw(b"\x84\xa7jsonrpc\xa32.0\xa2id\x01\xa6method\xacruntime/ping\xa6params\x82\xa1a\x01\xc4\x01b\x02")
    answer = p.recv(timeout=10)
    assert code(answer) in (-32700, -32600, -32602), answer
    still_serving(p)


@pytest.mark.parametrize("params", [
    {"model": "m", "prompt": "x", "stream_options": {1: 2}},
    {"model": "m", "prompt": "x", "logit_bias": {5: 1.0}},
])
def test_msgpack_non_string_keys_in_params(spawn, params):
    p = spawn("msgpack")
    p.send_raw(msgpack.packb({"jsonrpc": "2.0", "id": 3, "method": "generate", "params": params}, use_bin_type=True,
                             strict_types=False))
    answer = p.recv(timeout=10)
    assert code(answer) in (-32700, -32600, -32602), answer
    still_serving(p)
