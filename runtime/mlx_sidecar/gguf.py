"""Import a GGUF file (llama.cpp's format) as an MLX model directory that `mlx_lm.load` reads.

`mx.load` reads the tensors (Q4_0/Q4_1/Q8_0 become MLX affine-quantized triples, group size 32),
the names are mapped to Hugging Face / mlx-lm names, llama.cpp's q/k row permutation is undone,
and the tokenizer is rebuilt from the metadata with transformers' torch-free GGUF tokenizer builder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Callable, Optional

Progress = Optional[Callable[[float, str], None]]


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF file (as opposed to a valid one we cannot import)."""

# ggml tensor type ids (ggml.h) and their names, for messages.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp tensor names (inside a block, or global) -> Hugging Face module paths.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Metadata value types with a fixed width (GGUF spec): u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64.
_KV_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _report(progress: Progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFFormatError("GGUF header ends early: the file is truncated")
    return struct.unpack(fmt, data)[0]


def _skip_value(f, value_type: int) -> None:
    # Skip one metadata value without decoding it (strings and arrays have a length prefix).
    if value_type in _KV_WIDTH:
        f.seek(_KV_WIDTH[value_type], 1)
    elif value_type == 8:
        f.seek(_read(f, "<Q"), 1)
    elif value_type == 9:
        item_type, count = _read(f, "<I"), _read(f, "<Q")
        if item_type in _KV_WIDTH:
            f.seek(_KV_WIDTH[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        raise GGUFFormatError(f"GGUF metadata has unknown value type {value_type}")


def read_tensor_types(gguf_path: Path) -> dict[str, str]:
    """Map each tensor name in a GGUF file to its ggml type name (e.g. "Q4_0"), from the header."""
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFFormatError(f"{gguf_path} is not a GGUF file (bad magic)")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"{gguf_path} is GGUF version {version}; only versions 2 and 3 are supported")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        for _ in range(n_kv):
            f.seek(_read(f, "<Q"), 1)  # key
            _skip_value(f, _read(f, "<I"))
        types = {}
        for _ in range(n_tensors):
            name = f.read(_read(f, "<Q")).decode("utf-8")
            f.seek(8 * _read(f, "<I"), 1)  # dims
            type_id = _read(f, "<I")
            f.seek(8, 1)  # data offset
            types[name] = GGML_TYPES.get(type_id, f"type id {type_id}")
        return types


def _check_types(types: dict[str, str]) -> None:
    for name, type_name in types.items():
        if type_name not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF tensor {name} has type {type_name}, which mlx-sidecar cannot import; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )


def _scalar(meta: dict, key: str, default=None):
    # Metadata numbers come back from mx.load as 0-d mx.arrays; per-layer arrays are not supported.
    value = meta.get(key)
    if value is None:
        return default
    if hasattr(value, "ndim") and value.ndim != 0:
        raise ValueError(f"GGUF metadata {key} varies per layer, which mlx-sidecar cannot import")
    value = value.item() if hasattr(value, "item") else value
    # float32 metadata reads back as e.g. 9.999999747378752e-06; keep the digits float32 holds.
    return float(f"{value:.7g}") if isinstance(value, float) else value


def _build_config(arch: str, meta: dict, weights: dict) -> dict:
    hidden = int(_scalar(meta, f"{arch}.embedding_length"))
    heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    kv_heads = int(_scalar(meta, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_scalar(meta, f"{arch}.attention.key_length", hidden // heads))
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
        "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(meta, f"{arch}.rope.freq_base", 10000.0 if arch == "llama" else 1e6)),
        "vocab_size": int(weights["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in weights,
    }
    if head_dim != hidden // heads:
        if arch != "llama":
            raise ValueError(f"GGUF {arch} model has head size {head_dim} != hidden/heads; cannot import")
        config["head_dim"] = head_dim
    if (context := _scalar(meta, f"{arch}.context_length")) is not None:
        config["max_position_embeddings"] = int(context)
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if (token_id := _scalar(meta, f"tokenizer.ggml.{key}")) is not None:
            config[key.replace("padding", "pad")] = int(token_id)
    # Linear rope scaling is expressible in the config; anything else changes the math: refuse it.
    scaling = _scalar(meta, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(_scalar(meta, f"{arch}.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by mlx-sidecar's GGUF import")
    if arch == "llama" and "blk.0.attn_q.bias" in weights:
        config["attention_bias"] = True
    if arch == "llama" and "blk.0.ffn_up.bias" in weights:
        config["mlp_bias"] = True
    return config


def _hf_name(gguf_name: str) -> str:
    # "blk.3.attn_q.scales" -> "model.layers.3.self_attn.q_proj.scales"
    base, suffix = gguf_name.rsplit(".", 1)
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name} has no counterpart in mlx-lm's model; cannot import")


def _unpermute(w, n_head: int):
    # llama.cpp interleaves each head's rows (pairs) for its rope; put the two halves back.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert_weights(arch: str, weights: dict, config: dict) -> dict:
    out = {}
    for name, w in weights.items():
        # Only llama's converter permutes q/k (its rope is the interleaved kind); qwen2's is not.
        if arch == "llama" and re.search(r"\.attn_q\.", name):
            w = _unpermute(w, config["num_attention_heads"])
        elif arch == "llama" and re.search(r"\.attn_k\.", name):
            w = _unpermute(w, config["num_key_value_heads"])
        out[_hf_name(name)] = w
    return out


def _quantized_bits(weights: dict) -> dict[str, int]:
    # Bits of each quantized module: a row packs groups*32*bits/32 bits into uint32 words, so bits = words/groups.
    return {
        name[: -len(".scales")]: int(weights[name[: -len(".scales")] + ".weight"].shape[-1] // w.shape[-1])
        for name, w in weights.items()
        if name.endswith(".scales")
    }


def _quantization(bits: dict[str, int]) -> Optional[dict]:
    # mlx-lm's config: a default, plus an entry per module whose bits differ (e.g. 8-bit embeddings).
    if not bits:
        return None
    values = list(bits.values())
    common = max(set(values), key=values.count)
    config = {"group_size": 32, "bits": common, "mode": "affine"}
    for module, b in bits.items():
        if b != common:
            config[module] = {"group_size": 32, "bits": b, "mode": "affine"}
    return config


def _parameter_count(weights: dict, bits: dict[str, int]) -> int:
    total = 0
    for name, w in weights.items():
        module, suffix = name.rsplit(".", 1)
        if module in bits and suffix in ("scales", "biases"):
            continue
        total += w.size * 32 // bits[module] if module in bits and suffix == "weight" else w.size
    return total


def _plain(value):
    # mx.array metadata -> Python lists/numbers for the tokenizer builder and JSON.
    return value.tolist() if hasattr(value, "tolist") else value


def _write_tokenizer(meta: dict, arch: str, out: Path, context_length: Optional[int]) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    tokenizer_dict = {
        name: _plain(meta[f"tokenizer.{key}"])
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    if "tokens" not in tokenizer_dict:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing); cannot import")
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    backend.save(str(out / "tokenizer.json"))

    tokens = tokenizer_dict["tokens"]
    sentencepiece = tokenizer_dict.get("tokenizer_type") == "llama"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", sentencepiece)),
        "add_eos_token": bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        token_id = _scalar(meta, f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[f"{name}_token"] = tokens[int(token_id)]
    if context_length:
        config["model_max_length"] = context_length
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _describe(types: dict[str, str]) -> str:
    # "Q4_1 (210 tensors), Q8_0 (1), F32 (61)": quantized types first, most used first.
    counts: dict[str, int] = {}
    for type_name in types.values():
        counts[type_name] = counts.get(type_name, 0) + 1
    order = sorted(counts, key=lambda t: (t in ("F32", "F16"), -counts[t]))
    return ", ".join(f"{t} ({counts[t]} tensors)" if i == 0 else f"{t} ({counts[t]})" for i, t in enumerate(order))


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Progress = None) -> dict:
    """Write an mlx-lm model directory at out_dir from a GGUF file; out_dir must not exist yet.

    Returns {"architecture", "parameters", "quantization", "context_length"}.
    Raises ValueError for tensor types, architectures or features that cannot be imported.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    _report(progress, 0.0, f"reading {gguf_path.name}")
    types = read_tensor_types(gguf_path)
    _check_types(types)

    import mlx.core as mx

    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} cannot be imported by mlx-sidecar; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if "token_embd.weight" not in weights:
        raise ValueError("GGUF file has no token_embd.weight tensor; cannot import")
    config = _build_config(arch, meta, weights)
    weights = _convert_weights(arch, weights, config)
    bits = _quantized_bits(weights)
    quantization = _quantization(bits)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    # Everything goes to a hidden sibling directory first, renamed into place at the end.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _report(progress, 0.2, "writing weights")
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _report(progress, 0.6, "building tokenizer")
        _write_tokenizer(meta, arch, tmp, config.get("max_position_embeddings"))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(progress, 1.0, "converted")
    return {
        "architecture": arch,
        "parameters": _parameter_count(weights, bits),
        "quantization": _describe(types),
        "context_length": config.get("max_position_embeddings"),
    }
