"""Vision models (mlx-vlm) through the real runtime: a tiny random qwen2_vl, real images decoded by
Pillow, every image source, the limits, cancel, concurrency and the prompt cache."""

import base64
import io
import os
import shutil
import socket
import struct
import threading
import zlib

import pytest

from conftest import chunks_of

QUESTION = "What is in this picture?"


def png(width=64, height=48, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.new("RGB", (width, height), color)
    im.putpixel((1, 1), (0, 255, 0))
    im.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(p, parts, text=QUESTION, max_tokens=8, **params):
    content = list(parts) + [{"type": "text", "text": text}]
    return p.request("generate", {"model": "v", "messages": [{"role": "user", "content": content}],
                                  "max_tokens": max_tokens, "temperature": 0, **params})


def start_ask(p, parts, text=QUESTION, max_tokens=8, **params):
    content = list(parts) + [{"type": "text", "text": text}]
    return p.start("generate", {"model": "v", "messages": [{"role": "user", "content": content}],
                                "max_tokens": max_tokens, "temperature": 0, **params})


def result(answer):
    assert "result" in answer, answer
    return answer["result"]


def invalid(answer, path):
    assert "error" in answer, answer
    err = answer["error"]
    assert err["code"] == -32602, err
    assert err["data"]["path"] == path, err
    return err["message"]


@pytest.fixture
def vision(serve, vision_model):
    def start(framing="ndjson", args=()):
        p = serve(framing, args=args)
        info = result(p.request("model/load", {"model": vision_model, "id": "v"})[0])
        assert info["kind"] == "vision"
        return p
    return start


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(png())
    return path


# ---- loading ----
def test_load_reports_vision_and_processor_limits(vision):
    p = vision()
    models = result(p.request("model/list")[0])["models"]
    [info] = [m for m in models if m["id"] == "v"]
    assert info["kind"] == "vision" and info["architecture"] == "qwen2_vl"
    v = info["vision"]
    assert v["image_token"] == "<|image_pad|>"
    assert v["patch_size"] == 14 and v["merge_size"] == 2
    assert v["max_pixels"] == 448 * 448 and v["max_image_tokens"] == 256
    assert v["max_image_side"] in (512, 768, 1024) and v["max_images"] == 16


def test_load_stays_offline_without_processor_files(spawn, vision_model, tmp_path):
    """The processor loader looks for missing processor files on the hub (mlx-vlm 0.7.10 calls
    hf_hub_download with the local path); no connection may leave the runtime while it loads."""
    copy = tmp_path / "vlm"
    shutil.copytree(vision_model, copy)
    for name in ("processor_config.json", "video_preprocessor_config.json"):
        (copy / name).unlink()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    hits = []

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    stop = threading.Event()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_OFFLINE": "0"}
        p = spawn(env=env)
        info = result(p.request("model/load", {"model": str(copy), "id": "v"}, timeout=120)[0])
        assert info["kind"] == "vision"
        answer, _ = ask(p, [url_part(data_url(png()))])
        assert result(answer)["usage"]["completion_tokens"] == 8
    finally:
        stop.set()
        t.join()
        server.close()
    assert hits == [], "loading a local vision model reached for the hub"


def test_an_unsupported_vision_architecture_is_refused(serve, vision_model, tmp_path):
    import json

    copy = tmp_path / "odd"
    shutil.copytree(vision_model, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "no_such_vl"
    (copy / "config.json").write_text(json.dumps(config))
    p = serve()
    answer, _ = p.request("model/load", {"model": str(copy), "id": "v"})
    assert answer["error"]["code"] == -32001
    assert answer["error"]["data"]["type"] == "unsupported_architecture"
    assert "no_such_vl" in answer["error"]["message"]
    assert result(p.request("runtime/ping")[0]) is not None


# ---- text and one image ----
def test_text_only_request_on_a_vision_model(vision):
    p = vision()
    answer, notes = p.request("generate", {"model": "v", "messages": [{"role": "user", "content": "Hello"}],
                                           "max_tokens": 6, "temperature": 0})
    r = result(answer)
    assert r["usage"]["completion_tokens"] == 6 and "images" not in r
    assert "".join(c["text"] for c in chunks_of(notes, answer["id"])) == r["text"]


def test_one_image_every_source_gives_the_same_tokens(vision, image_file):
    data = image_file.read_bytes()
    sources = [url_part(data_url(data)), url_part(str(image_file)), url_part(image_file.as_uri()),
               {"type": "image", "data": data, "mime": "image/png"}]
    texts = []
    for framing in ("ndjson", "msgpack"):
        p = vision(framing, args=["--prompt-cache-bytes", "0"])
        for part in sources if framing == "msgpack" else sources[:3]:
            answer, notes = ask(p, [part], max_tokens=12)
            r = result(answer)
            assert r["usage"]["completion_tokens"] == 12
            assert "".join(c["text"] for c in chunks_of(notes, answer["id"])) == r["text"]
            [im] = r["images"]
            assert (im["source_width"], im["source_height"]) == (64, 48)
            assert im["tokens"] >= 4
            texts.append((r["text"], r["usage"]["prompt_tokens"]))
    assert len(texts) == 7 and len(set(texts)) == 1, texts


def test_the_image_changes_the_answer(vision):
    p = vision(args=["--prompt-cache-bytes", "0"])
    red = result(ask(p, [url_part(data_url(png(color=(255, 0, 0))))], max_tokens=16)[0])
    blue = result(ask(p, [url_part(data_url(png(color=(0, 0, 255))))], max_tokens=16)[0])
    none = result(p.request("generate", {"model": "v", "max_tokens": 16, "temperature": 0,
                                         "messages": [{"role": "user", "content": QUESTION}]})[0])
    assert red["usage"]["prompt_tokens"] == blue["usage"]["prompt_tokens"] > none["usage"]["prompt_tokens"]
    assert red["text"] != blue["text"]


def test_resize_budget_flag_and_per_request(vision):
    p = vision(args=["--max-image-side", "256"])
    big = png(1000, 500)
    r = result(ask(p, [url_part(data_url(big))])[0])
    assert (r["images"][0]["width"], r["images"][0]["height"]) == (256, 128)
    r = result(ask(p, [url_part(data_url(big))], max_image_side=100)[0])
    assert (r["images"][0]["width"], r["images"][0]["height"]) == (100, 50)
    assert r["images"][0]["source_width"] == 1000
    low = {"type": "image_url", "image_url": {"url": data_url(png(2000, 1000)), "detail": "low"}}
    p2 = vision(args=["--max-image-side", "1024"])
    r = result(ask(p2, [low])[0])
    assert (r["images"][0]["width"], r["images"][0]["height"]) == (512, 256)
    small = result(ask(p2, [url_part(data_url(png(40, 30)))])[0])
    assert (small["images"][0]["width"], small["images"][0]["height"]) == (40, 30)  # never enlarged


def test_exif_orientation_is_honoured(vision):
    from PIL import Image

    im = Image.new("RGB", (80, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    p = vision()
    r = result(ask(p, [url_part(data_url(buf.getvalue(), "image/jpeg"))])[0])
    im = r["images"][0]
    assert (im["source_width"], im["source_height"]) == (40, 80)
    assert (im["width"], im["height"]) == (40, 80)


# ---- several images ----
def test_two_images_in_one_message_and_across_messages(vision):
    p = vision(args=["--prompt-cache-bytes", "0"])
    a, b = url_part(data_url(png(color=(255, 0, 0)))), url_part(data_url(png(56, 56, color=(0, 0, 255))))
    one = result(ask(p, [a])[0])
    two = result(ask(p, [a, b])[0])
    assert len(two["images"]) == 2
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]
    swapped = result(ask(p, [b, a])[0])
    assert swapped["usage"]["prompt_tokens"] == two["usage"]["prompt_tokens"]
    convo = result(p.request("generate", {"model": "v", "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "user", "content": [a, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [b, {"type": "text", "text": "And this one?"}]},
    ]})[0])
    assert [im["tokens"] for im in convo["images"]] == [im["tokens"] for im in two["images"]]


def test_raw_prompt_with_images_follows_the_models_placeholders(vision):
    p = vision(args=["--prompt-cache-bytes", "0"])
    img = url_part(data_url(png()))
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = f"<|im_start|>user\n{placeholder}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    raw = result(p.request("generate", {"model": "v", "prompt": prompt, "images": [img], "max_tokens": 8, "temperature": 0})[0])
    chat = result(ask(p, [img])[0])
    assert raw["text"] == chat["text"] and raw["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"]
    answer, _ = p.request("generate", {"model": "v", "prompt": "no placeholder here", "images": [img], "max_tokens": 4})
    assert "<|image_pad|>" in invalid(answer, "/images")
    answer, _ = p.request("generate", {"model": "v", "messages": [{"role": "user", "content": "hi"}], "images": [img]})
    assert answer["error"]["code"] == -32602


# ---- bad inputs ----
def _bomb_png(width=50_000, height=50_000) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_images_are_refused_by_part_and_the_runtime_keeps_serving(vision, tmp_path, image_file):
    p = vision("msgpack", args=["--max-images", "2"])
    good = url_part(data_url(png()))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    truncated = png(200, 200)[:120]
    cases = [
        ([good, {"type": "image", "data": b"\x00\x01garbage"}], "/messages/0/content/1/data", "format"),
        ([url_part(data_url(truncated))], "/messages/0/content/0/image_url/url", "corrupt"),
        ([url_part(str(text_file))], "/messages/0/content/0/image_url/url", "format"),
        ([url_part(data_url(_bomb_png()))], "/messages/0/content/0/image_url/url", "bomb"),
        ([url_part(str(tmp_path / "missing.png"))], "/messages/0/content/0/image_url/url", "does not exist"),
        ([url_part(str(tmp_path))], "/messages/0/content/0/image_url/url", "not a regular file"),
        ([url_part("relative/red.png")], "/messages/0/content/0/image_url/url", "absolute file path"),
        ([url_part("https://example.com/cat.png")], "/messages/0/content/0/image_url/url", "--allow-remote-images"),
        ([url_part("data:image/png;base64,@@@")], "/messages/0/content/0/image_url/url", "base64"),
        ([url_part("file://otherhost/x.png")], "/messages/0/content/0/image_url/url", "local file"),
        ([url_part("file:red.png")], "/messages/0/content/0/image_url/url", "absolute path"),
        ([good, good, good], "/messages/0/content/2", "limit of 2"),
    ]
    for parts, path, words in cases:
        message = invalid(ask(p, parts)[0], path)
        assert words in message, (words, message)
    # An image outside a user message, and a str where bytes belong.
    answer, _ = p.request("generate", {"model": "v", "max_tokens": 4, "messages": [
        {"role": "system", "content": [good]}, {"role": "user", "content": "hi"}]})
    invalid(answer, "/messages/0/content/0")
    invalid(ask(p, [{"type": "image", "data": "aGVsbG8="}])[0], "/messages/0/content/0/data")
    # Still serving, with images.
    assert result(ask(p, [good])[0])["usage"]["completion_tokens"] == 8
    info = result(p.request("runtime/info")[0])
    assert info["memory"]["rss_bytes"] < 4 << 30   # the bomb was never allocated


def test_remote_images_only_with_the_flag(vision, tmp_path):
    """http(s) URLs are fetched only when the runtime was started with --allow-remote-images (a
    local HTTP server here: no network)."""
    import http.server

    (tmp_path / "red.png").write_bytes(png())
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/red.png"
        closed = vision()
        assert "--allow-remote-images" in invalid(ask(closed, [url_part(url)])[0], "/messages/0/content/0/image_url/url")
        open_ = vision(args=["--allow-remote-images"])
        r = result(ask(open_, [url_part(url)])[0])
        assert (r["images"][0]["source_width"], r["images"][0]["source_height"]) == (64, 48)
        invalid(ask(open_, [url_part(url + ".missing")])[0], "/messages/0/content/0/image_url/url")
    finally:
        server.shutdown()
        server.server_close()


def test_a_text_model_refuses_images(serve, tiny_model, vision_model):
    p = serve()
    result(p.request("model/load", {"model": tiny_model, "id": "t"})[0])
    answer, _ = p.request("generate", {"model": "t", "max_tokens": 4, "messages": [
        {"role": "user", "content": [url_part(data_url(png())), {"type": "text", "text": "hi"}]}]})
    invalid(answer, "/messages/0/content/0")
    answer, _ = p.request("generate", {"model": "t", "prompt": "hi", "images": [url_part(data_url(png()))]})
    invalid(answer, "/images/0")


# ---- engine ----
def test_cancel_an_image_request(vision):
    p = vision()
    id = p.start("generate", {"model": "v", "max_tokens": 100000, "temperature": 0, "stream_options": {"chunk_tokens": 1},
                              "messages": [{"role": "user", "content": [url_part(data_url(png())), {"type": "text", "text": QUESTION}]}]})
    # Wait until it streams, then cancel.
    while True:
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == id:
            break
    p.notify("$/cancelRequest", {"id": id})
    answer, _ = p.wait(id)
    assert answer["error"]["code"] == -32800
    assert 0 < answer["error"]["data"]["usage"]["completion_tokens"] < 100000
    assert result(ask(p, [url_part(data_url(png()))])[0])["usage"]["completion_tokens"] == 8


def test_sampling_seed_stop_and_response_format(vision):
    p = vision()
    img = [url_part(data_url(png()))]
    a = result(ask(p, img, max_tokens=12, temperature=0.9, seed=7)[0])
    b = result(ask(p, img, max_tokens=12, temperature=0.9, seed=7)[0])
    assert a["text"] == b["text"]
    greedy = result(ask(p, img, max_tokens=12)[0])["text"]
    cut = greedy[3:5]
    stopped = result(ask(p, img, max_tokens=12, stop=[cut])[0])
    assert stopped["finish_reason"] == "stop" and stopped["text"] == greedy[: greedy.index(cut)]
    fmt = result(ask(p, img, max_tokens=12, response_format={"type": "regex", "pattern": "(ab|ba){3}"})[0])
    assert fmt["text"] in {x + y + z for x in ("ab", "ba") for y in ("ab", "ba") for z in ("ab", "ba")}
    assert fmt["format_complete"] is True


def test_second_question_on_one_image_reuses_its_prefix(vision):
    img = url_part(data_url(png(200, 150)))
    p = vision()
    first = result(ask(p, [img], text="What colour is it?")[0])
    second = result(ask(p, [img], text="Describe the picture.")[0])
    image_tokens = first["images"][0]["tokens"]
    assert first["usage"].get("cached_tokens", 0) == 0
    assert second["usage"]["cached_tokens"] > image_tokens
    # The same answer as without any cache.
    cold = vision(args=["--prompt-cache-bytes", "0"])
    assert result(ask(cold, [img], text="Describe the picture.")[0])["text"] == second["text"]
    # Another picture of the same size never reuses the first one's encoding.
    other = result(ask(p, [url_part(data_url(png(200, 150, color=(0, 90, 0))))], text="Describe the picture.")[0])
    assert other["usage"].get("cached_tokens", 0) < image_tokens


def test_concurrent_image_requests_and_a_text_model_keeps_flowing(vision, tiny_model):
    p = vision(args=["--prompt-cache-bytes", "0"])
    result(p.request("model/load", {"model": tiny_model, "id": "t"})[0])
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90)]
    alone = [result(ask(p, [url_part(data_url(png(color=c)))], max_tokens=24)[0])["text"] for c in colors]
    ids = [p.start("generate", {"model": "v", "max_tokens": 24, "temperature": 0, "messages": [
        {"role": "user", "content": [url_part(data_url(png(color=c))), {"type": "text", "text": QUESTION}]}]}) for c in colors]
    text_id = p.start("generate", {"model": "t", "prompt": "Hello", "max_tokens": 4})
    order, answers = [], {}
    while len(answers) < 5:
        msg = p.recv()
        if "id" in msg and msg["id"] in ids + [text_id]:
            order.append(msg["id"])
            answers[msg["id"]] = msg
    assert [result(answers[i])["text"] for i in ids] == alone
    # The text model did not wait for all the image requests.
    assert order.index(text_id) < len(order) - 1


