"""What a caller asks to see of attention (`Lens`) and what comes back (`LensResult`).

Every statistic describes the attention weights ``P = softmax(Q Kᵀ · scale + mask)`` *before*
dropout, and carries no gradient. Shapes below are for rank-4 input ``(B, Hq, Nq, D)``; for
rank-3 input drop ``B``, for rank-2 input drop ``B`` and ``Hq``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any, Sequence, Union

RowsSpec = Union[None, str, slice, range, Sequence[int]]


@dataclass(frozen=True)
class Lens:
    """A request for attention statistics, computed inside the attention pass in linear memory.

    Args:
        lse: natural log-sum-exp of each query's scaled, masked scores ``(B, Hq, Nq)``.
            ``softmax`` row i is ``exp(s_i - lse_i)``.
        max_weight: the largest weight of each query ``(B, Hq, Nq)``: 1 means the query copies
            one value row, ``1/Nk`` means it averages all of them.
        entropy: Shannon entropy of each query's weights in nats ``(B, Hq, Nq)``, in
            ``[0, log(number of visible keys)]``: low = focused, high = spread out.
        received: column sums of the weights ``(B, Hq, Nk)``: how much attention key j receives
            from all queries together (the column view; heavy-hitter KV-cache eviction uses it).
            Summed over keys it equals the number of queries that see at least one key.
        topk: ``k > 0`` returns ``topk_indices`` and ``topk_weights`` ``(B, Hq, Nq, k)``: the k
            keys each query draws on most, largest first. Where a weight is exactly 0 (fewer
            than k visible keys) its index is -1.
        rows: query rows whose full weight rows to return, ``weights (B, Hq, len(rows), Nk)``:
            a list of ints (negative counts from the end), a ``slice``/``range``, or ``"all"``
            (the whole n × n matrix — only ask for it when it fits in memory).
    """

    lse: bool = True
    max_weight: bool = True
    entropy: bool = True
    received: bool = True
    topk: int = 0
    rows: RowsSpec = None

    def __post_init__(self):
        for name in ("lse", "max_weight", "entropy", "received"):
            val = getattr(self, name)
            if not isinstance(val, bool):
                raise TypeError(f"Lens.{name} must be a bool, got {type(val).__name__} {val!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, numbers.Integral):
            raise TypeError(f"Lens.topk must be an int >= 0, got {type(self.topk).__name__} {self.topk!r}")
        if self.topk < 0:
            raise ValueError(f"Lens.topk must be >= 0, got {self.topk}")
        rows = self.rows
        if rows is None or isinstance(rows, (slice, range)):
            return
        if isinstance(rows, str):
            if rows != "all":
                raise ValueError(f"Lens.rows must be a list of ints, a slice, or 'all'; got the string {rows!r}")
            return
        try:
            items = list(rows)
        except TypeError:
            raise TypeError(f"Lens.rows must be a list of ints, a slice, or 'all'; got {type(rows).__name__}") from None
        for r in items:
            if isinstance(r, bool) or not isinstance(r, numbers.Integral):
                raise TypeError(f"Lens.rows must hold ints, got {type(r).__name__} {r!r}")
        object.__setattr__(self, "rows", tuple(int(r) for r in items))

    @classmethod
    def coerce(cls, lens) -> "Lens | None":
        """The ``lens=`` argument as a `Lens` or ``None``: ``None``/``False`` → ``None``, ``True`` → ``Lens()``
        (the defaults), a `Lens` → itself; anything else is a ``TypeError``."""
        if lens is None or lens is False:
            return None
        if lens is True:
            return cls()
        if not isinstance(lens, cls):
            raise TypeError(f"lens must be None, True, or an attnlens.Lens, got {type(lens).__name__}")
        return lens

    def resolve_rows(self, nq: int) -> tuple[int, ...] | None:
        """The requested rows as non-negative query indices, checked against ``nq``."""
        rows = self.rows
        if rows is None:
            return None
        if isinstance(rows, str):
            return tuple(range(nq))
        if isinstance(rows, slice):
            return tuple(range(nq)[rows])
        if isinstance(rows, range):
            rows = tuple(rows)
        out = []
        for r in rows:
            if not -nq <= r < nq:
                raise ValueError(f"Lens.rows: row {r} is out of range for Nq={nq} queries (expected -{nq} <= row < {nq})")
            out.append(r % nq)
        return tuple(out)

    @property
    def needs_any(self) -> bool:
        return any((self.lse, self.max_weight, self.entropy, self.received, self.topk, self.rows is not None))


@dataclass
class LensResult:
    """Statistics of one attention call; a field not asked for is ``None``.

    Arrays are of the caller's kind (NumPy in → NumPy out; torch in → torch on the same device).
    Floating fields are float32 for float16/bfloat16/float32 torch input and float64 for
    float64 input; indices are int64.

    Fields (rank-4 shapes):
        lse ``(B, Hq, Nq)``: log-sum-exp of the scaled, masked scores; ``-inf`` for a query
            that sees no key.
        max_weight ``(B, Hq, Nq)``: largest weight per query (0 for a query that sees no key).
        entropy ``(B, Hq, Nq)``: entropy of the weights in nats (0 for a query that sees no key).
        received ``(B, Hq, Nk)``: column sums of the weights.
        topk_indices, topk_weights ``(B, Hq, Nq, k)``: most attended keys, largest first;
            index -1 where the weight is 0.
        weights ``(B, Hq, len(rows), Nk)``: full weight rows for ``rows``.
        rows: the query indices of ``weights`` (non-negative), or ``None``.
    """

    lse: Any = None
    max_weight: Any = None
    entropy: Any = None
    received: Any = None
    topk_indices: Any = None
    topk_weights: Any = None
    weights: Any = None
    rows: tuple[int, ...] | None = None

    def map_arrays(self, fn) -> "LensResult":
        """A new result with ``fn`` applied to every array field that is present."""
        kw = {}
        for f in fields(self):
            val = getattr(self, f.name)
            kw[f.name] = val if (val is None or f.name == "rows") else fn(val)
        return LensResult(**kw)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            val = getattr(self, f.name)
            if val is None:
                continue
            if f.name == "rows":
                parts.append(f"rows={list(val) if len(val) <= 8 else f'[{len(val)} rows]'}")
            else:
                parts.append(f"{f.name}={tuple(val.shape)}")
        return "LensResult(" + ", ".join(parts) + ")"
