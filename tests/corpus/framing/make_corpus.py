"""Writes the hand-made part of the frame-reader corpus (the reproductions of issue 15).

Run from the repository root: .venv/bin/python tests/corpus/framing/make_corpus.py
Each input ends with the tail request (id "corpus-tail"), which the replay test expects to be
read after the bad part. Hypothesis finds are kept next to these as found-*.bin."""

import json
from pathlib import Path

import msgpack

HERE = Path(__file__).parent
TAIL = {"jsonrpc": "2.0", "id": "corpus-tail", "method": "runtime/ping"}


def lsp(message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def mp(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def nd(message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


PING = {"jsonrpc": "2.0", "id": 1, "method": "runtime/ping"}
PING_BODY = json.dumps(PING, separators=(",", ":")).encode()

CASES = {
    "msgpack": {
        "bin-key-in-params": b"\x84\xa7jsonrpc\xa32.0\xa2id\x01\xa6method\xacruntime/ping\xa6params\x82\xa1a\x01\xc4\x01b\x02",
        "int-key": mp({"jsonrpc": "2.0", "id": 1, "method": "runtime/ping", "params": {1: 2}}),
        "timestamp-value": mp({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"t": msgpack.Timestamp(1, 0)}}),
        "ext-value": mp({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"e": msgpack.ExtType(7, b"ab")}}),
        "bad-timestamp-length": b"\x83\xa7jsonrpc\xa32.0\xa6method\xa1x\xa6params\x81\xa1t\xc7\x03\xff\x00\x00\x00",
        "unhashable-key": b"\x81\x90\x01",
        "array-headers-garbage": b"\xc1" + b"\x91" * 20_000,
        "str32-without-body": b"\xdb\xff\xff\xff\xff",
        "bin32-without-body": b"\xc6\xff\xff\xff\xff",
        "array32-without-items": b"\xdd\xff\xff\xff\xff",
        "huge-str-inside-request": b"\x83\xa7jsonrpc\xa32.0\xa6method\xdb\x7f\xff\xff\xff",
        "scalar-garbage": b"xxxxxxxxxx",
        "bad-utf8": b"\x83\xa7jsonrpc\xa32.0\xa2id\x01\xa6method\xa2\xff\xfe",
        "fake-request-start-then-garbage": b"\xc1\x82\xa2id\xdb\x00\x00\x08\x00",
        "too-deep": b"\x91" * 1100 + b"\x01",
        "request-then-0xc1": mp(PING) + b"\xc1",
    },
    "lsp": {
        "bare-lf-header-then-crlf-frame": b"Content-Length: %d\n\n" % len(PING_BODY) + PING_BODY,
        "header-over-8k-then-frame": b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n",
        "huge-content-length-no-body": b"Content-Length: 999999999999\r\n\r\n",
        "absurd-content-length": b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n",
        "over-limit-with-body": b"Content-Length: 5000\r\n\r\n" + b"[" * 5000,
        "garbage-line-before-header": b"garbage\r\n",
        "garbage-glued-to-header": b"garbage",
        "bad-length": b"Content-Length: 1_0\r\n\r\n0123456789",
        "two-lengths": b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n1234",
        "bad-line-after-length": b"Content-Length: 3\r\nX-Broken\r\n\r\n123",
        "bad-json-body": b"Content-Length: 5\r\n\r\n{bad}",
    },
    "ndjson": {
        "line-over-limit": b"x" * 10_000 + b"\n",
        "bad-utf8": b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}\n',
        "truncated-json": b'{"jsonrpc":"2.0","id":1\n',
        "deep-nesting": b"[" * 5000 + b"\n",
        "huge-integer": b'{"jsonrpc":"2.0","id":' + b"9" * 400 + b',"method":"x"}\n',
        "nul-bytes": b"\x00\x00\x00\n",
    },
}

ENCODE = {"msgpack": mp, "lsp": lsp, "ndjson": nd}

if __name__ == "__main__":
    for name, cases in CASES.items():
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        for case, data in cases.items():
            (folder / f"{case}.bin").write_bytes(data + ENCODE[name](TAIL))
