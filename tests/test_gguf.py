"""GGUF import: tiny random models exported to GGUF, converted back, and compared logit for logit."""

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.gguf import convert_to_gguf, permute_weights, translate_weight_names
from mlx_lm.utils import dequantize_model, load

from mlx_sidecar.gguf import convert_gguf, read_tensor_types

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "In 2024 there were 12345 tokens, a 3.14 ratio, and naïve café résumé.",
    "def f(x):\n    return x * 2  # code too\n",
]
TEXTS = ["What is the capital of France?", "  spaced   out\n\nlines 42", "naïve café <|im_end|> tail"]


def _train_tokenizer(out: Path) -> dict:
    # A byte-level BPE tokenizer trained in milliseconds; returns its tokenizer.json as a dict.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return json.loads((out / "tokenizer.json").read_text())


def _make_model(out: Path, model_type="llama", tie=True, dtype=mx.float32) -> dict:
    """Write a tiny random model directory (GQA, random norms) that mlx_lm.load reads."""
    out.mkdir(parents=True)
    vocab = _train_tokenizer(out)["model"]["vocab"]
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab),
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie,
        "bos_token_id": vocab["<|im_start|>"],
        "eos_token_id": vocab["<|im_end|>"],
    }
    (out / "config.json").write_text(json.dumps(config))
    if model_type == "qwen2":
        from mlx_lm.models.qwen2 import Model, ModelArgs
    else:
        from mlx_lm.models.llama import Model, ModelArgs
    model = Model(ModelArgs.from_dict(config))
    # Random values everywhere (norms and biases too), so a swapped or misplaced tensor shows.
    mx.random.seed(0)
    weights = {k: (0.3 * mx.random.normal(v.shape)).astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return config


def _tokenizer_metadata(model_dir: Path, meta: dict) -> dict:
    # mlx-lm's GGUF writer stores a sentencepiece-style vocabulary; describe the real byte-level BPE.
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    meta = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
    meta.update({
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t in SPECIALS else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(vocab["<|im_start|>"], dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(vocab["<|im_end|>"], dtype=mx.uint32),
        "tokenizer.chat_template": TEMPLATE,
    })
    return meta


def _export_llama(model_dir: Path, config: dict, out: Path) -> None:
    # mlx-lm's own writer does the llama.cpp naming and q/k permutation; we only fix the tokenizer.
    weights = mx.load(str(model_dir / "model.safetensors"))
    convert_to_gguf(model_dir, weights, dict(config), str(out))
    tensors, meta = mx.load(str(out), return_metadata=True)
    mx.save_gguf(str(out), tensors, _tokenizer_metadata(model_dir, meta))


def _logits(model_dir: Path, ids: list[int], dequantize=True) -> np.ndarray:
    model, _ = load(str(model_dir))
    if dequantize:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


IDS = [1, 5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 2]


@pytest.mark.parametrize("dtype,tie", [(mx.float32, True), (mx.float16, False)])
def test_llama_roundtrip_matches_logits(tmp_path, dtype, tie):
    src = tmp_path / "src"
    config = _make_model(src, tie=tie, dtype=dtype)
    _export_llama(src, config, tmp_path / "m.gguf")
    assert set(read_tensor_types(tmp_path / "m.gguf").values()) <= {"F32", "F16"}

    steps = []
    info = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", lambda f, m: steps.append(f))
    assert info["architecture"] == "llama"
    assert info["context_length"] == 512
    assert steps[0] == 0.0 and steps[-1] == 1.0
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "out", "src"]  # no temp directory left behind

    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("hidden_size", "num_key_value_heads", "intermediate_size", "eos_token_id", "tie_word_embeddings"):
        assert out_config[key] == config[key], key
    np.testing.assert_allclose(_logits(tmp_path / "out", IDS), _logits(src, IDS), rtol=1e-4, atol=1e-4)


def test_tokenizer_and_chat_template_survive(tmp_path):
    src = tmp_path / "src"
    config = _make_model(src)
    _export_llama(src, config, tmp_path / "m.gguf")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    _, want = load(str(src))
    _, got = load(str(tmp_path / "out"))
    for text in TEXTS:
        assert got.encode(text) == want.encode(text), text
        assert got.decode(got.encode(text)) == text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert got.apply_chat_template(chat, add_generation_prompt=True) == want.apply_chat_template(chat, add_generation_prompt=True)
    assert got.eos_token_ids == {config["eos_token_id"]}


def test_qwen2_roundtrip_with_qkv_biases(tmp_path):
    src = tmp_path / "src"
    config = _make_model(src, model_type="qwen2", tie=False)
    weights = mx.load(str(src / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    # llama.cpp writes qwen2 without the q/k permutation (its qwen2 rope is the NeoX kind).
    tensors = {translate_weight_names(k): v for k, v in weights.items()}
    meta = {
        "general.architecture": "qwen2",
        "qwen2.context_length": mx.array(512, dtype=mx.uint32),
        "qwen2.embedding_length": mx.array(64, dtype=mx.uint32),
        "qwen2.block_count": mx.array(2, dtype=mx.uint32),
        "qwen2.feed_forward_length": mx.array(128, dtype=mx.uint32),
        "qwen2.attention.head_count": mx.array(4, dtype=mx.uint32),
        "qwen2.attention.head_count_kv": mx.array(2, dtype=mx.uint32),
        "qwen2.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
        "qwen2.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
    }
    mx.save_gguf(str(tmp_path / "q.gguf"), tensors, _tokenizer_metadata(src, meta))
    info = convert_gguf(tmp_path / "q.gguf", tmp_path / "out")
    assert info["architecture"] == "qwen2"
    np.testing.assert_allclose(_logits(tmp_path / "out", IDS), _logits(src, IDS), rtol=1e-4, atol=1e-4)


def test_quantized_types_stay_quantized(tmp_path):
    """Q8_0, Q4_0, Q4_1, F16 and F32 tensors in one file, written with the `gguf` package."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    src = tmp_path / "src"
    config = _make_model(src, tie=False)
    weights = {k: np.array(v) for k, v in mx.load(str(src / "model.safetensors")).items()}
    kinds = {"embed_tokens": Q.Q8_0, "q_proj": Q.Q4_0, "k_proj": Q.Q4_1, "v_proj": Q.Q8_0,
             "o_proj": Q.Q4_0, "gate_proj": Q.Q4_1, "up_proj": Q.Q4_0, "down_proj": Q.Q8_0, "lm_head": Q.F16}

    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    for key, value in _tokenizer_metadata(src, {}).items():
        value = np.array(value).tolist() if isinstance(value, mx.array) else value
        writer.add_key_value(key, value, {str: gguf.GGUFValueType.STRING, int: gguf.GGUFValueType.UINT32,
                                          list: gguf.GGUFValueType.ARRAY}[type(value)])
    reference = {}
    for name, w in weights.items():
        kind = next((q for part, q in kinds.items() if part in name), Q.F32)
        # The reference is what the file holds, dequantized; rows permute independently of blocks.
        if kind == Q.F32:
            reference[name] = w
        elif kind == Q.F16:
            reference[name] = w.astype(np.float16).astype(np.float32)
        else:
            reference[name] = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)
        if "q_proj" in name:
            w = np.array(permute_weights(mx.array(w), 4, 4))
        elif "k_proj" in name:
            w = np.array(permute_weights(mx.array(w), 4, 2))
        data = w.astype(np.float16) if kind == Q.F16 else w if kind == Q.F32 else gguf.quants.quantize(w, kind)
        writer.add_tensor(translate_weight_names(name), data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    types = read_tensor_types(tmp_path / "q.gguf")
    assert {types["blk.0.attn_q.weight"], types["blk.0.attn_k.weight"], types["token_embd.weight"], types["output.weight"]} == {
        "Q4_0", "Q4_1", "Q8_0", "F16"}
    info = convert_gguf(tmp_path / "q.gguf", tmp_path / "out")
    assert info["parameters"] == sum(w.size for w in weights.values())
    assert info["quantization"].startswith("Q")

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (ref_dir / f).write_bytes((src / f).read_bytes())
    mx.save_safetensors(str(ref_dir / "model.safetensors"), {k: mx.array(v) for k, v in reference.items()})

    # The quantized layers load as such, with the bits of each tensor (8 for some, 4 for others).
    model, _ = load(str(tmp_path / "out"))
    layer = model.model.layers[0]
    assert (layer.self_attn.q_proj.bits, layer.self_attn.v_proj.bits, model.model.embed_tokens.bits) == (4, 8, 8)
    quantized_logits = np.array(model(mx.array([IDS]))[0].astype(mx.float32))
    want = _logits(ref_dir, IDS)
    # MLX keeps scales/biases in float16, so values match to float16 precision only.
    np.testing.assert_allclose(_logits(tmp_path / "out", IDS), want, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(quantized_logits, want, rtol=5e-2, atol=5e-2)


def _patch_tensor_type(path: Path, tensor: str, type_id: int) -> None:
    # In the header a tensor's name is followed by n_dims (u32), the dims (u64 each), then its type (u32).
    data = bytearray(path.read_bytes())
    at = data.index(tensor.encode()) + len(tensor)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_unsupported_tensor_type_is_refused(tmp_path):
    src = tmp_path / "src"
    config = _make_model(src)
    _export_llama(src, config, tmp_path / "m.gguf")
    _patch_tensor_type(tmp_path / "m.gguf", "blk.0.attn_q.weight", 13)  # Q5_K
    assert read_tensor_types(tmp_path / "m.gguf")["blk.0.attn_q.weight"] == "Q5_K"
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight has type Q5_K.*supported: F32, F16, Q8_0, Q4_0, Q4_1"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "src"]


def test_unsupported_architecture_is_refused(tmp_path):
    src = tmp_path / "src"
    config = _make_model(src)
    _export_llama(src, config, tmp_path / "m.gguf")
    tensors, meta = mx.load(str(tmp_path / "m.gguf"), return_metadata=True)
    meta["general.architecture"] = "gemma"
    mx.save_gguf(str(tmp_path / "m.gguf"), tensors, meta)
    with pytest.raises(ValueError, match=r"architecture 'gemma' cannot be imported.*supported: llama, qwen2"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
