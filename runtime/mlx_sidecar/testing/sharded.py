"""A tiny random qwen2 model written in two weight files with a model.safetensors.index.json, the
shape mlx-lm's pipeline sharding needs (each rank reads only its layers' files)."""

import json
import random
import socket
from pathlib import Path

from .models import CHAT_TEMPLATE, _tokenizer

QWEN2 = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)


def make_pipeline_model(directory, seed: int = 0) -> Path:
    """Write the directory and return its path; greedy decoding never reaches EOS."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    config = {"model_type": "qwen2", "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "eos_token_id": vocab_size, **QWEN2}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": None,
        "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": config["max_position_embeddings"]}, indent=2))
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # Layers of the first half in one file, the rest (and embeddings, norm, head) in the other.
    half = config["num_hidden_layers"] // 2
    files = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    weight_map = {}
    for name, value in weights.items():
        parts = name.split(".")
        first = "layers" in parts and int(parts[parts.index("layers") + 1]) < half
        fname = "model-00001-of-00002.safetensors" if first else "model-00002-of-00002.safetensors"
        files[fname][name] = value
        weight_map[name] = fname
    for fname, part in files.items():
        mx.save_safetensors(str(out / fname), part)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (a two-rank ring listens on one port per rank)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")
