"""Speculative decoding through the runtime: decode tok/s with prompt lookup and with a draft model
÷ plain decoding, on an edit task whose answer repeats a passage of the prompt.

    .venv/bin/python bench/speculative.py [--model default] [--reps 3] [--tokens 200] [--draft-layers 6 ...]
        [--lookup 4 8] [--task edit|free] [--others N] [--json out.json]

Greedy, so every mode gives the same text (checked). Runs alternate mode by mode. The draft model
is a layer-truncated copy of the model (its first N layers, float32, same tokenizer), written to a
temporary directory. Reported per mode: the engine's generation_tps (first token to last), its
ratio to plain (of medians, and the median of each rep's ratio to that rep's plain run), and
end-to-end completion_tokens ÷ total_ms (prefill included, the same for every mode)."""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from mlx_sidecar import blas  # noqa: E402

blas.preload()

from mlx_sidecar.testing.pipe import Pipe  # noqa: E402

PASSAGE = (
    "The lighthouse stood on a narow spit of rock at the edge of the harbour. Every evening the keeper "
    "climbed the one hundred and twelve steps to light the lamp, and every morning he climbed them again "
    "to put it out. Ships that passed in the night saw the beam sweep acros the water once every ten "
    "seconds, and they knew where the rocks were. In the winter storms the waves broke over the gallery, "
    "and the keeper wrote in his log the height of the spray, the direction of the wind, and the names of "
    "the ships that he could see. He had done this for thirty years, and his father before him."
)
MESSAGES = [{"role": "user", "content": "Correct the spelling mistakes in the following text. Reply with the corrected "
                                        "text only, in full.\n\n" + PASSAGE}]

# A task whose answer does not repeat the prompt: prompt lookup's worst case.
FREE = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def truncated_copy(model_dir: Path, layers: int, out: Path) -> Path:
    """The first `layers` layers of a llama-type model (dequantized, float32), same tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load

    model, _ = load(str(model_dir))
    if any("quantization" in k for k in json.loads((model_dir / "config.json").read_text())):
        model = dequantize_model(model)
    model.model.layers = model.model.layers[:layers]
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def run_mode(p: Pipe, model_id: str, spec, tokens: int, messages=MESSAGES, others: int = 0) -> dict:
    q = {"model": model_id, "messages": messages, "max_tokens": tokens, "temperature": 0}
    if spec is not None:
        q["speculative"] = spec
    if not others:
        answer, _ = p.request("generate", q, timeout=1200)
        r = answer["result"]
        other_tps = None
    else:
        # Others arrive once the measured request streams: plain stories, as long as it.
        rid = p.start("generate", q)
        while not (lambda m: m.get("method") == "generate/chunk" and m["params"]["id"] == rid)(p.recv(1200)):
            pass
        ids = [p.start("generate", {"model": model_id, "messages": FREE, "max_tokens": tokens, "temperature": 0,
                                    "speculative": {"type": "none"}}) for _ in range(others)]
        done = {}
        while len(done) < others + 1:
            m = p.recv(1200)
            if m.get("id") in ids + [rid]:
                done[m["id"]] = m["result"]
        r = done[rid]
        other_tps = sum(done[i]["usage"]["completion_tokens"] / (done[i]["timings"]["total_ms"] / 1000) for i in ids)
    return {"text": r["text"], "tps": r["timings"]["generation_tps"], "others_tps": other_tps,
            "e2e": r["usage"]["completion_tokens"] / (r["timings"]["total_ms"] / 1000), "usage": r["usage"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--draft-layers", type=int, nargs="*", default=[6])
    ap.add_argument("--lookup", type=int, nargs="*", default=[8], help="num_draft_tokens values for prompt lookup")
    ap.add_argument("--draft-tokens", type=int, default=3)
    ap.add_argument("--task", choices=["edit", "free"], default="edit", help="edit: the answer repeats the prompt; free: a story")
    ap.add_argument("--others", type=int, default=0, help="plain requests that join each measured one once it streams")
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    p = Pipe("ndjson", args=["--prompt-cache-bytes", "0"], check_schemas=False)
    try:
        info = p.request("model/load", {"model": args.model, "id": "m"}, timeout=1800)[0]["result"]
        modes = {"plain": ("m", {"type": "none"})}
        for k in args.lookup:
            modes[f"prompt_lookup k={k}"] = ("m", {"type": "prompt_lookup", "num_draft_tokens": k})
        for n in args.draft_layers:
            d = truncated_copy(Path(info["path"]), n, tmp / f"draft{n}")
            answer, _ = p.request("model/load", {"model": args.model, "id": f"d{n}", "draft_model": str(d),
                                                 "num_draft_tokens": args.draft_tokens}, timeout=1800)
            assert "result" in answer, answer
            modes[f"draft {n}/{info.get('architecture')} layers k={args.draft_tokens}"] = (f"d{n}", {"type": "draft"})
        for model_id, spec in modes.values():  # warm-up
            run_mode(p, model_id, spec, 16)
        runs = {name: [] for name in modes}
        for _ in range(args.reps):
            for name, (model_id, spec) in modes.items():
                runs[name].append(run_mode(p, model_id, spec, args.tokens, MESSAGES if args.task == "edit" else FREE, args.others))
        plain = runs["plain"]
        base_tps = statistics.median(r["tps"] for r in plain)
        base_e2e = statistics.median(r["e2e"] for r in plain)
        report = {"model": args.model, "task": args.task, "parameters": info["parameters"], "tokens": args.tokens, "reps": args.reps,
                  "completion_tokens": plain[0]["usage"]["completion_tokens"], "modes": {}}
        for name, rs in runs.items():
            same = all(r["text"] == plain[0]["text"] for r in rs)
            u = rs[0]["usage"]
            tps = statistics.median(r["tps"] for r in rs)
            e2e = statistics.median(r["e2e"] for r in rs)
            # Each rep's ratio against the plain run of the same rep (the load changes between reps).
            paired = [r["tps"] / b["tps"] for r, b in zip(rs, plain)]
            row = {"tps": round(tps, 2), "ratio": round(tps / base_tps, 3), "paired_ratio": round(statistics.median(paired), 3),
                   "paired_runs": [round(x, 2) for x in paired], "e2e_tps": round(e2e, 2),
                   "e2e_ratio": round(e2e / base_e2e, 3), "same_text": same,
                   "tps_runs": [round(r["tps"], 2) for r in rs],
                   "draft_tokens": u.get("draft_tokens"), "accepted_draft_tokens": u.get("accepted_draft_tokens")}
            if args.others:
                row["others_tps"] = round(statistics.median(r["others_tps"] for r in rs), 2)
            report["modes"][name] = row
            print(f"{name}: {row['tps']} tok/s (x{row['ratio']}; paired x{row['paired_ratio']} {row['paired_runs']}), end-to-end x{row['e2e_ratio']}, "
                  f"accepted {row['accepted_draft_tokens']}/{row['draft_tokens']}, same text {same}, runs {row['tps_runs']}"
                  + (f", the {args.others} others: {row['others_tps']} tok/s end-to-end in all" if args.others else ""), flush=True)
        report["text"] = plain[0]["text"]
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        p.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
