"""Load-while-serving stall: what a running stream on model A feels while model B loads.

    .venv/bin/python bench/load_stall.py [--a default|small] [--b default|small|vision|vision-big|PATH] [--runs 3] [--compare]

B may be a vision model (mlx-vlm): `vision` is the tests' tiny random qwen2_vl, `vision-big` a
random qwen2_vl of ~108M parameters (12 text layers of 768, 8 vision blocks of 512; bfloat16 on disk).

One stream decodes on A (a chunk per token); after 40 of its tokens `model/load` for B is sent.
Reported per run: A's token time before the load (elapsed ÷ tokens: chunks can arrive in bursts,
so single gaps read 0), its worst gap before the load (the machine's own noise), its worst gap
while B loads (÷ token time), A's tokens during the load, and B's load time. Each run uses a fresh runtime; the old path (the whole load on
the engine thread) is measured with MLX_SIDECAR_LOAD_ON_ENGINE=1 when --compare is given."""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))

from mlx_sidecar.testing import make_model  # noqa: E402
from mlx_sidecar.testing.pipe import Pipe  # noqa: E402

STREAM = {"chunk_tokens": 1, "max_latency_ms": 0}
WARM = 40  # A's tokens before the load starts


def one(a_model, b_model, env=None):
    p = Pipe("ndjson", args=["--prompt-cache-bytes", "0"], env=env, check_schemas=False)
    p.request("model/load", {"model": a_model, "id": "a"}, timeout=600)
    eos = {str(t): -100 for t in (0, 1, 2)}  # SmolLM2's special tokens: the stream must not end by itself
    run = p.start("generate", {"model": "a", "prompt": "Tell me a story.", "max_tokens": 100000, "logit_bias": eos,
                               "stream_options": STREAM})
    times, answered, phases = [], {}, []
    load_id = load_sent = load_done = None
    while load_done is None or len([t for t in times if t > load_done]) < 4:
        msg = p.recv(600)
        if "id" in msg:
            answered[msg["id"]] = msg
            assert msg["id"] != run, f"the stream ended: {msg}"
            if msg["id"] == load_id:
                load_done = time.monotonic()
                assert "result" in msg, msg
        if msg.get("method") == "$/progress" and msg["params"]["token"] == load_id:
            phases.append((time.monotonic(), msg["params"]["value"].get("message", "begin")))
        if msg.get("method") == "generate/chunk" and msg["params"]["id"] == run:
            times.append(time.monotonic())
            if len(times) == WARM and load_id is None:
                load_sent = time.monotonic()
                load_id = p.start("model/load", {"model": b_model, "id": "b"})
    p.notify("$/cancelRequest", {"id": run})
    if run not in answered:
        p.wait(run, 600)
    p.close()
    before = [b - a for a, b in zip(times[1:WARM], times[2:WARM])]  # the first gap includes the prefill
    during = [(b - a, b) for a, b in zip(times, times[1:]) if b > load_sent and a < load_done] or [(0.0, load_sent)]
    worst, worst_at = max(during)
    # What the load was doing when the worst gap ended: its last $/progress message before then.
    phase = ([m for t, m in phases if t <= worst_at] or ["queued"])[-1]
    token = (times[WARM - 1] - times[1]) / (WARM - 2)
    return {"token_ms": round(token * 1000, 1), "worst_before_ms": round(max(before) * 1000, 1),
            "worst_gap_ms": round(worst * 1000, 1), "worst_over_token": round(worst / token, 1), "worst_phase": phase,
            "load_s": round(load_done - load_sent, 2), "a_tokens_during_load": sum(1 for t in times if load_sent < t <= load_done)}


def big_vision_model(directory):
    """The tests' tiny qwen2_vl directory (tokenizer, processor files) with ~108M random parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl

    from mlx_sidecar.testing.vision import make_vision_model

    out = make_vision_model(directory)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4)
    config["rope_scaling"]["mrope_section"] = [8, 12, 12]   # head_dim 64: the sections sum to 32
    config["vision_config"].update(depth=8, embed_dim=512, hidden_size=768, num_heads=8, mlp_ratio=4)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    args = qwen2_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))
    args.text_config = qwen2_vl.TextConfig.from_dict(args.text_config)
    args.vision_config = qwen2_vl.VisionConfig.from_dict(config["vision_config"])
    # bfloat16 on disk, as models ship: the load converts it to the runtime's dtype (float32 on CPU).
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(qwen2_vl.Model(args).parameters())}
    for name, w in list(weights.items()):
        if w.ndim == 5:  # saved in PyTorch's conv layout, which mlx-vlm transposes at load
            weights[name] = w.transpose(0, 4, 1, 2, 3)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="small", help="model A, the one streaming: default (the built-in model) or a testing preset")
    ap.add_argument("--b", default="small", help="model B, the one loading: default (the built-in model), a preset, vision, vision-big, or a path")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also measure the old path (the whole load on the engine thread)")
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="load-stall-")
    a_model = args.a if args.a == "default" else str(make_model(os.path.join(tmp, "a"), preset=args.a))
    b_model = args.b
    if b_model in ("tiny", "small"):
        b_model = str(make_model(os.path.join(tmp, "b"), preset=b_model))
    elif b_model == "vision":
        from mlx_sidecar.testing.vision import make_vision_model

        b_model = str(make_vision_model(os.path.join(tmp, "b")))
    elif b_model == "vision-big":
        b_model = str(big_vision_model(os.path.join(tmp, "b")))
    modes = [("off the engine thread", None)]
    if args.compare:
        modes.insert(0, ("on the engine thread (old)", dict(os.environ, MLX_SIDECAR_LOAD_ON_ENGINE="1")))
    rows = []
    for _ in range(args.runs):
        for name, env in modes:  # alternate, so machine noise hits both
            rows.append(dict(one(a_model, b_model, env), mode=name))
    print(f"A: {args.a} streaming; B: {args.b} loading")
    print("| load path | A token time | A worst gap before | A worst gap during load | ÷ token time | load phase then | A tokens during load | B load time |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['token_ms']} ms | {r['worst_before_ms']} ms | {r['worst_gap_ms']} ms | {r['worst_over_token']} | {r['worst_phase']} | "
              f"{r['a_tokens_during_load']} | {r['load_s']} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)  # the models made for this run (vision-big: ~215 MB)


if __name__ == "__main__":
    main()
