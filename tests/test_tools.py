"""Tool calls against the real runtime: a tiny model whose template takes tools (calls parsed with
mlx-lm's json_tools parser, markup never streamed), a tiny model without (the fallback prompt), a
forced call (tool_choice required / named) held to the schema, bad input -32602 with a path, and
the default model (no tool template) making a valid call on 20 seeds at once."""

import json
import os

import pytest
from jsonschema import Draft202012Validator

from conftest import chunks_of

from mlx_sidecar.testing import make_model
from mlx_sidecar.testing.models import TOOLS_CHAT_TEMPLATE

TIME = {"type": "function", "function": {"name": "get_time", "description": "The current time in a time zone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}}, "required": ["tz"],
                       "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What time is it in UTC?"}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("tiny-tools"), preset="tiny", chat_template=TOOLS_CHAT_TEMPLATE))


@pytest.fixture
def both(serve, tiny_model, tool_model):
    """One runtime with the tool-template model as "t" and the plain ChatML one as "m"."""
    p = serve()
    for path, name in ((tool_model, "t"), (tiny_model, "m")):
        answer, _ = p.request("model/load", {"model": path, "id": name})
        assert "result" in answer, answer
    return p


def run(p, params):
    answer, notes = p.request("generate", params)
    return answer, chunks_of(notes, answer["id"])


def joined_deltas(chunks):
    """The tool_calls of all chunks joined per index, as OpenAI clients assemble them."""
    calls = {}
    for c in chunks:
        for d in c.get("tool_calls", ()):
            call = calls.setdefault(d["index"], {"function": {"name": "", "arguments": ""}})
            if "id" in d:
                call["id"], call["type"] = d["id"], d["type"]
            call["function"]["name"] += d["function"].get("name", "")
            call["function"]["arguments"] += d["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def forced_text(body: str) -> dict:
    """A regex response_format that makes a random model write exactly body."""
    import re

    return {"type": "regex", "pattern": re.escape(body)}


@pytest.mark.parametrize("model,start", [("t", "<tool_call>\n"), ("m", "<tool_call>\n")])
def test_auto_call_is_parsed_and_never_streamed_as_text(both, model, start):
    """Template route ("t": json_tools from its template) and fallback route ("m"): the text before
    the call streams, the markup does not, the call arrives as a tool_calls delta."""
    body = 'Let me check. ' + start + '{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    answer, chunks = run(both, {"model": model, "messages": ASK, "tools": [TIME, WEATHER], "max_tokens": 80,
                                "temperature": 0, "response_format": forced_text(body)})
    result = answer["result"]
    assert result["finish_reason"] == "tool_calls", result
    assert result["text"] == "Let me check. "
    assert "".join(c["text"] for c in chunks) == result["text"]
    [call] = result["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_time" and json.loads(call["function"]["arguments"]) == {"tz": "UTC"}
    assert joined_deltas(chunks) == result["tool_calls"]
    assert "tool_parse_error" not in result


def test_auto_markup_that_does_not_parse_stays_text(both):
    body = '<tool_call>\n{"name": get_time}\n</tool_call>'
    answer, chunks = run(both, {"model": "t", "messages": ASK, "tools": [TIME], "max_tokens": 60, "temperature": 0,
                                "response_format": forced_text(body)})
    result = answer["result"]
    assert result["finish_reason"] == "stop" and "tool_calls" not in result
    assert result["text"] == body and "did not parse" in result["tool_parse_error"]
    assert "".join(c["text"] for c in chunks) == body


@pytest.mark.parametrize("model", ["t", "m"])
def test_forced_calls_are_valid_and_stream_as_they_form(both, model):
    """required (either function) and a named function: always exactly one call whose arguments
    validate; seeds at temperature 1 on a random model, all at once (one batch)."""
    ids = {}
    for seed in range(6):
        choice = "required" if seed % 2 else {"type": "function", "function": {"name": "get_weather"}}
        ids[both.start("generate", {"model": model, "messages": ASK, "tools": [TIME, WEATHER], "tool_choice": choice,
                                    "max_tokens": 200, "seed": seed, "temperature": 1.0,
                                    "stream_options": {"chunk_tokens": 1}})] = choice
    answers, notes = {}, []
    while len(answers) < len(ids):
        msg = both.recv(120)
        (answers.__setitem__(msg["id"], msg) if msg.get("id") in ids else notes.append(msg))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (TIME, WEATHER)}
    for id, choice in ids.items():
        result = answers[id]["result"]
        assert result["finish_reason"] == "tool_calls" and result["text"] == "", result
        [call] = result["tool_calls"]
        name = call["function"]["name"]
        if choice != "required":
            assert name == "get_weather"
        Draft202012Validator(schemas[name]).validate(json.loads(call["function"]["arguments"]))
        chunks = chunks_of(notes, id)
        assert all(c["text"] == "" for c in chunks)
        assert joined_deltas(chunks) == [call]
        assert sum(1 for c in chunks if c.get("tool_calls")) > 2  # the arguments came in pieces


