import json
import os
import time
import sys
from pathlib import Path

import pytest

from mlx_sidecar import blas

blas.preload()  # before anything imports mlx.core, as the runtime does

from mlx_sidecar.testing import make_model
from mlx_sidecar.testing.pipe import Pipe

ROOT = Path(__file__).resolve().parents[1]
FRAMINGS = ("ndjson", "lsp", "msgpack")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A ~0.1M-parameter random llama (about 1 ms per token); greedy never reaches EOS."""
    return str(make_model(tmp_path_factory.mktemp("tiny"), preset="tiny"))


@pytest.fixture(scope="session")
def eos_model(tmp_path_factory) -> str:
    """The same shape, but special tokens (EOS) can be sampled."""
    return str(make_model(tmp_path_factory.mktemp("tiny-eos"), preset="tiny", reachable_eos=True))


@pytest.fixture(scope="session")
def vision_model(tmp_path_factory) -> str:
    """A ~0.2M-parameter random qwen2_vl (mlx-vlm) with its processor files; greedy never reaches EOS."""
    from mlx_sidecar.testing.vision import make_vision_model

    return str(make_vision_model(tmp_path_factory.mktemp("tiny-vlm")))


@pytest.fixture
def spawn():
    """Start real runtimes as subprocesses; all are closed after the test."""
    pipes = []

    def start(framing="ndjson", args=(), **kw):
        p = Pipe(framing, args=args, **kw)
        pipes.append(p)
        return p

    yield start
    for p in pipes:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture
def serve():
    """Start real runtimes in-process (Server.serve on a thread, over os.pipe): the same code as
    the subprocess without its start-up, for dispatcher, ordering and shutdown tests."""
    pipes = []

    def start(framing="ndjson", args=()):
        p = Pipe(framing, args=args, in_process=True)
        pipes.append(p)
        return p

    yield start
    for p in pipes:
        p.close()


@pytest.fixture
def loaded(serve, tiny_model):
    """A runtime (ndjson, in-process) with the tiny model loaded as "m"."""
    p = serve()
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "m"})
    assert "result" in answer, answer
    return p


@pytest.fixture
def loaded_process(spawn, tiny_model):
    """The same as a subprocess, for what only a process has: a pid, signals, stdout and exit."""
    p = spawn()
    answer, _ = p.request("model/load", {"model": tiny_model, "id": "m"})
    assert "result" in answer, answer
    return p


def chunks_of(notes, id):
    return [n["params"] for n in notes if n.get("method") == "generate/chunk" and n["params"]["id"] == id]


def collect(p, ids, timeout=300):
    """Read until every id in ids is answered; returns {id: (answer, chunks)}."""
    answers, notes = {}, []
    deadline = time.monotonic() + timeout
    while len(answers) < len(ids):
        msg = p.recv(max(0.1, deadline - time.monotonic()))
        if "id" in msg and msg["id"] in ids:
            assert msg["id"] not in answers, f"two answers for {msg['id']}"
            answers[msg["id"]] = msg
        else:
            notes.append(msg)
    return {i: (answers[i], chunks_of(notes, i)) for i in ids}