def test_a_running_image_request_moves_into_a_batch_unchanged(vision):
    """A lone request is joined mid-stream by newcomers (mlx-vlm's batch takes no KV cache, so it
    is prefilled again with what it has made so far); every text stays the one it gets alone."""
    p = vision(args=["--prompt-cache-bytes", "0"])
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]

    def params(c):
        return {"model": "v", "max_tokens": 80, "temperature": 0, "stream_options": {"chunk_tokens": 1},
                "messages": [{"role": "user", "content": [url_part(data_url(png(color=c))), {"type": "text", "text": QUESTION}]}]}

    alone = [result(p.request("generate", params(c))[0])["text"] for c in colors]
    first = p.start("generate", params(colors[0]))
    while True:
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == first:
            break
    ids = [first] + [p.start("generate", params(c)) for c in colors[1:]]
    answers = {}
    while len(answers) < 3:
        msg = p.recv()
        if msg.get("id") in ids:
            answers[msg["id"]] = msg
    assert [result(answers[i])["text"] for i in ids] == alone


def test_cancel_one_image_request_of_a_batch(vision):
    p = vision(args=["--prompt-cache-bytes", "0"])
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]

    def params(c, n):
        return {"model": "v", "max_tokens": n, "temperature": 0, "stream_options": {"chunk_tokens": 1},
                "messages": [{"role": "user", "content": [url_part(data_url(png(color=c))), {"type": "text", "text": QUESTION}]}]}

    alone = [result(p.request("generate", params(c, 40))[0])["text"] for c in colors[1:]]
    ids = [p.start("generate", params(colors[0], 100000))] + [p.start("generate", params(c, 40)) for c in colors[1:]]
    seen = set()
    while len(seen) < 3:   # every request streams: the batch is running
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            seen.add(msg["params"]["id"])
    p.notify("$/cancelRequest", {"id": ids[0]})
    answers = {}
    while len(answers) < 3:
        msg = p.recv()
        if msg.get("id") in ids:
            answers[msg["id"]] = msg
    assert answers[ids[0]]["error"]["code"] == -32800
    assert [result(answers[i])["text"] for i in ids[1:]] == alone


