"""Property tests of the three frame readers, run in-process on the real reader code: bytes go in
through a `read` function that hands out random-sized pieces of a stream, as a pipe does.

MLX_SIDECAR_FUZZ_EXAMPLES=20000 raises the number of examples for a long run. Inputs that broke a
reader are kept in tests/corpus/framing/<framing>/ and replayed on every run; with
MLX_SIDECAR_FUZZ_SAVE=1 a failing example is written there by the test itself."""

import hashlib
import os
import random
import re
import time
from pathlib import Path

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlx_sidecar import framing
from mlx_sidecar.framing import msgpack as mp_framing

CORPUS = Path(__file__).parent / "corpus" / "framing"
EXAMPLES = int(os.environ.get("MLX_SIDECAR_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TAIL = {"jsonrpc": "2.0", "id": "corpus-tail", "method": "runtime/ping"}
CORPUS_MAX_FRAME = 4096  # the corpus is replayed with this --max-frame-bytes


def encode(name: str, message) -> bytes:
    """Client-side encoders, written apart from the runtime's (msgpack: as a host would)."""
    if name == "msgpack":
        return msgpack.packb(message, use_bin_type=True)
    body = orjson.dumps(message)
    if name == "lsp":
        return b"Content-Length: %d\r\n\r\n" % len(body) + body
    return body + b"\n"


def read_all(name: str, data: bytes, max_frame: int = 1 << 20, sizes=None):
    """Every Frame the reader yields for `data`, read in pieces of the given sizes (cycled)."""
    pos = 0
    turn = 0

    def read(n: int) -> bytes:
        nonlocal pos, turn
        size = n if not sizes else max(1, min(n, sizes[turn % len(sizes)]))
        turn += 1
        piece = data[pos: pos + size]
        pos += len(piece)
        return piece

    first = read(1 << 16)
    frames = list(framing.load(name).Reader(read, max_frame, first)) if first else []
    for f in frames:
        assert (f.message is None) != (f.error is None), f  # exactly one of the two
    return frames


def messages(frames):
    return [f.message for f in frames if f.error is None]


def save_on_failure(name: str, data: bytes):
    """Keep a failing input in the corpus when asked to (MLX_SIDECAR_FUZZ_SAVE=1)."""
    if os.environ.get("MLX_SIDECAR_FUZZ_SAVE"):
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"found-{hashlib.sha1(data).hexdigest()[:12]}.bin").write_bytes(data)


# ---- strategies ----

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=30) | \
    st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) |
                           st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


@st.composite
def requests(draw, n_max=6):
    """Distinct requests (ids are unique, so order and loss are visible)."""
    n = draw(st.integers(1, n_max))
    out = []
    for i in range(n):
        msg = {"jsonrpc": "2.0", "id": f"r{i}", "method": draw(st.sampled_from(["runtime/ping", "generate", "x/y"]))}
        if draw(st.booleans()):
            msg["params"] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
        out.append(dict(draw(st.permutations(list(msg.items())))))  # members in any order
    return out


splits = st.lists(st.integers(1, 64), min_size=1, max_size=20)
framings = st.sampled_from(framing.NAMES)


# ---- properties ----

@FUZZ
@given(name=framings, reqs=requests(), sizes=splits)
def test_random_splits_of_valid_streams_give_exactly_the_requests(name, reqs, sizes):
    data = b"".join(encode(name, r) for r in reqs)
    try:
        frames = read_all(name, data, sizes=sizes)
        assert [f.error for f in frames if f.error] == []
        assert messages(frames) == reqs
    except AssertionError:
        save_on_failure(name, data)
        raise


@FUZZ
@given(name=framings, reqs=requests(), sizes=splits)
def test_every_batch_frame_is_one_item(name, reqs, sizes):
    """A batch array is one frame, so one item."""
    data = encode(name, reqs) + encode(name, TAIL)
    assert messages(read_all(name, data, sizes=sizes)) == [reqs, TAIL]


def garbage_for(name: str):
    """Garbage as each framing's resync guarantee is stated (docs/protocol.md, section 2):
    ndjson: any bytes ended by a newline; lsp: any bytes without `Content-Length:`;
    msgpack: bytes that start with a byte that cannot start a value (0xc1) and hold no
    plausible request start."""
    if name == "ndjson":
        return st.binary(max_size=300).map(lambda b: b + b"\n")
    if name == "lsp":
        return st.binary(max_size=300).filter(lambda b: b"content-length:" not in b.lower())
    return st.binary(max_size=300).map(lambda b: b"\xc1" + b).filter(lambda b: not mp_framing._REQUEST_START.search(b))


