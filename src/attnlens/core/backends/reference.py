"""The float64 NumPy oracle as a backend: dense, CPU, every primitive (no dropout).

It holds the full ``(B, Hq, Nq, Nk)`` weights, so it is for small inputs: tests, and the
gradients of the block primitives' tests (float64 ``reference_backward``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..capabilities import Capabilities, MaskFeature, Memory
from ..inputs import AttnInputs, stat_dtype
from ..reference import reference_attention, reference_backward, reference_lens
from . import Backend, add_sink_grad, sink_weights


def _np64(t):
    return None if t is None else t.detach().cpu().to(torch.bool if t.dtype == torch.bool else torch.float64).numpy()


def _dense(inp: AttnInputs):
    """``out, weights, lse`` in float64 NumPy."""
    sl = inp.seqlens
    lengths = {} if sl is None else dict(seqlens_q=sl.q.cpu().numpy(), seqlens_k=sl.k.cpu().numpy())
    return reference_attention(_np64(inp.q), _np64(inp.k), _np64(inp.v), mask=_np64(inp.mask), causal=inp.causal,
                               window=inp.window, scale=inp.scale,
                               offset=inp.offset if sl is None else sl.offset.cpu().numpy(), softcap=inp.softcap,
                               sinks=_np64(inp.sinks), alibi_slopes=_np64(inp.alibi_slopes), **lengths)


class ReferenceBackend(Backend):
    name = "reference"
    description = "NumPy float64, dense weights: the oracle (small inputs only)"
    capabilities = Capabilities(dropout=False, memory=Memory.DENSE, seqlens=True,
                                masks=frozenset({MaskFeature.BOOL, MaskFeature.FLOAT, MaskFeature.QUERY}),
                                notes="computes on the CPU in float64; the oracle of every test")

    def forward(self, inp: AttnInputs):
        out, w, lse = _dense(inp)
        dev, dt = inp.q.device, inp.q.dtype
        sd = stat_dtype(dt)
        out_t = torch.from_numpy(out).to(device=dev, dtype=dt)
        lse_t = torch.from_numpy(lse).to(device=dev, dtype=sd)
        if inp.lens is None:
            return out_t, lse_t, None
        extra = None if inp.received_from is None else _np64(inp.received_from)
        at = None if inp.at is None else inp.at.cpu().numpy()
        res = reference_lens(w, lse, topk=inp.lens.topk, rows=inp.rows, received_from=extra, at=at,
                             pool=inp.lens.pool, sinks=_np64(inp.sinks))
        for name in ("lse", "max_weight", "entropy", "received"):  # drop what was not asked for
            if not getattr(inp.lens, name):
                setattr(res, name, None)
        res = res.map_arrays(lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(
            device=dev, dtype=torch.int64 if a.dtype == np.int64 else sd))
        if res.topk_indices is not None:  # a weight that underflows to 0 in the output precision has no key
            res.topk_indices = res.topk_indices.masked_fill(res.topk_weights == 0, -1)
        return out_t, lse_t, res

    def backward(self, inp: AttnInputs, out, lse, dout, dq, dk, dv, dsinks=None, dlse=None) -> None:
        w, p_sink = _weights(inp, lse, with_sink=True)
        grads = reference_backward(_np64(inp.q), _np64(inp.k), _np64(inp.v), w, _np64(dout), scale=inp.scale,
                                   softcap=inp.softcap, dlse=_np64(dlse))
        for buf, g in zip((dq, dk, dv), grads):
            buf += torch.from_numpy(g).to(device=buf.device, dtype=buf.dtype)
        add_sink_grad(inp, out, lse, dout, dsinks, None if p_sink is None else torch.from_numpy(p_sink), dlse=dlse)

    def column_sums(self, inp: AttnInputs, lse, weights=None):
        w = _weights(inp, lse)  # (B, Hq, Nq, Nk)
        sd = stat_dtype(inp.q.dtype)
        if weights is None:
            cs = w.sum(-2)
        else:
            cs = np.swapaxes(w, -1, -2) @ _np64(weights)  # (B, Hq, Nk, T)
        return torch.from_numpy(np.ascontiguousarray(cs)).to(device=inp.q.device, dtype=sd)


def _weights(inp: AttnInputs, lse, with_sink: bool = False):
    """``exp(s - lse)`` in float64 from the call's scores and a given ``lse`` (0 where lse = -inf): the call's own
    weights ``w · exp(own - lse)``, and exactly ``w`` where ``lse`` is the row's own log-sum-exp rounded to the
    statistics dtype (``|own - lse| <= eps · (|lse| / 2 + 1)``, the torch backend's rule): a rounded lse loses
    ``log l`` when fp32 cannot hold ``m + log l`` (scores near -1e30), which ``exp(s - lse)`` would turn into weights
    l times too large. ``with_sink``: also the sinks' weights ``(B, Hq, Nq)`` by the same rule (None without sinks)."""
    _, w, own = _dense(inp)
    lse = _np64(lse)
    eps = float(np.finfo(np.float32 if stat_dtype(inp.q.dtype) == torch.float32 else np.float64).eps)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale = np.where(np.isneginf(lse), 0.0, np.exp(own - np.where(np.isneginf(lse), 0.0, lse)))
        rounded = np.isfinite(lse) & (np.abs(own - lse) <= eps * (0.5 * np.abs(lse) + 1.0))
    p = w * np.where(np.isneginf(own), 0.0, np.where(rounded, 1.0, scale))[..., None]
    if not with_sink:
        return p
    if inp.sinks is None:
        return p, None
    own_sw = reference_lens(w, own, sinks=_np64(inp.sinks)).sink_weight  # the oracle's own sink weights
    return p, np.where(rounded, own_sw, sink_weights(inp, torch.from_numpy(lse)).numpy())
