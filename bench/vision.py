"""Vision benchmarks on a tiny random qwen2_vl (the worst case for any bridge overhead):

    .venv/bin/python bench/vision.py [--n 15] [--json bench/results/vision.json]

  ttft     time to the first token of a one-image request through the sidecar (a subprocess,
           image by file path; also data URL over NDJSON and raw bytes over MessagePack) ÷
           in-process mlx-vlm stream_generate on the same file: goal <= 1.05
  second   a second question on the same image (prefix reused): its time to first token ÷ the
           first question's: goal <= 0.3
  batch    4 image requests at once: aggregate tokens/s ÷ the same 4 one at a time (64 and 256
           tokens each)
Medians of interleaved runs; every request is greedy and cold unless said otherwise.
"""

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from mlx_sidecar import blas  # noqa: E402

blas.preload()

from mlx_sidecar.testing.pipe import Pipe  # noqa: E402
from mlx_sidecar.testing.vision import make_vision_model  # noqa: E402

QUESTION = "What is in this picture?"


def picture(path: Path, width=512, height=384, seed=0) -> bytes:
    """A noisy picture (PNG), already within the runtime's smallest budget so nothing resizes it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


RUNTIME_TTFT: dict = {}   # framing/source name → the runtime's own ttft_ms (read → first token)


def first_chunk_ms(p: Pipe, params: dict, name: str = "") -> float:
    """Client-side time from sending a request to its first generate/chunk."""
    t = time.perf_counter()
    id = p.start("generate", params)
    first = None
    while True:
        msg = p.recv()
        if first is None and msg.get("method") == "generate/chunk" and msg["params"]["id"] == id:
            first = (time.perf_counter() - t) * 1000
        if msg.get("id") == id:
            assert "result" in msg, msg
            RUNTIME_TTFT.setdefault(name, []).append(msg["result"]["timings"]["ttft_ms"])
            return first


def ask(part, max_tokens=1, text=QUESTION) -> dict:
    return {"model": "v", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}]}


class InProcess:
    """mlx-vlm in this process: load once, then time stream_generate to its first token."""

    def __init__(self, model_dir: str, image: str):
        from mlx_vlm import load
        from mlx_vlm.prompt_utils import apply_chat_template

        self.model, self.processor = load(model_dir)
        self.image = image
        self.prompt = apply_chat_template(self.processor, self.model.config, [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": QUESTION}]}], num_images=1)
        for _ in range(2):
            self.ttft()

    def ttft(self, image: str | None = None) -> float:
        from mlx_vlm import stream_generate

        t = time.perf_counter()
        for _ in stream_generate(self.model, self.processor, self.prompt, image=[image or self.image], max_tokens=1, temperature=0.0):
            return (time.perf_counter() - t) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlx-sidecar-vision-bench-"))
    model_dir = str(make_vision_model(tmp / "vlm"))
    image = tmp / "picture.png"
    data = picture(image)
    out = {}

    # TTFT: cold prompts (no prompt cache) and a new picture every round (nothing decoded or
    # prepared before), sidecar vs in-process, interleaved rounds, medians.
    def parts_for(path: Path, data: bytes) -> dict:
        return {"ndjson path": ("ndjson", {"type": "image_url", "image_url": {"url": str(path)}}),
                "ndjson data URL": ("ndjson", {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}),
                "msgpack bytes": ("msgpack", {"type": "image", "data": data})}

    sources = parts_for(image, data)
    pipes = {}
    for name, (framing, part) in sources.items():
        pipes[name] = Pipe(framing, args=["--prompt-cache-bytes", "0"])
        assert "result" in pipes[name].request("model/load", {"model": model_dir, "id": "v"})[0]
        for _ in range(2):
            first_chunk_ms(pipes[name], ask(part))
    reference = InProcess(model_dir, str(image))
    times = {name: [] for name in ["in_process", *sources]}
    for k in range(args.n):
        fresh = tmp / f"t{k}.png"
        fresh_data = picture(fresh, seed=1000 + k)
        times["in_process"].append(reference.ttft(str(fresh)))
        for name, (_, part) in parts_for(fresh, fresh_data).items():
            times[name].append(first_chunk_ms(pipes[name], ask(part), name))
    for p in pipes.values():
        p.close()
    base = statistics.median(times["in_process"])
    out["ttft"] = {"in_process_ms": round(base, 2)}
    for name in sources:
        ms = statistics.median(times[name])
        runtime_ms = statistics.median(RUNTIME_TTFT[name])
        out["ttft"][name] = {"sidecar_ms": round(ms, 2), "ratio": round(ms / base, 3),
                             "runtime_ttft_ms": round(runtime_ms, 2), "runtime_ratio": round(runtime_ms / base, 3)}

    # A second question on the same image: the prefix up to the question is reused.
    p = Pipe("ndjson")
    assert "result" in p.request("model/load", {"model": model_dir, "id": "v"})[0]
    firsts, seconds = [], []
    for k in range(args.n + 1):
        img = tmp / f"q{k}.png"
        picture(img, seed=k + 1)   # a new picture each round: the first question is always cold
        part = {"type": "image_url", "image_url": {"url": str(img)}}
        a = first_chunk_ms(p, ask(part, text="What colour is it?"))
        b = first_chunk_ms(p, ask(part, text="Describe the picture in detail."))
        if k:
            firsts.append(a)
            seconds.append(b)
    first, second = statistics.median(firsts), statistics.median(seconds)
    out["second"] = {"first_ms": round(first, 2), "second_ms": round(second, 2), "ratio": round(second / first, 3)}

    # 4 at once vs one at a time (different pictures).
    parts = []
    for k in range(4):
        img = tmp / f"b{k}.png"
        picture(img, seed=100 + k)
        parts.append({"type": "image_url", "image_url": {"url": str(img)}})
    q = Pipe("ndjson", args=["--prompt-cache-bytes", "0"])
    assert "result" in q.request("model/load", {"model": model_dir, "id": "v"})[0]

    def one_at_a_time(tokens: int) -> float:
        t = time.perf_counter()
        for part in parts:
            assert "result" in q.request("generate", ask(part, tokens))[0]
        return 4 * tokens / (time.perf_counter() - t)

    def together(tokens: int) -> float:
        t = time.perf_counter()
        ids = [q.start("generate", ask(part, tokens)) for part in parts]
        done = 0
        while done < 4:
            msg = q.recv()
            if msg.get("id") in ids:
                assert "result" in msg, msg
                done += 1
        return 4 * tokens / (time.perf_counter() - t)

    one_at_a_time(8), together(8)   # warm both paths (the batch compiles its own graphs)
    rounds = max(3, args.n // 3)
    out["batch"] = {}
    for tokens in (64, 256):
        alone = statistics.median(one_at_a_time(tokens) for _ in range(rounds))
        at_once = statistics.median(together(tokens) for _ in range(rounds))
        out["batch"][f"{tokens}_tokens"] = {"one_at_a_time_tps": round(alone, 1), "four_at_once_tps": round(at_once, 1),
                                            "ratio": round(at_once / alone, 2)}

    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
