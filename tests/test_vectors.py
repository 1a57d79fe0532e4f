"""Replays protocol/vectors/*.json against the real runtime in every framing they allow."""

import json
import math
from pathlib import Path

import pytest

from conftest import FRAMINGS, ROOT

VECTORS = sorted((ROOT / "protocol" / "vectors").glob("*.json"))
TYPES = {"$string": str, "$boolean": bool, "$object": dict, "$array": list}


def matches(pattern, value) -> bool:
    if isinstance(pattern, str) and pattern.startswith("$"):
        if pattern == "$any":
            return True
        if pattern == "$null":
            return value is None
        if pattern == "$number":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if pattern == "$integer":
            return isinstance(value, int) and not isinstance(value, bool)
        if pattern in TYPES:
            return isinstance(value, TYPES[pattern])
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        for k, v in pattern.items():
            if v == "$absent":
                if k in value:
                    return False
            elif k not in value or not matches(v, value[k]):
                return False
        return True
    if isinstance(pattern, list):
        return isinstance(value, list) and len(pattern) == len(value) and all(matches(p, v) for p, v in zip(pattern, value))
    if isinstance(pattern, (int, float)) and not isinstance(pattern, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(pattern, value)
    return pattern == value


def substitute(obj, model):
    if isinstance(obj, str):
        return obj.replace("${MODEL}", model)
    if isinstance(obj, list):
        return [substitute(x, model) for x in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, model) for k, v in obj.items()}
    return obj


def cases():
    for path in VECTORS:
        vector = json.loads(path.read_text())
        for framing in vector.get("framings", FRAMINGS):
            yield pytest.param(vector, framing, id=f"{path.stem}-{framing}")


def test_vectors_exist():
    assert len(VECTORS) >= 8


@pytest.mark.parametrize("vector,framing", list(cases()))
def test_vector(spawn, tiny_model, vector, framing):
    p = spawn(framing)
    for step in vector["steps"]:
        if "send_raw" in step:
            p.send_raw(step["send_raw"].encode())
            msg = p.recv()
            while "method" in msg and "id" not in msg:
                msg = p.recv()
            assert matches(step["expect"], msg), (step, msg)
            continue
        message = substitute(step["send"], tiny_model)
        p.send(message)
        if "expect_batch" in step:
            answer = p.recv()
            assert isinstance(answer, list) and len(answer) == len(step["expect_batch"]), answer
            left = list(answer)
            for pattern in step["expect_batch"]:
                hit = next((a for a in left if matches(pattern, a)), None)
                assert hit is not None, (pattern, answer)
                left.remove(hit)
            continue
        if "expect" not in step:
            continue
        answer, notes = p.wait(message["id"])
        assert matches(step["expect"], answer), (step["expect"], answer)
        chunks = [n["params"] for n in notes if n.get("method") == "generate/chunk" and n["params"]["id"] == message["id"]]
        if step.get("chunks"):
            assert chunks and [c["index"] for c in chunks] == list(range(len(chunks)))
            body = answer.get("result") or answer["error"]["data"]
            assert "".join(c["text"] for c in chunks) == body["text"]
            assert sum(len(c["token_ids"]) for c in chunks) == body["usage"]["completion_tokens"]
        else:
            assert chunks == []
        if step.get("progress"):
            kinds = [n["params"]["value"]["kind"] for n in notes if n.get("method") == "$/progress" and n["params"]["token"] == message["id"]]
            assert kinds and kinds[0] == "begin" and kinds[-1] == "end"
