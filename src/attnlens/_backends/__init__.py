"""The block seam: one protocol every backend implements, and typed capabilities.

A backend computes attention of one block — queries ``q (B, Hq, Nq, D)`` against keys/values
``k, v (B, Hkv, Nk, ·)``, with query i at key position ``i + offset`` — through three primitives
on checked `AttnInputs` (rank-4 torch views):

    forward(inp)                               -> out (B, Hq, Nq, Dv) in q's dtype,
                                                  lse (B, Hq, Nq) in the statistics dtype,
                                                  LensResult (rank-4 torch) or None
    backward(inp, out, lse, dout, dq, dk, dv)  -> None: *adds* the gradients into caller-owned
                                                  buffers (any float dtype, strided views allowed),
                                                  recomputing the weights from the saved lse
    column_sums(inp, lse, weights=None)        -> Σ_i exp(s_ij - lse_i) · W_i: (B, Hq, Nk) for W = 1
                                                  (``received``), (B, Hq, Nk, T) for W (B, Hq, Nq, T)

The lens fields that follow from the lse — ``received_from`` (``Pᵀ W``), ``weights_at`` (``P`` at chosen keys)
and ``pooled`` (block sums of ``P``) — a backend may compute in its pass (reference, torch) or leave ``None``:
`finish_lens` fills them from ``column_sums`` and `attnlens._scores.pair_weights` after the forward (triton).

With the block's own lse these give its own statistics and gradients; ring attention and split-KV
pass the *global* lse of queries that also saw other keys, and get the block's share of the global
weights — which is what lets every integration run on whichever backend serves the call.

`Capabilities` declare what a backend supports; `Backend.not_supported_reasons` derives the generic
reasons from them (one place), plus what only the backend knows (``extra_reasons``). Dispatch,
``attnlens.backends()``, ``attnlens info`` and the CLI all read the same objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._inputs import FLOAT_DTYPES, AttnInputs, stat_dtype
from .._scores import pair_weights

#: lens fields a request may ask for (`Lens` flags and the top-k / rows / received_from / at / pool options)
LENS_FIELDS = ("lse", "max_weight", "entropy", "received", "topk", "rows", "received_from", "at", "pool")
#: mask features: "bool", "float" (additive), "query" (varies along the queries: not a key mask),
#: "float_grad" (a gradient with respect to a float mask)
MASK_FEATURES = ("bool", "float", "query", "float_grad")
#: score modifications (``AttnInputs.score_mods``): logit soft-capping, attention sinks, ALiBi
SCORE_MODS = ("softcap", "sinks", "alibi")
_SCORE_MOD_NAMES = {"softcap": "logit soft-capping (softcap)", "sinks": "attention sinks (sinks)",
                    "alibi": "ALiBi (alibi_slopes)"}


def requested_fields(inp: AttnInputs) -> list[str]:
    """The `LENS_FIELDS` the call asks for."""
    lens = inp.lens
    if lens is None:
        return []
    want = [f for f in ("lse", "max_weight", "entropy", "received") if getattr(lens, f)]
    if lens.topk:
        want.append("topk")
    want += [f for f in ("rows", "received_from", "at", "pool") if getattr(lens, f) is not None]
    return want


def finish_lens(backend: "Backend", inp: AttnInputs, lse, res):
    """Fill the fields of ``res`` the backend's own pass did not, from the block primitives and the pass's ``lse``:

    - ``weights_at`` = ``exp(s_i,idx - lse_i)`` from `attnlens._scores.pair_weights` (O(Nq · m); exact to the
      rounding of the lse, which loses ``log l`` for rows of scores near -1e30 in fp32: the reference and torch
      backends gather it from their own weights instead);
    - ``received_from`` = ``backend.column_sums(inp, lse, W)`` (``Pᵀ W``);
    - ``pooled`` = block sums of ``P`` through ``column_sums`` with ``W`` = one-hot of the query blocks, summed
      over key blocks (`pooled_from_columns`). Linear memory, exact.
    """
    if res is None:
        return None
    if inp.at is not None and res.weights_at is None:
        res.weights_at = pair_weights(inp, inp.at, lse)
    if inp.received_from is not None and res.received_from is None:
        res.received_from = backend.column_sums(inp, lse, inp.received_from)
    if inp.lens.pool is not None and res.pooled is None:
        res.pooled = pooled_from_columns(backend, inp, lse)
    return res


#: query blocks per column-sum pass of `pooled_from_columns` (bounds its (B, Hq, Nk, T) buffer)
POOL_COLUMNS = 32


def block_sums(x: torch.Tensor, b: int, dim: int) -> torch.Tensor:
    """Sums of ``x`` over consecutive blocks of ``b`` along ``dim`` (the last block may be shorter). A block longer
    than the dim is one block of all of it (no padding to ``b``: ``Lens(pool=(1, 2**40))`` is the row sums)."""
    n = x.shape[dim]
    b = max(1, min(b, n))
    nb = -(-n // b)
    x = x.movedim(dim, -1)
    if nb * b != n:
        x = torch.nn.functional.pad(x, (0, nb * b - n))
    return x.unflatten(-1, (nb, b)).sum(-1).movedim(-1, dim)


def pooled_from_columns(backend: "Backend", inp: AttnInputs, lse) -> torch.Tensor:
    """``pooled (B, Hq, ⌈Nq/bq⌉, ⌈Nk/bk⌉)`` = block sums of ``P``, from ``column_sums`` with ``W`` the one-hot
    of the query blocks (``POOL_COLUMNS`` blocks per pass), then sums over key blocks."""
    B, Hq, _, Nq, Nk, _, _ = inp.shape
    bq, bk = inp.lens.pool
    nbq = -(-Nq // bq)
    blk = torch.arange(Nq, device=inp.q.device) // bq  # (Nq,): each query's block
    parts = []
    for c0 in range(0, nbq, POOL_COLUMNS):
        cols = torch.arange(c0, min(nbq, c0 + POOL_COLUMNS), device=blk.device)
        w = (blk[:, None] == cols[None, :]).to(stat_dtype(inp.q.dtype))[None, None]  # (1, 1, Nq, T)
        cs = backend.column_sums(inp, lse, w)  # (B, Hq, Nk, T)
        parts.append(block_sums(cs, bk, 2).transpose(-1, -2))  # (B, Hq, T, nbk)
    return torch.cat(parts, dim=2)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve. Every field is data; `describe` renders it for people.

    Attributes:
        devices: torch device types it runs on (``None``: any device torch has).
        dtypes: input dtypes it takes.
        max_head_dim: largest D / Dv (``None``: any).
        lens: the lens fields (`LENS_FIELDS`) it computes inside its pass; empty: output only.
        max_topk: largest ``Lens.topk`` (``None``: any).
        masks: the mask features (`MASK_FEATURES`) it takes.
        score_mods: the score modifications (`SCORE_MODS`) it applies.
        dropout: applies dropout.
        backward: gradients (through the block primitive, or PyTorch's own autograd when ``block`` is False).
        block: implements the block primitives (forward with lse, backward into buffers, column sums).
        column_weights: ``column_sums`` takes per-query weights W.
        memory: extra memory of a call beyond inputs and outputs: ``"O(N)"`` (linear in the sequence),
            ``"O(chunk·Nk)"`` (a bounded workspace) or ``"O(Nq·Nk)"`` (dense) — `Backend.memory` says
            which for a given call.
        notes: one line for people (``attnlens info``).
    """

    devices: Optional[frozenset] = None
    dtypes: frozenset = frozenset(FLOAT_DTYPES)
    max_head_dim: Optional[int] = None
    lens: frozenset = frozenset(LENS_FIELDS)
    max_topk: Optional[int] = None
    masks: frozenset = frozenset(MASK_FEATURES)
    score_mods: frozenset = frozenset(SCORE_MODS)
    dropout: bool = True
    backward: bool = True
    block: bool = True
    column_weights: bool = True
    memory: str = "O(N)"
    notes: str = ""

    def describe(self) -> dict:
        """The capabilities as short strings, for tables (``attnlens info``)."""
        dts = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
        lens = "no" if not self.lens else ("yes" if self.max_topk is None else f"yes (top-k <= {self.max_topk})")
        grad = "no" if not self.backward else ("yes" if self.block else "yes (PyTorch autograd)")
        return {"lens": lens, "grad": grad, "dropout": "yes" if self.dropout else "no",
                "dtypes": ", ".join(dts[d] for d in FLOAT_DTYPES if d in self.dtypes),
                "devices": "any" if self.devices is None else ", ".join(sorted(self.devices)),
                "masks": ", ".join(m for m in MASK_FEATURES if m in self.masks) or "none",
                "score mods": ", ".join(m for m in SCORE_MODS if m in self.score_mods) or "none",
                "head dims": "any" if self.max_head_dim is None else f"<= {self.max_head_dim}",
                "memory": self.memory}


