"""The three framings over the real pipe: round trips, bad frames, resynchronisation."""

import time

import msgpack
import pytest

from conftest import FRAMINGS, chunks_of
from mlx_sidecar.testing.pipe import encode as pipe_encode


@pytest.mark.parametrize("framing", FRAMINGS)
def test_round_trip_in_every_framing(spawn, tiny_model, framing):
    p = spawn(framing)  # auto-detected from the first byte
    answer, _ = p.request("initialize", {"client_info": {"name": "test"}})
    assert answer["result"]["capabilities"]["framing"] == framing
    answer, notes = p.request("model/load", {"model": tiny_model, "id": "m"})
    assert answer["result"]["id"] == "m"
    assert [n["params"]["value"]["kind"] for n in notes if n["method"] == "$/progress"][0] == "begin"
    answer, notes = p.request("generate", {"model": "m", "prompt": "Hello", "max_tokens": 20, "temperature": 0})
    chunks = chunks_of(notes, answer["id"])
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["text"] for c in chunks) == answer["result"]["text"]
    assert sum(len(c["token_ids"]) for c in chunks) == answer["result"]["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize("framing", FRAMINGS)
def test_explicit_framing_flag(spawn, framing):
    p = spawn(framing, args=["--framing", framing])
    assert p.request("runtime/ping")[0]["result"] == {}


def test_ndjson_bad_frames_resync(spawn):
    p = spawn("ndjson")
    p.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"runtime/ping"\n')          # truncated JSON
    p.send_raw(b'{"jsonrpc":"2.0","id":2,"method":"\xff\xfe"}\n')           # bad UTF-8
    p.send_raw(b'\n   \n')                                                  # blank lines: ignored
    p.send_raw(b'{"jsonrpc":"2.0","id":3,"method":"runtime/ping"}\r\n')     # CRLF is fine
    first, second, third = p.recv(), p.recv(), p.recv()
    for bad in (first, second):
        assert bad["id"] is None and bad["error"]["code"] == -32700
    assert third == {"jsonrpc": "2.0", "id": 3, "result": {}}


def test_ndjson_frame_too_large_is_skipped(spawn):
    p = spawn("ndjson", args=["--max-frame-bytes", "1000"])
    p.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"runtime/ping","params":{"pad":"' + b"x" * 200_000 + b'"}}\n')
    p.send_raw(b'{"jsonrpc":"2.0","id":2,"method":"runtime/ping"}\n')
    err = p.recv()
    assert err["id"] is None and err["error"]["code"] == -32600
    assert err["error"]["data"]["type"] == "frame_too_large"
    assert p.recv() == {"jsonrpc": "2.0", "id": 2, "result": {}}


def test_lsp_bad_header_and_oversized_body(spawn):
    p = spawn("lsp", args=["--max-frame-bytes", "1000"])
    p.send_raw(b"Content-Length: 5\r\n\r\n{bad}")                               # bad JSON body
    p.send_raw(b"Content-Length: abc\r\n\r\n")                                 # bad header: skip to the next frame,
    p.send_raw(b"Content-Type: x\r\n\r\n")                                     # so this length-less block goes with it
    big = b'{"jsonrpc":"2.0","id":9,"method":"runtime/ping","params":{"p":"' + b"y" * 5000 + b'"}}'
    p.send_raw(b"Content-Length: %d\r\n\r\n" % len(big) + big)                # skipped by its length
    p.send({"jsonrpc": "2.0", "id": 2, "method": "runtime/ping"})
    errors = [p.recv() for _ in range(3)]
    assert [e["error"]["code"] for e in errors] == [-32700, -32700, -32600]
    assert errors[2]["error"]["data"]["type"] == "frame_too_large"
    assert all(e["id"] is None for e in errors)
    assert p.recv() == {"jsonrpc": "2.0", "id": 2, "result": {}}


