"""NDJSON: one JSON value per line, UTF-8. What a person types into a terminal."""

import orjson

from . import BaseReader, Frame, parse_error, too_large


def encode(message) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes) -> Frame:
    """One JSON text; anything wrong with it (syntax, UTF-8, nesting) is a -32700 for this frame."""
    try:
        return Frame(message=orjson.loads(line))
    except orjson.JSONDecodeError as e:
        return parse_error(f"not a valid JSON value ({e})")
    except Exception as e:  # never expected from orjson, but one bad frame must not end the reader
        return parse_error(f"the JSON value could not be decoded ({type(e).__name__}: {e})")


class Reader(BaseReader):
    """Splits the byte stream at newlines. A line over the size limit is answered with
    frame_too_large as soon as the buffered part passes the limit (so memory stays bounded), and
    dropped up to its newline; blank lines are ignored."""

    def __init__(self, read, max_frame_bytes: int, initial: bytes = b""):
        super().__init__(read, max_frame_bytes, initial)
        self._scanned = 0       # bytes of the buffer already searched for a newline
        self._skipping = False  # inside an oversized line, dropping bytes until its newline

    def _frames(self):
        buf = self._buf
        while True:
            nl = buf.find(b"\n", self._scanned)
            if nl < 0:
                if self._skipping:
                    buf.clear()
                elif len(buf) > self._max:
                    self._skipping = True
                    buf.clear()
                    yield too_large(self._max)
                self._scanned = len(buf)
                if not self._fill():
                    break
                continue
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            self._scanned = 0
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > self._max:
                yield too_large(self._max)
            elif line.strip():
                yield decode(line)
        # A last line without its newline (a person pressing Ctrl-D) still counts.
        if not self._skipping and buf.strip():
            line = bytes(buf)
            buf.clear()
            yield decode(line)

    def _recover(self) -> None:
        # Drop the rest of the line being read (at least one byte, so the reader moves on).
        nl = self._buf.find(b"\n")
        if nl >= 0:
            del self._buf[: nl + 1]
        else:
            self._buf.clear()
            self._skipping = True
        self._scanned = 0