class Backend:
    """One way to compute attention: typed `capabilities` and the block primitives.

    Subclasses set ``name``, ``description``, ``capabilities``, implement `forward` (and `backward`,
    `column_sums` when ``capabilities.block``), and may add `extra_reasons` / `memory`.
    """

    name: str = ""
    description: str = ""
    capabilities: Capabilities = Capabilities()

    # ---- what it can serve

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        """Why this backend cannot serve the call (empty: it can): the capabilities, then `extra_reasons`."""
        c = self.capabilities
        reasons = self._device_reasons(inp)
        if inp.q.dtype not in c.dtypes:
            reasons.append(f"dtype {inp.q.dtype}: takes {self._dtypes()}")
        B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
        if c.max_head_dim is not None and max(D, Dv) > c.max_head_dim:
            reasons.append(f"head dim D={D}, Dv={Dv}: takes head dims up to {c.max_head_dim}")
        reasons += self._mask_reasons(inp)
        reasons += [f"{_SCORE_MOD_NAMES[m]} is not supported" for m in SCORE_MODS
                    if m in inp.score_mods and m not in c.score_mods]
        if inp.dropout_p > 0 and not c.dropout:
            reasons.append(f"dropout_p={inp.dropout_p}: no dropout")
        missing = [f for f in requested_fields(inp) if f not in c.lens]
        if missing:
            reasons.append("no lens" if not c.lens else f"lens fields {missing} are not computed")
        if inp.lens is not None and inp.lens.topk and c.max_topk is not None and inp.lens.topk > c.max_topk:
            reasons.append(f"Lens.topk={inp.lens.topk}: keeps at most {c.max_topk} per query")
        if inp.requires_grad and not c.backward:
            reasons.append("no gradients")
        return reasons + self.extra_reasons(inp, reasons)

    def _device_reasons(self, inp: AttnInputs) -> list[str]:
        c = self.capabilities
        if c.devices is not None and inp.q.device.type not in c.devices:
            return [f"tensors on {inp.q.device}: runs on {', '.join(sorted(c.devices))}"]
        return []

    def _mask_reasons(self, inp: AttnInputs) -> list[str]:
        m, c = inp.mask, self.capabilities
        if m is None:
            return []
        out = []
        kind = "bool" if m.dtype == torch.bool else "float"
        if kind not in c.masks:
            out.append(f"{kind} masks are not supported")
        if m.shape[2] != 1 and "query" not in c.masks:
            out.append(f"mask of shape {tuple(m.shape)} (as rank 4) varies along the queries: only key masks "
                       f"(B|1, H|1, 1, Nk), e.g. key padding, are supported")
        if kind == "float" and m.requires_grad and torch.is_grad_enabled() and "float_grad" not in c.masks:
            out.append("no gradient with respect to a float mask")
        return out

    def _dtypes(self) -> str:
        return ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES if d in self.capabilities.dtypes)

    def extra_reasons(self, inp: AttnInputs, reasons: list[str]) -> list[str]:
        """Reasons only the backend can judge (``reasons``: the capability reasons found so far)."""
        return []

    def auto_reasons(self, inp: AttnInputs) -> list[str]:
        """Why ``backend="auto"`` should pass over this backend although it could serve the call when
        named (e.g. a slow test mode). Empty by default."""
        return []

    def memory(self, inp: AttnInputs) -> str:
        """The extra memory of this call: ``capabilities.memory`` unless the call makes it worse."""
        return self.capabilities.memory

    # ---- the block primitives

    def forward(self, inp: AttnInputs):
        """``(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) or None, LensResult or None)``; no autograd."""
        raise NotImplementedError

    def backward(self, inp: AttnInputs, out, lse, dout, dq, dk, dv, dsinks=None) -> None:
        """Add the gradients of the block into ``dq (B, Hq, Nq, D)``, ``dk (B, Hkv, Nk, D)``, ``dv (B, Hkv, Nk, Dv)``,
        recomputing the weights ``exp(s - lse)`` from ``lse``; ``D_i = rowsum(dout ∘ out)`` from ``out``; and,
        with sinks, into ``dsinks`` (the shape of ``inp.sinks``) through `add_sink_grad`."""
        raise NotImplementedError(f"backend {self.name!r} has no backward primitive")

    def column_sums(self, inp: AttnInputs, lse, weights=None):
        """``Σ_i exp(s_ij - lse_i) · W_i``: ``(B, Hq, Nk)`` without ``weights``; with ``weights (B|1, Hq|1, Nq, T)``,
        ``(B, Hq, Nk, T)`` = ``Pᵀ W``. Rows with ``lse = -inf`` contribute 0."""
        raise NotImplementedError(f"backend {self.name!r} has no column-sum primitive")

    def __repr__(self) -> str:
        return f"<attnlens backend {self.name!r}>"