def test_msgpack_undecodable_frame_then_recovers(spawn):
    p = spawn("msgpack")
    p.send({"jsonrpc": "2.0", "id": 1, "method": "runtime/ping"})
    assert p.recv()["result"] == {}
    p.send_raw(b"\xc1")  # a byte MessagePack never uses
    err = p.recv()
    assert err["id"] is None and err["error"]["code"] == -32700
    p.send({"jsonrpc": "2.0", "id": 2, "method": "runtime/ping"})
    assert p.recv() == {"jsonrpc": "2.0", "id": 2, "result": {}}
    # A well-formed value that is not a request object.
    p.send_raw(msgpack.packb(7))
    assert p.recv()["error"]["code"] == -32600


def test_msgpack_bin_id_is_rejected_cleanly(spawn):
    p = spawn("msgpack")
    p.send({"jsonrpc": "2.0", "id": b"\x01\x02", "method": "runtime/ping"})
    err = p.recv()
    assert err["error"]["code"] == -32600 and err["id"] is None


def test_interactive_typing_byte_by_byte(spawn):
    """A person typing: bytes arrive one at a time, answers come per line."""
    p = spawn("ndjson")
    for b in b'  {"jsonrpc": "2.0", "id": 1, "method": "runtime/ping"}\n':
        p.send_raw(bytes([b]))
    assert p.recv() == {"jsonrpc": "2.0", "id": 1, "result": {}}


def test_last_line_without_newline_is_read_at_eof(spawn):
    p = spawn("ndjson")
    p.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"runtime/ping"}')
    p.close_stdin()
    assert p.recv(10) == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert p.proc.wait(10) == 0


def test_lsp_bad_header_with_a_body_resyncs(spawn):
    p = spawn("lsp")
    body = b'{"jsonrpc":"2.0","id":1,"method":"runtime/ping"}'
    p.send_raw(b"Content-Lngth: %d\r\n\r\n" % len(body) + body)              # misspelt: no usable length
    p.send_raw(b"Content-Length: %d\r\nX-Broken\r\n\r\n" % len(body) + body)  # a length and a bad line
    p.send({"jsonrpc": "2.0", "id": 2, "method": "runtime/ping"})
    p.send({"jsonrpc": "2.0", "id": 3, "method": "runtime/ping"})
    first, second = p.recv(), p.recv()
    assert first["error"]["code"] == second["error"]["code"] == -32700
    assert p.recv() == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert p.recv() == {"jsonrpc": "2.0", "id": 3, "result": {}}


