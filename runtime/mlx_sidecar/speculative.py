"""Speculative decoding for a request that runs alone: a draft proposes a few tokens, the model
checks them all in one forward pass of k+1 tokens, and every proposal up to the first mismatch is
kept, plus the model's own token after it.

Drafts come from a draft model (greedy, loaded with model/load's draft_model) or from prompt
lookup (the tokens that followed the latest earlier occurrence of the last n-gram). Acceptance:
the model samples its own token at each position, as plain decoding would, and a proposal is kept
when the two agree. The output is therefore always the model's own samples: identical with greedy,
and the same distribution with sampling (for a point-mass draft this is the standard rule: keep
the proposal with probability p(token), else sample from p with the proposal taken out). Each
sample uses the sampler once per emitted token, so seeded requests draw the same keys.

Logits processors (penalties, structured output) see each row's history including the earlier
accepted proposals; rows are checked in order and the first mismatch ends the step, so a stateful
processor never consumes a rejected proposal and needs no rollback."""

import time
from dataclasses import dataclass

from .errors import INVALID_PARAMS, RpcError

DEFAULT_DRAFT_TOKENS = 3       # per step with a draft model (as mlx-lm's server)
DEFAULT_LOOKUP_TOKENS = 8      # per step with prompt lookup: a match often runs long
DEFAULT_MAX_NGRAM = 3
PREFILL_STEP = 512


@dataclass
class Plan:
    """One request's speculation: where drafts come from and what they achieved."""
    kind: str                  # "draft" or "prompt_lookup"
    num_draft_tokens: int
    max_ngram: int = DEFAULT_MAX_NGRAM
    draft: object = None       # the draft's LoadedModel, for kind "draft"
    drafted: int = 0           # proposed tokens the model checked
    accepted: int = 0          # of those, the ones it kept and the request took (Generation.on_token)
    per_step: float | None = None   # recent tokens per step (moving average)
    step_s: float | None = None     # recent seconds per step (moving average)
    steps: int = 0                  # decode steps so far

    def usage(self) -> dict:
        return {"draft_tokens": self.drafted, "accepted_draft_tokens": self.accepted}


def plan(loaded, params: dict) -> Plan | None:
    """The request's speculation from generate's `speculative` (default: the model's draft)."""
    spec = params.get("speculative")
    draft = getattr(loaded, "draft", None)
    if spec is None:
        return Plan("draft", loaded.info["draft"]["num_draft_tokens"], draft=draft) if draft is not None else None
    kind = spec["type"]
    if kind == "none":
        return None
    if loaded.kind != "llm":
        raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} is a {loaded.kind} model; speculative decoding works with text models only", path="/speculative")
    if "max_ngram" in spec and kind != "prompt_lookup":
        raise RpcError(INVALID_PARAMS, "max_ngram belongs to prompt_lookup only", path="/speculative/max_ngram")
    if kind == "draft":
        if draft is None:
            raise RpcError(INVALID_PARAMS, f"model {loaded.id!r} was loaded without a draft_model; load it with one, or use type prompt_lookup",
                           path="/speculative/type")
        return Plan("draft", spec.get("num_draft_tokens", loaded.info["draft"]["num_draft_tokens"]), draft=draft)
    return Plan("prompt_lookup", spec.get("num_draft_tokens", DEFAULT_LOOKUP_TOKENS), spec.get("max_ngram", DEFAULT_MAX_NGRAM))


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.7 * old + 0.3 * new


MEASURED_STEPS = 4   # steps of each kind seen before the (one-way) decision to join the batch


def worth_staying(plan_: Plan, others: int, batch_s: float | None, batch_steps: int) -> bool:
    """While `others` requests decode in a batch whose step takes batch_s, does this request give
    more tokens per second overall by speculating alone between batch steps than by joining the
    batch (one token per batch step, at little extra cost)? Until both are measured: stay."""
    if batch_s is None or plan_.step_s is None or plan_.per_step is None:
        return True
    if plan_.steps < MEASURED_STEPS or batch_steps < MEASURED_STEPS:
        return True
    return (others + plan_.per_step) / (plan_.step_s + batch_s) > (others + 1) / batch_s


def usable(cache) -> bool:
    """Rejected proposals are taken out of the KV cache: only trimmable caches can speculate."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    return can_trim_prompt_cache(cache)


# ---- proposals ----
def lookup(seq: list[int], k: int, max_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of seq's last n-gram (longest n first)."""
    size = len(seq)
    for n in range(min(max_ngram, size - 1), 0, -1):
        tail = seq[size - n:]
        first = tail[0]
        for i in range(size - n - 1, -1, -1):
            if seq[i] == first and seq[i:i + n] == tail:
                return seq[i + n:i + n + k]
    return []


