"""MessagePack: a stream of maps with the same fields as JSON-RPC; `bin` values allowed.

MessagePack has no frame boundaries, so the reader walks each value's headers (not its contents)
to find where it ends, and refuses it with frame_too_large as soon as a declared size puts that end
past the limit: a 4 GiB string header with no body is answered at once instead of swallowing the
stream. A decoded frame must look like JSON: string map keys, no extension types or timestamps.

Resync policy: after a bad frame the reader answers once, then drops bytes until the next
plausible request start: a map header (2-15 members) whose first key is "jsonrpc", "id", "method"
or "params" followed by a value of the type that member has, from which a whole map with
"jsonrpc": "2.0" decodes. Only maps restart the stream, so a batch array right after bad bytes
is served as its separate requests. A complete candidate wins over an earlier one still waiting
for bytes, so a garbage header that declares a long body cannot hold back the requests behind it.
Every step looks at each byte a bounded number of times, so resync is linear in the garbage."""

import re

import msgpack

from ..errors import INVALID_REQUEST, RpcError
from . import BaseReader, Frame, parse_error, too_large

_packer = msgpack.Packer(use_bin_type=True)

_TOO_LARGE = "too large"
_BAD_BYTE = "byte 0xc1 is never used"
_TOO_DEEP = "nested too deeply"
_MAX_DEPTH = 1024          # msgpack's own limit
_RESYNC_MAX_DEPTH = 32     # a candidate nested deeper is taken for garbage (bounds resync work)
_WHITESPACE = b" \t\r\n"  # between frames, as in detection: skipped
_MAX_CANDIDATES = 16       # resync: incomplete request starts followed at once
# A map of 2-15 members whose first key is a JSON-RPC member with a value of the right type
# (fixstr or str8 keys; a str "2.0", an int/str/nil id, a str method, a map/array params).
_REQUEST_START = re.compile(
    rb"(?:[\x82-\x8f]|\xde\x00[\x02-\x0f]|\xdf\x00\x00\x00[\x02-\x0f])"
    rb"(?:(?:\xa7|\xd9\x07)jsonrpc(?:\xa3|\xd9\x03)2\.0"
    rb"|(?:\xa2|\xd9\x02)id[\x00-\x7f\xa0-\xbf\xc0\xcc-\xd3\xd9-\xdb\xe0-\xff]"
    rb"|(?:\xa6|\xd9\x06)method[\xa0-\xbf\xd9-\xdb]"
    rb"|(?:\xa6|\xd9\x06)params[\x80-\x9f\xdc-\xdf])")
_KEEP = 18  # the longest request start minus one: it may be split across reads

# Header byte -> (header size, bytes of its length field, what the length counts:
# 0 nothing (fixed size), 1 payload bytes, 2 array items, 3 map pairs). 0xc1 is never used.
_HEAD = {
    0xc4: (2, 1, 1), 0xc5: (3, 2, 1), 0xc6: (5, 4, 1),     # bin
    0xc7: (3, 1, 1), 0xc8: (4, 2, 1), 0xc9: (6, 4, 1),     # ext
    0xca: (5, 0, 0), 0xcb: (9, 0, 0),                      # float
    0xcc: (2, 0, 0), 0xcd: (3, 0, 0), 0xce: (5, 0, 0), 0xcf: (9, 0, 0),
    0xd0: (2, 0, 0), 0xd1: (3, 0, 0), 0xd2: (5, 0, 0), 0xd3: (9, 0, 0),
    0xd4: (3, 0, 0), 0xd5: (4, 0, 0), 0xd6: (6, 0, 0), 0xd7: (10, 0, 0), 0xd8: (18, 0, 0),  # fixext
    0xd9: (2, 1, 1), 0xda: (3, 2, 1), 0xdb: (5, 4, 1),     # str
    0xdc: (3, 2, 2), 0xdd: (5, 4, 2),                      # array
    0xde: (3, 2, 3), 0xdf: (5, 4, 3),                      # map
}


def encode(message) -> bytes:
    # Only the writer thread encodes, so one Packer is safe.
    return _packer.pack(message)