@FUZZ
@given(data=st.data(), name=framings, reqs=requests(), sizes=splits, max_frame=st.sampled_from([64, 200, 1 << 20]))
def test_garbage_between_frames_never_loses_a_frame(data, name, reqs, sizes, max_frame):
    garbage = [data.draw(garbage_for(name)) if data.draw(st.booleans()) else None for _ in reqs]
    for r in reqs:
        assume(len(encode(name, r)) <= max_frame)
    stream = b"".join((g or b"") + encode(name, r) for g, r in zip(garbage, reqs))
    try:
        frames = read_all(name, stream, max_frame, sizes)
        got = messages(frames)
        # Garbage may itself be read as a message (a JSON line "1", say), never a request of ours.
        assert [m for m in got if m in reqs] == reqs
        if name != "ndjson":
            # One error at most per garbage run, and garbage is never read as messages.
            assert got == reqs
            assert len(frames) - len(got) <= sum(g is not None for g in garbage)
        if name == "msgpack":
            # Every garbage run starts with 0xc1: exactly one error for each.
            assert len(frames) - len(got) == sum(g is not None for g in garbage)
    except AssertionError:
        save_on_failure(name, stream)
        raise


@FUZZ
@given(name=framings, stream=st.binary(max_size=2000), sizes=splits, max_frame=st.sampled_from([16, 300, 1 << 20]))
def test_arbitrary_bytes_never_raise_and_end(name, stream, sizes, max_frame):
    try:
        frames = read_all(name, stream + encode(name, TAIL), max_frame, sizes)
        assert len(frames) <= len(stream) + 1
    except Exception:
        save_on_failure(name, stream)
        raise


@FUZZ
@given(name=framings, stream=st.binary(max_size=400), cut=st.integers(0, 10**6), sizes=splits)
def test_mutated_valid_streams_never_raise(name, stream, cut, sizes):
    """Valid frames with random bytes spliced in, cut short, or both."""
    valid = encode(name, {"jsonrpc": "2.0", "id": 1, "method": "runtime/ping", "params": {"a": [1, "x"]}})
    at = cut % (len(valid) + 1)
    data = valid[:at] + stream + valid[at:] + valid
    try:
        read_all(name, data, 1 << 20, sizes)
        read_all(name, data[: cut % (len(data) + 1)], 1 << 20, sizes)
    except Exception:
        save_on_failure(name, data)
        raise


# ---- the kept corpus ----

def corpus_files():
    return sorted(CORPUS.glob("*/*.bin"))


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_replays(path):
    """Every kept input reads without raising, in one piece and byte by byte alike. Inputs that
    end with the tail request (the reproductions) must have it answered after the bad part."""
    name = path.parent.name
    data = path.read_bytes()
    whole = read_all(name, data, max_frame=CORPUS_MAX_FRAME)
    trickled = read_all(name, data, max_frame=CORPUS_MAX_FRAME, sizes=[1])
    odd = read_all(name, data, max_frame=CORPUS_MAX_FRAME, sizes=[7, 3, 64])
    assert [f.message for f in whole] == [f.message for f in trickled] == [f.message for f in odd]
    assert [f.error.code for f in whole if f.error] == [f.error.code for f in trickled if f.error]
    if data.endswith(encode(name, TAIL)):
        assert whole[-1].message == TAIL


def test_corpus_is_there():
    names = {p.parent.name for p in corpus_files()}
    assert names == set(framing.NAMES)


# ---- one failure in a reader never ends it ----

@pytest.mark.parametrize("name", framing.NAMES)
def test_reader_survives_an_exception_of_its_own(name):
    """An exception raised inside the reader (a bug) becomes one error and the reader goes on."""
    codec = framing.load(name)

    class Faulty(codec.Reader):
        failed = False

        def _frames(self):
            for frame in super()._frames():
                if not Faulty.failed:
                    Faulty.failed = True
                    raise RuntimeError("injected")
                yield frame

    reqs = [{"jsonrpc": "2.0", "id": i, "method": "runtime/ping"} for i in range(6)]
    data = b"".join(encode(name, r) for r in reqs)
    chunks = [data[i: i + 5] for i in range(0, len(data), 5)]
    frames = list(Faulty(lambda n: chunks.pop(0) if chunks else b"", 1 << 20))
    assert Faulty.failed and frames[0].error.code == -32700
    assert messages(frames)[-3:] == reqs[-3:]