class DraftModel:
    """A draft model's KV cache, kept in step with the request's tokens; proposes greedily."""

    def __init__(self, draft, vocab_size: int, check):
        from mlx_lm.models.cache import make_prompt_cache

        self.model = draft.model
        self.cache = make_prompt_cache(draft.model)
        self.fed = 0               # tokens of the sequence inside the cache
        self.vocab_size = vocab_size
        self.check = check

    def propose(self, seq: list[int], k: int) -> list[int]:
        import mlx.core as mx

        feed = seq[self.fed:]
        while len(feed) > PREFILL_STEP:   # a long prompt: in steps, cancellable between them
            self.model(mx.array(feed[:PREFILL_STEP])[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            feed = feed[PREFILL_STEP:]
            self.check()
        out = []
        for _ in range(k):
            logits = self.model(mx.array(feed)[None], cache=self.cache)[0, -1, : self.vocab_size]
            out.append(int(mx.argmax(logits).item()))
            feed = out[-1:]
        # The last proposal was never fed.
        self.fed = len(seq) + k - 1
        return out

    def settle(self, before: int, proposed: int, accepted: int) -> None:
        """Drop the rejected proposals from the cache (before: the sequence length when proposing)."""
        from mlx_lm.models.cache import trim_prompt_cache

        keep = min(accepted, proposed - 1)
        trim_prompt_cache(self.cache, (proposed - 1) - keep)
        self.fed = before + keep


# ---- the loop ----
def generate(rest: list[int], gen, cache, check):
    """Like mlx-lm's generate_step for one request, but yields a list per step:
    [(token, from the draft?, logprobs row or None), ...]. The caller stops pulling once the
    request has ended; the KV cache then holds everything up to, not including, the last token."""
    import mlx.core as mx
    from mlx_lm.models.cache import trim_prompt_cache

    model = gen.loaded.model
    plan_ = gen.speculative
    processors, sampler = gen.processors, gen.sampler
    want_lp = gen.top_logprobs is not None
    history = list(rest)           # what processors see (as generate_step: the uncached prompt part + output)
    seq = list(gen.prompt_ids)     # the whole sequence, for proposals
    drafter = None
    if plan_.kind == "draft":
        drafter = DraftModel(plan_.draft, gen.loaded.config.get("vocab_size"), lambda: check(0, 1))

    # Prefill as generate_step does (all but the last prompt token, in steps), so the logits match.
    done, total = 0, len(rest)
    check(done, total)
    while total - done > 1:
        n = min(PREFILL_STEP, total - done - 1)
        model(mx.array(rest[done:done + n])[None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        check(done, total)
        mx.clear_cache()
    pending = rest[done:]
    pending_is_decode = False

    while True:
        started = time.perf_counter()
        room = gen.max_tokens - gen.completion - 1   # proposals past max_tokens would be wasted
        k = max(0, min(plan_.num_draft_tokens, room))
        before = len(seq)
        if k == 0:
            drafts = []
        elif drafter is not None:
            drafts = drafter.propose(seq, k)
        else:
            drafts = lookup(seq, k, plan_.max_ngram)
        logits = model(mx.array(pending + drafts)[None], cache=cache)[0, len(pending) - 1:, :]
        out = []
        for i in range(len(drafts) + 1):
            row = logits[i:i + 1]
            if processors:
                h = mx.array(history + drafts[:i])
                for p in processors:
                    row = p(h, row)
            lp = row - mx.logsumexp(row, keepdims=True)
            token = int(sampler(lp).item())
            hit = i < len(drafts) and token == drafts[i]
            out.append((token, hit, lp.squeeze(0) if want_lp else None))
            if not hit:
                break
        accepted = len(out) - 1
        if len(drafts) > accepted:
            trim_prompt_cache(cache, len(drafts) - accepted)
        if drafter is not None and drafts:
            drafter.settle(before, len(drafts), accepted)
        plan_.drafted += len(drafts)
        plan_.per_step = _average(plan_.per_step, len(out))
        if pending_is_decode:
            plan_.step_s = _average(plan_.step_s, time.perf_counter() - started)
        plan_.steps += pending_is_decode
        pending_is_decode = True   # the first step also prefilled the last prompt token (and the draft's prompt)
        tokens = [t for t, _, _ in out]
        history.extend(tokens)
        seq.extend(tokens)
        pending = tokens[-1:]
        yield out


# ---- draft models ----
def check_compatible(target, draft, source: str) -> None:
    """Refuse a draft whose tokenizer does not map every token exactly as the target's does."""
    def bad(what: str):
        return RpcError(INVALID_PARAMS, f"draft_model {source!r} cannot draft for {target.id!r}: {what}", path="/draft_model")

    if draft.kind != "llm" or target.kind != "llm":
        raise bad("speculative decoding works with text models only")
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    if not can_trim_prompt_cache(make_prompt_cache(draft.model)) or not can_trim_prompt_cache(make_prompt_cache(target.model)):
        raise bad("one of the two models has a KV cache that cannot be rolled back (rejected drafts must be)")
    a, b = _hf(target.tokenizer), _hf(draft.tokenizer)
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb), key=va.get)
        only_b = sorted(set(vb) - set(va), key=vb.get)
        moved = sorted((t for t in set(va) & set(vb) if va[t] != vb[t]), key=va.get)
        parts = [f"the target has {len(va)} tokens, the draft {len(vb)}"]
        if moved:
            t = moved[0]
            parts.append(f"{len(moved)} tokens have other ids (e.g. {t!r} is {va[t]} in the target, {vb[t]} in the draft)")
        if only_a:
            parts.append(f"{len(only_a)} target tokens are missing from the draft (e.g. {only_a[0]!r})")
        if only_b:
            parts.append(f"{len(only_b)} draft tokens are not in the target (e.g. {only_b[0]!r})")
        raise bad("the tokenizers' vocabularies differ: " + "; ".join(parts))
    sa, sb = _specials(a), _specials(b)
    if sa != sb:
        diff = sorted(set(sa.items()) ^ set(sb.items()))
        raise bad(f"the special tokens differ: target {sorted(sa.items())}, draft {sorted(sb.items())} (first difference: {diff[0]})")
    ea, eb = sorted(target.tokenizer.eos_token_ids), sorted(draft.tokenizer.eos_token_ids)
    if ea != eb:
        raise bad(f"the end-of-sequence tokens differ: target {ea}, draft {eb}")


def _hf(wrapper):
    return getattr(wrapper, "_tokenizer", wrapper)


def _specials(tok) -> dict:
    """id → text of special tokens (added tokens marked special, and the named ones)."""
    out = {}
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            out[f"id {int(i)}"] = str(added)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        if value:
            out[name] = str(value)
    return out