def test_unloading_a_vision_model_ends_its_requests(vision):
    p = vision()
    img = url_part(data_url(png()))
    ids = [p.start("generate", {"model": "v", "max_tokens": 100000, "temperature": 0, "stream_options": {"chunk_tokens": 1},
                                "messages": [{"role": "user", "content": [img, {"type": "text", "text": text}]}]})
           for text in ("one", "two")]
    while True:
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            break
    unload = p.start("model/unload", {"model": "v"})
    answers = {}
    while len(answers) < 3:
        msg = p.recv()
        if msg.get("id") in ids + [unload]:
            answers[msg["id"]] = msg
    assert result(answers[unload]) == {"id": "v"}
    assert [answers[i]["error"]["code"] for i in ids] == [-32005, -32005]


def test_tokenize_counts_image_tokens_like_generate(vision):
    p = vision()
    img = url_part(data_url(png(200, 150)))
    messages = [{"role": "user", "content": [img, {"type": "text", "text": QUESTION}]}]
    tokens = result(p.request("tokenize", {"model": "v", "messages": messages})[0])
    generated = result(p.request("generate", {"model": "v", "messages": messages, "max_tokens": 2, "temperature": 0})[0])
    assert len(tokens["tokens"]) == generated["usage"]["prompt_tokens"]
    assert tokens["text"].count("<|image_pad|>") == 1
    text_only = result(p.request("tokenize", {"model": "v", "text": "Hello"})[0])
    assert len(text_only["tokens"]) < 5
    answer, _ = p.request("tokenize", {"model": "v", "messages": [{"role": "user", "content": [url_part("/no/such.png")]}]})
    invalid(answer, "/messages/0/content/0/image_url/url")


