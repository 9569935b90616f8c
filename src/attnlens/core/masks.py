"""Causal, sliding-window and padding masks, and how they combine: the band geometry, in one place.

Positions: query ``i`` sits at key position ``p = i + offset``. The default ``offset = Nk - Nq``
is bottom-right alignment, what decoding with a KV cache needs (the last query sits at the last
key); ring attention and split-KV pass other offsets for blocks of a longer sequence. Query
``i`` may see key ``j`` iff

    causal:            j <= p
    window (L, R):     p - L <= j <= p + R      (None on a side = unbounded)

and a user mask allows it (bool: True = may attend; float: added to the scores, ``-inf`` =
may not attend). The functions here work on NumPy arrays and torch tensors alike.

Padded batches (`SeqLens`, FlashAttention's varlen semantics): sequence b has ``Lq[b]`` queries (rows
``[0, Lq[b])``) and ``Lk[b]`` keys (``[0, Lk[b])``), and its own offset ``off[b]`` (default ``Lk[b] - Lq[b]``,
bottom-right per sequence). Query i of sequence b may see key j iff ``i < Lq[b]``, ``j < Lk[b]`` and the rules
above hold with ``p = i + off[b]``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

Window = Optional[Tuple[Optional[int], Optional[int]]]


#: largest finite window side. Wider is refused (use ``None`` for unbounded): it keeps every position
#: sum in int64, and no sequence is that long, so any wider window would equal ``None`` anyway.
MAX_WINDOW = 2**62


def normalize_window(window) -> Window:
    """``None`` | int w | (left, right) → ``None`` or ``(left|None, right|None)``.

    Each side is ``None`` (unbounded) or an int in ``[0, MAX_WINDOW]`` (2**62); larger values are
    refused with a ValueError, not clamped."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise TypeError(f"window must be None, an int >= 0, or a (left, right) pair; got the bool {window!r}")
    if isinstance(window, numbers.Integral):
        window = (int(window), int(window))
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None, an int >= 0, or a (left, right) pair; got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {side} must be an int >= 0 or None; got {type(w).__name__} {w!r}")
        if w < 0:
            raise ValueError(f"window {side} must be >= 0 (a number of positions), got {w}; use None for an "
                             f"unbounded side, or window=None for no window (FlashAttention writes -1)")
        if w > MAX_WINDOW:
            raise ValueError(f"window {side} must be <= 2**62 (use None for an unbounded side), got {w}")
        out.append(int(w))
    return tuple(out)