class _Extent:
    """Where one MessagePack value that starts at `start` ends, found by walking its headers;
    resumable, so a value arriving in many reads is walked once."""

    __slots__ = ("start", "pos", "stack")

    def __init__(self, start: int):
        self.start = start
        self.pos = start
        self.stack = []  # items still expected by each open array/map

    def advance(self, buf, limit: int, max_depth: int = _MAX_DEPTH):
        """The end offset once complete; None while more bytes are needed; else a str saying
        what is wrong (_TOO_LARGE, _BAD_BYTE, _TOO_DEEP)."""
        pos, stack, n = self.pos, self.stack, len(buf)
        end_max = self.start + limit
        while True:
            if pos >= n:
                self.pos = pos
                return None
            b = buf[pos]
            count = 0
            if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
                size = 1
            elif b <= 0x8f:
                size, count = 1, 2 * (b & 0x0f)
            elif b <= 0x9f:
                size, count = 1, b & 0x0f
            elif b <= 0xbf:
                size = 1 + (b & 0x1f)
            elif b == 0xc1:
                return _BAD_BYTE
            else:
                size, width, unit = _HEAD[b]
                if unit:
                    if pos + 1 + width > n:
                        self.pos = pos
                        return None
                    length = int.from_bytes(buf[pos + 1: pos + 1 + width], "big")
                    if unit == 1:
                        size += length
                    else:
                        count = length if unit == 2 else 2 * length
            # Every item still to come takes at least a byte.
            if pos + size + count > end_max:
                return _TOO_LARGE
            if pos + size > n:
                self.pos = pos
                return None
            pos += size
            if count:
                if len(stack) >= max_depth:
                    return _TOO_DEEP
                stack.append(count)
                continue
            while stack:  # a value ended: so may the containers around it
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            else:
                self.pos = pos
                return pos

    def shift(self, by: int) -> None:
        self.start -= by
        self.pos -= by


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Reader(BaseReader):
    def __init__(self, read, max_frame_bytes: int, initial: bytes = b""):
        super().__init__(read, max_frame_bytes, initial)
        self._frame = _Extent(0)   # the value at the buffer's start
        self._candidates = None    # resynchronising: request starts being followed, in order
        self._searched = 0         # resynchronising: where the search for more starts goes on

    def _frames(self):
        buf = self._buf
        while True:
            if self._candidates is not None:
                found = self._resync()
                if found is None:
                    return
                yield found
                continue
            if self._frame.pos == 0:
                while buf and buf[0] in _WHITESPACE:
                    del buf[:1]
            end = self._frame.advance(buf, self._max) if buf else None
            if end is None:
                if not self._fill():
                    if buf:
                        buf.clear()
                        yield parse_error("input ended inside a MessagePack value")
                    return
                continue
            if end is _TOO_LARGE:
                self._start_resync(1)
                yield too_large(self._max, "frame (by its declared sizes)")
                continue
            if isinstance(end, str):
                self._start_resync(1)
                yield parse_error(f"undecodable MessagePack ({end}); skipped to the next request")
                continue
            try:
                obj = _unpack(bytes(buf[:end]))
            except Exception as e:  # bad UTF-8, unhashable keys, bad timestamps, nesting...
                self._start_resync(1)
                yield parse_error(f"undecodable MessagePack ({type(e).__name__}: {e}); skipped to the next request")
                continue
            del buf[:end]
            self._frame = _Extent(0)
            if not isinstance(obj, (dict, list)):
                # A bare scalar is never a request: the stream is most likely out of step.
                self._start_resync(0)
                yield Frame(error=RpcError(
                    INVALID_REQUEST, f"a MessagePack frame must be a map (a request) or an array (a batch), not {_kind(obj)}; skipped to the next request"))
                continue
            yield _checked(obj)

    def _start_resync(self, start: int) -> None:
        self._candidates = []
        self._searched = start
        self._frame = _Extent(0)

    def _resync(self):
        """The next plausible request's Frame, with the bytes before and of it dropped; None at EOF.
        Candidates still waiting for bytes are followed as more arrive, oldest first; past
        _MAX_CANDIDATES the oldest is given up, so fake starts cannot hide a later request."""
        buf = self._buf
        while True:
            waiting = []
            for c in self._candidates:
                found = self._try(c, waiting)
                if found is not None:
                    return found
            while True:
                m = _REQUEST_START.search(buf, self._searched)
                if m is None:
                    self._searched = max(self._searched, len(buf) - _KEEP)
                    break
                self._searched = m.start() + 1
                found = self._try(_Extent(m.start()), waiting)
                if found is not None:
                    return found
                del waiting[:-_MAX_CANDIDATES]
            self._candidates = waiting
            drop = min([c.start for c in waiting] + [self._searched])
            if drop:
                del buf[:drop]
                for c in waiting:
                    c.shift(drop)
                self._searched -= drop
            if not self._fill():
                buf.clear()
                self._candidates = None
                return None

    def _try(self, c: _Extent, waiting: list):
        """The Frame if candidate c is a whole plausible request (the buffer then starts after
        it); else None, with c added to `waiting` if it needs more bytes."""
        end = c.advance(self._buf, self._max, _RESYNC_MAX_DEPTH)
        if end is None:
            waiting.append(c)
            return None
        if isinstance(end, str):
            return None
        try:
            obj = _unpack(bytes(self._buf[c.start:end]))
        except Exception:
            return None
        if not (isinstance(obj, dict) and obj.get("jsonrpc") == "2.0"):
            return None
        del self._buf[:end]
        self._candidates = None
        self._frame = _Extent(0)
        return _checked(obj)

    def _recover(self) -> None:
        if self._buf:
            del self._buf[:1]
        self._start_resync(0)


_SCALARS = frozenset((str, int, float, bool, type(None), bytes))


def _checked(obj) -> Frame:
    """The frame for a decoded map or array: -32600 (naming where) if anything in it has no JSON
    equivalent, a non-string map key or an extension value (bin values are left to the schemas)."""
    stack = [(obj, "")]
    while stack:
        value, path = stack.pop()
        items = value.items() if type(value) is dict else enumerate(value)
        for k, v in items:
            if type(value) is dict and type(k) is not str:
                return _invalid(path, f"a MessagePack map key is {_kind(k)} ({_short(k)}); JSON-RPC objects have string keys only")
            t = type(v)
            if t is dict or t is list:
                stack.append((v, f"{path}/{_pointer(k)}"))
            elif t not in _SCALARS:
                return _invalid(f"{path}/{_pointer(k)}", f"a MessagePack {_kind(v)} has no JSON equivalent")
    return Frame(message=obj)


def _invalid(path: str, problem: str) -> Frame:
    where = f"at {path!r}" if path else "at the top level"
    return Frame(error=RpcError(INVALID_REQUEST, f"invalid request: {problem} ({where})", path=path))


def _pointer(key) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _kind(value) -> str:
    if isinstance(value, msgpack.Timestamp):
        return "timestamp (extension -1)"
    if isinstance(value, msgpack.ExtType):
        return f"extension type {value.code}"
    if isinstance(value, bytes):
        return "bin"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "nil"
    return {int: "integer", float: "float", str: "string", list: "array", dict: "map"}.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