def sink_weights(inp: AttnInputs, lse) -> torch.Tensor:
    """``P_sink,i = exp(sink - lse_i)`` ``(B, Hq, Nq)`` in the statistics dtype, 0 where ``lse = -inf``."""
    cdt = stat_dtype(inp.q.dtype)
    lse = lse.to(cdt)
    sink = inp.sinks.detach().to(cdt)[..., None]  # (B|1, Hq, 1)
    return torch.where(torch.isneginf(lse), torch.zeros((), dtype=cdt, device=lse.device), torch.exp(sink - lse))


def add_sink_grad(inp: AttnInputs, out, lse, dout, dsinks, p_sink=None) -> None:
    """Add the gradient of the sink logits into ``dsinks`` (``inp.sinks``' shape ``(B|1, Hq)``), for every backend.

    The sink is one more softmax entry with no value, so with ``P_sink,i = exp(sink - lse_i)`` and
    ``D_i = rowsum(dO ∘ O)_i`` (the softmax Jacobian's row term, as in the backward of the scores)::

        d sink = Σ_i P_sink,i · (0 - D_i)        summed over the batch where sinks are (1, Hq)

    ``p_sink (B, Hq, Nq)``: the sinks' weights where the backend rebuilt them more exactly than `sink_weights` (rows
    whose lse lost ``log l`` to rounding: see `torch_chunked._own_row_factors`); default `sink_weights`.
    q, k and v's gradients need nothing new: their weights ``exp(s - lse)`` already use the lse with the sink.
    """
    if dsinks is None or inp.sinks is None:
        return
    cdt = stat_dtype(inp.q.dtype)
    p = sink_weights(inp, lse) if p_sink is None else p_sink.to(cdt)
    di = torch.einsum("bhid,bhid->bhi", dout.to(cdt), out.to(cdt))  # (B, Hq, Nq)
    g = -(p * di).sum(-1)  # (B, Hq)
    dsinks += g.sum(0, keepdim=True).to(dsinks.dtype) if dsinks.shape[0] == 1 else g.to(dsinks.dtype)
