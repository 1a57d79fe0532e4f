"""LSP base protocol: `Content-Length: N\\r\\n\\r\\n` then N bytes of JSON.

Resync policy: when a frame's extent cannot be trusted (no usable Content-Length, a header block
over 8 KiB, a declared length over the frame limit), the reader drops input up to the next
`Content-Length:` (any case) and reads a header from there. Frames abut, so no newline is needed
before it. A bad header is searched from its second byte, so a valid header inside an oversized or
malformed block is still found."""

import re

import orjson

from . import BaseReader, parse_error, too_large
from .ndjson import decode

MAX_HEADER_BYTES = 8192
_BLANK_LINE = re.compile(rb"\n\r?\n")          # ends a header block: CRLF CRLF, or bare LF LF
_CONTENT_LENGTH = re.compile(rb"(?i)content-length:")
_KEEP = len(b"content-length:") - 1             # a header name may be split across reads


def encode(message) -> bytes:
    body = orjson.dumps(message)
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class Reader(BaseReader):
    """Reads header blocks and bodies. A malformed block with a usable length is answered and its
    body skipped by that length; anything else bad is answered once and resynchronised."""

    def __init__(self, read, max_frame_bytes: int, initial: bytes = b""):
        super().__init__(read, max_frame_bytes, initial)
        self._scanned = 0         # leading bytes known to hold no blank line
        self._resync_from = None  # not None: drop input up to the next Content-Length at or after this
        self._quiet = False       # a bad header was answered; until a good one, the rest is not

    def _frames(self):
        buf = self._buf
        while True:
            if self._resync_from is not None and not self._resync():
                return
            if buf[:1] in (b"\r", b"\n"):  # line ends between frames: drop them all at once
                drop = len(buf) - len(buf.lstrip(b"\r\n"))
                del buf[:drop]
                self._scanned = max(0, self._scanned - drop)
            # The earliest blank line ends the header block; none within 8 KiB means a bad block.
            m = _BLANK_LINE.search(buf, max(0, self._scanned - 2), MAX_HEADER_BYTES + 4)
            if m is None:
                self._scanned = min(len(buf), MAX_HEADER_BYTES + 4)
                if len(buf) >= MAX_HEADER_BYTES + 4:
                    self._resync_from = 1
                    if not self._quiet:
                        self._quiet = True
                        yield parse_error(f"LSP header block longer than {MAX_HEADER_BYTES} bytes without a blank line; skipped to the next Content-Length")
                    continue
                if not self._fill():
                    if buf.strip() and not self._quiet:
                        buf.clear()
                        yield parse_error("input ended inside an LSP header block")
                    return
                continue
            block = bytes(buf[: m.start()])
            if not block.strip():
                del buf[: m.end()]  # blank lines between frames
                self._scanned = 0
                continue
            length, problem, trusted = _parse_header(block)
            if not trusted:
                self._resync_from = 1
                self._scanned = m.start()
                if not self._quiet:
                    self._quiet = True
                    yield parse_error(f"bad LSP header ({problem}); skipped to the next Content-Length")
                continue
            del buf[: m.end()]
            self._scanned = 0
            self._quiet = False
            if length > self._max:
                # The body may never come: do not wait for it, resync at the next header instead.
                self._resync_from = 0
                self._quiet = True
                yield too_large(self._max, f"frame of {length} bytes (declared by Content-Length)")
                continue
            while len(buf) < length:
                if not self._fill():
                    got = len(buf)
                    buf.clear()
                    yield parse_error(f"input ended {got} bytes into a {length}-byte LSP body")
                    return
            body = bytes(buf[:length])
            del buf[:length]
            if problem:
                yield parse_error(f"bad LSP header ({problem}); its {length}-byte body was skipped")
            else:
                yield decode(body)

    def _resync(self) -> bool:
        """Drop input up to the next `Content-Length:`; False at EOF."""
        buf = self._buf
        while True:
            m = _CONTENT_LENGTH.search(buf, self._resync_from)
            drop = m.start() if m else max(self._resync_from, len(buf) - _KEEP)
            del buf[:drop]
            self._scanned = max(0, self._scanned - drop)  # still known to hold no blank line
            if m:
                self._resync_from = None
                return True
            self._resync_from = 0
            if not self._fill():
                buf.clear()
                return False

    def _recover(self) -> None:
        if self._buf:
            del self._buf[:1]
        self._resync_from = 0
        self._scanned = 0
        self._quiet = True


def _parse_header(block: bytes):
    """(content length or None, what is wrong or None, whether the length can be trusted). A bad
    line after a valid Content-Length still lets the body be skipped by its size; a bad line
    before it is taken for garbage ahead of the real header, so the reader resyncs to that
    header. Empty lines (a stray newline before the header) are ignored."""
    length = None
    problem = None
    conflict = False
    bad_first = False
    for raw in block.split(b"\n"):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        name, colon, value = raw.partition(b":")
        if not colon:
            problem = problem or f"line {raw[:40]!r} is not 'Name: value'"
            bad_first = bad_first or length is None
        elif name.strip().lower() == b"content-length":
            value = value.strip()
            if not value.isdigit():
                problem = problem or f"Content-Length {value[:20]!r} is not a non-negative integer"
                bad_first = bad_first or length is None
                continue
            n = int(value) if len(value) <= 18 else 10**18  # absurd lengths are just "too large"
            conflict = conflict or (length is not None and n != length)
            length = n
    if conflict:
        length, problem = None, "two different Content-Length values"
    if length is None:
        problem = problem or "no Content-Length"
    return length, problem, length is not None and not bad_first
