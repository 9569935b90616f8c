"""What a caller asks to see of attention (`Lens`) and what comes back (`LensResult`).

Every statistic describes the attention weights ``P = softmax(Q Kᵀ · scale + mask)`` *before*
dropout. ``lse`` carries a gradient when an input needs one (``∂lse_i/∂s_ij = P_ij``: `attnlens.merge` and any
other user of the lse get exact gradients); every other field carries none. Shapes below are for rank-4 input ``(B, Hq, Nq, D)``; for
rank-3 input drop ``B``, for rank-2 input drop ``B`` and ``Hq``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Sequence, Union

import numpy as np
import torch

from .capabilities import LensField

RowsSpec = Union[None, str, slice, range, Sequence[int]]

#: the default of `Lens.max_bytes`: 8 GiB for the fields that grow as Nq · Nk (every weight of 32 heads of 8,192
#: tokens in float32). A request beyond it is refused before any work, naming the field and its size, instead of
#: failing in the allocator after the pass; ``Lens(..., max_bytes=None)`` (or a larger limit) allows it.
MAX_BYTES = 8 << 30


@dataclass(frozen=True)
class Lens:
    """A request for attention statistics, computed inside the attention pass in linear memory.

    Args:
        lse: natural log-sum-exp of each query's scaled, masked scores ``(B, Hq, Nq)``, the sink's
            logit included when the call has ``sinks``. ``softmax`` row i is ``exp(s_i - lse_i)``.
        max_weight: the largest weight of each query ``(B, Hq, Nq)``: 1 means the query copies
            one value row, ``1/Nk`` means it averages all of them.
        entropy: Shannon entropy of each query's weights in nats ``(B, Hq, Nq)``, in
            ``[0, log(number of visible keys)]``: low = focused, high = spread out. With ``sinks``, the
            entropy of the full distribution, the sink's weight included (``LensResult.sink_weight``, which
            every lens request gets when the call has sinks).
        received: column sums of the weights ``(B, Hq, Nk)``: how much attention key j receives
            from all queries together (the column view; heavy-hitter KV-cache eviction uses it).
            Summed over keys it equals the number of queries that see at least one key.
        topk: ``k > 0`` returns ``topk_indices`` and ``topk_weights`` ``(B, Hq, Nq, k)``: the k
            keys each query draws on most, largest first. Where a weight is exactly 0 (fewer
            than k visible keys, or k > Nk) its index is -1.
        rows: query rows whose full weight rows to return, ``weights (B, Hq, len(rows), Nk)``:
            a list of ints (negative counts from the end), a ``slice``/``range``, or ``"all"``
            (the whole n × n matrix — only ask for it when it fits in memory).
        received_from: query weights ``W`` (NumPy array or torch tensor, the call's kind) broadcastable
            to ``(B, Hq, Nq, T)``, or a ``(Nq,)`` vector (T = 1): returns ``received_from (B, Hq, Nk, T)``
            ``= Pᵀ W``, what each key receives from the queries weighted by ``W`` (``W = 1`` gives
            ``received``; a one-hot column gives one row of ``P``; a rollout row carried backwards through
            a layer is ``Pᵀ w``). Computed like the backward's ``dV = Pᵀ dO``: in the pass (torch), or by a
            column-sum pass after it from the pass's lse (Triton).
        at: integer key indices broadcastable to ``(B, Hq, Nq, m)`` (a ``(m,)`` vector: the same keys for
            every query): returns ``weights_at (B, Hq, Nq, m)`` ``= P[i, at[..., i, m]]``; ``-1`` means none
            (weight 0). Exact from the row's lse and the chosen pairs' dot products, O(Nq · m).
        pool: ``(bq, bk)`` block sizes: returns ``pooled (B, Hq, ⌈Nq/bq⌉, ⌈Nk/bk⌉)``, the sums of ``P`` over
            blocks of ``bq`` queries × ``bk`` keys (the last blocks may be shorter) — a thumbnail of the
            weights at any length. An int b means ``(b, b)``.
        max_bytes: the most memory the fields that can grow as Nq · Nk (``weights``, top-k, ``pooled``,
            ``weights_at``, ``received_from``) may take together in one call, checked from the shapes before any
            work; above it the call is a ValueError naming each field and its size. Default `MAX_BYTES` (8 GiB);
            ``None``: no limit.

    ``received_from`` and ``at`` compare by identity (two lenses are equal when they hold the same
    array objects), so a `Lens` stays hashable.
    """

    lse: bool = True
    max_weight: bool = True
    entropy: bool = True
    received: bool = True
    topk: int = 0
    rows: RowsSpec = None
    received_from: Any = field(default=None, compare=False)
    at: Any = field(default=None, compare=False)
    pool: Any = None
    max_bytes: Any = MAX_BYTES

    def __eq__(self, other):
        if not isinstance(other, Lens):
            return NotImplemented
        same = all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.compare)
        return same and self.received_from is other.received_from and self.at is other.at

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            val = getattr(self, f.name)
            if val == f.default if f.default is not None else val is None:
                continue
            shown = f"<{type(val).__name__} {tuple(val.shape)}>" if hasattr(val, "shape") else repr(val)
            parts.append(f"{f.name}={shown}")
        return "Lens(" + ", ".join(parts) + ")"

    def __post_init__(self):
        self._check_arrays()
        for name in ("lse", "max_weight", "entropy", "received"):
            val = getattr(self, name)
            if not isinstance(val, bool):
                raise TypeError(f"Lens.{name} must be a bool, got {type(val).__name__} {val!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, numbers.Integral):
            raise TypeError(f"Lens.topk must be an int >= 0, got {type(self.topk).__name__} {self.topk!r}")
        if self.topk < 0:
            raise ValueError(f"Lens.topk must be >= 0, got {self.topk}")
        mb = self.max_bytes
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, numbers.Integral) or mb < 0):
            raise TypeError(f"Lens.max_bytes must be an int >= 0 or None (no limit), got {type(mb).__name__} {mb!r}")
        rows = self.rows
        if rows is None or isinstance(rows, (slice, range)):
            return
        self._check_rows(rows)

    def _check_rows(self, rows):
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

    def _check_arrays(self):
        """``received_from`` float, ``at`` integer (NumPy or torch); ``pool`` as a pair of ints >= 1."""
        for name, want in (("received_from", "floating"), ("at", "integer")):
            a = getattr(self, name)
            if a is None:
                continue
            if not hasattr(a, "dtype") or not hasattr(a, "shape") or isinstance(a, (bool, numbers.Number)):
                raise TypeError(f"Lens.{name} must be a NumPy array or torch tensor, got {type(a).__name__}")
            kind = _dtype_kind(a)
            if kind != want:
                raise TypeError(f"Lens.{name} must have a {want} dtype, got {a.dtype}")
            if not 1 <= len(a.shape) <= 4:
                raise ValueError(f"Lens.{name} must have 1 to 4 dims, got shape {tuple(a.shape)}")
        pool = self.pool
        if pool is None:
            return
        pair = (pool, pool) if isinstance(pool, numbers.Integral) and not isinstance(pool, bool) else pool
        try:
            pair = tuple(pair)
        except TypeError:
            raise TypeError(f"Lens.pool must be an int or a pair (bq, bk) of ints >= 1, got {pool!r}") from None
        if len(pair) != 2 or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) for b in pair):
            raise TypeError(f"Lens.pool must be an int or a pair (bq, bk) of ints >= 1, got {pool!r}")
        if min(pair) < 1:
            raise ValueError(f"Lens.pool block sizes must be >= 1, got {pool!r}")
        object.__setattr__(self, "pool", (int(pair[0]), int(pair[1])))

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

    def requested(self) -> frozenset:
        """The `LensField` members this lens asks for (what a backend must compute to serve it)."""
        on = {LensField.LSE: self.lse, LensField.MAX_WEIGHT: self.max_weight, LensField.ENTROPY: self.entropy,
              LensField.RECEIVED: self.received, LensField.TOPK: bool(self.topk),
              LensField.ROWS: self.rows is not None, LensField.RECEIVED_FROM: self.received_from is not None,
              LensField.AT: self.at is not None, LensField.POOL: self.pool is not None}
        return frozenset(f for f, want in on.items() if want)


def _dtype_kind(a) -> str:
    """``"floating"``, ``"integer"`` or ``"other"`` for a NumPy array or torch tensor's dtype."""
    dt = a.dtype
    if isinstance(dt, torch.dtype):
        if dt.is_floating_point:
            return "floating"
        return "integer" if dt != torch.bool and not dt.is_complex else "other"
    if np.issubdtype(dt, np.floating):
        return "floating"
    return "integer" if np.issubdtype(dt, np.integer) else "other"


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
        received_from ``(B, Hq, Nk, T)``: ``Pᵀ W`` for ``Lens(received_from=W)``.
        weights_at ``(B, Hq, Nq, m)``: ``P[i, at[..., i, m]]`` for ``Lens(at=...)`` (0 where the index is -1).
        pooled ``(B, Hq, ⌈Nq/bq⌉, ⌈Nk/bk⌉)``: block sums of ``P`` for ``Lens(pool=(bq, bk))``.
        rows: the query indices of ``weights`` (non-negative), or ``None``.
        sink_weight ``(B, Hq, Nq)``: with ``attention(..., sinks=...)``, the weight of each row's sink,
            ``exp(sink - lse)`` (1 for a row that sees no key); ``None`` without sinks. The other fields
            then read as follows: ``lse`` includes the sink; ``max_weight``, ``received``, top-k and
            ``weights`` are over the real keys (a row sums to ``1 - sink_weight``); ``entropy`` is that of
            the full distribution, sink included.
    """

    lse: Any = None
    max_weight: Any = None
    entropy: Any = None
    received: Any = None
    topk_indices: Any = None
    topk_weights: Any = None
    weights: Any = None
    received_from: Any = None
    weights_at: Any = None
    pooled: Any = None
    rows: tuple[int, ...] | None = None
    sink_weight: Any = None

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


#: the array fields of a `LensResult` (``rows`` is a tuple of ints)
ARRAY_FIELDS = ("lse", "max_weight", "entropy", "received", "topk_indices", "topk_weights", "weights", "sink_weight",
                "received_from", "weights_at", "pooled")


class Merger:
    """The running merge of partial attention results over disjoint key sets, for the same queries.

    A part is attention over some keys only: ``out_b`` (rows are convex combinations of *its* values)
    and ``lse_b``. Over all keys, query i's weight on part b is ``w_b = exp(lse_b - lse)`` with
    ``lse = log Σ_b exp(lse_b)``, and::

        out        = Σ_b w_b · out_b
        max_weight = max_b w_b · max_weight_b
        entropy    = Σ_b w_b (H_b - log w_b)            (log w_b = lse_b - lse)
        top-k      = top-k of ∪_b w_b · topk_weights_b  (indices shifted by each part's key offset)
        weights    = w_b · weights_b, placed at the part's keys

    ``received`` cannot be merged: a key's column sum needs every query's *final* lse; compute it with
    the backend's column-sum primitive once the lse is known (ring attention does so in a second pass).
    Works in place on torch tensors in the compute dtype; query rows can be merged a range at a time.
    """

    def __init__(self, out_shape, nq: int, lens: "Lens | None", dtype, device, nk: int | None = None,
                 rows: "tuple | None" = None):
        lead = tuple(out_shape[:-2])  # (B, Hq)
        self.out = torch.zeros(out_shape, dtype=dtype, device=device)
        self.lse = torch.full(lead + (nq,), float("-inf"), dtype=dtype, device=device)
        want = lens if lens is not None else Lens(lse=True, max_weight=False, entropy=False, received=False)
        self.maxw = torch.zeros(lead + (nq,), dtype=dtype, device=device) if want.max_weight else None
        self.ent = torch.zeros(lead + (nq,), dtype=dtype, device=device) if want.entropy else None
        self.topk = want.topk
        if self.topk:
            self.tk_w = torch.zeros(lead + (nq, self.topk), dtype=dtype, device=device)
            self.tk_i = torch.full(lead + (nq, self.topk), -1, dtype=torch.int64, device=device)
        self.rows = rows
        self.wrows = None
        if rows is not None:
            if nk is None:
                raise ValueError("merging weight rows needs the total number of keys")
            self.wrows = torch.zeros(lead + (len(rows), nk), dtype=dtype, device=device)
            self._wparts: list = []  # (lse_b of the rows, weights_b, key offset), scaled once the lse is final

    def add(self, out, res: "LensResult", koff: int = 0, i0: int = 0, i1: int | None = None):
        """Fold one part (``out (..., n, Dv)``, its `LensResult` with ``lse``) into query rows ``[i0, i1)``."""
        i1 = self.lse.shape[-1] if i1 is None else i1
        cdt = self.lse.dtype
        l0, lb = self.lse[..., i0:i1], res.lse.to(cdt)
        # written so that gradients through out and lse stay finite on rows that see no key (both -inf): there
        # logaddexp and exp(l - lse) would give NaN gradients (0 · NaN)
        dead = torch.isneginf(l0) & torch.isneginf(lb)
        zero = torch.zeros((), dtype=cdt, device=lb.device)
        lse = torch.where(dead, float("-inf"), torch.logaddexp(torch.where(dead, zero, l0), torch.where(dead, zero, lb)))
        lse_s = torch.where(dead, zero, lse)
        wa = torch.exp(l0 - lse_s)  # share of what was merged so far (0 on dead rows)
        wb = torch.exp(lb - lse_s)  # share of this part
        if i0 == 0 and i1 == self.lse.shape[-1]:  # whole rows (`attnlens.merge`): functional, so differentiable
            self.out = self.out * wa[..., None] + out.to(cdt) * wb[..., None]
        else:  # a range of rows (ring attention, no autograd here): in place, no (rows, Dv) temporaries
            self.out[..., i0:i1, :].mul_(wa[..., None]).addcmul_(out.to(cdt), wb[..., None])
        l0, lb, lse, wa, wb = (x.detach() for x in (l0, lb, lse, wa, wb))  # the statistics carry no gradient
        if self.ent is not None:
            ha = torch.where(wa > 0, wa * (self.ent[..., i0:i1] - (l0 - lse)), zero)
            hb = torch.where(wb > 0, wb * (res.entropy.to(cdt) - (lb - lse)), zero)
            self.ent[..., i0:i1] = ha + hb
        if self.maxw is not None:
            self.maxw[..., i0:i1] = torch.maximum(wa * self.maxw[..., i0:i1], wb * res.max_weight.to(cdt))
        if self.topk:
            self._add_topk(i0, i1, wa, wb, res, koff)
        if self.wrows is not None:
            self._wparts.append((lb.detach()[..., list(self.rows)], res.weights.to(cdt), koff))
        if i0 == 0 and i1 == self.lse.shape[-1]:
            self.lse = torch.where(dead, float("-inf"), lse_s)  # keeps the gradient of the parts' lse
        else:
            self.lse[..., i0:i1] = lse

    def _add_topk(self, i0, i1, wa, wb, res, koff):
        ib = res.topk_indices
        w = torch.cat([self.tk_w[..., i0:i1, :] * wa[..., None], res.topk_weights.to(wa.dtype) * wb[..., None]], -1)
        idx = torch.cat([self.tk_i[..., i0:i1, :], torch.where(ib >= 0, ib + koff, ib)], -1)
        k = min(self.topk, w.shape[-1])
        w, pos = torch.topk(w, k, dim=-1, sorted=True)
        idx = torch.gather(idx, -1, pos)
        self.tk_w[..., i0:i1, :k] = w
        self.tk_i[..., i0:i1, :k] = torch.where(w > 0, idx, torch.full((), -1, dtype=torch.int64, device=idx.device))

    def result(self, lens: "Lens | None") -> "LensResult | None":
        """The merged `LensResult` with the fields ``lens`` asks for (``received`` stays ``None``)."""
        if lens is None:
            return None
        res = LensResult(lse=self.lse if lens.lse else None, max_weight=self.maxw,
                         entropy=None if self.ent is None else self.ent.clamp_(min=0))
        if self.topk:
            res.topk_weights, res.topk_indices = self.tk_w, self.tk_i
        if self.wrows is not None:
            lse_r = self.lse.detach()[..., list(self.rows)]
            zero = torch.zeros((), dtype=lse_r.dtype, device=lse_r.device)
            for lb, wb, koff in self._wparts:
                share = torch.where(lse_r > float("-inf"), torch.exp(lb - lse_r), zero)
                self.wrows[..., koff:koff + wb.shape[-1]] += wb * share[..., None]
            res.weights, res.rows = self.wrows, self.rows
        return res
