"""MessagePack: a stream of maps with the same fields as JSON-RPC; `bin` values allowed.

MessagePack has no frame boundaries, so an undecodable byte sequence cannot be skipped by length.
The runtime answers -32700 once (frame_too_large for a frame over the size limit), then
resynchronises: it drops bytes until the next position where a whole request decodes (a map with
"jsonrpc", or an array of them), so the rest of a bad frame is never taken for requests."""

import msgpack

from ..errors import INVALID_REQUEST, PARSE_ERROR, RpcError
from . import Frame

_READ_SIZE = 1 << 16
_packer = msgpack.Packer(use_bin_type=True)


def encode(message) -> bytes:
    # Only the writer thread encodes, so one Packer is safe.
    return _packer.pack(message)


class Reader:
    def __init__(self, read, max_frame_bytes: int, initial: bytes = b""):
        self._read = read
        self._max = max_frame_bytes
        self._initial = initial

    def _unpacker(self):
        return msgpack.Unpacker(raw=False, max_buffer_size=self._max, strict_map_key=True)

    def __iter__(self):
        unpacker = self._unpacker()
        data = self._initial
        lost = bytearray()  # after an error: bytes not yet known to start a request
        while True:
            if lost:
                lost += data
                found = _next_request(lost, self._max)
                if found is None:
                    data = self._read(_READ_SIZE)
                    if not data:
                        return
                    continue
                data = bytes(lost[found:])
                lost.clear()
            if data:
                try:
                    unpacker.feed(data)
                except msgpack.BufferFull:
                    unpacker = self._unpacker()
                    lost = bytearray(b"\x00") + data  # resync from here on
                    yield Frame(error=RpcError(
                        INVALID_REQUEST, f"frame is larger than the limit of {self._max} bytes; it was dropped",
                        type="frame_too_large", limit=self._max))
                    data = b""
                    continue
            data = b""
            while True:
                try:
                    message = next(unpacker)
                except StopIteration:
                    break
                except Exception as e:  # FormatError, StackError, UnicodeDecodeError, ValueError...
                    rest = _unread(unpacker)
                    unpacker = self._unpacker()
                    lost = bytearray(b"\x00") + rest
                    yield Frame(error=RpcError(
                        PARSE_ERROR, f"parse error: undecodable MessagePack ({type(e).__name__}: {e}); skipped to the next request"))
                    break
                yield Frame(message=message)
            if lost:
                continue
            data = self._read(_READ_SIZE)
            if not data:
                return


def _unread(unpacker) -> bytes:
    """What an Unpacker still holds (after a decoding error), so resync can scan it."""
    try:
        return unpacker.read_bytes(1 << 62)
    except Exception:
        return b""


def _is_request(obj) -> bool:
    if isinstance(obj, list):
        return bool(obj) and all(isinstance(o, dict) and "jsonrpc" in o for o in obj)
    return isinstance(obj, dict) and "jsonrpc" in obj


def _next_request(buf: bytearray, limit: int):
    """The offset (past the marker byte at 0) where a whole request decodes, or None if none is
    visible yet; then bytes that cannot start one are dropped, and an incomplete candidate is kept
    for the next read. A complete request later in the buffer wins over an incomplete one."""
    incomplete = None
    for i in range(1, len(buf)):
        if buf[i] not in _FIRST:
            continue
        u = msgpack.Unpacker(raw=False, max_buffer_size=limit, strict_map_key=True)
        try:
            u.feed(bytes(buf[i:]))
            obj = next(u)
        except StopIteration:
            incomplete = i if incomplete is None else incomplete
            continue
        except Exception:
            continue
        if _is_request(obj):
            return i
    del buf[1: incomplete if incomplete is not None else len(buf)]
    return None


_FIRST = set(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}
