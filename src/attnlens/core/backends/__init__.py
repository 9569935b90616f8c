"""The block seam: the protocol every backend implements, on checked inputs.

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
and ``pooled`` (block sums of ``P``) — a backend may compute in its pass (reference, torch) or leave ``None``;
`attnlens.core.blocks.Block.forward` fills them from ``column_sums`` and the pair weights (triton).

Nothing outside the core calls a backend directly: integrations and analysis reach them through
`attnlens.core.blocks.Block` (and `attnlens.attention` / `merge`). `Capabilities`
(`attnlens.core.capabilities`) declare what a backend supports; `Backend.not_supported_reasons` derives
the generic reasons from them (one place), plus what only the backend knows (``extra_reasons``).
Dispatch, ``attnlens.backends()``, ``attnlens info`` and the CLI all read the same objects.
"""
from __future__ import annotations

import torch

from ..capabilities import FLOAT_DTYPES, Capabilities, MaskFeature, Memory
from ..inputs import AttnInputs, stat_dtype

__all__ = ["Backend", "Capabilities", "add_sink_grad", "sink_weights"]


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
        reasons = self.device_reasons(inp)
        if inp.q.dtype not in c.dtypes:
            reasons.append(f"dtype {inp.q.dtype}: takes {self._dtypes()}")
        B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
        if c.max_head_dim is not None and max(D, Dv) > c.max_head_dim:
            reasons.append(f"head dim D={D}, Dv={Dv}: takes head dims up to {c.max_head_dim}")
        reasons += self.mask_reasons(inp)
        reasons += [f"{m.label} is not supported" for m in sorted(inp.score_mods - c.score_mods, key=_order)]
        if inp.seqlens is not None and not c.seqlens:
            reasons.append("no per-sequence lengths (seqlens_q / seqlens_k)")
        if inp.dropout_p > 0 and not c.dropout:
            reasons.append(f"dropout_p={inp.dropout_p}: no dropout")
        if inp.lens is not None:
            missing = [str(f) for f in sorted(inp.lens.requested() - c.lens, key=_order)]
            if missing:
                reasons.append("no lens" if not c.lens else f"lens fields {missing} are not computed")
            if inp.lens.topk and c.max_topk is not None and inp.lens.topk > c.max_topk:
                reasons.append(f"Lens.topk={inp.lens.topk}: keeps at most {c.max_topk} per query")
        if inp.requires_grad and not c.backward:
            reasons.append("no gradients")
        return reasons + self.extra_reasons(inp, reasons)

    def device_reasons(self, inp: AttnInputs) -> list[str]:
        """Why the call's device is not served (from ``capabilities.devices``); a backend may widen it."""
        c = self.capabilities
        if c.devices is not None and inp.q.device.type not in c.devices:
            return [f"tensors on {inp.q.device}: runs on {', '.join(sorted(c.devices))}"]
        return []

    def mask_reasons(self, inp: AttnInputs) -> list[str]:
        """Why the call's mask is not served: the `MaskFeature` members it needs beyond ``capabilities.masks``."""
        missing = inp.mask_features - self.capabilities.masks
        out = [f"{str(f)} masks are not supported" for f in (MaskFeature.BOOL, MaskFeature.FLOAT) if f in missing]
        if MaskFeature.QUERY in missing:
            out.append(f"mask of shape {tuple(inp.mask.shape)} (as rank 4) varies along the queries: only key masks "
                       f"(B|1, H|1, 1, Nk), e.g. key padding, are supported")
        if MaskFeature.FLOAT_GRAD in missing:
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

    def memory(self, inp: AttnInputs) -> Memory:
        """The `Memory` class of this call: ``capabilities.memory`` unless the call makes it worse."""
        return self.capabilities.memory

    # ---- the block primitives

    def forward(self, inp: AttnInputs):
        """``(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) or None, LensResult or None)``; no autograd."""
        raise NotImplementedError

    def backward(self, inp: AttnInputs, out, lse, dout, dq, dk, dv, dsinks=None, dlse=None) -> None:
        """Add the gradients of the block into ``dq (B, Hq, Nq, D)``, ``dk (B, Hkv, Nk, D)``, ``dv (B, Hkv, Nk, Dv)``,
        recomputing the weights ``exp(s - lse)`` from ``lse``; ``D_i = rowsum(dout ∘ out)`` from ``out``; and,
        with sinks, into ``dsinks`` (the shape of ``inp.sinks``) through `add_sink_grad`.

        ``dlse (B, Hq, Nq)`` or None: the gradient of the lse itself. Since ``∂lse_i/∂s_ij = P_ij`` it folds into the
        row term, ``dS = P ∘ (dP - (D - dlse))`` (and the sink's ``-Σ_i P_sink,i (D_i - dlse_i)``), as split-KV and
        ring implementations do: a caller that combines blocks through their lse (`attnlens.merge`) gets exact
        gradients."""
        raise NotImplementedError(f"backend {self.name!r} has no backward primitive")

    def column_sums(self, inp: AttnInputs, lse, weights=None):
        """``Σ_i exp(s_ij - lse_i) · W_i``: ``(B, Hq, Nk)`` without ``weights``; with ``weights (B|1, Hq|1, Nq, T)``,
        ``(B, Hq, Nk, T)`` = ``Pᵀ W``. Rows with ``lse = -inf`` contribute 0."""
        raise NotImplementedError(f"backend {self.name!r} has no column-sum primitive")

    def __repr__(self) -> str:
        return f"<attnlens backend {self.name!r}>"


