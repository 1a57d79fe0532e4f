"""NDJSON: one JSON value per line, UTF-8. What a person types into a terminal."""

import orjson

from ..errors import INVALID_REQUEST, PARSE_ERROR, RpcError
from . import Frame

_READ_SIZE = 1 << 16


def encode(message) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes) -> Frame:
    try:
        return Frame(message=orjson.loads(line))
    except orjson.JSONDecodeError as e:
        return Frame(error=RpcError(PARSE_ERROR, f"parse error: not a valid JSON value ({e})"))


class Reader:
    """Splits the byte stream at newlines. A line over the size limit is skipped up to its
    newline and answered with frame_too_large; blank lines are ignored."""

    def __init__(self, read, max_frame_bytes: int, initial: bytes = b""):
        self._read = read
        self._max = max_frame_bytes
        self._buf = bytearray(initial)

    def __iter__(self):
        buf = self._buf
        start = 0
        skipping = False  # inside an oversized line, dropping bytes until its newline
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                if start:
                    del buf[:start]
                    start = 0
                if not skipping and len(buf) > self._max:
                    skipping = True
                    yield _too_large(self._max)
                if skipping:
                    buf.clear()
                data = self._read(_READ_SIZE)
                if not data:
                    break
                buf += data
                continue
            line = bytes(buf[start:nl])
            start = nl + 1
            if skipping:
                skipping = False
                continue
            if len(line) > self._max:
                yield _too_large(self._max)
                continue
            if line.strip():
                yield decode(line)
        # A last line without its newline (a person pressing Ctrl-D) still counts.
        if not skipping and bytes(buf[start:]).strip():
            yield decode(bytes(buf[start:]))


def _too_large(limit: int) -> Frame:
    return Frame(error=RpcError(
        INVALID_REQUEST, f"frame is larger than the limit of {limit} bytes; it was skipped",
        type="frame_too_large", limit=limit))
