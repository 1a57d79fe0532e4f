"""Tool calls (generate's tools, tool_choice and tool messages), OpenAI's way.

Checked before queueing (`plan`): tool schemas, tool_choice and the call ids of tool messages,
each mistake -32602 with a JSON Pointer. Rendering: a model whose tokenizer has an mlx-lm tool
parser (named in its config or inferred from its template) gets the tools through its chat
template; any other model gets FALLBACK_PROMPT in its system message, and earlier calls and
results written in the same Hermes-style markup. Decoding:
- "auto": free text; calls are cut out of the text at the parser's markers (never streamed as
  text), parsed, and streamed as `tool_calls` deltas; markup that does not parse stays text and
  the result says `tool_parse_error`.
- "required" or a named function: the output is held by the structured-output machinery to
  exactly one call, `{"name":...,"arguments":...}` with arguments valid under the function's
  schema, on every model; the arguments stream as they form.
- "none": no calls are parsed; the tools still reach the template."""

import collections
import json
import threading
import uuid

from .errors import INVALID_PARAMS, RpcError

# The fallback markup (Hermes / Qwen 2.5 style), parsed by mlx-lm's json_tools parser.
FALLBACK_START = "<tool_call>"
FALLBACK_END = "</tool_call>"
FALLBACK_PROMPT = (
    "You can call functions (tools). Their definitions, one JSON object per line:\n"
    "<tools>\n{tools}\n</tools>\n"
    "{how}"
)
FALLBACK_HOW_AUTO = (
    "To call one, answer with a JSON object naming the function and its arguments, between tags:\n"
    '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>\n'
    "Function results come back inside <tool_response></tool_response> tags. Answer normally when no function is needed."
)
FALLBACK_HOW_REQUIRED = (
    'Answer now with one function call: a JSON object {"name": "<function name>", "arguments": {<arguments>}}.'
)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
CACHE_SIZE = 64
_lock = threading.Lock()
_checked: collections.OrderedDict = collections.OrderedDict()   # (tools, choice) → format or None


def _bad(message: str, path: str) -> RpcError:
    return RpcError(INVALID_PARAMS, message, path=path)


class Plan:
    """What a request's tools ask for: the functions and the choice. `check` (on the compile
    worker, never the reading thread) checks the schemas and makes a forced call's grammar."""

    def __init__(self, tools: list, choice, index: dict | None = None):
        self.tools = tools                           # OpenAI function definitions, as sent
        self.functions = {t["function"]["name"]: t["function"] for t in tools}
        self.choice = choice                         # "auto", "none", "required" or a function name
        self.forced = choice not in ("auto", "none")
        self.format = None                           # a forced call's grammar (a response_format), after check
        self._index = index or {}                    # function name → its index in tools

    def check(self):
        """Refuse tool schemas that are not JSON Schema, and for a forced call those the
        structured-output machinery cannot enforce (-32602 at the keyword's path); returns the
        forced call's format, or None. Tools that passed before are not checked again (an agent
        loop sends the same tools every turn)."""
        key = json.dumps([self.tools, self.choice], sort_keys=True)
        with _lock:
            if key in _checked:
                _checked.move_to_end(key)
                self.format = _checked[key]
                return self.format
        self.format = self._check()
        with _lock:
            _checked[key] = self.format
            while len(_checked) > CACHE_SIZE:
                _checked.popitem(last=False)
        return self.format

    def _check(self):
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        from .constraints import _json_spec

        for i, tool in enumerate(self.tools):
            fn = tool["function"]
            if "parameters" not in fn:
                continue
            try:
                Draft202012Validator.check_schema(fn["parameters"])
            except SchemaError as e:
                where = f"/tools/{i}/function/parameters" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in e.absolute_path)
                raise _bad(f"the parameters of tool {fn['name']!r} are not valid JSON Schema: {e.message}", where) from None
        if not self.forced:
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        for name in names:
            fn = self.functions[name]
            if "parameters" in fn:
                _json_spec(fn["parameters"], f"/tools/{self._index[name]}/function/parameters", "json_schema")
        return _grammar([self.functions[n] for n in names])