@pytest.mark.parametrize("name", framing.NAMES)
def test_reader_that_always_fails_still_ends(name):
    codec = framing.load(name)

    class Broken(codec.Reader):
        def _frames(self):
            raise RuntimeError("always")
            yield

    frames = list(Broken(lambda n: b"", 1 << 20, b"x" * 50))
    assert 1 <= len(frames) <= 52 and all(f.error.code == -32700 for f in frames)


def test_a_failing_read_is_not_swallowed():
    """The host's read raising is not a framing problem: it ends the reader (the server treats it as EOF)."""
    def read(n):
        raise OSError("gone")

    with pytest.raises(OSError):
        list(framing.load("msgpack").Reader(read, 1 << 20, b"\x81"))


# ---- resync cost is linear in the garbage ----

PATHOLOGICAL = {
    "msgpack": [b"\xc1" + b"\x91" * 200_000, b"\xc1" + b"\x82\xa2id" * 50_000, b"\xc1" + b"\x82\xa2id\xdb\x00\x01\x00\x00" * 20_000,
                b"\xc1" + b"\xdc\xff\xff" * 70_000, b"\xc1" + b"\x82\xa6params\x91" * 20_000,
                b"\xc1" + random.Random(1).randbytes(200_000)],
    "lsp": [b"x" * 200_000, b"\n" * 200_000, b"Content-Length: 1\r\n" * 10_000, b"Content-Length" * 15_000,
            b"a: b\r\n" * 40_000],
    "ndjson": [b"x" * 400_000 + b"\n", b"[" * 200_000 + b"\n", b"\n" * 200_000],
}


@pytest.mark.parametrize("name,garbage", [(n, g) for n, gs in PATHOLOGICAL.items() for g in gs],
                         ids=lambda v: v if isinstance(v, str) else f"{v[:8]!r}x{len(v)}")
def test_resync_after_much_garbage_is_fast(name, garbage):
    """A generous bound for a noisy machine: 100 KB of 0x91 took ~17 s when resync was quadratic
    (200 KB: about a minute); now each case takes well under a second."""
    data = garbage + encode(name, TAIL)
    t0 = time.monotonic()
    frames = read_all(name, data, max_frame=1 << 16)
    assert time.monotonic() - t0 < 10.0
    assert frames[-1].message == TAIL  # a single request comes back as a single request
    assert sum(f.error is not None for f in frames) <= 3


# ---- the reproductions, one by one ----

def test_msgpack_bin_key_is_invalid_request_with_its_path():
    frame = b"\x84\xa7jsonrpc\xa32.0\xa2id\x01\xa6method\xacruntime/ping\xa6params\x82\xa1a\x01\xc4\x01b\x02"
    frames = read_all("msgpack", frame + encode("msgpack", TAIL))
    assert frames[0].error.code == -32600 and frames[0].error.data["path"] == "/params"
    assert "bin" in frames[0].error.message
    assert frames[1].message == TAIL


@pytest.mark.parametrize("value,path,word", [
    ({1: 2}, "/params/v", "integer"),
    ({None: 2}, "/params/v", "nil"),
    (msgpack.ExtType(5, b"x"), "/params/v", "extension type 5"),
    (msgpack.Timestamp(1, 5), "/params/v", "timestamp"),
    ([0, [msgpack.ExtType(1, b"")]], "/params/v/1/0", "extension type 1"),
])
def test_msgpack_values_without_json_equivalent_are_refused(value, path, word):
    msg = {"jsonrpc": "2.0", "id": 1, "method": "runtime/ping", "params": {"v": value}}
    frames = read_all("msgpack", msgpack.packb(msg, use_bin_type=True, strict_types=False) + encode("msgpack", TAIL))
    assert frames[0].error.code == -32600 and frames[0].error.data["path"] == path
    assert word in frames[0].error.message
    assert frames[1].message == TAIL


