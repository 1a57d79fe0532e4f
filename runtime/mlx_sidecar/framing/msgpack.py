"""MessagePack: a stream of maps with the same fields as JSON-RPC; `bin` values allowed.

MessagePack has no frame boundaries, so an undecodable byte sequence cannot be skipped by length:
the runtime answers -32700 once, drops everything it had buffered, and decodes afresh from the
next bytes that arrive. A frame over the size limit is answered with frame_too_large, likewise."""

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
        while True:
            if data:
                try:
                    unpacker.feed(data)
                except msgpack.BufferFull:
                    unpacker = self._unpacker()
                    yield Frame(error=RpcError(
                        INVALID_REQUEST, f"frame is larger than the limit of {self._max} bytes; buffered input was dropped",
                        type="frame_too_large", limit=self._max))
            while True:
                try:
                    message = next(unpacker)
                except StopIteration:
                    break
                except Exception as e:  # FormatError, StackError, UnicodeDecodeError, ValueError...
                    unpacker = self._unpacker()
                    yield Frame(error=RpcError(
                        PARSE_ERROR, f"parse error: undecodable MessagePack ({type(e).__name__}: {e}); buffered input was dropped"))
                    break
                yield Frame(message=message)
            data = self._read(_READ_SIZE)
            if not data:
                return