def _order(member) -> int:
    """Declaration order of an enum member (reasons list fields in a stable, readable order)."""
    return list(type(member)).index(member)


def sink_weights(inp: AttnInputs, lse) -> torch.Tensor:
    """``P_sink,i = exp(sink - lse_i)`` ``(B, Hq, Nq)`` in the statistics dtype, 0 where ``lse = -inf``."""
    cdt = stat_dtype(inp.q.dtype)
    lse = lse.to(cdt)
    sink = inp.sinks.detach().to(cdt)[..., None]  # (B|1, Hq, 1)
    return torch.where(torch.isneginf(lse), torch.zeros((), dtype=cdt, device=lse.device), torch.exp(sink - lse))


def add_sink_grad(inp: AttnInputs, out, lse, dout, dsinks, p_sink=None, dlse=None) -> None:
    """Add the gradient of the sink logits into ``dsinks`` (``inp.sinks``' shape ``(B|1, Hq)``), for every backend.

    The sink is one more softmax entry with no value, so with ``P_sink,i = exp(sink - lse_i)`` and
    ``D_i = rowsum(dO ∘ O)_i`` (the softmax Jacobian's row term, as in the backward of the scores)::

        d sink = Σ_i P_sink,i · (0 - D_i + dlse_i)        summed over the batch where sinks are (1, Hq)

    (``dlse``: the lse's own gradient, if any, as in `Backend.backward`).

    ``p_sink (B, Hq, Nq)``: the sinks' weights where the backend rebuilt them more exactly than `sink_weights` (rows
    whose lse lost ``log l`` to rounding: see `torch_chunked._own_row_factors`); default `sink_weights`.
    q, k and v's gradients need nothing new: their weights ``exp(s - lse)`` already use the lse with the sink.
    """
    if dsinks is None or inp.sinks is None:
        return
    cdt = stat_dtype(inp.q.dtype)
    p = sink_weights(inp, lse) if p_sink is None else p_sink.to(cdt)
    di = torch.einsum("bhid,bhid->bhi", dout.to(cdt), out.to(cdt))  # (B, Hq, Nq)
    if dlse is not None:
        di = di - dlse.to(cdt)
    g = -(p * di).sum(-1)  # (B, Hq)
    dsinks += g.sum(0, keepdim=True).to(dsinks.dtype) if dsinks.shape[0] == 1 else g.to(dsinks.dtype)