def test_msgpack_resync_finds_requests_from_str8_encoders():
    """Some encoders write every string as str8; such a request is still a resync point."""
    req = (b"\x83\xd9\x07jsonrpc\xd9\x032.0\xd9\x02id\x01"
           b"\xd9\x06method\xd9\x0cruntime/ping")
    for sizes in (None, [1], [5]):
        frames = read_all("msgpack", b"\xc1garbage" + req, sizes=sizes)
        assert [f.message for f in frames] == [None, {"jsonrpc": "2.0", "id": 1, "method": "runtime/ping"}]


def test_msgpack_bin_values_pass_to_the_schemas():
    msg = {"jsonrpc": "2.0", "id": 1, "method": "runtime/ping", "params": {"b": b"\x00\x01"}}
    assert messages(read_all("msgpack", encode("msgpack", msg))) == [msg]


def test_lsp_earliest_header_end_wins():
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "runtime/ping"})
    data = b"Content-Length: %d\n\n" % len(body) + body + encode("lsp", TAIL)
    assert messages(read_all("lsp", data)) == [orjson.loads(body), TAIL]


@pytest.mark.parametrize("sizes", [None, [1], [100]])
def test_lsp_header_over_8k_is_dropped_without_losing_the_next_frame(sizes):
    data = b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n" + encode("lsp", TAIL)
    frames = read_all("lsp", data, sizes=sizes)
    assert [f.error.code for f in frames if f.error] == [-32700]
    assert frames[-1].message == TAIL


@pytest.mark.parametrize("name,header", [
    ("lsp", b"Content-Length: 999999999999\r\n\r\n"),
    ("lsp", b"Content-Length: 99999999999999999999999999\r\n\r\n"),
    ("msgpack", b"\xdb\xff\xff\xff\xff"),             # str 32
    ("msgpack", b"\xc6\xff\xff\xff\xff"),             # bin 32
    ("msgpack", b"\xdd\xff\xff\xff\xff"),             # array 32
    ("msgpack", b"\xdf\xff\xff\xff\xff"),             # map 32
    ("msgpack", b"\x83\xa7jsonrpc\xa32.0\xa6method\xdb\xff\xff\xff\xff"),  # deep inside a request
])
def test_declared_length_beyond_the_limit_is_answered_at_once(name, header):
    # No body follows: the answer must not wait for it, and the next request is read.
    frames = read_all(name, header + encode(name, TAIL), max_frame=1 << 20)
    assert frames[0].error.data["type"] == "frame_too_large"
    assert frames[1].message == TAIL and len(frames) == 2


def test_ndjson_long_line_is_answered_before_its_newline():
    """The error comes as soon as the limit is passed; the line is never held whole."""
    seen = []
    pieces = [b"x" * 1000] * 50 + [b"\n", encode("ndjson", TAIL)]
    sent = 0
    peak = 0

    def read(n):
        nonlocal sent, peak
        peak = max(peak, len(reader._buf))
        sent += 1
        return pieces[sent - 1] if sent <= len(pieces) else b""

    reader = framing.load("ndjson").Reader(read, 4096)
    for frame in reader:
        seen.append((sent, frame))
    assert peak <= 4096 + 1000  # memory stays bounded by the limit, not by the line
    (when, error), (_, tail) = seen
    assert error.error.data["type"] == "frame_too_large" and when == 5
    assert tail.message == TAIL


@FUZZ
@given(name=framings, reqs=requests(), sizes=splits, at=st.integers(0, 10), pad=st.integers(300, 3000))
def test_a_frame_over_the_limit_costs_only_itself(name, reqs, sizes, at, pad):
    """A whole frame over --max-frame-bytes gets one frame_too_large; the frames around it are read."""
    limit = 256
    for r in reqs:
        assume(len(encode(name, r)) <= limit)
    big = {"jsonrpc": "2.0", "id": "big", "method": "generate", "params": {"prompt": "p" * pad}}
    at = at % (len(reqs) + 1)
    stream = b"".join(encode(name, r) for r in reqs[:at]) + encode(name, big) + b"".join(encode(name, r) for r in reqs[at:])
    try:
        frames = read_all(name, stream, limit, sizes)
        assert messages(frames) == reqs
        assert [f.error.data["type"] for f in frames if f.error] == ["frame_too_large"]
        assert frames[at].error is not None  # answered in its place
    except AssertionError:
        save_on_failure(name, stream)
        raise