# ---- the KV budget and loading beside other streams ----
def _kv_per_token(p) -> int:
    [info] = [m for m in result(p.request("model/list")[0])["models"] if m["id"] == "v"]
    return info["kv_bytes_per_token"]


def _prompt_tokens(p, parts, text=QUESTION) -> int:
    """The prompt's tokens after the processor expanded each image into its placeholder tokens."""
    messages = [{"role": "user", "content": list(parts) + [{"type": "text", "text": text}]}]
    return len(result(p.request("tokenize", {"model": "v", "messages": messages})[0])["tokens"])


def _events(p, ids):
    """("chunk" | "answer", id) in arrival order until every id is answered, and the answers."""
    events, answers = [], {}
    while len(answers) < len(ids):
        msg = p.recv()
        if msg.get("method") == "generate/chunk":
            events.append(("chunk", msg["params"]["id"]))
        elif msg.get("id") in ids:
            answers[msg["id"]] = msg
            events.append(("answer", msg["id"]))
    return events, answers


def test_an_image_request_that_does_not_fit_now_waits_then_runs(vision, serve, vision_model):
    img = url_part(data_url(png(200, 150)))
    probe = vision()
    per, n = _kv_per_token(probe), _prompt_tokens(probe, [img])
    assert n > 40  # the image's tokens count
    budget = per * (n + 300) * 3 // 2      # one request of n + 300 tokens fits, two do not
    p = vision(args=["--kv-budget-bytes", str(budget), "--prompt-cache-bytes", "0"])
    a, b = start_ask(p, [img], max_tokens=300), start_ask(p, [img], max_tokens=300)
    events, answers = _events(p, {a, b})
    ra, rb = result(answers[a]), result(answers[b])
    # Nothing lost: both ran to their length with the same greedy text.
    assert ra["usage"]["completion_tokens"] == rb["usage"]["completion_tokens"] == 300
    assert ra["usage"]["prompt_tokens"] == n and ra["text"] == rb["text"]
    # b made nothing until a had ended and given its KV budget back.
    assert events.index(("chunk", b)) > events.index(("answer", a))
    assert result(p.request("runtime/metrics")[0])["gauges"]["kv"]["reserved_bytes"] == 0
    # The control: with the machine's budget the same two requests decode together.
    q = vision(args=["--prompt-cache-bytes", "0"])
    a, b = start_ask(q, [img], max_tokens=300), start_ask(q, [img], max_tokens=300)
    events, _ = _events(q, {a, b})
    assert events.index(("chunk", b)) < events.index(("answer", a))


