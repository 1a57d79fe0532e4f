"""Log-probabilities in OpenAI's shape: the chosen token's and the top alternatives', for generated
tokens (generate's `logprobs`/`top_logprobs`) and for given text (the `score` method).

The values are mlx-lm's: log-softmax of the logits after every logits processor (penalties, bias,
a response_format mask) and before temperature and the top-p/top-k/min-p filters. Top-k runs as
one numpy pass over all rows that ask for it (a batch, or a scored prompt): each row is cut into
groups, the k groups with the largest maxima hold the k largest values, and only those are sorted."""

import math
import weakref

MAX_TOP = 20
FLOOR = -9999.0      # what a -inf logprob is reported as (JSON has no infinity), as OpenAI does
_GROUPS = 64         # rows are cut into this many interleaved groups for the two-level top-k
_DIRECT_BELOW = 4096  # vocabularies smaller than this take one plain partition instead

_tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # tokenizer → _Table


def _finite(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


def rows_to_numpy(rows):
    """A (n, V) float32 numpy array from MLX rows (a list of (V,) or (1, V) arrays, or one (n, V)
    array). Rows that are already evaluated are read in place: no new MLX op is made, so nothing
    waits behind the next step that mlx-lm has already queued."""
    import numpy as np

    if isinstance(rows, (list, tuple)):
        arrs = [_numpy(r).reshape(-1) for r in rows]
        return arrs[0][None] if len(arrs) == 1 else np.stack(arrs)
    a = _numpy(rows)
    return a.reshape(-1, a.shape[-1])


def _numpy(x):
    import mlx.core as mx
    import numpy as np

    if x.dtype != mx.float32:
        x = x.astype(mx.float32)  # numpy has no bfloat16 (GPU models)
    return np.asarray(x)


def top_k(a, k: int):
    """(ids, values), each (n, k) and sorted by value descending, of the k largest values per row
    of a (n, V) numpy array. Ties at the k-th value may pick any of the tied ids."""
    import numpy as np

    n, v = a.shape
    k = min(k, v)
    width = v // _GROUPS
    if n == 0 or k == 0:
        empty = np.zeros((n, 0), dtype=np.int64)
        return empty, empty.astype(a.dtype)
    if v < _DIRECT_BELOW or width < k:
        # A small vocabulary: one partition of the whole rows is cheaper than the two levels.
        part = np.argpartition(np.nan_to_num(a, nan=-np.inf), v - k, axis=-1)[:, v - k:]
        vals = np.take_along_axis(a, part, -1)
        order = np.argsort(-vals, axis=-1, kind="stable")
        return np.take_along_axis(part, order, -1), np.take_along_axis(vals, order, -1)
    # Group j holds columns j, j + width, j + 2*width, ... (a strided view: no copy); max over the
    # group axis is a vectorized elementwise max of _GROUPS contiguous slices.
    body = a[:, : width * _GROUPS].reshape(n, _GROUPS, width)
    best = np.nan_to_num(body.max(axis=1), nan=-np.inf)                         # (n, width)
    cols = np.argpartition(best, width - k, axis=-1)[:, width - k:]             # (n, k)
    cand = np.take_along_axis(body, cols[:, None, :], axis=2).reshape(n, _GROUPS * k)
    cand_ids = (np.arange(_GROUPS)[None, :, None] * width + cols[:, None, :]).reshape(n, _GROUPS * k)
    if v > width * _GROUPS:  # the columns past the last whole group are always candidates
        cand = np.concatenate([cand, a[:, width * _GROUPS:]], axis=1)
        cand_ids = np.concatenate([cand_ids, np.broadcast_to(np.arange(width * _GROUPS, v), (n, v - width * _GROUPS))], axis=1)
    cand = np.nan_to_num(cand, nan=-np.inf)
    part = np.argpartition(cand, cand.shape[1] - k, axis=-1)[:, cand.shape[1] - k:]
    vals = np.take_along_axis(cand, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(np.take_along_axis(cand_ids, part, -1), order, -1), np.take_along_axis(vals, order, -1)


def pick(rows, tokens, ks):
    """For each row i: (logprob of tokens[i], [(id, logprob), ...] of its ks[i] most likely tokens).
    One conversion and one top-k for all rows."""
    import numpy as np

    a = rows_to_numpy(rows)
    chosen = a[np.arange(len(tokens)), np.asarray(tokens)].tolist() if len(tokens) else []
    k = max(ks) if ks else 0
    if k <= 0:
        return [(c, []) for c in chosen]
    ids, vals = top_k(a, k)
    ids, vals = ids.tolist(), vals.tolist()
    return [(c, list(zip(ids[i][: ks[i]], vals[i][: ks[i]]))) for i, c in enumerate(chosen)]


class _Table:
    """Each token's text and exact bytes, built on first use per token."""

    def __init__(self, tokenizer):
        from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, _byte_decoder

        self._tokenizer = tokenizer
        detok = getattr(tokenizer, "_detokenizer", None)
        self._bpe = _byte_decoder() if isinstance(detok, BPEStreamingDetokenizer) else None
        self._map = detok.tokenmap if isinstance(detok, (BPEStreamingDetokenizer, SPMStreamingDetokenizer)) else None
        self._spm = isinstance(detok, SPMStreamingDetokenizer)
        self._cache: dict = {}

    def entry(self, token: int):
        hit = self._cache.get(token)
        if hit is None:
            data = self._bytes(token)
            hit = self._cache[token] = (data.decode("utf-8", errors="replace"), list(data))
        return hit

    def _bytes(self, token: int) -> bytes:
        if self._map is not None and token < len(self._map):
            piece = self._map[token]
            if self._spm:
                return piece.replace("\u2581".encode(), b" ")
            if piece is not None and all(c in self._bpe for c in piece):
                return bytes(self._bpe[c] for c in piece)
            if piece is not None:
                return piece.encode("utf-8")  # a special token: its text
        try:
            return self._tokenizer.decode([token]).encode("utf-8")
        except Exception:
            return b""


def table(tokenizer) -> _Table:
    t = _tables.get(tokenizer)
    if t is None:
        t = _tables[tokenizer] = _Table(tokenizer)
    return t


def entry(tab: _Table, token: int, logprob, top) -> dict:
    """One item of OpenAI's logprobs.content, plus token_id on it and its alternatives."""
    text, data = tab.entry(token)
    item = {"token": text, "token_id": token, "logprob": None if logprob is None else _finite(logprob), "bytes": data,
            "top_logprobs": []}
    for tid, lp in top:
        if not math.isfinite(lp):
            continue  # a token that could not be drawn (masked by a format, say)
        t_text, t_data = tab.entry(tid)
        item["top_logprobs"].append({"token": t_text, "token_id": tid, "logprob": _finite(lp), "bytes": t_data})
    return item
