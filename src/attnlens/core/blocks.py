"""The block API: one checked block of attention and the backend that serves it — what every integration builds on.

A `Block` is one call of attention, checked once (shapes, dtypes, masks, flags, lens) and matched to a backend,
with the backend's block primitives (the seam of `attnlens.core.backends`) as its methods. On rank-4 torch tensors
``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``, query i at key position ``i + offset``::

    blk = Block.build(q, k, v, causal=True, lens=Lens(topk=8), primitives=True)
    out, lse, res = blk.forward()                 # (B, Hq, Nq, Dv), (B, Hq, Nq), LensResult | None; no autograd
    blk.backward(out, lse, dout, dq, dk, dv)      # adds the gradients into the caller's buffers, from lse
    blk.column_sums(lse, W)                       # Pᵀ W (B, Hq, Nk, T); received (B, Hq, Nk) without W
    blk.pair_weights(lse, qi, kj)                 # P[qi[p], kj[.., p]] (B, Hq, P): chosen weights, exact
    blk.weights_at(lse, idx)                      # P[i, idx[.., i, m]] (B, Hq, Nq, m)
    blk.rows(a, b)                                # queries [a, b) alone: same keys and rules, offset moved
    blk.derive(q=..., k=..., v=..., offset=...)   # other tensors under this block's rules and backend
    out, lse, res = blk.run()                     # forward, under the one autograd wrapper when a gradient is needed
    blk.finish(out, res)                          # back to the caller's rank and kind (NumPy in → NumPy out)

With a block's own lse these give its own statistics and gradients; ring attention and split-KV pass the *global*
lse of queries that also saw other keys and get the block's share of the global weights — which is how every
integration runs on whichever backend serves the call. Any single weight is ``P[i, j] = exp(s_ij − lse_i)``.

`AttnCall` keeps the arguments of one call (what a capture records, `attnlens.hf.capture` / `attnlens.nn.capture`)
and asks it again, exactly and in linear memory at any length: `AttnCall.ask`, `weights_at`, `weight_sums`,
`received_from`. `differentiable` is the one autograd wrapper (`Block.run` and ring attention use it).

**Writing an integration.** Build a `Block` (``primitives=True`` when you need more than the forward), call its
methods, return `Block.finish` of what you computed. `attnlens.attention` is ``Block.build(...).run()`` then
``finish``. Integrations and analysis import only the core's public API (`attnlens.core`: this module, `api`,
`lens`, `masks`) — never `attnlens.core.inputs`, `dispatch`, `scores` or a backend (tests/test_layers.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import dispatch, scores
from .backends import Backend
from .inputs import AttnInputs, stat_dtype, validate
from .lens import ARRAY_FIELDS, Lens, LensResult

__all__ = ["Block", "AttnCall", "differentiable", "PAIR_ELEMS", "POOL_COLUMNS"]

#: elements of the gathered keys one chunk of `AttnCall.weights_at` / `weight_sums` may hold (64 MiB of float32)
PAIR_ELEMS = 1 << 24
#: query blocks per column-sum pass when a backend's pooled map is made from column sums (bounds the (B, Hq, Nk, T)
#: buffer of one pass)
POOL_COLUMNS = 32


class Block:
    """One checked block of attention (``inputs``, rank-4 torch views) and the backend that serves it (``backend``).

    Make one with `Block.build` (checks the arguments and chooses the backend) or from another block with `derive` /
    `rows`. ``primitives``: the block was chosen for its block primitives (``backward``, ``column_sums``), so a
    backend without them (``sdpa``: output only) was passed over.
    """

    def __init__(self, inputs: AttnInputs, backend: Backend, primitives: bool = False):
        self.inputs, self.backend, self.primitives = inputs, backend, primitives

    @classmethod
    def build(cls, q, k, v, *, mask=None, causal=False, window=None, scale=None, offset=None, softcap=None,
              sinks=None, alibi_slopes=None, seqlens_q=None, seqlens_k=None, dropout_p=0.0, lens=None,
              backend="auto", primitives: bool = False) -> "Block":
        """Check one call (the arguments of `attnlens.attention`, which documents them) and choose its backend:
        ``backend="auto"`` takes the first that serves it (``attnlens.backends()`` order), a name or a backend
        object must serve it. ``primitives=True``: the caller needs ``backward`` / ``column_sums`` too.

        Raises:
            TypeError / ValueError naming the argument; ValueError listing the reasons when no backend serves it.
        """
        inp = validate(q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p, lens=lens,
                       offset=offset, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, seqlens_q=seqlens_q,
                       seqlens_k=seqlens_k)
        return cls(inp, dispatch.select(inp, backend, primitives=primitives), primitives)

    # ---- views of the call

    @property
    def shape(self) -> tuple:
        """``(B, Hq, Hkv, Nq, Nk, D, Dv)``."""
        return self.inputs.shape

    @property
    def lens(self) -> Optional[Lens]:
        return self.inputs.lens

    def derive(self, q=None, k=None, v=None, *, offset=None, lens=None, mask=None, seqlens_q=None,
               seqlens_k=None) -> "Block":
        """A block of other tensors (``None``: this block's) under this block's rules — causal, window, scale, score
        modifications, and ``mask`` unless given — and its backend, with ``offset`` (default: ``Nk − Nq`` of the new
        shapes) and ``lens``. Derived blocks have no dropout (re-asks describe the weights before dropout). A block of
        a padded batch keeps its per-sequence lengths unless ``seqlens_q`` / ``seqlens_k`` are given (``offset``:
        then None for each sequence's bottom-right, an int, or ``(B,)`` ints).

        The backend is not chosen again: the derived block has this block's dtype, device, head dims and flags, and
        its lens is checked against the backend's lens fields. Tensor values are not scanned again (a fused backend
        refuses NaN/inf inputs when a block is built)."""
        inp = self.inputs
        sl = inp.seqlens
        if sl is not None:
            seqlens_q = sl.q if seqlens_q is None else seqlens_q
            seqlens_k = sl.k if seqlens_k is None else seqlens_k
        new = validate(inp.q if q is None else q, inp.k if k is None else k, inp.v if v is None else v,
                       mask=inp.mask if mask is None else mask, causal=inp.causal, window=inp.window, scale=inp.scale,
                       offset=offset, softcap=inp.softcap, sinks=inp.sinks, alibi_slopes=inp.alibi_slopes, lens=lens,
                       seqlens_q=seqlens_q, seqlens_k=seqlens_k)
        if new.seqlens is not None and not self.backend.capabilities.seqlens:
            raise ValueError(f"backend {self.backend.name!r} has no per-sequence lengths (seqlens_q / seqlens_k), "
                             f"asked of a derived block")
        if lens is not None:
            missing = new.lens.requested() - self.backend.capabilities.lens
            if missing:
                raise ValueError(f"backend {self.backend.name!r} does not compute the lens fields "
                                 f"{sorted(str(f) for f in missing)} asked of a derived block")
        return Block(new, self.backend, self.primitives)

    def rows(self, a: int, b: int, lens=None) -> "Block":
        """Queries ``[a, b)`` alone: the same keys, mask rows and rules, ``offset`` moved so each query keeps its key
        position; this block's backend."""
        inp = self.inputs
        Nq = inp.shape[3]
        if not 0 <= a < b <= Nq:
            raise ValueError(f"rows: expected 0 <= a < b <= Nq={Nq}, got a={a}, b={b}")
        mask = inp.mask
        if mask is not None and mask.shape[2] == Nq and Nq > 1:
            mask = mask[:, :, a:b]  # a mask that varies along the queries
        sl = inp.seqlens
        if sl is not None:  # each sequence keeps its key positions; its queries past b - a are cut
            part = sl.rows(a, b)
            return self.derive(q=inp.q[:, :, a:b], offset=part.offset, lens=lens, mask=mask, seqlens_q=part.q,
                               seqlens_k=part.k)
        return self.derive(q=inp.q[:, :, a:b], offset=inp.offset + a, lens=lens, mask=mask)

    # ---- the block primitives

    def forward(self):
        """``(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) or None, LensResult or None)``, no autograd: the
        backend's pass, then the lens fields it left to the primitives — ``weights_at`` (`weights_at`: exact to the
        rounding of the lse, which loses ``log l`` for rows of scores near -1e30 in fp32, so the reference and torch
        backends gather it from their own weights instead), ``received_from`` (`column_sums`) and ``pooled`` (column
        sums of one-hot query blocks; a block longer than N is all of it). Exact, linear memory."""
        inp = self.inputs
        out, lse, res = self.backend.forward(inp)
        if res is None or not self.backend.capabilities.block:
            return out, lse, res
        if inp.at is not None and res.weights_at is None:
            res.weights_at = self.weights_at(lse, inp.at)
        if inp.received_from is not None and res.received_from is None:
            res.received_from = self.column_sums(lse, inp.received_from)
        if inp.lens.pool is not None and res.pooled is None:
            res.pooled = self._pooled(lse)
        return out, lse, res

    def backward(self, out, lse, dout, dq, dk, dv, dsinks=None, dlse=None) -> None:
        """Add the block's gradients into ``dq (B, Hq, Nq, D)``, ``dk (B, Hkv, Nk, D)``, ``dv (B, Hkv, Nk, Dv)`` (and
        ``dsinks``, the shape of the call's sinks), recomputing the weights from ``lse``; ``D_i = rowsum(dout ∘ out)``
        from ``out`` (the final output when the block is part of a longer row). ``dlse (B, Hq, Nq)``: the gradient
        of the lse itself, if the caller used it (``∂lse_i/∂s_ij = P_ij``: it folds into ``D_i - dlse_i``)."""
        self._need_primitives("backward")
        self.backend.backward(self.inputs, out, lse, dout, dq, dk, dv, dsinks=dsinks, dlse=dlse)

    def gradients(self, out, lse, dout, dlse=None) -> tuple:
        """``(dq, dk, dv)`` (and ``dsinks`` when the call has sinks) in the inputs' dtypes, from fresh buffers in the
        statistics dtype: what `differentiable` asks of its op. ``dlse``: the lse's gradient, or None."""
        inp = self.inputs
        cdt = stat_dtype(inp.q.dtype)
        ts = (inp.q, inp.k, inp.v) if inp.sinks is None else (inp.q, inp.k, inp.v, inp.sinks)
        grads = [torch.zeros(t.shape, dtype=cdt, device=t.device) for t in ts]
        self.backward(out, lse, dout, *grads[:3], dsinks=grads[3] if len(grads) > 3 else None, dlse=dlse)
        return tuple(g.to(t.dtype) for g, t in zip(grads, ts))

    def column_sums(self, lse, weights=None):
        """``Σ_i exp(s_ij − lse_i) · W_i``: ``(B, Hq, Nk)`` without ``weights`` (``received`` for the block's own
        lse); with ``weights`` (torch, broadcastable to ``(B, Hq, Nq, T)``, or a ``(Nq,)`` vector: T = 1),
        ``Pᵀ W (B, Hq, Nk, T)``. Rows with ``lse = -inf`` contribute 0."""
        self._need_primitives("column_sums")
        inp = self.inputs
        if weights is not None:
            weights = self._query_weights(weights)
        return self.backend.column_sums(inp, lse, weights)

    def pair_weights(self, lse, qi, kj):
        """``P[qi[p], kj[b, h, p]]`` ``(B, Hq, P)`` from ``lse (B, Hq, Nq)``: ``exp(s − lse)`` for a flat list of pairs
        (``qi (P,)`` in ``[0, Nq)``, ``kj`` broadcastable to ``(B, Hq, P)``; ``-1`` = none), 0 where the pair is not
        visible. Exact; O(P · D) memory (chunk the pairs). Any backend: the scores are formed here under the call's
        rules (`attnlens.core.scores`)."""
        return scores.flat_pair_weights(self.inputs, qi, kj, lse)

    def weights_at(self, lse, idx):
        """``P[i, idx[b, h, i, m]]`` ``(B, Hq, Nq, m)`` from ``lse``: ``idx`` int, broadcastable to ``(B, Hq, Nq, m)``,
        ``-1`` = none (weight 0). O(Nq · m · D) memory; `AttnCall.weights_at` chunks long inputs."""
        return scores.pair_weights(self.inputs, idx, lse)

    # ---- running it

    def run(self):
        """`forward`, under the one autograd wrapper (`differentiable`) when an input needs a gradient and the backend
        has block primitives (``sdpa`` differentiates through PyTorch's own autograd): ``(out, lse, res)``."""
        inp = self.inputs
        if inp.requires_grad and self.backend.capabilities.block:
            return differentiable(self, inp.q, inp.k, inp.v, sinks=inp.sinks)
        return self.forward()

    def finish(self, out, res=None):
        """``out`` (and ``res``) back to the caller's rank and kind: NumPy in → NumPy out; lens fields detached.
        Returns ``out`` when the call has no lens, else ``(out, LensResult)``."""
        inp = self.inputs
        lead = 4 - inp.rank  # leading unit dims added by validate()

        keep = out, (None if res is None else res.lse)  # the output and the lse carry gradients; other fields none

        def back(t):
            t = t.detach() if isinstance(t, torch.Tensor) and all(t is not x for x in keep) else t
            t = t.reshape(t.shape[lead:])
            return t.cpu().numpy() if inp.numpy_io else t

        out = back(out)
        if inp.lens is None:
            return out
        return out, res.map_arrays(back)

    # ---- helpers

    def _need_primitives(self, what: str) -> None:
        if not self.backend.capabilities.block:
            raise ValueError(f"Block.{what}: backend {self.backend.name!r} has {dispatch.NO_PRIMITIVES}; build the "
                             f"block with primitives=True")

    def _query_weights(self, w) -> torch.Tensor:
        """Query weights as ``(B|1, Hq|1, Nq, T)`` in the statistics dtype on the block's device."""
        inp = self.inputs
        B, Hq, _, Nq, _, _, _ = inp.shape
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights must be a torch tensor, got {type(w).__name__}")
        w = w.detach().to(device=inp.q.device, dtype=stat_dtype(inp.q.dtype))
        w = w[:, None] if w.ndim == 1 else w
        dims = tuple(w.shape[:-1])
        if not 1 <= len(dims) <= 3 or dims[-1] != Nq or any(d not in (1, n) for d, n in zip(dims[::-1], (Nq, Hq, B))):
            raise ValueError(f"weights of shape {tuple(w.shape)} do not broadcast to (B={B}, Hq={Hq}, Nq={Nq}, T) "
                             f"(a (Nq,) vector means T = 1)")
        return w.reshape((1,) * (4 - w.ndim) + tuple(w.shape))

    def _pooled(self, lse) -> torch.Tensor:
        """``pooled (B, Hq, ⌈Nq/bq⌉, ⌈Nk/bk⌉)`` = block sums of ``P``, from `column_sums` with ``W`` the one-hot of the
        query blocks (``POOL_COLUMNS`` blocks per pass), then summed over key blocks."""
        inp = self.inputs
        _, _, _, Nq, Nk, _, _ = inp.shape
        bq, bk = (max(1, min(b, n)) for b, n in zip(inp.lens.pool, (Nq, Nk)))  # a block longer than N: all of it
        nbq, nbk = -(-Nq // bq), -(-Nk // bk)
        blk = torch.arange(Nq, device=inp.q.device) // bq  # (Nq,): each query's block
        parts = []
        for c0 in range(0, nbq, POOL_COLUMNS):
            cols = torch.arange(c0, min(nbq, c0 + POOL_COLUMNS), device=blk.device)
            w = (blk[:, None] == cols[None, :]).to(stat_dtype(inp.q.dtype))[None, None]  # (1, 1, Nq, T)
            cs = self.backend.column_sums(inp, lse, w)  # (B, Hq, Nk, T)
            if nbk * bk != Nk:
                cs = torch.nn.functional.pad(cs.movedim(2, -1), (0, nbk * bk - Nk)).movedim(-1, 2)
            parts.append(cs.unflatten(2, (nbk, bk)).sum(3).transpose(-1, -2))  # (B, Hq, T, nbk)
        return torch.cat(parts, dim=2)

    def __repr__(self) -> str:
        return f"<attnlens Block {dispatch.describe(self.inputs)} on {self.backend.name!r}>"


# ---------------------------------------------------------------------------------------------
# the one autograd wrapper


class _Differentiable(torch.autograd.Function):
    """Forward: ``op.forward() -> (out, lse, LensResult | None)``; backward: ``op.gradients(out, lse, dout, dlse)`` ->
    ``(dq, dk, dv)``, or ``(dq, dk, dv, dsinks)`` when ``sinks`` is given. ``out`` and ``lse`` are differentiable
    (``dlse`` is None when the lse was not used); the other lens fields are non-differentiable outputs."""

    @staticmethod
    def forward(ctx, op, q, k, v, sinks):
        out, lse, res = op.forward()
        stats = [None if res is None or f == "lse" else getattr(res, f) for f in ARRAY_FIELDS]  # lse: returned once
        ctx.op, ctx.has_sinks = op, sinks is not None
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(*[s for s in stats if s is not None])
        ctx.set_materialize_grads(False)
        wants_lse = res is not None and res.lse is not None
        return (out, lse, res is not None, None if res is None else res.rows, wants_lse, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse, *_):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()  # only the lse was used
        grads = ctx.op.gradients(out, lse, dout, dlse)
        return (None, *grads) if ctx.has_sinks else (None, *grads, None)


def differentiable(op, q, k, v, sinks=None):
    """Run ``op`` under autograd with respect to ``q, k, v`` (and ``sinks``): ``(out, lse, LensResult | None)``.

    ``op`` has ``forward() -> (out, lse, LensResult | None)`` and ``gradients(out, lse, dout, dlse) -> (dq, dk, dv)``,
    with ``dsinks`` last when ``sinks`` is given: a `Block` (`Block.run`), or ring attention's passes. ``out`` and
    ``lse`` (also as ``LensResult.lse``) carry gradients — ``∂lse_i/∂s_ij = P_ij``, so whoever combines blocks
    through their lse (`attnlens.merge`) gets exact gradients; the other lens fields carry none."""
    out, lse, has_res, rows, wants_lse, *stats = _Differentiable.apply(op, q, k, v, sinks)
    res = None
    if has_res:
        res = LensResult(**dict(zip(ARRAY_FIELDS, stats)), rows=rows)
        res.lse = lse if wants_lse else None
    return out, lse, res


# ---------------------------------------------------------------------------------------------
# a recorded call, asked again


@dataclass(frozen=True)
class AttnCall:
    """The arguments of one attention call (detached rank-4 torch tensors), kept to ask it again exactly.

    ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``; ``mask``, ``causal``, ``window``, ``scale``,
    ``softcap``, ``sinks``, ``alibi_slopes`` and ``dropout_p`` as passed to `attnlens.attention` (default offset:
    bottom-right). ``module``: the object that made the call (the attention module a capture watched), or None.
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

    def block(self, lens=None, *, batch: Optional[int] = None, backend="auto", primitives: bool = False) -> Block:
        """This call (or sequence ``batch`` of it) as a `Block` with ``lens``, without dropout."""
        call = self if batch is None else self.select(batch)
        return Block.build(call.q, call.k, call.v, lens=lens, backend=backend, primitives=primitives,
                           **call.options())

    def ask(self, lens, *, batch: Optional[int] = None, backend="auto") -> LensResult:
        """This call's attention again, without dropout, with ``lens``: its `LensResult` (rank-4 torch)."""
        lens = Lens.coerce(lens)
        if lens is None:
            raise TypeError("ask: lens must be True or an attnlens.Lens")
        with torch.no_grad():
            return self.block(lens, batch=batch, backend=backend).forward()[2]

    def lse(self, *, batch: Optional[int] = None) -> torch.Tensor:
        """``(B, Hq, Nq)``: the call's log-sum-exp (one lse-only pass)."""
        return self.ask(Lens(max_weight=False, entropy=False, received=False), batch=batch).lse

    def weights_at(self, idx: torch.Tensor, *, lse: Optional[torch.Tensor] = None, batch: Optional[int] = None,
                   max_elems: int = PAIR_ELEMS) -> torch.Tensor:
        """``P[i, idx[..., i, m]]`` ``(B, Hq, Nq, m)``, exact: ``Lens(at=idx)`` for this call. ``lse (B, Hq, Nq)``: the
        call's lse if known (else one lse-only pass). ``-1`` = none (weight 0). Only the pairs some head uses are
        computed (`pairs`: key sets of very different sizes cost the sum of their sizes), in chunks of pairs whose
        gathered rows (``pairs · B · Hq · D`` elements) stay under ``max_elems``."""
        call = self if batch is None else self.select(batch)
        lse = call.lse() if lse is None else lse
        B, Hq, Nq, _ = call.q.shape
        w = torch.zeros(B, Hq, Nq, idx.shape[-1], dtype=lse.dtype, device=lse.device)
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
        ``(B, Hq, Nq, m)``, ``-1`` = none) that some head uses, in query order:
        ``w (B, Hq, P) = P[qi, idx[.., qi, col]]`` (`Block.pair_weights` of the chunk's rows), at most
        ``max_elems // (B · Hq · D)`` pairs a chunk (one or more)."""
        B, Hq, Nq, D = self.q.shape
        idx4 = idx.reshape((1,) * (4 - idx.ndim) + tuple(idx.shape)).to(self.q.device, torch.int64)
        idx4 = idx4.expand(idx4.shape[0], idx4.shape[1], Nq, idx4.shape[3])
        qi, col = torch.nonzero((idx4 >= 0).any(0).any(0), as_tuple=True)  # (P,) each: row-major, queries ascending
        if qi.numel() == 0:
            return
        whole = self.block()  # the rules of the call; pair weights need no backend primitive
        step = max(1, max_elems // max(1, B * Hq * D))
        for a in range(0, qi.shape[0], step):
            q_, c_ = qi[a:a + step], col[a:a + step]
            i0, i1 = int(q_[0]), int(q_[-1]) + 1  # the queries of this chunk: rows [i0, i1)
            kj = idx4[:, :, q_, c_]  # (B|1, Hq|1, p)
            yield q_, c_, whole.rows(i0, i1).pair_weights(lse[..., i0:i1], q_ - i0, kj)

    def received_from(self, W: torch.Tensor, *, lse: Optional[torch.Tensor] = None, batch: Optional[int] = None,
                      backend="auto") -> torch.Tensor:
        """``Pᵀ W`` ``(B, Hq, Nk, T)`` for query weights ``W`` broadcastable to ``(B, Hq, Nq, T)`` (or a ``(Nq,)``
        vector): ``Lens(received_from=W)`` for this call, from its ``lse`` (else one lse-only pass) by the serving
        backend's column-sum primitive — one pass over only the queries from the first to the last whose row of
        ``W`` is not zero."""
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
        rows = call.block(backend=backend, primitives=True).rows(a, b)
        return rows.column_sums(lse[..., a:b], W4[:, :, a:b])

