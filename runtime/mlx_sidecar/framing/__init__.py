"""Framings: how JSON-RPC messages are cut out of stdin and put on stdout.

Each framing module has a `Reader` (bytes in, `Frame`s out, resynchronising after a bad frame)
and an `encode(message) -> bytes`. `detect` picks one from the first byte the client sends.
"""

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RpcError

NAMES = ("ndjson", "lsp", "msgpack")
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024

# Bytes a MessagePack request (a map, or an array for a batch) can start with.
_MSGPACK_FIRST = set(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}


@dataclass(slots=True)
class Frame:
    """One decoded message, or the error to answer (with id null) for a frame that was not one."""

    message: Any = None
    error: RpcError | None = None


def detect(first: bytes) -> str:
    """The framing a client uses, from its first non-whitespace byte."""
    b = first.lstrip(b" \t\r\n")[:1]
    if not b:
        return "ndjson"
    if b[0] in _MSGPACK_FIRST:
        return "msgpack"
    if b.isalpha():  # "Content-Length: ..."
        return "lsp"
    return "ndjson"


def load(name: str):
    """The framing module for a name."""
    if name == "ndjson":
        from . import ndjson as mod
    elif name == "lsp":
        from . import lsp as mod
    elif name == "msgpack":
        from . import msgpack as mod
    else:
        raise ValueError(f"unknown framing {name!r}; use one of {', '.join(NAMES)}")
    return mod


Read = Callable[[int], bytes]
