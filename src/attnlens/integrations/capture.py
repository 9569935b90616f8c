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
- a capture whose ``lens`` is ``None`` asks for no statistic: it adds no pass (with nobody else asking, the call
  runs on the fastest backend, e.g. PyTorch's fused SDPA) and gets ``record(call, None)`` — what `attnlens.kv`
  uses to compute what it needs from the call itself (a few rows, key norms);
- every watching capture gets ``record(call, result)`` with its own lens's result and the
  `attnlens.core.AttnCall`: the call's inputs (q, k, v, mask, flags), enough to recompute that layer
  with another lens later (``record.ask(lens)``, exact, through the block API).

`nn.capture` and `hf.capture` are thin layers: which modules they watch and what a record holds.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core import AttnCall, Lens, LensResult, attention

__all__ = ["AttnCall", "Record", "Recorder", "attend", "activate", "active"]


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
    """A capture: the ``lens`` it asks for (``None``: none; its `record` then gets ``result=None``), the modules it
    watches (``names``: module → qualified name) and its ``results`` in call order. Subclasses make the records
    (`record`)."""

    lens: Optional[Lens]
    results: list = field(default_factory=list)
    keep_inputs: bool = True
    names: dict = field(default_factory=dict, repr=False)

    def watches(self, module) -> bool:
        """Whether this capture records the calls of ``module``."""
        return module in self.names

    def record(self, call: AttnCall, result: Optional[LensResult]) -> None:
        """Record one call of a watched module (``attend`` calls it): append a record to ``results``. ``result`` is
        the `LensResult` of this capture's lens (``None`` when its lens is ``None``)."""
        raise NotImplementedError

    def kept(self, call: AttnCall) -> Optional[AttnCall]:
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
        if c.lens is not None and c.lens not in lenses:
            lenses.append(c.lens)
    kw = dict(mask=mask, causal=causal, window=window, scale=scale, softcap=softcap, sinks=sinks,
              alibi_slopes=alibi_slopes)
    if not lenses:
        out, first = attention(q, k, v, dropout_p=dropout_p, **kw), None
    else:
        out, first = attention(q, k, v, dropout_p=dropout_p, lens=lenses[0], **kw)
    if not caps:
        return out, first
    q, k, v = q.detach(), k.detach(), v.detach()
    kw = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}  # learned (T5 bias, sinks)
    results = [first] + [attention(q, k, v, dropout_p=0.0, lens=extra, **kw)[1] for extra in lenses[1:]]
    call = AttnCall(module, q, k, v, dropout_p=dropout_p, **kw)
    kept = [None if r is None else r.map_arrays(torch.Tensor.detach) for r in results]  # no autograd graph (lse's)
    for c in caps:
        c.record(call, None if c.lens is None else kept[lenses.index(c.lens)])
    return out, first