def plan(params: dict) -> Plan | None:
    """Check tools, tool_choice and tool messages (cheap checks, on the dispatcher thread, before
    any compute); the schemas are checked by Plan.check on the compile worker."""
    tools = params.get("tools")
    choice = params.get("tool_choice")
    if "messages" in params:
        _check_messages(params["messages"])
    if not tools:
        if choice not in (None, "none"):
            raise _bad("tool_choice needs tools; send tools or drop tool_choice", "/tool_choice")
        history = any(m.get("tool_calls") or m["role"] == "tool" for m in params.get("messages") or ())
        return Plan([], "none") if history else None  # earlier calls and results still need rendering
    if "prompt" in params:
        raise _bad("tools need messages (a chat); prompt is raw text with no place for them", "/tools")
    seen = {}
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in seen:
            raise _bad(f"two tools are named {name!r} (tools/{seen[name]} and tools/{i}); names must be unique", f"/tools/{i}/function/name")
        seen[name] = i
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in seen:
            raise _bad(f"tool_choice names the function {name!r}, but tools has no such function (tools: {', '.join(seen)})", "/tool_choice/function/name")
        choice = name
    if choice not in ("auto", "none") and params.get("response_format"):
        raise _bad("response_format cannot be combined with a required or named tool_choice (the call's own schema holds the output)", "/response_format")
    return Plan(tools, choice, seen)


def _check_messages(messages: list) -> None:
    """Every tool message answers a call made earlier; every earlier call's arguments are JSON."""
    ids = set()
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or ()):
            if m["role"] != "assistant":
                raise _bad("only assistant messages carry tool_calls", f"/messages/{i}/tool_calls")
            try:
                args = json.loads(call["function"]["arguments"])
            except ValueError as e:
                raise _bad(f"the arguments of this tool call are not JSON: {e}", f"/messages/{i}/tool_calls/{j}/function/arguments") from None
            if not isinstance(args, dict):
                raise _bad("the arguments of a tool call must be a JSON object", f"/messages/{i}/tool_calls/{j}/function/arguments")
            ids.add(call["id"])
        if m["role"] == "tool":
            if "tool_call_id" not in m:
                raise _bad("a tool message needs tool_call_id (the id of the call it answers)", f"/messages/{i}/tool_call_id")
            if m["tool_call_id"] not in ids:
                raise _bad(f"tool_call_id {m['tool_call_id']!r} matches no tool call of an earlier assistant message", f"/messages/{i}/tool_call_id")


def _lark_literal(text: str) -> str:
    return json.dumps(text)


def _grammar(functions: list) -> dict:
    """A Lark grammar (llguidance) for exactly one call to one of the functions, compact JSON."""
    lines = ["start: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
    for i, fn in enumerate(functions):
        schema = dict(fn.get("parameters") or NO_PARAMETERS)
        schema["x-guidance"] = {"whitespace_flexible": False}
        header = '{"name":' + json.dumps(fn["name"]) + ',"arguments":'
        lines.append(f"call_{i}: {_lark_literal(header)} args_{i} {_lark_literal('}')}")
        lines.append(f"args_{i}: %json {json.dumps(schema, separators=(',', ':'))}")
    return {"type": "grammar", "grammar": "\n".join(lines) + "\n"}


# ---- rendering (engine thread) ----
def template_route(tokenizer) -> bool:
    """True when the model's own template and an mlx-lm parser handle tools."""
    return bool(getattr(tokenizer, "has_tool_calling", False)) and getattr(tokenizer, "tool_parser", None) is not None


def render_messages(tokenizer, plan_: Plan, messages: list) -> tuple[list, list | None]:
    """(messages, tools) to hand to the chat template."""
    if template_route(tokenizer):
        out = []
        for m in messages:
            if m.get("tool_calls"):
                # Templates read arguments as a mapping (as mlx-lm's server passes them).
                m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                         for c in m["tool_calls"]]}
            out.append(m)
        return out, plan_.tools
    return _fallback_messages(plan_, messages), None


