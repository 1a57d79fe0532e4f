"""How much prompt a batch step may prefill while other requests are decoding.

mlx-lm's BatchGenerator interleaves already: each `next()` decodes one token for every running
request, then prefills one slice of the waiting prompts. The slice decides what running streams
feel: 512 tokens on a CPU is seconds of silence. The pacer steers each step's slice from measured
step times so that prefilling takes about `factor` times the decode step: the running streams'
gap stays near (1 + factor) times their token time, and a long prompt still moves at full speed
whenever nobody is waiting for a token."""

MIN_SLICE = 16     # tokens: below this a slice's own forward (all weights read) dominates its cost
FUSED_MIN_SLICE = 4  # tokens, when the slice rides in the decode rows' forward (fused.py): no forward of its own
MAX_SLICE = 512    # tokens: a step when nobody is decoding (cancellation is seen between steps)
ALPHA = 0.3        # weight of the newest measurement in the running averages


class PrefillPacer:
    def __init__(self, factor: float, floor: int = MIN_SLICE):
        self.factor = factor             # 0: no pacing, always MAX_SLICE
        self.floor = floor               # the smallest slice while others decode
        self.decode_s = None             # a decode-only step, seconds (running average)
        self.step_tokens = floor         # prompt tokens per paced step, all prompts together
        self._progress: dict = {}        # uid → prompt tokens done, from the generator's responses

    def slice(self, decoding: bool, prompting: int) -> int:
        """Prompt tokens per waiting prompt for the next step."""
        if not decoding or self.factor <= 0 or prompting <= 0:
            return MAX_SLICE
        if not self._progress:
            # A new prompt at context 0: start at the floor and grow (at most 2x a step) from what
            # its slices cost; a size learnt deep in an earlier prompt's context, or guessed, can overshoot.
            self.step_tokens = self.floor
        return int(max(self.floor, min(MAX_SLICE, self.step_tokens / prompting)))

    def observe(self, prompt_responses, seconds: float, decoded: bool) -> None:
        """Learn from one `next()`: its duration, whether it decoded, how many prompt tokens it took.
        The paced slice is steered by what a step really cost (per-step overheads included): it
        grows or shrinks, at most 2x a step, until prefilling takes `factor` decode steps."""
        tokens = 0
        progress = {}  # every prompt still prefilling answers each step: the rest (done, cancelled) drop out
        for r in prompt_responses:
            done = r.progress[0]
            tokens += max(0, done - self._progress.get(r.uid, 0))
            if not (r.end_of_segment and done >= r.progress[1]):
                progress[r.uid] = done
        self._progress = progress
        if tokens == 0:
            if decoded:
                self.decode_s = _average(self.decode_s, seconds)
            return
        if not decoded or self.decode_s is None or self.factor <= 0:
            return
        prefill_s = max(seconds - self.decode_s, 1e-4)
        ratio = min(2.0, max(0.5, self.factor * self.decode_s / prefill_s))
        self.step_tokens = max(self.floor, min(MAX_SLICE * 8, self.step_tokens * ratio))

    def observe_decode(self, seconds: float) -> None:
        """A decode step measured elsewhere (a request running alone)."""
        self.decode_s = _average(self.decode_s, seconds)

    def forget(self, uid) -> None:
        self._progress.pop(uid, None)


def _average(old, new):
    return new if old is None else old + ALPHA * (new - old)