def test_an_image_request_that_never_fits_is_refused(vision):
    img = url_part(data_url(png(200, 150)))
    probe = vision()
    per, n, text_only = _kv_per_token(probe), _prompt_tokens(probe, [img]), _prompt_tokens(probe, [])
    p = vision(args=["--kv-budget-bytes", str(per * (n + 100))])
    err = ask(p, [img], max_tokens=200)[0]["error"]
    assert err["code"] == -32602 and err["data"]["type"] == "exceeds_memory" and err["data"]["path"] == "/max_tokens"
    assert err["data"]["kv_bytes_needed"] == per * (n + 200) and err["data"]["prompt_tokens"] == n
    assert err["data"]["max_tokens_that_fit"] == 100
    # The figure it gives fits.
    assert result(ask(p, [img], max_tokens=100)[0])["usage"]["total_tokens"] == n + 100
    # The image's tokens alone are too many: the prompt is what to shorten (the same text fits).
    small = vision(args=["--kv-budget-bytes", str(per * (text_only + 20))])
    err = ask(small, [img], max_tokens=1)[0]["error"]
    assert err["code"] == -32602 and err["data"]["type"] == "exceeds_memory" and err["data"]["path"] == "/messages"
    assert result(ask(small, [], max_tokens=4)[0])["usage"]["completion_tokens"] == 4
    assert "result" in small.request("runtime/ping")[0]


