"""Stop strings matched on decoded text. Text that might be the start of a stop string is held
back until it is known not to be, so a stop string never leaks into a chunk, even split across
tokens."""


class StopText:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""        # all text decoded so far (cut at the stop string once one matched)
        self.released = 0     # how much of text has been handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add newly decoded text; return the part that is now safe to send."""
        if not piece or self.stopped:
            return ""
        start = self.released
        self.text += piece
        if not self.stops:
            self.released = len(self.text)
            return self.text[start:]
        # A match can only begin in the unreleased tail: released text was never a stop prefix.
        first = min((p for p in (self.text.find(s, start) for s in self.stops) if p >= 0), default=-1)
        if first >= 0:
            self.text = self.text[:first]
            self.stopped = True
            self.released = first
            return self.text[start:first]
        safe = len(self.text) - self._held(self.text, start)
        self.released = max(start, safe)
        return self.text[start:self.released]

    def rest(self) -> str:
        """At the end of generation (no stop matched), everything held back is plain text."""
        start = self.released
        self.released = len(self.text)
        return self.text[start:]

    def _held(self, text: str, start: int) -> int:
        """Length of the longest suffix of text[start:] that is a proper prefix of a stop string."""
        tail_len = len(text) - start
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, tail_len), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
