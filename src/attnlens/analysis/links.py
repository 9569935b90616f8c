"""Informative links: where tokens look, past sinks, positional heads, neighbours and themselves — from each query's
top-k keys.

The terminal summary of ``attnlens explain`` and the report read a model through these: the strongest query → key
weights between real tokens in the heads that are not routine (sinks, self heads and the positional heads —
previous-token, next-token, fixed-offset and local-window heads, `attnlens.analysis.head_kinds`: their links say
where a token sits, not what it reads), each with every other head that carries the same link. Arrays are one sequence's
top-k per layer and head: ``topk_idx``, ``topk_w (L, H, N, k)`` (index -1 = none).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["is_special_token", "link_mask", "informative_links", "focus_heads", "LINKS", "LINK_MIN", "ROUTINE_KINDS",
           "FOCUSED_HEADS"]

#: informative links: at most this many distinct query → key pairs, each of weight at least LINK_MIN
LINKS = 8
LINK_MIN = 0.2
#: head kinds that need no reading (sinks, self and positional heads): their links are left out unless the heads are
#: asked for by layer / head
ROUTINE_KINDS = ("first-token sink", "sink", "self", "previous-token", "next-token", "offset", "local window")
#: heads `focus_heads` picks when only a layer or only a head is asked for
FOCUSED_HEADS = 3


def is_special_token(token: str) -> bool:
    """A special token: written as ``[...]`` or ``<...>`` ([CLS], [SEP], <s>, </s>, <|endoftext|>)."""
    t = str(token).strip()
    return len(t) > 2 and (t[0], t[-1]) in (("[", "]"), ("<", ">"))


def link_mask(topk_idx: np.ndarray, topk_w: np.ndarray, tokens: Sequence[str], kinds: Optional[list] = None, *,
              layer: Optional[int] = None, head: Optional[int] = None) -> np.ndarray:
    """``(L, H, N, k)`` bool: the top-k entries that count as informative links — of weight >= ``LINK_MIN``, in the
    heads of ``layer`` / ``head`` (any kind) or else in the heads not of a ``ROUTINE_KINDS`` kind (``kinds``: per
    layer, `head_kinds`' list; ``None``: every head), between a query and a key that are real tokens (not special,
    not position 0), the key not the query itself nor a neighbour (the token before or after it: positional links,
    which previous-token and next-token heads make)."""
    idx, w = np.asarray(topk_idx), np.asarray(topk_w)
    L, H, n = idx.shape[:3]
    use = np.ones((L, H), dtype=bool)
    if layer is not None or head is not None:
        use[:] = False
        use[slice(None) if layer is None else layer, slice(None) if head is None else head] = True
    elif kinds is not None:
        use = np.array([[kind not in ROUTINE_KINDS for kind, _ in row] for row in kinds], dtype=bool)
    real = np.array([i > 0 and not is_special_token(t) for i, t in enumerate(tokens)], dtype=bool)
    q = np.arange(n)[:, None]
    return (use[:, :, None, None] & real[:, None] & (idx >= 0) & real[np.clip(idx, 0, n - 1)]
            & (np.abs(idx - q) > 1) & (w >= LINK_MIN))


def informative_links(topk_idx: np.ndarray, topk_w: np.ndarray, tokens: Sequence[str], kinds: Optional[list] = None,
                      *, layer: Optional[int] = None, head: Optional[int] = None, limit: int = LINKS) -> list:
    """The strongest informative links (`link_mask`): ``[(query i, key j, [(weight, layer, head), ...]), ...]``, up
    to ``limit`` distinct pairs, strongest first, each with every head that has it among its top k, by weight."""
    idx, w_all = np.asarray(topk_idx), np.asarray(topk_w)
    n = idx.shape[2]
    li, h, i, m = np.nonzero(link_mask(idx, w_all, tokens, kinds, layer=layer, head=head))
    j = idx[li, h, i, m]
    w = w_all[li, h, i, m]
    order = np.argsort(-w, kind="stable")
    code = (i * n + j)[order]
    _, first = np.unique(code, return_index=True)  # each pair's strongest entry (in order)
    links = []
    for p in np.sort(first)[:limit]:
        e = order[code == code[p]]
        links.append((int(i[e[0]]), int(j[e[0]]), [(float(w[s]), int(li[s]), int(h[s])) for s in e]))
    return links


def focus_heads(topk_idx: np.ndarray, topk_w: np.ndarray, tokens: Sequence[str], kinds: Optional[list],
                layer: Optional[int], head: Optional[int], count: int = FOCUSED_HEADS) -> list:
    """The heads to read token by token: ``[(layer, head)]`` when both are given; else, among the heads asked for
    (a layer, or a head in every layer), the ``count`` whose strongest informative link is strongest."""
    if layer is not None and head is not None:
        return [(layer, head)]
    if layer is None and head is None:
        raise ValueError("focus_heads: expected a layer, a head or both")
    mask = link_mask(topk_idx, topk_w, tokens, kinds, layer=layer, head=head)
    best = np.where(mask, np.asarray(topk_w), -np.inf).max(axis=(2, 3))  # (L, H)
    if layer is not None:
        return [(layer, int(h)) for h in np.argsort(-best[layer], kind="stable")[:count]]
    return [(int(li), head) for li in np.argsort(-best[:, head], kind="stable")[:count]]