def test_a_text_stream_keeps_flowing_while_a_vision_model_loads(serve, tiny_model, vision_model):
    """The processor, tokenizer and weights are read on the loader thread: the text stream makes
    chunks between the load's first progress report and its last one (the old path, the whole load
    on the engine thread, made none there: its only report came just before it blocked)."""
    p = serve()
    result(p.request("model/load", {"model": tiny_model, "id": "t"})[0])
    run = p.start("generate", {"model": "t", "prompt": "Hello", "max_tokens": 100000,
                               "stream_options": {"chunk_tokens": 1, "max_latency_ms": 0}})
    while p.recv().get("method") != "generate/chunk":
        pass
    load = p.start("model/load", {"model": vision_model, "id": "v"})
    events = []
    while True:
        msg = p.recv()
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == run:
            events.append("chunk")
        elif msg.get("method") == "$/progress" and msg["params"]["token"] == load:
            events.append(msg["params"]["value"]["kind"])
        elif msg.get("id") == load:
            assert result(msg)["kind"] == "vision"
            break
        else:
            assert msg.get("id") != run, msg
    reports = [i for i, e in enumerate(events) if e == "report"]
    assert len(reports) >= 2, events
    assert events[reports[0]:reports[-1]].count("chunk") >= 1, events
    # The stream goes on after the load, and the new model answers.
    while p.recv().get("method") != "generate/chunk":
        pass
    p.notify("$/cancelRequest", {"id": run})
    assert p.wait(run)[0]["error"]["code"] == -32800
    assert result(ask(p, [url_part(data_url(png()))])[0])["usage"]["completion_tokens"] == 8


def test_a_vision_model_read_off_the_engine_matches_the_one_piece_load(serve, vision_model, monkeypatch):
    """The same ModelInfo and the same greedy answer as the old path (mlx-vlm's whole load on the
    engine thread, MLX_SIDECAR_LOAD_ON_ENGINE=1), whose progress has none of the loader's reports."""
    img = [url_part(data_url(png(color=(10, 120, 240))))]
    seen = []
    for old in (True, False):
        if old:
            monkeypatch.setenv("MLX_SIDECAR_LOAD_ON_ENGINE", "1")
        else:
            monkeypatch.delenv("MLX_SIDECAR_LOAD_ON_ENGINE")
        p = serve(args=["--prompt-cache-bytes", "0"])
        answer, notes = p.request("model/load", {"model": vision_model, "id": "v"})
        info = dict(result(answer))
        del info["load_ms"]
        messages = [n["params"]["value"].get("message") for n in notes if n.get("method") == "$/progress"]
        seen.append((info, result(ask(p, img, max_tokens=16)[0])["text"], "reading weights" in messages))
    (old_info, old_text, old_read), (info, text, read) = seen
    assert info == old_info and text == old_text
    assert read and not old_read