def band(causal: bool, window: Window) -> tuple[Optional[int], Optional[int]]:
    """The (left, right) reach of every query around its position, causal folded in."""
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def key_range(i0: int, i1: int, nk: int, offset: int, causal: bool, window: Window) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that at least one query in rows ``[i0, i1)`` may see (by causal/window)."""
    left, right = band(causal, window)
    lo = 0 if left is None else min(nk, max(0, i0 + offset - left))
    hi = nk if right is None else max(0, min(nk, i1 - 1 + offset + right + 1))
    return lo, max(lo, hi)


def band_keep(qi, kj, offset, causal: bool, window: Window):
    """Bool array ``keep[a, b]`` for query indices ``qi`` (column) and key indices ``kj`` (row).

    ``qi`` and ``kj`` are 1-D integer arrays (NumPy or torch); returns ``None`` when there is
    no causal/window restriction at all. ``offset``: an int, or an integer array that broadcasts against
    ``qi[:, None]`` (e.g. ``(B, 1, 1)`` per-sequence offsets give ``keep (B, len(qi), len(kj))``).
    """
    left, right = band(causal, window)
    if left is None and right is None:
        return None
    pos = qi[:, None] + offset
    kk = kj[None, :]
    keep = None
    if right is not None:
        keep = kk <= pos + right
    if left is not None:
        lk = kk >= pos - left
        keep = lk if keep is None else (keep & lk)
    return keep


@dataclass(frozen=True)
class SeqLens:
    """The per-sequence lengths of a padded batch (FlashAttention's varlen semantics, right padding), checked.

    ``q (B,)``, ``k (B,)``: int64 lengths, sequence b's queries are rows ``[0, q[b])`` and its keys ``[0, k[b])``;
    ``offset (B,)`` int64: query i of sequence b sits at key position ``i + offset[b]`` (default ``k - q``:
    bottom-right per sequence). All three on q's device. ``bounds = (max q, max k, min offset, max offset)`` as
    Python ints, so the chunk/tile geometry needs no device sync. Padded query rows (``i >= q[b]``) see nothing
    (dead rows, not even a sink); padded keys (``j >= k[b]``) are seen by no query.
    """

    q: torch.Tensor
    k: torch.Tensor
    offset: torch.Tensor
    bounds: Tuple[int, int, int, int]

    @classmethod
    def check(cls, seqlens_q, seqlens_k, B: int, Nq: int, Nk: int, device, offset=None,
              max_offset: int = 2**53) -> "SeqLens":
        """From the arguments of a call: ``seqlens_q`` / ``seqlens_k`` ``(B,)`` ints in ``[0, Nq]`` / ``[0, Nk]``
        (torch, NumPy or a list; None: every sequence full length) and ``offset`` None (``seqlens_k - seqlens_q``),
        an int (every sequence) or ``(B,)`` ints in ``[-max_offset, max_offset]``. TypeError / ValueError naming
        the argument otherwise."""
        lq = (torch.full((B,), Nq, dtype=torch.int64, device=device) if seqlens_q is None else
              check_lengths(seqlens_q, "seqlens_q", device, B, Nq, "sequence b's queries are rows [0, seqlens_q[b])"))
        lk = (torch.full((B,), Nk, dtype=torch.int64, device=device) if seqlens_k is None else
              check_lengths(seqlens_k, "seqlens_k", device, B, Nk, "sequence b's keys are [0, seqlens_k[b])"))
        if offset is None:
            off = lk - lq
        elif isinstance(offset, numbers.Integral) and not isinstance(offset, bool):
            off = torch.full((B,), int(offset), dtype=torch.int64, device=device)
        else:
            off = check_lengths(offset, "offset", device, B, None, "with seqlens: one key position per sequence",
                                max_offset)
        return cls.make(lq, lk, off)

    @classmethod
    def make(cls, q, k, offset) -> "SeqLens":
        """From int64 ``(B,)`` tensors on one device (the caller has checked them)."""
        qs, ks, offs = q.tolist(), k.tolist(), offset.tolist()
        return cls(q, k, offset, (max(qs, default=0), max(ks, default=0), min(offs, default=0), max(offs, default=0)))

    def key_range(self, i0: int, i1: int, nk: int, causal: bool, window: Window) -> tuple[int, int]:
        """Keys ``[lo, hi)`` that hold every key some query in rows ``[i0, i1)`` of some sequence may see (a hull
        over the sequences: `keep` masks the rest); empty when no sequence has a query in those rows."""
        qmax, kmax, omin, omax = self.bounds
        if i0 >= qmax:
            return 0, 0
        lo = key_range(i0, i1, nk, omin, causal, window)[0]
        hi = min(kmax, key_range(i0, i1, nk, omax, causal, window)[1])
        return lo, max(lo, hi)

    def positions(self, qi):
        """``(B, len(qi))``: each sequence's key position of query indices ``qi`` (1-D torch)."""
        return qi[None, :] + self.offset[:, None]

    def keep(self, qi, kj, causal: bool, window: Window):
        """Bool ``(B, len(qi), len(kj))``: query ``qi[a]`` of sequence b may see key ``kj[c]`` (band and lengths)."""
        keep = (qi[None, :, None] < self.q[:, None, None]) & (kj[None, None, :] < self.k[:, None, None])
        band_ = band_keep(qi, kj, self.offset[:, None, None], causal, window)
        return keep if band_ is None else keep & band_

    def rows(self, a: int, b: int) -> "SeqLens":
        """The lengths of queries ``[a, b)`` taken alone: each sequence keeps its key positions (offset + a)."""
        return SeqLens.make((self.q - a).clamp(0, b - a), self.k, self.offset + a)


def check_lengths(x, name: str, device, B: int, n: Optional[int], what: str,
                  max_offset: int = 2**53) -> torch.Tensor:
    """One ``(B,)`` int64 tensor on ``device`` from ``x`` (torch, NumPy, or a list of ints), checked: an integer dtype,
    shape ``(B,)``, values in ``[0, n]`` (``n`` None: offsets, within ``±max_offset``)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers ({what}), got NumPy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
    elif isinstance(x, (list, tuple)) and all(isinstance(a, (numbers.Integral, np.integer))
                                              and not isinstance(a, (bool, np.bool_)) for a in x):
        t = torch.tensor([int(a) for a in x], dtype=torch.int64)
    else:
        raise TypeError(f"{name} must be a 1-D integer torch tensor, NumPy array or list of ints ({what}), got "
                        f"{type(x).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers ({what}), got dtype {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},), one entry per sequence ({what}), got shape "
                         f"{tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if n is not None and B and (int(t.min()) < 0 or int(t.max()) > n):
        raise ValueError(f"{name} must lie in [0, {n}] ({what}), got {t.tolist()}")
    if n is None and B and int(t.abs().max()) > max_offset:
        raise ValueError(f"{name} must lie in [-{max_offset}, {max_offset}], got {t.tolist()}")
    return t


def padding_mask(lengths, n: int, *, device=None):
    """Bool key-padding mask ``(B, 1, 1, n)`` from per-sequence lengths: True for real tokens.

    Broadcasts against ``(B, H, Nq, Nk)`` scores, so it can be passed as ``mask=`` directly.
    """
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (one length per sequence), got shape {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > n).any()):
        raise ValueError(f"lengths must lie in [0, {n}], got {lengths.tolist()}")
    return (torch.arange(n, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def alibi_slopes(num_heads: int, *, device=None):
    """The standard ALiBi slopes ``(num_heads,)`` float32 (Press et al. 2022; BLOOM's and MPT's formula): for
    ``n`` a power of two, ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``; otherwise those of the largest power of two
    ``c < n``, then every other slope of ``2c``. Pass them as ``attention(..., alibi_slopes=...)``."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    c = 1 << (int(num_heads).bit_length() - 1)  # largest power of two <= n
    slopes = [2.0 ** (-8.0 * (i + 1) / c) for i in range(c)]
    slopes += [2.0 ** (-4.0 * (2 * i + 1) / c) for i in range(num_heads - c)]  # every other slope of 2c
    return torch.tensor(slopes, dtype=torch.float32, device=device)
