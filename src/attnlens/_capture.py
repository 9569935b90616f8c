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

from .api import attention
from .lens import Lens, LensResult

__all__ = ["AttnCall", "Record", "Recorder", "attend", "activate", "active"]


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


@dataclass(frozen=True)
class Record:
    """One attention call seen by a capture: the module's qualified ``name``, the call ``index``
    (0, 1, ... in call order) and its ``result``."""

    name: str
    index: int
    result: LensResult


@dataclass
class Recorder:
    """A capture: the ``lens`` it asks for, the modules it watches (``_names``: module → qualified
    name) and its ``results`` in call order. Subclasses make the records (`_record`)."""

    lens: Lens
    results: list = field(default_factory=list)
    _names: dict = field(default_factory=dict, repr=False)

    def watches(self, module) -> bool:
        return module in self._names

    def _record(self, call: AttnCall, result: LensResult) -> None:
        raise NotImplementedError


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