def _fallback_messages(plan_: Plan, messages: list) -> list:
    names = {}
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
                body = json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
                calls.append(f"{FALLBACK_START}\n{body}\n{FALLBACK_END}")
            text = ((m.get("content") or "") + "\n" if isinstance(m.get("content"), str) and m.get("content") else "") + "\n".join(calls)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            content = m.get("content")
            if isinstance(content, list):
                content = "\n".join(p.get("text", "") for p in content)
            out.append({"role": "user", "content": f"<tool_response>\n{json.dumps({'name': names.get(m['tool_call_id']), 'content': content or ''})}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if plan_.choice == "none":
        return out
    listed = [plan_.functions[plan_.choice]] if plan_.choice in plan_.functions else list(plan_.functions.values())
    tools = "\n".join(json.dumps({"type": "function", "function": fn}) for fn in listed)
    system = FALLBACK_PROMPT.format(tools=tools, how=FALLBACK_HOW_REQUIRED if plan_.forced else FALLBACK_HOW_AUTO)
    if out and out[0]["role"] in ("system", "developer") and isinstance(out[0].get("content"), str):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---- output (engine thread) ----
class AutoCalls:
    """Free text with calls inside markers: feed decoded text, get the text that is safe to
    send and the call deltas found; markup never comes out as text unless it fails to parse."""

    def __init__(self, start: str, end: str, parser, tools: list):
        self.start, self.end, self.parser, self.tools = start, end, parser, tools
        self.text = ""          # text released to the host
        self.calls: list = []   # OpenAI tool_calls
        self.error = None       # why markup did not parse (then it stayed text)
        self._pending = ""      # text not yet released (maybe a marker's start)
        self._inside = None     # the text of a call being formed, or None outside one

    def feed(self, piece: str) -> tuple[str, list]:
        self._pending += piece
        out, deltas = [], []
        while self._pending:
            if self._inside is None:
                at = self._pending.find(self.start)
                if at < 0:
                    keep = _partial_suffix(self._pending, self.start)
                    out.append(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                out.append(self._pending[:at])
                self._pending = self._pending[at + len(self.start):]
                self._inside = ""
            else:
                # The end marker may straddle what came before and this piece: search both.
                joined = self._inside + self._pending
                at = joined.find(self.end) if self.end else -1
                if at < 0:
                    self._inside, self._pending = joined, ""
                    break
                body = joined[:at]
                self._pending = joined[at + len(self.end):]
                self._inside = None
                found = self._parse(body)
                if found is None:
                    out.append(self.start + body + self.end)
                else:
                    deltas.extend(found)
        text = "".join(out)
        self.text += text
        return text, deltas

    def finish(self) -> tuple[str, list]:
        """At the end: a call without its end marker is parsed as it is, else it stays text."""
        rest, deltas = "", []
        if self._inside is not None:
            body = self._inside + self._pending
            found = self._parse(body) if body.strip() else None
            if found is None:
                rest = self.start + body
                self.error = self.error or "the output ended inside a tool call"
            else:
                deltas = found
        else:
            rest = self._pending
        self._inside, self._pending = None, ""
        self.text += rest
        return rest, deltas

    def _parse(self, body: str):
        try:
            parsed = self.parser(body, self.tools)
            parsed = parsed if isinstance(parsed, list) else [parsed]
            calls = []
            for c in parsed:
                name, args = c["name"], c.get("arguments", {})
                if not isinstance(name, str):
                    raise ValueError("the call has no function name")
                if isinstance(args, str):
                    args = json.loads(args)
                calls.append({"id": c.get("id") or new_id(), "type": "function",
                              "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
        except Exception as e:
            self.error = f"a tool call did not parse ({type(e).__name__}: {e}); it is left in the text"
            return None
        deltas = []
        for c in calls:
            deltas.append({"index": len(self.calls), **c})
            self.calls.append(c)
        return deltas


class ForcedCall:
    """The constrained output `{"name":"X","arguments":{...}}`: nothing of it is text; the call
    streams as deltas (id, name, then argument fragments) as it forms."""

    def __init__(self):
        self.raw = ""
        self.id = new_id()
        self.header = None      # the function name once the header is complete
        self._sent = 0          # argument characters already sent

    def feed(self, piece: str) -> list:
        self.raw += piece
        deltas = []
        if self.header is None:
            at = self.raw.find(',"arguments":')
            if at < 0:
                return deltas
            try:
                self.header = json.loads(self.raw[: at] + "}")["name"]
            except ValueError:
                return deltas
            self._args_at = at + len(',"arguments":')
            deltas.append({"index": 0, "id": self.id, "type": "function", "function": {"name": self.header, "arguments": ""}})
        # Hold back the last character: it may be the closing brace of the wrapper.
        args = self.raw[self._args_at: len(self.raw) - 1]
        if len(args) > self._sent:
            deltas.append({"index": 0, "function": {"arguments": args[self._sent:]}})
            self._sent = len(args)
        return deltas

    def result(self):
        """The complete call, or None when the output was cut before it ended."""
        try:
            value = json.loads(self.raw)
        except ValueError:
            return None
        arguments = self.raw[self._args_at:-1]
        return {"id": self.id, "type": "function", "function": {"name": value["name"], "arguments": arguments}}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