def test_msgpack_resyncs_without_answering_leftovers(spawn):
    p = spawn("msgpack", args=["--framing", "msgpack"])  # the first byte is garbage: no auto-detection
    good = msgpack.packb({"jsonrpc": "2.0", "id": 1, "method": "runtime/ping"})
    # A bad byte, then the tail of some frame (ten 'x' bytes and a stray fixmap start), then requests,
    # all in one write: exactly one error, then both pings answered, nothing else.
    garbage = b"\xc1" + b"x" * 10 + b"\x81\xa1"
    p.send_raw(garbage + good + msgpack.packb({"jsonrpc": "2.0", "id": 2, "method": "runtime/ping"}))
    answers = [p.recv() for _ in range(3)]
    assert answers[0]["error"]["code"] == -32700
    assert answers[1:] == [{"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 2, "result": {}}]
    # The same split across writes.
    p.send_raw(b"\xc1xxxx")
    assert p.recv()["error"]["code"] == -32700
    p.send_raw(b"yyyy" + good[:5])
    p.send_raw(good[5:])
    assert p.recv() == {"jsonrpc": "2.0", "id": 1, "result": {}}
    p.send({"jsonrpc": "2.0", "id": 9, "method": "runtime/ping"})
    assert p.recv() == {"jsonrpc": "2.0", "id": 9, "result": {}}


# ---- issue 15: regressions over the real pipe; after each bad input a valid request is answered ----

PING = {"jsonrpc": "2.0", "id": 99, "method": "runtime/ping"}
PONG = {"jsonrpc": "2.0", "id": 99, "result": {}}


def test_msgpack_non_string_keys_and_ext_values_are_invalid_requests(spawn):
    p = spawn("msgpack")
    # A bin key inside params used to kill the reader thread (TypeError when keys were sorted).
    p.send_raw(b"\x84\xa7jsonrpc\xa32.0\xa2id\x01\xa6method\xacruntime/ping\xa6params\x82\xa1a\x01\xc4\x01b\x02")
    err = p.recv()
    assert err["id"] is None and err["error"]["code"] == -32600
    assert err["error"]["data"]["path"] == "/params" and "bin" in err["error"]["message"]
    for params in ({1: "int key"}, {"t": msgpack.Timestamp(5, 0)}, {"e": msgpack.ExtType(3, b"z")}):
        p.send_raw(msgpack.packb({"jsonrpc": "2.0", "id": 2, "method": "runtime/ping", "params": params},
                                 use_bin_type=True, strict_types=False))
        err = p.recv()
        assert err["id"] is None and err["error"]["code"] == -32600 and err["error"]["data"]["path"].startswith("/params")
    p.send(PING)
    assert p.recv() == PONG


def test_lsp_bare_lf_header_then_crlf_frame(spawn):
    p = spawn("lsp")
    body = b'{"jsonrpc":"2.0","id":1,"method":"runtime/ping"}'
    p.send_raw(b"Content-Length: %d\n\n" % len(body) + body + pipe_encode("lsp", PING))
    assert p.recv() == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert p.recv() == PONG


def test_lsp_header_over_8k_then_a_frame_in_the_same_write(spawn):
    p = spawn("lsp")
    p.send_raw(b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n" + pipe_encode("lsp", PING))
    err = p.recv()
    assert err["id"] is None and err["error"]["code"] == -32700 and "8192" in err["error"]["message"]
    assert p.recv() == PONG


def test_msgpack_resync_after_100k_of_array_headers(spawn):
    """Was quadratic (~17 s) and answered the ping inside an array; a generous bound here."""
    p = spawn("msgpack")
    assert p.request("runtime/ping")[0]["result"] == {}
    t0 = time.monotonic()
    p.send_raw(b"\xc1" + b"\x91" * 100_000 + msgpack.packb(PING))
    err = p.recv()
    assert err["error"]["code"] == -32700
    assert p.recv() == PONG  # a single response, not [PONG]
    assert time.monotonic() - t0 < 8.0
    p.send(PING)
    assert p.recv() == PONG


@pytest.mark.parametrize("framing,header", [
    ("lsp", b"Content-Length: 999999999999\r\n\r\n"),
    ("msgpack", b"\xdb\xff\xff\xff\xff"),  # str 32 of 4 GiB
    ("msgpack", b"\xc6\xff\xff\xff\xff"),  # bin 32
    ("msgpack", b"\xdd\xff\xff\xff\xff"),  # array 32
])
def test_declared_length_beyond_the_limit_without_a_body(spawn, framing, header):
    p = spawn(framing, args=["--framing", framing])
    p.send_raw(header)
    # Answered as soon as the header is read: nothing else has been sent yet.
    err = p.recv()
    assert err["id"] is None and err["error"]["data"]["type"] == "frame_too_large"
    assert err["error"]["data"]["limit"] == 64 * 1024 * 1024
    p.send(PING)
    assert p.recv() == PONG


def test_ndjson_endless_line_is_answered_before_its_newline(spawn):
    p = spawn("ndjson", args=["--framing", "ndjson", "--max-frame-bytes", "4096"])  # "x" would look like LSP
    for _ in range(10):
        p.send_raw(b"x" * 1000)
    err = p.recv()  # no newline sent yet
    assert err["error"]["data"]["type"] == "frame_too_large"
    p.send_raw(b"y" * 100_000 + b"\n")  # the rest of that line is dropped without another answer
    p.send(PING)
    assert p.recv() == PONG