def test_round_trip_messages_render_on_both_routes(both):
    """call → tool result → answer: assistant tool_calls and tool messages render (template and
    fallback), and the answer is plain text."""
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    for model in ("t", "m"):
        answer, _ = both.request("tokenize", {"model": model, "messages": history})
        assert "result" in answer
        answer, chunks = run(both, {"model": model, "messages": history, "tools": [TIME], "max_tokens": 8, "temperature": 0})
        assert answer["result"]["finish_reason"] == "length" and "tool_calls" not in answer["result"]


@pytest.mark.parametrize("params,path", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "/tools/0/function/parameters/type"),
    ({"tools": [TIME, TIME]}, "/tools/1/function/name"),
    ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "/tool_choice/function/name"),
    ({"tool_choice": "required"}, "/tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "/tools/0/function/name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}], "tool_choice": "required"},
     "/tools/0/function/parameters/not"),
    ({"tools": [TIME], "tool_choice": "required", "response_format": {"type": "json_object"}}, "/response_format"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "/messages/1/tool_call_id"),
    ({"messages": ASK + [{"role": "tool", "content": "1"}]}, "/messages/1/tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "/messages/1/tool_calls/0/function/arguments"),
])
def test_bad_tool_input_is_refused_with_its_path(both, params, path):
    answer, _ = both.request("generate", {"model": "t", "messages": ASK, "max_tokens": 4, **params})
    assert answer["error"]["code"] == -32602, answer
    assert answer["error"]["data"]["path"] == path, answer["error"]
    assert both.request("runtime/ping")[0]["result"] is not None


@pytest.mark.skipif(os.environ.get("MLX_SIDECAR_SKIP_DEFAULT_MODEL") == "1", reason="MLX_SIDECAR_SKIP_DEFAULT_MODEL=1")
def test_default_model_required_call_is_always_valid(spawn):
    """SmolLM2 has no tool template: the fallback prompt plus the constraint give a valid call on
    every one of 20 seeds at temperature 0.7 (all sent at once: one batch)."""
    p = spawn()
    answer, _ = p.request("model/load", {"model": "default", "id": "d"}, timeout=600)
    assert "result" in answer, answer
    ids = [p.start("generate", {"model": "d", "messages": [{"role": "user", "content": "What's the weather in Paris, in celsius?"}],
                                "tools": [TIME, WEATHER], "tool_choice": "required", "max_tokens": 48,
                                "temperature": 0.7, "seed": seed, "stream": False}) for seed in range(20)]
    answers = {}
    while len(answers) < len(ids):
        msg = p.recv(600)
        if msg.get("id") in ids:
            answers[msg["id"]] = msg
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (TIME, WEATHER)}
    for id in ids:
        result = answers[id]["result"]
        assert result["finish_reason"] == "tool_calls", result
        [call] = result["tool_calls"]
        Draft202012Validator(schemas[call["function"]["name"]]).validate(json.loads(call["function"]["arguments"]))
