"""fused.py: a batch step's decode rows and prompt slice in one forward give what mlx-lm's two
forwards give. In-process on tiny random models of each architecture the fused path accepts, driven
through mlx-lm's own BatchGenerator exactly as runners.py drives it."""

import importlib

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm.generate import BatchGenerator  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mlx_sidecar import fused  # noqa: E402


def tiny(arch: str, **extra):
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    args = dict(model_type=arch, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300, rope_theta=10000.0, head_dim=16,
                tie_word_embeddings=True, max_position_embeddings=4096, **extra)
    fields = module.ModelArgs.__dataclass_fields__
    model = module.Model(module.ModelArgs(**{k: v for k, v in args.items() if k in fields}))
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.5, model.parameters()))
    mx.eval(model.parameters())
    return model


def run(model, fuse: bool, slice_tokens: int = 16):
    """Two streams of unequal lengths decoding (so the decode rows carry left padding); at step 3 two
    130-token prompts join (the step that takes them in is not fused) and are prefilled
    `slice_tokens` at a time beside them; at step 20 a 40-token prompt joins alone while the others
    decode; at step 24 one of the 130-token prompts is removed mid-batch, its cache taken out as
    the runner does on a cancel. Returns the tokens and logprobs per request, how many steps fused
    and the most parts the decoding batch was kept in."""
    held = fused.FusingModel(model) if fuse else model
    g = BatchGenerator(held, completion_batch_size=8, prefill_batch_size=8, prefill_step_size=512)
    if fuse:
        fused.join_in_parts(g)
    g.insert([[1, 2, 3, 4, 5], [11, 12, 13, 14, 15, 16, 17, 18, 19]], max_tokens=[60, 50])
    tokens, logprobs, fired, parts = {}, {}, 0, 1
    for step in range(300):
        if step == 3:
            g.insert([list(range(7, 137)), list(range(20, 150))], max_tokens=[10, 14])
        if step == 20:
            g.insert([list(range(200, 240))], max_tokens=[5])
        if step == 24:
            (cache, kept), = g.remove([3], return_prompt_caches=True).values()
            assert cache[0].offset == len(kept) == 130 + len(tokens[3])  # its prompt and what it decoded
        g.prefill_step_size = slice_tokens if step >= 3 else 512
        if fuse:
            rows = fused.planned_slice(g)
            if rows is not None:
                held.arm(g, rows)
                fired += 1
        _, responses = g.next()
        if fuse:
            assert held.disarm(), "the fused forward wrote a slice the generator never took"
        layer = g._generation_batch.prompt_cache[:1]
        if layer and isinstance(layer[0], fused.Parted):
            parts = max(parts, len(layer[0].parts))
            # mlx-lm's public size of all held caches still adds up through the parts.
            assert g.prompt_cache_nbytes >= sum(p.keys.nbytes + p.values.nbytes for p in layer[0].parts)
        for r in responses:
            tokens.setdefault(r.uid, []).append(r.token)
            logprobs.setdefault(r.uid, []).append(r.logprobs)
        if step > 20 and not (len(g._generation_batch) or len(g._prompt_batch) or g._unprocessed_sequences):
            break
    return tokens, logprobs, fired, parts


@pytest.mark.parametrize("arch", sorted(fused.ARCHITECTURES - {"mistral"}))  # mistral is llama in mlx-lm
@pytest.mark.parametrize("max_parts", [4, 2])  # 2: the 40-token prompt's join merges two parts
def test_fused_steps_match_two_forwards(arch, max_parts, monkeypatch):
    monkeypatch.setattr(fused, "MAX_PARTS", max_parts)
    model = tiny(arch)
    plain, plain_lp, _, _ = run(model, fuse=False)
    assert fused.prepare(model)
    same, same_lp, fired, parts = run(model, fuse=True)
    # Of the 9 slices of the two 130-token prompts and the 3 of the 40-token one, all but the first of each.
    assert fired >= 9
    # The streams, the two 130-token prompts and the 40-token one each joined as a part (up to max_parts).
    assert parts == min(3, max_parts)
    assert {u: len(t) for u, t in plain.items()} == {0: 60, 1: 50, 2: 10, 3: 11, 4: 5}
    assert same == plain
    for uid in plain_lp:
        for a, b in zip(plain_lp[uid], same_lp[uid]):
            assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def test_a_prepared_model_still_runs_plain_calls_unchanged():
    # prepare() swaps classes of attention and final-norm instances: calls without a fused plan
    # (generate_step, a lone request, a prompt cache's prefill) must see the model as it was.
    model = tiny("llama")
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    before = model(ids)
    names = sorted(k for k, _ in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters()))
    assert fused.prepare(model) and fused.prepare(model)  # twice is harmless
    after = model(ids)
    assert mx.array_equal(before, after).item()
    assert sorted(k for k, _ in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters())) == names


def test_architectures_it_was_not_checked_against_keep_two_forwards():
    # A sliding-window layer has another cache type and mask: prepare() declines, the runner keeps
    # mlx-lm's own step.
    assert not fused.prepare(tiny("llama", layer_types=["sliding_attention", "full_attention"], sliding_window=8))
    gemma = tiny("gemma")
    assert not fused.prepare(gemma)


def test_a_long_prompt_fed_in_slices_grows_its_cache_once():
    # BatchKVCache grows 256 positions at a time, copying all it holds; fused steps size the slice's
    # cache for the whole prompt at its first fused step instead (fused._reserve). Same tokens as
    # mlx-lm's own steps, and the buffer holds the whole prompt long before the prompt is done.
    model = tiny("llama")
    prompt = [5 + i % 290 for i in range(700)]

    def go(fuse):
        held = fused.FusingModel(model) if fuse else model
        g = BatchGenerator(held, completion_batch_size=8, prefill_batch_size=8, prefill_step_size=512)
        g.insert([[1, 2, 3]], max_tokens=[80])
        g.next()
        g.insert([prompt], max_tokens=[3])
        g.prefill_step_size = 16
        out, sizes = {}, []
        while len(g._generation_batch) or len(g._prompt_batch) or g._unprocessed_sequences:
            rows = fused.planned_slice(g) if fuse else None
            if rows is not None:
                held.arm(g, rows)
            _, responses = g.next()
            if fuse:
                assert held.disarm()
            if len(g._prompt_batch) and g._prompt_batch.prompt_cache[0].keys is not None:
                sizes.append(g._prompt_batch.prompt_cache[0].keys.shape[2])
            for r in responses:
                out.setdefault(r.uid, []).append((r.token, r.logprobs))
        return out, sizes

    plain, plain_sizes = go(False)
    assert fused.prepare(model)
    same, sizes = go(True)
    assert [t for t, _ in same[1]] == [t for t, _ in plain[1]] and len(same[1]) == 3
    for (_, a), (_, b) in zip(plain[1] + plain[0], same[1] + same[0]):
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
    assert plain_sizes[0] < 300 and len(set(plain_sizes)) >= 3  # mlx-lm's: grown as it goes, 256 at a time
    assert sizes[1] >= 700 and len(set(sizes[1:])) == 1  # fused: the whole prompt from its first fused step
