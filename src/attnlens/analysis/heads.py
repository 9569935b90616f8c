"""Per-head scores of one captured layer (how much each head attends to the first token, itself, the previous token,
earlier copies of the current token, the token after them, or a pattern of your own) and a name for each head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .records import as_numpy, dense_weights, has_full_weights, key_count, result_of, row_stats, weight_sums

__all__ = ["HeadSummary", "head_summary", "head_kinds", "earlier_same_token", "HEAD_KINDS", "KIND_SCORE",
           "BROAD_ENTROPY", "BROAD_MAX_WEIGHT"]


@dataclass
class HeadSummary:
    """Per-head statistics of one layer for one sequence; arrays of shape ``(H,)``, every one exact.

    Each is a mean over the *live* queries (padded queries and queries that see no key are left out; see
    `head_summary`) of a sum of weights ``P[i, j]`` over a set of keys ``S_i``, taken over the live queries
    whose set is not empty. ``duplicate`` / ``induction`` are ``None`` without ``input_ids``, ``custom``
    without a ``pattern``. ``self_lo`` … ``prev_hi`` equal ``self`` / ``prev`` (kept for readers of the older
    bounds; ``exact`` is always True).
    """

    entropy: np.ndarray  # mean entropy of the query rows, nats
    max_weight: np.ndarray  # mean largest weight of the query rows
    first: np.ndarray  # mean P[i, 0] (the first token; attention sinks)
    self: np.ndarray  # mean P[i, pos(i)]
    prev: np.ndarray  # mean P[i, pos(i) - 1] over queries with pos(i) >= 1
    self_lo: np.ndarray
    self_hi: np.ndarray
    prev_lo: np.ndarray
    prev_hi: np.ndarray
    exact: bool = True
    duplicate: Optional[np.ndarray] = None  # Σ P[i, j] over earlier j with the same token as pos(i)
    induction: Optional[np.ndarray] = None  # Σ P[i, j + 1] over those j
    custom: Optional[np.ndarray] = None  # Σ P[i, j] over the pattern's keys


def _positions(rec, res, nq: int, nk: int, q_offset) -> np.ndarray:
    """Each query's own key position ``i + q_offset`` (default ``Nk - Nq``, or the record's ``q_offset``)."""
    if q_offset is None:
        q_offset = getattr(rec, "q_offset", None)
    return np.arange(nq) + (nk - nq if q_offset is None else q_offset)


def _live_queries(rec, res, lse: np.ndarray, pos: np.ndarray, batch: int, live) -> np.ndarray:
    """Queries that count: they see a key (finite lse in some head) and their own position is not padding — per
    ``live`` (key positions, ``(B, Nk)`` / ``(Nk,)``) when given, else a key no query may see (from the call's
    bool mask; with full weights only, a key of weight 0 everywhere)."""
    ok = np.isfinite(lse).any(0)
    seen = None
    call = getattr(rec, "call", None)
    if live is not None:
        seen = np.asarray(as_numpy(live)).astype(bool)
        seen = seen[batch] if seen.ndim == 2 else seen
    elif call is not None and call.mask is not None and call.mask.dtype == torch.bool:
        m = call.mask[batch] if call.mask.shape[0] > 1 else call.mask[0]
        seen = as_numpy(m.reshape(-1, m.shape[-1]).any(0)).astype(bool)  # (Nk,)
    elif call is None and has_full_weights(res):
        seen = (dense_weights(res, batch) > 0).any((0, 1))
    if seen is not None:
        inside = (pos >= 0) & (pos < seen.shape[0])
        ok &= ~inside | seen[np.clip(pos, 0, seen.shape[0] - 1)]
    return ok


def earlier_same_token(tokens) -> np.ndarray:
    """``(N, m)`` int64: row p lists the earlier positions j < p with ``tokens[j] == tokens[p]`` (ascending),
    padded with -1; ``m`` = the most earlier occurrences of any position (at least 1)."""
    tok = np.asarray(tokens).reshape(-1)
    n = tok.shape[0]
    order = np.lexsort((np.arange(n), tok))  # by token, then position
    st = tok[order]
    start = np.r_[0, np.flatnonzero(st[1:] != st[:-1]) + 1]  # first slot of each token's group
    first = np.repeat(start, np.diff(np.r_[start, n]))  # (n,) group start of each sorted slot
    rank = np.arange(n) - first  # earlier occurrences of each sorted slot
    m = max(1, int(rank.max()) if n else 1)
    cols = np.arange(m)
    src = np.minimum(first[:, None] + cols, n - 1)
    rows = np.where(cols < rank[:, None], order[src], -1)  # (n, m) in sorted order
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _pattern_index(pattern, pos: np.ndarray, nk: int) -> np.ndarray:
    """A user pattern as ``(Nq, m)`` key indices: a function of the query positions ``pos (Nq,)`` returning
    ``(Nq, m)`` indices, or an index map ``(Nq, m)`` itself; -1 = none."""
    idx = pattern(pos.copy()) if callable(pattern) else pattern
    idx = np.asarray(as_numpy(idx))
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"pattern: expected integer key indices, got dtype {idx.dtype}")
    idx = idx.reshape(pos.shape[0], -1) if idx.ndim == 1 else idx
    if idx.ndim != 2 or idx.shape[0] != pos.shape[0] or (idx.size and (idx.min() < -1 or idx.max() >= nk)):
        raise ValueError(f"pattern: expected (Nq={pos.shape[0]}, m) key indices in [-1, {nk}), got shape "
                         f"{idx.shape}")
    return idx.astype(np.int64)


def _score(rec, idx: np.ndarray, live: np.ndarray, batch: int, exclude_first: bool, H: int, lse: np.ndarray
           ) -> np.ndarray:
    """Mean over live queries with a non-empty key set of ``Σ_m P[i, idx[i, m]]`` ``(H,)``; ``lse (H, Nq)`` from
    `row_stats` (so no key set costs another lse pass)."""
    if exclude_first:
        idx = np.where(idx == 0, -1, idx)
    has = live & (idx >= 0).any(-1)
    if not has.any():
        return np.zeros(H)
    idx = np.where(has[:, None], idx, -1)
    return weight_sums(rec, idx, batch=batch, lse=lse)[:, has].mean(-1)


def head_summary(rec, input_ids=None, *, batch: int = 0, q_offset: Optional[int] = None, exclude_first: bool = False,
                 pattern=None, live=None) -> HeadSummary:
    """Exact summaries of each head of one captured call (a record of `hf.capture` / `nn.capture`, or a
    `LensResult` with full weights), at any length: no full weights needed (the weights at the chosen keys
    come from the record's inputs and lse, `weights_at`).

    With ``pos(i) = i + q_offset`` the key position of query i (``Nk - Nq`` by default: a generation step's
    query sits after the cache), every figure is a mean over the live queries with a non-empty key set::

        first     = mean P[i, 0]
        self      = mean P[i, pos(i)]
        prev      = mean over queries with pos(i) >= 1 of P[i, pos(i) - 1]             (previous-token heads)
        duplicate = mean over queries whose token occurred before, of Σ P[i, j] over the earlier positions j
                    with the same token                                                (duplicate-token heads)
        induction = mean over the same queries of Σ P[i, j + 1] over those j (j + 1 <= pos(i)): attention to
                    the token that followed the earlier occurrence                     (induction heads)
        custom    = mean of Σ P[i, j] over the keys j the ``pattern`` gives query i
        entropy, max_weight: means of the rows' entropy (nats) and largest weight.

    Args:
        input_ids: the token ids of the keys ``(B, Nk)`` / ``(Nk,)`` (tensor or array); enables ``duplicate`` and
            ``induction``.
        batch: which sequence.
        q_offset: the position of the first query among the keys; default from the record (``Nk - Nq``).
        exclude_first: drop key 0 from every key set (TransformerLens's ``exclude_bos``): a query left with an
            empty set does not count.
        pattern: a user pattern: a function of the query positions ``pos (Nq,)`` returning key indices
            ``(Nq, m)`` (-1 = none), or such an index map; gives ``custom``.
        live: which key positions hold real tokens ``(B, Nk)`` / ``(Nk,)`` bool (e.g. the attention mask); by
            default a query counts unless it sees no key or its own position is a key no query may see
            (key padding in the call's bool mask).

    Cost: one weight per query and key set member (O(Nq · m) dot products, in query chunks), plus
    ``entropy``/``max_weight``/``lse`` from the record (or one more pass when its lens lacked them).
    """
    res = result_of(rec)
    lse, ent, mw = row_stats(rec, batch)
    H, nq = lse.shape
    nk = key_count(rec, batch)
    pos = _positions(rec, res, nq, nk, q_offset)
    ok = _live_queries(rec, res, lse, pos, batch, live)
    inside = (pos >= 0) & (pos < nk)
    own = np.where(inside, pos, -1)[:, None]
    prev = np.where(inside & (pos >= 1), pos - 1, -1)[:, None]
    sets = {"first": np.zeros((nq, 1), dtype=np.int64), "self": own, "prev": prev}
    if input_ids is not None:
        dup = _duplicates(input_ids, batch, nk, pos)
        sets.update(duplicate=dup, induction=np.where(dup >= 0, dup + 1, -1))
    if pattern is not None:
        sets["custom"] = _pattern_index(pattern, pos, nk)
    hs = {name: _score(rec, idx, ok, batch, exclude_first and name != "first", H, lse) for name, idx in sets.items()}
    n = max(int(ok.sum()), 1)
    return HeadSummary(entropy=np.where(ok, ent, 0).sum(-1) / n, max_weight=np.where(ok, mw, 0).sum(-1) / n,
                       self_lo=hs["self"], self_hi=hs["self"], prev_lo=hs["prev"], prev_hi=hs["prev"], **hs)


#: the kinds `head_kinds` names: the pattern kinds in the order it tries them, then "broad", then "mixed"
HEAD_KINDS = ("induction", "duplicate", "previous-token", "self", "first-token sink", "broad", "mixed")
_PATTERNS = (("induction", "induction"), ("duplicate", "duplicate"), ("previous-token", "prev"), ("self", "self"),
             ("first-token sink", "first"))
#: a pattern kind applies when its score (the mean weight a query puts on the pattern's keys) is at least this
KIND_SCORE = 0.5
#: "broad": mean entropy at least this fraction of log(n_tokens) ...
BROAD_ENTROPY = 0.75
#: ... or a mean largest weight below this
BROAD_MAX_WEIGHT = 0.25


def head_kinds(summary: HeadSummary, n_tokens: int | None = None) -> list:
    """Name each head of one layer from its exact scores (`head_summary`): ``[(kind, score), ...]``, one per head.

    The rules, for each head; the first that applies names it:

    1. A *pattern kind*, when its score is at least ``KIND_SCORE`` (0.5: more than half of a query's weight, on
       average, goes to the pattern's keys), tried in this order::

           "induction"         summary.induction: the token after an earlier copy of the query's token
           "duplicate"         summary.duplicate: earlier copies of the query's token
           "previous-token"    summary.prev: the token just before the query
           "self"              summary.self: the query's own position
           "first-token sink"  summary.first: position 0 ([CLS], BOS), where a head puts weight it does not
                               need (an attention sink)

       The key sets can overlap (a token repeated right after itself: its earlier copy is also the previous
       token, and the token after that copy is the query itself); the more specific reading then wins, which is
       why induction, whose keys define an induction head, is tried first. ``duplicate`` / ``induction`` are
       skipped when they are ``None`` (no token ids). The score is the pattern's score.
    2. ``"broad"``: no pattern dominates and the head spreads its weight: its mean entropy is at least
       ``BROAD_ENTROPY`` (0.75) of ``log(n_tokens)`` (the entropy of a uniform row over every token; only when
       ``n_tokens >= 2`` is given), or its mean largest weight is below ``BROAD_MAX_WEIGHT`` (0.25: on average no
       key gets a quarter of a query's weight). The score is the mean largest weight (``summary.max_weight``).
    3. ``"mixed"``: anything else: the head focuses on keys that none of the patterns describes (where the
       content heads are: look at its links). The score is the mean largest weight.

    A figure that is NaN (non-finite inputs) never applies: a head whose figures are all NaN is ``"mixed"``.
    The thresholds were looked at on MiniLM (BERT, 6 × 12) and on a small trained induction model
    (tests/test_induction.py): their previous-token heads score 0.94 to 1.00 and the induction heads 0.78 to 0.98,
    far above 0.5, while MiniLM's first-token scores run evenly from 0.04 to 0.9, so for sinks 0.5 is a convention
    (more than half), not a gap in the data. In MiniLM's first layer the heads with no pattern have entropies of
    0.76 to 0.91 of log(n) on a 16-token sentence (broad); its later heads mostly 0.3 to 0.7 (sinks, mixed).

    Args:
        summary: one layer's `HeadSummary` (arrays ``(H,)``).
        n_tokens: the number of keys (tokens) in the sequence, for the entropy test of ``"broad"``.
    """
    if not isinstance(summary, HeadSummary):
        raise TypeError(f"summary: expected an attnlens.analysis.HeadSummary, got {type(summary).__name__}")
    if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer))
                                 or n_tokens < 1):
        raise ValueError(f"n_tokens: expected an int >= 1 or None, got {n_tokens!r}")
    ent, mw = np.asarray(summary.entropy, dtype=np.float64), np.asarray(summary.max_weight, dtype=np.float64)
    spread = BROAD_ENTROPY * np.log(n_tokens) if n_tokens is not None and n_tokens >= 2 else np.inf
    scores = [(kind, np.asarray(getattr(summary, f), dtype=np.float64)) for kind, f in _PATTERNS
              if getattr(summary, f) is not None]
    out = []
    for h in range(ent.shape[0]):
        kind = next(((k, float(s[h])) for k, s in scores if s[h] >= KIND_SCORE), None)
        if kind is None:
            kind = ("broad" if ent[h] >= spread or mw[h] < BROAD_MAX_WEIGHT else "mixed", float(mw[h]))
        out.append(kind)
    return out


def _duplicates(input_ids, batch: int, nk: int, pos: np.ndarray) -> np.ndarray:
    """``(Nq, m)``: for each query, the earlier key positions with its token (``earlier_same_token``)."""
    ids = as_numpy(input_ids)
    ids = ids[batch] if ids.ndim == 2 else ids
    if ids.shape[-1] != nk:
        raise ValueError(f"input_ids: expected one token id per key position ({nk}), got shape {ids.shape}")
    table = earlier_same_token(ids)  # (Nk, m)
    inside = (pos >= 0) & (pos < nk)
    return np.where(inside[:, None], table[np.clip(pos, 0, nk - 1)], -1)
