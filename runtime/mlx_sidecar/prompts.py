"""Turning a prompt string or OpenAI-style messages into token ids with the model's own template."""

from .errors import INVALID_PARAMS, RpcError


def _text_of(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part["type"] != "text":
            raise RpcError(INVALID_PARAMS, f"messages[{index}] has a {part['type']} part, but this model takes text only", path=f"/messages/{index}/content/{j}")
        texts.append(part["text"])
    return "\n".join(texts)


def render(tokenizer, params: dict, model_id: str, tools=None) -> tuple[list[int], str | None]:
    """(token ids, rendered chat text or None) for a generate or tokenize request; tools (OpenAI
    function definitions) go to templates that take them (tools.py decides)."""
    if "messages" in params:
        if not getattr(tokenizer, "has_chat_template", False):
            raise RpcError(INVALID_PARAMS, f"model {model_id!r} has no chat template; send prompt (raw text) instead of messages", path="/messages")
        messages = [{**m, "content": _text_of(m.get("content"), i)} for i, m in enumerate(params["messages"])]
        try:
            extra = {"tools": tools} if tools else {}
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as e:  # template errors come from jinja with the template's own words
            raise RpcError(INVALID_PARAMS, f"the chat template of {model_id!r} rejected these messages: {e}", path="/messages") from None
        return list(tokenizer.encode(text, add_special_tokens=False)), text
    text = params["prompt"] if "prompt" in params else params["text"]
    special = params.get("add_special_tokens")
    if special is None:
        # Like mlx-lm: add BOS unless the text already starts with it.
        bos = getattr(tokenizer, "bos_token", None)
        special = bos is None or not text.startswith(bos)
    return list(tokenizer.encode(text, add_special_tokens=special)), None
