"""The runtime's own defaults, in one place. Defaults of request params live in the protocol's
schemas ("default" keywords) and are read from there: see spec.default()."""

MAX_BATCH = 16                  # generate requests decoded together per model
MAX_QUEUE = 64                  # more waiting per model before `overloaded`
PROMPT_CACHE_BYTES = 512 << 20  # KV cache kept per model for prompts that share a prefix
MLX_CACHE_BYTES = 256 << 20     # freed MLX buffers kept for reuse; more is returned to the system
PREFILL_SLICE_FACTOR = 2.0      # while others decode, a step prefills for about this many decode steps (pacing.py)
