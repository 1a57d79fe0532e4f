"""Framings: how JSON-RPC messages are cut out of stdin and put on stdout.

Each framing module has a `Reader` (bytes in, `Frame`s out, resynchronising after a bad frame)
and an `encode(message) -> bytes`. `detect` picks one from the first byte the client sends.
"""

import logging
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import INVALID_REQUEST, PARSE_ERROR, RpcError

log = logging.getLogger(__name__)

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


def too_large(limit: int, what: str = "frame") -> Frame:
    """The answer for a frame over --max-frame-bytes (the same shape in every framing)."""
    return Frame(error=RpcError(
        INVALID_REQUEST, f"{what} is larger than the limit of {limit} bytes; it was skipped",
        type="frame_too_large", limit=limit))


def parse_error(message: str) -> Frame:
    return Frame(error=RpcError(PARSE_ERROR, f"parse error: {message}"))


class ReadFailed(Exception):
    """The host's `read` raised: not a framing problem, so it ends the reader instead of a resync."""


class BaseReader:
    """Shared by the framings: keeps all reading state on self, so that after an unexpected
    exception (a bug) the reader answers -32700, resynchronises and goes on instead of dying."""

    def __init__(self, read: Read, max_frame_bytes: int, initial: bytes = b""):
        self._read = read
        self._max = max_frame_bytes
        self._buf = bytearray(initial)

    def _fill(self, size: int = 1 << 16) -> bool:
        """Append the next read to the buffer; False at EOF."""
        try:
            data = self._read(size)
        except Exception as e:
            raise ReadFailed(str(e)) from e
        if not data:
            return False
        self._buf += data
        return True

    def __iter__(self):
        stuck = False  # failed with nothing buffered and no frame since: stop, or it would loop
        while True:
            try:
                for frame in self._frames():
                    stuck = False
                    yield frame
                return
            except ReadFailed as e:
                raise e.__cause__ from None
            except Exception as e:
                log.exception("frame reader failed; resynchronising")
                if stuck and not self._buf:
                    return
                stuck = not self._buf
                yield parse_error(f"the frame could not be read ({type(e).__name__}: {e}); skipped to the next frame")
                self._recover()

    def _frames(self):
        raise NotImplementedError

    def _recover(self) -> None:
        """After an unexpected exception: drop at least one buffered byte and resynchronise."""
        raise NotImplementedError
