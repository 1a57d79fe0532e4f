"""SmolLM2-135M speed in process (prefill and decode tokens/s) against the machine's memory limit.

Decode reads every weight once per token, so bytes of weights per token / copy bandwidth is the
fastest decode this machine can do. Usage (OpenBLAS makes float32 matmuls ~30x faster on Linux):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        PYTHONPATH=runtime python bench/smollm2_speed.py [--model default] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

FILLER = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def load_model(model_dir: Path, dtype: str = "float32"):
    """mlx_lm.load, then dequantized and cast to dtype ("native" keeps the file's quantization)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(model_dir))
    if dtype != "native":
        model = dequantize_model(model)
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model, tokenizer


def weight_bytes_per_token(model) -> int:
    # Every parameter is read per decoded token, except an untied embedding (one row of it).
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    total = sum(p.nbytes for p in params.values())
    if "lm_head.weight" in params or "lm_head.scales" in params:
        embed = [p for name, p in params.items() if name.startswith("model.embed_tokens.")]
        total -= sum(p.nbytes for p in embed)
    return total


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict:
    """Best-of-N: a numpy copy counted as bytes read + written (STREAM "copy"), and the read rate of a
    large float32 matrix-vector product in MLX (what decode does, minus the per-op overheads)."""
    import mlx.core as mx
    import numpy as np

    n = megabytes * (1 << 20) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    best_copy = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    side = int((n // 4) ** 0.5)
    w, x = mx.random.normal((side, side)), mx.random.normal((1, side))
    mx.eval(w, x)
    best_gemv = min(_timed(lambda: mx.eval(x @ w)) for _ in range(repeats))
    return {"copy_gb_s": 2 * src.nbytes / best_copy / 1e9, "gemv_read_gb_s": w.nbytes / best_gemv / 1e9}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def in_process(model_dir: Path, prompt_tokens: int, gen_tokens: int, dtype: str = "float32", loaded=None) -> dict:
    """Prefill and decode tokens/s with mlx_lm.stream_generate, greedy, EOS masked so it runs to the end."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    started = time.perf_counter()
    model, tokenizer = loaded or load_model(model_dir, dtype)
    load_s = time.perf_counter() - started
    ids = tokenizer.encode(FILLER * (prompt_tokens // 8 + 1))[:prompt_tokens]
    eos = mx.array(sorted(tokenizer.eos_token_ids))

    def no_eos(tokens, logits):
        return logits.at[:, eos].add(-float("inf"))

    def run(prompt, max_tokens):
        last, first_at, t0 = None, None, time.perf_counter()
        for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                    sampler=make_sampler(temp=0.0), logits_processors=[no_eos]):
            first_at = first_at or time.perf_counter()
        return last, first_at - t0, time.perf_counter() - t0

    run(ids[:16], 4)  # warm up: compile paths, allocate caches
    last, ttft, total = run(ids, gen_tokens)
    return {
        "dtype": dtype,
        "load_s": load_s,
        "prompt_tokens": last.prompt_tokens,
        "prefill_tok_s": last.prompt_tps,
        "ttft_s": ttft,
        "gen_tokens": last.generation_tokens,
        "decode_tok_s": last.generation_tps,
        "total_s": total,
        "weight_bytes_per_token": weight_bytes_per_token(model),
        "peak_memory_gb": last.peak_memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="alias, model directory or .gguf (see mlx_sidecar.sources)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "native"])
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from mlx_sidecar.sources import resolve

    started = time.perf_counter()
    model_dir = resolve(args.model)
    resolve_s = time.perf_counter() - started
    result = in_process(model_dir, args.prompt_tokens, args.gen_tokens, args.dtype)
    bandwidth = copy_bandwidth()
    gb_per_token = result["weight_bytes_per_token"] / 1e9
    limit = bandwidth["copy_gb_s"] / gb_per_token

    rows = [
        ("model", str(model_dir)),
        ("resolve (fetch/convert or cache hit)", f"{resolve_s:.2f} s"),
        ("load + cast", f"{result['load_s']:.2f} s ({result['dtype']})"),
        ("prefill", f"{result['prefill_tok_s']:.1f} tok/s ({result['prompt_tokens']} tokens, TTFT {result['ttft_s'] * 1000:.0f} ms)"),
        ("decode", f"{result['decode_tok_s']:.1f} tok/s ({result['gen_tokens']} tokens)"),
        ("weights read per token", f"{gb_per_token * 1000:.0f} MB"),
        ("memory copy bandwidth", f"{bandwidth['copy_gb_s']:.1f} GB/s (read + write)"),
        ("decode limit (bandwidth / bytes)", f"{limit:.1f} tok/s; decode reaches {100 * result['decode_tok_s'] / limit:.0f} %"),
        ("large GEMV read rate (MLX)", f"{bandwidth['gemv_read_gb_s']:.1f} GB/s -> "
                                       f"{bandwidth['gemv_read_gb_s'] / gb_per_token:.1f} tok/s if decode were one GEMV"),
        ("peak memory", f"{result['peak_memory_gb']:.2f} GB"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
