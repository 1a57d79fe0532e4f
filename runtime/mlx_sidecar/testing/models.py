"""Tiny llama-type model directories that plain `mlx_lm.load` reads: random weights, a byte-level
BPE tokenizer trained in milliseconds, and a ChatML chat template."""

import json
from pathlib import Path

PRESETS = {
    # ~0.1M parameters: about 1 ms per token on a laptop CPU, the worst case for bridge overhead.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    # ~24M parameters: slow enough to see batching pay off.
    "small": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=4096),
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Hermes / Qwen 2.5-style template that takes tools (mlx-lm infers its json_tools parser from it).
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> tags.<|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if m.role == 'system' %}"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- for tool_call in m.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! How are you today? I am fine, thank you.",
    "MLX runs language models on Apple silicon, CUDA and plain CPUs.",
    "A sidecar speaks JSON-RPC over stdin and stdout, one frame at a time.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: {}[]()<>,.;:!?\"'-_+=*/\\|@#$%^&~`",
    "The quick brown fox jumps over the lazy dog while streams of tokens flow.",
]


def _tokenizer(vocab_size: int = 420, specials=SPECIALS, corpus=_CORPUS):
    """A byte-level BPE tokenizer trained in milliseconds on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return tok


def make_model(directory, preset: str = "tiny", seed: int = 0, reachable_eos: bool = False,
               chat_template: str = CHAT_TEMPLATE) -> Path:
    """Write a model directory and return its path (TOOLS_CHAT_TEMPLATE for one that takes tools)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id("<|im_end|>")
    config = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        # Without reachable_eos, EOS is an id past the vocabulary: no sampler can ever pick it.
        "eos_token_id": eos_id if reachable_eos else vocab_size,
        **PRESETS[preset],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>" if reachable_eos else None,
        "pad_token": "<|endoftext|>",
        "chat_template": chat_template,
        "model_max_length": config["max_position_embeddings"],
    }, indent=2))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out
