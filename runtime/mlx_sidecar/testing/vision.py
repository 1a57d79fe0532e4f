"""A tiny random-weight qwen2_vl directory that `mlx_vlm.load` reads offline: config, weights, a
byte-level BPE tokenizer with Qwen's special tokens, Qwen2-VL's own style of chat template, and the
three processor files the loader would otherwise ask the hub for."""

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's template, cut down: string content, or a list of text and image parts in order.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is in this picture? A red square on a blue background.",
    "Describe the screenshot. The window shows a button and some text.",
    "The capital of France is Paris. Hello world! How are you today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9. Symbols: {}[]()<>,.;:!?\"'-_+=*/",
]

# One 28x28 cell (a 2x2 merge of 14-pixel patches) is one image token; 56x56 is 4 tokens.
PATCH, MERGE = 14, 2
MAX_PIXELS = 448 * 448       # the processor's own cap on this tiny model (256 tokens)
MIN_PIXELS = 56 * 56


def _tokenizer(vocab_size: int = 400):
    from .models import _tokenizer as train

    return train(vocab_size, SPECIALS, _CORPUS)


def make_vision_model(directory, seed: int = 0, reachable_eos: bool = False) -> Path:
    """Write a ~0.2M-parameter qwen2_vl model directory and return its path."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    text = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=vocab_size,
                max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                # head_dim 16: the three mrope sections (time, height, width) sum to 16 / 2.
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        **text,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        # Without reachable_eos, EOS is an id past the vocabulary: no sampler can ever pick it.
        "eos_token_id": ids["<|im_end|>"] if reachable_eos else vocab_size,
        # mlp_ratio must be an int: transformers' strict config refuses a float here.
        "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                          "patch_size": PATCH, "spatial_patch_size": PATCH, "spatial_merge_size": MERGE,
                          "temporal_patch_size": 2, "in_channels": 3},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>" if reachable_eos else None,
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": text["max_position_embeddings"],
    }, indent=2))
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2,
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    # All three: a missing one makes the processor loader ask the hub.
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))

    mx.random.seed(seed)
    args = qwen2_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))
    args.text_config = qwen2_vl.TextConfig.from_dict(args.text_config)
    args.vision_config = qwen2_vl.VisionConfig.from_dict(config["vision_config"])
    model = qwen2_vl.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    # mlx-vlm transposes 5-D conv weights from PyTorch's layout at load: save them in that layout.
    for name, w in list(weights.items()):
        if w.ndim == 5:
            weights[name] = w.transpose(0, 4, 1, 2, 3)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out
