"""LSP base protocol: `Content-Length: N\\r\\n\\r\\n` then N bytes of JSON."""

import re

import orjson

from ..errors import INVALID_REQUEST, PARSE_ERROR, RpcError
from . import Frame
from .ndjson import decode

_READ_SIZE = 1 << 16
_MAX_HEADER_BYTES = 8192
_CONTENT_LENGTH = re.compile(rb"(?i)content-length:")  # frames abut: no newline before it


def encode(message) -> bytes:
    body = orjson.dumps(message)
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class Reader:
    """Reads header blocks and bodies. A bad header block is answered and skipped; a body over
    the size limit is skipped by its declared length and answered with frame_too_large."""

    def __init__(self, read, max_frame_bytes: int, initial: bytes = b""):
        self._read = read
        self._max = max_frame_bytes
        self._buf = bytearray(initial)
        self._eof = False

    def _fill(self) -> bool:
        data = self._read(_READ_SIZE)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _header_block(self):
        """The next header block's bytes (without the blank line), or None at EOF."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            sep = 4
            if end < 0:
                # Be lenient with bare-\n clients.
                end = self._buf.find(b"\n\n")
                sep = 2
            if end >= 0:
                block = bytes(self._buf[:end])
                del self._buf[: end + sep]
                return block
            if len(self._buf) > _MAX_HEADER_BYTES:
                # No blank line in sight: drop what we have, keep looking for the next block.
                self._buf.clear()
                return b"\x00oversized"
            if not self._fill():
                return None

    def __iter__(self):
        while True:
            block = self._header_block()
            if block is None:
                return
            if not block.strip():
                continue
            length, problem = _parse_header(block)
            if problem and length is None:
                # No usable length, so the body (if any) cannot be skipped by size: drop bytes up
                # to the next `Content-Length:`, where the next frame starts.
                yield Frame(error=RpcError(PARSE_ERROR, f"parse error: bad LSP header ({problem})"))
                if not self._resync():
                    return
                continue
            too_large = problem is not None or length > self._max
            # Collect (or, when too large, skip) exactly `length` bytes.
            remaining = length
            body = bytearray()
            while remaining:
                if not self._buf and not self._fill():
                    return
                take = min(remaining, len(self._buf))
                if not too_large:
                    body += self._buf[:take]
                del self._buf[:take]
                remaining -= take
            if problem:
                yield Frame(error=RpcError(PARSE_ERROR, f"parse error: bad LSP header ({problem}); its {length}-byte body was skipped"))
                continue
            if too_large:
                yield Frame(error=RpcError(
                    INVALID_REQUEST,
                    f"frame of {length} bytes is larger than the limit of {self._max} bytes; it was skipped",
                    type="frame_too_large", limit=self._max))
                continue
            yield decode(bytes(body))


    def _resync(self) -> bool:
        """Drop input up to the next `Content-Length:`; False at EOF."""
        while True:
            m = _CONTENT_LENGTH.search(self._buf)
            if m:
                del self._buf[: m.start()]
                return True
            keep = len(b"content-length:")  # a header name may be split across reads
            del self._buf[: max(0, len(self._buf) - keep)]
            if not self._fill():
                return False


def _parse_header(block: bytes):
    """(content length or None, what is wrong or None). A valid length with another bad line
    still lets the body be skipped by its size."""
    length = None
    problem = None
    for raw in block.replace(b"\r\n", b"\n").split(b"\n"):
        name, colon, value = raw.partition(b":")
        if not colon:
            problem = problem or f"line {raw[:40]!r} is not 'Name: value'"
        elif name.strip().lower() == b"content-length":
            try:
                n = int(value.strip())
            except ValueError:
                problem = problem or f"Content-Length {value.strip()[:20]!r} is not a number"
                continue
            if n < 0:
                problem = problem or "Content-Length is negative"
            else:
                length = n
    if length is None:
        problem = problem or "no Content-Length"
    return length, problem
