"""The one capture mechanism behind `attnlens.nn.capture` and `attnlens.hf.capture`.

A capture (a `Recorder`) watches some modules and asks for one `Lens`. While its ``with`` block
is open it sits on a stack held in a ``contextvars.ContextVar`` (innermost last): restored on
exit, also when the block raises, and invisible to other threads and asyncio tasks.

An attention module computes attention through `attend` instead of calling `attnlens.attention`
itself::

    out, first = attend(module, q, k, v, lens=caller_lens, mask=..., causal=..., window=...,
                        scale=..., dropout_p=...)

- one ``attention(q, k, v, ..., dropout_p, lens=lenses[0])`` call gives the output (with
  gradients) and the first lens asked: the caller's, else the first watching capture's;
- each other lens the watching captures ask for costs one more lens-only call on detached inputs,
  without dropout (a lens describes the weights before dropout);
- every watching capture gets ``_record(call, result)`` with its own lens's result and the
  `AttnCall`: the call's inputs (q, k, v, mask, flags), enough to recompute that layer with
  another lens later (``record.ask(lens)``).

`nn.capture` and `hf.capture` are thin layers: which modules they watch and what a record holds.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ._inputs import validate
from ._scores import flat_pair_weights
from . import dispatch
from .api import attention
from .lens import Lens, LensResult

__all__ = ["AttnCall", "Record", "Recorder", "attend", "activate", "active"]

#: elements of the gathered keys one chunk of `AttnCall.weights_at` may hold (64 MiB of float32)
PAIR_ELEMS = 1 << 24


@dataclass(frozen=True)
class AttnCall:
    """The inputs of one attention call of ``module``, as `attnlens.attention` got them (detached).

    ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``; ``mask``, ``causal``,
    ``window``, ``scale``, ``softcap``, ``sinks``, ``alibi_slopes`` and ``dropout_p`` as passed to
    `attnlens.attention`.
    """

    module: Any
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor] = None
    causal: bool = False
    window: Any = None
    scale: Optional[float] = None
    dropout_p: float = 0.0
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None

    def options(self) -> dict:
        """The keyword arguments that recompute this call's weights: mask, causal, window, scale and the score
        modifications (softcap, sinks, alibi_slopes)."""
        return dict(mask=self.mask, causal=self.causal, window=self.window, scale=self.scale, softcap=self.softcap,
                    sinks=self.sinks, alibi_slopes=self.alibi_slopes)

    def select(self, batch: int) -> "AttnCall":
        """The call restricted to sequence ``batch`` (batch dim kept, of size 1; a broadcast mask stays as is)."""
        B = self.q.shape[0]
        if not -B <= batch < B:
            raise ValueError(f"batch={batch} is out of range for a call of batch size {B}")
        sl = slice(batch % B, batch % B + 1)
        mask = self.mask
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[0] > 1:
            mask = mask[sl]
        sinks, alibi = ((x[sl] if isinstance(x, torch.Tensor) and x.ndim == 2 and x.shape[0] > 1 else x)
                        for x in (self.sinks, self.alibi_slopes))  # per-sequence (B, Hq) values: this sequence's
        return AttnCall(self.module, self.q[sl], self.k[sl], self.v[sl], mask=mask, causal=self.causal,
                        window=self.window, scale=self.scale, dropout_p=self.dropout_p, softcap=self.softcap,
                        sinks=sinks, alibi_slopes=alibi)

    def ask(self, lens: Lens, *, batch: Optional[int] = None, backend="auto") -> LensResult:
        """This call's attention again, without dropout, with ``lens``: its `LensResult` (rank-4 torch)."""
        call = self if batch is None else self.select(batch)
        lens = Lens.coerce(lens)
        if lens is None:
            raise TypeError("ask: lens must be True or an attnlens.Lens")
        with torch.no_grad():
            return attention(call.q, call.k, call.v, lens=lens, backend=backend, **call.options())[1]

    def rows_inputs(self, a: int, b: int, lens: Optional[Lens] = None):
        """Checked inputs (`AttnInputs`) of queries ``[a, b)`` alone: same keys, mask rows, flags and score
        modifications (softcap, sinks, ALiBi); ``offset`` moved so each query keeps its key position."""
        Nq, Nk = self.q.shape[2], self.k.shape[2]
        mask = self.mask
        if isinstance(mask, torch.Tensor) and mask.ndim >= 2 and mask.shape[-2] == Nq:
            mask = mask[..., a:b, :]  # a mask that varies along the queries
        return validate(self.q[:, :, a:b], self.k, self.v, mask=mask, causal=self.causal, window=self.window,
                        scale=self.scale, offset=Nk - Nq + a, lens=lens, softcap=self.softcap, sinks=self.sinks,
                        alibi_slopes=self.alibi_slopes)

    def lse(self) -> torch.Tensor:
        """``(B, Hq, Nq)``: the call's log-sum-exp (one lse-only pass)."""
        return self.ask(Lens(max_weight=False, entropy=False, received=False)).lse

    def weights_at(self, idx: torch.Tensor, *, lse: Optional[torch.Tensor] = None, batch: Optional[int] = None,
                   max_elems: int = PAIR_ELEMS) -> torch.Tensor:
        """``P[i, idx[..., i, m]]`` ``(B, Hq, Nq, m)``, exact: ``Lens(at=idx)`` for this call. ``lse (B, Hq, Nq)``: the
        call's lse if known (else one lse-only pass). ``-1`` = none (weight 0). Only the pairs some head uses are
        computed (`pairs`: key sets of very different sizes cost the sum of their sizes), in chunks of pairs whose
        gathered rows (``pairs · B · Hq · D`` elements) stay under ``max_elems``."""
        call = self if batch is None else self.select(batch)
        lse = call.lse() if lse is None else lse
        B, Hq, Nq, _ = call.q.shape
        m = idx.shape[-1]
        w = torch.zeros(B, Hq, Nq, m, dtype=lse.dtype, device=lse.device)
        for qi, col, wp in call.pairs(idx, lse, max_elems):
            w[:, :, qi, col] = wp
        return w

    def weight_sums(self, idx: torch.Tensor, *, lse: Optional[torch.Tensor] = None, batch: Optional[int] = None,
                    max_elems: int = PAIR_ELEMS, dtype=torch.float64) -> torch.Tensor:
        """``Σ_m P[i, idx[..., i, m]]`` ``(B, Hq, Nq)`` in ``dtype``: `weights_at` summed over each query's key set,
        without the ``(B, Hq, Nq, m)`` array (linear memory in the number of pairs per chunk)."""
        call = self if batch is None else self.select(batch)
        lse = call.lse() if lse is None else lse
        B, Hq, Nq, _ = call.q.shape
        out = torch.zeros(B, Hq, Nq, dtype=dtype, device=lse.device)
        for qi, _, wp in call.pairs(idx, lse, max_elems):
            out.index_add_(2, qi, wp.to(dtype))
        return out

    def pairs(self, idx: torch.Tensor, lse: torch.Tensor, max_elems: int = PAIR_ELEMS):
        """Yield ``(qi, col, w)`` chunks over the pairs (query i, slot c) of ``idx`` (broadcastable to
        ``(B, Hq, Nq, m)``, ``-1`` = none) that some head uses, in query order: ``w (B, Hq, P) = P[qi, idx[.., qi, col]]``
        (`attnlens._scores.flat_pair_weights`), at most ``max_elems // (B · Hq · D)`` pairs a chunk (one or more)."""
        B, Hq, Nq, D = self.q.shape
        idx4 = idx.reshape((1,) * (4 - idx.ndim) + tuple(idx.shape)).to(self.q.device, torch.int64)
        idx4 = idx4.expand(idx4.shape[0], idx4.shape[1], Nq, idx4.shape[3])
        qi, col = torch.nonzero((idx4 >= 0).any(0).any(0), as_tuple=True)  # (P,) each: row-major, queries ascending
        step = max(1, max_elems // max(1, B * Hq * D))
        for a in range(0, qi.shape[0], step):
            q_, c_ = qi[a:a + step], col[a:a + step]
            i0, i1 = int(q_[0]), int(q_[-1]) + 1  # the queries of this chunk: rows [i0, i1)
            kj = idx4[:, :, q_, c_]  # (B|1, Hq|1, p)
            yield q_, c_, flat_pair_weights(self.rows_inputs(i0, i1), q_ - i0, kj, lse[..., i0:i1])

    def received_from(self, W: torch.Tensor, *, lse: Optional[torch.Tensor] = None, batch: Optional[int] = None,
                      backend="auto") -> torch.Tensor:
        """``Pᵀ W`` ``(B, Hq, Nk, T)`` for query weights ``W`` broadcastable to ``(B, Hq, Nq, T)``:
        ``Lens(received_from=W)`` for this call, from its ``lse`` (else one lse-only pass) by the serving backend's column-sum primitive —
        one pass over only the queries from the first to the last whose row of ``W`` is not zero."""
        call = self if batch is None else self.select(batch)
        lse = call.lse() if lse is None else lse
        W = W.to(call.q.device)
        W = W[:, None] if W.ndim == 1 else W  # a (Nq,) vector: T = 1
        W4 = W.reshape((1,) * (4 - W.ndim) + tuple(W.shape))
        live = torch.nonzero((W4 != 0).transpose(2, 3).flatten(0, 2).any(0)).flatten()
        B, Hq, Nq, _ = call.q.shape
        if live.numel() == 0:
            return torch.zeros(B, Hq, call.k.shape[2], W4.shape[-1], dtype=lse.dtype, device=lse.device)
        a, b = int(live[0]), int(live[-1]) + 1
        inp = call.rows_inputs(a, b, Lens(lse=False, max_weight=False, entropy=False, received=False,
                                          received_from=W4[:, :, a:b]))
        return dispatch.select(inp, backend).column_sums(inp, lse[..., a:b], inp.received_from)


@dataclass(frozen=True)
class Record:
    """One attention call seen by a capture: the module's qualified ``name``, the call ``index``
    (0, 1, ... in call order), its ``result`` and, unless the capture was made with ``keep_inputs=False``,
    the ``call``'s inputs (`AttnCall`), which `ask` recomputes."""

    name: str
    index: int
    result: LensResult
    call: Optional[AttnCall] = field(default=None, repr=False, compare=False)

    def ask(self, lens, *, batch: Optional[int] = None, backend="auto") -> LensResult:
        """Ask this layer again: its attention recomputed with a new `attnlens.Lens` (same q, k, v, mask, causal,
        window, scale and offset; no dropout), exact, in the layer's own memory (one attention pass, linear
        memory on the lens backends). ``batch``: only that sequence (the result keeps a batch dim of 1).

        >>> rec.ask(attnlens.Lens(received_from=w))      # what each key receives from the queries weighted by w
        >>> rec.ask(attnlens.Lens(rows=[5]))             # row 5 of the weights, at any length

        Needs the call's inputs: a capture made with ``keep_inputs=False`` raises ``ValueError``.
        """
        if self.call is None:
            raise ValueError(f"record {self.name!r} (call {self.index}) kept no inputs: capture with "
                             f"keep_inputs=True (the default) to ask it again")
        return self.call.ask(lens, batch=batch, backend=backend)


@dataclass
class Recorder:
    """A capture: the ``lens`` it asks for, the modules it watches (``_names``: module → qualified
    name) and its ``results`` in call order. Subclasses make the records (`_record`)."""

    lens: Lens
    results: list = field(default_factory=list)
    keep_inputs: bool = True
    _names: dict = field(default_factory=dict, repr=False)

    def watches(self, module) -> bool:
        return module in self._names

    def _record(self, call: AttnCall, result: LensResult) -> None:
        raise NotImplementedError

    def _kept(self, call: AttnCall) -> Optional[AttnCall]:
        """What a record keeps of the call: the call itself, or None with ``keep_inputs=False``."""
        return call if self.keep_inputs else None


#: the captures active in this context (innermost last); a thread or task has its own
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("attnlens_capture", default=())


def active() -> tuple:
    """The captures open in this context, innermost last."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(recorder: Recorder):
    """Put ``recorder`` on this context's stack for the block; take it off on exit, also on an exception."""
    token = _ACTIVE.set(_ACTIVE.get() + (recorder,))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def attend(module, q, k, v, *, lens: Optional[Lens] = None, mask=None, causal: bool = False, window=None,
           scale=None, dropout_p: float = 0.0, softcap=None, sinks=None, alibi_slopes=None):
    """`attnlens.attention` for ``module``, recorded by every active capture that watches it.

    ``lens`` is the caller's own request (an `attnlens.Lens` or None). Returns ``(out, first)``:
    ``out`` as `attnlens.attention` returns it, ``first`` the `LensResult` of the first lens computed
    (``lens`` when given, else the outermost watching capture's; None when nobody asked).
    """
    caps = [c for c in _ACTIVE.get() if c.watches(module)]
    lenses = [] if lens is None else [lens]
    for c in caps:
        if c.lens not in lenses:
            lenses.append(c.lens)
    kw = dict(mask=mask, causal=causal, window=window, scale=scale, softcap=softcap, sinks=sinks,
              alibi_slopes=alibi_slopes)
    if not lenses:
        return attention(q, k, v, dropout_p=dropout_p, **kw), None
    out, first = attention(q, k, v, dropout_p=dropout_p, lens=lenses[0], **kw)
    q, k, v = q.detach(), k.detach(), v.detach()
    kw = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}  # learned (T5 bias, sinks)
    results = [first] + [attention(q, k, v, dropout_p=0.0, lens=extra, **kw)[1] for extra in lenses[1:]]
    if caps:
        call = AttnCall(module, q, k, v, dropout_p=dropout_p, **kw)
        for c in caps:
            c._record(call, results[lenses.index(c.lens)])
    return out, first
