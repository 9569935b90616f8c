"""NumPy float64 attention: the oracle every test compares against. Short, dense, never optimised.

It holds the full ``(B, Hq, Nq, Nk)`` weight matrix, so use it at small sizes.
"""
from __future__ import annotations

import numpy as np

from .lens import LensResult
from .masks import band_keep

__all__ = ["reference_attention", "reference_lens", "reference_backward"]


def reference_attention(q, k, v, mask=None, causal=False, window=None, scale=None, offset=None, softcap=None,
                        sinks=None, alibi_slopes=None, seqlens_q=None, seqlens_k=None):
    """softmax(q kᵀ · scale + mask) v in float64, with the weights and log-sum-exp.

    Args: rank-4 arrays ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``;
        ``mask`` bool or float broadcastable to ``(B, Hq, Nq, Nk)``; ``window`` as
        ``masks.normalize_window`` returns it; ``offset``: query i sits at key position ``i + offset``
        (default ``Nk - Nq``); ``softcap`` c > 0 or None; ``sinks`` and ``alibi_slopes`` broadcastable
        to ``(B, Hq)`` or None. ``seqlens_q``, ``seqlens_k`` ``(B,)`` ints or None (full length): a padded batch,
        sequence b's queries are rows ``[0, seqlens_q[b])`` and its keys ``[0, seqlens_k[b])``; its offset is
        ``offset`` (an int, or ``(B,)`` ints) or by default ``seqlens_k[b] - seqlens_q[b]``. Query rows past a
        sequence's length see nothing, not even the sink (out 0, lse -inf).
    Returns: ``out (B, Hq, Nq, Dv)``, ``weights (B, Hq, Nq, Nk)``, ``lse (B, Hq, Nq)`` (float64).

    Score order: ``s = (q_i · k_j) · scale``; ``s = c · tanh(s / c)`` (softcap); ``s -= slope · |i + offset - j|``
    (ALiBi); ``s += mask`` (float) — then bool mask, causal, window. A sink is one more entry of every row's
    softmax, with logit ``sinks[b, h]`` and no value: it is in ``lse``, and the weights of the real keys then
    sum to ``1 - exp(sink - lse)``. A row with no visible key but a finite sink has out 0, lse = sink.

    The NaN/inf rule (what every backend must match):

    - *Visible* is structural: key j is visible to query i unless causal/window excludes it, a bool
      mask is False there, or a float mask is ``-inf`` there. Nothing else hides a key.
    - A row with no visible key: out 0, weights 0, lse -inf (never NaN), whatever q, k, v hold.
    - The score ``s_ij = (q_i · k_j) · scale + mask_ij``. A row with a visible key whose score is not
      finite — NaN (from NaN in q, k or the float mask, or inf · 0), +inf, or -inf (from inf in q or
      k, or overflow: a numeric event, not masking) — is non-finite: its out and lse are NaN, its
      weights NaN at its visible keys (0 at the others). ``reference_lens`` then gives it NaN
      max_weight, entropy and top-k weights (indices -1), and NaN ``received`` at the keys it sees.
    - Otherwise the row is the exact softmax over its visible keys. NaN/inf in v reach only the
      rows that give that key a weight > 0 (a key of weight 0 contributes 0, even if its value is
      NaN/inf), and only the output columns where v holds them.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    group = Hq // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (B, Hq, Nk, D): query head h uses kv head h // group
    v = np.repeat(v, group, axis=1)
    scale = 1.0 / np.sqrt(D) if scale is None else scale

    with np.errstate(all="ignore"):  # inf/NaN inputs are handled by the rule above
        s = (q @ np.swapaxes(k, -1, -2)) * scale  # (B, Hq, Nq, Nk)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        varlen = seqlens_q is not None or seqlens_k is not None
        lq = np.full(B, Nq) if seqlens_q is None else np.asarray(seqlens_q, dtype=np.int64)
        lk = np.full(B, Nk) if seqlens_k is None else np.asarray(seqlens_k, dtype=np.int64)
        if varlen:  # one offset per sequence, (B, 1, 1, 1): default bottom-right per sequence
            offset = (lk - lq if offset is None else np.broadcast_to(np.asarray(offset, np.int64), (B,)))
            offset = offset[:, None, None, None]
        else:
            offset = Nk - Nq if offset is None else offset
        pos = np.arange(Nq)[:, None] + offset  # (Nq, 1), or (B, 1, Nq, 1) per sequence
        if alibi_slopes is not None:
            dist = np.abs(pos - np.arange(Nk)[None, :])  # (Nq, Nk) or (B, 1, Nq, Nk)
            s = s - np.broadcast_to(np.asarray(alibi_slopes, np.float64), (B, Hq))[:, :, None, None] * dist
        keep = np.ones(s.shape, dtype=bool)  # visible (structural)
        band = band_keep(np.arange(Nq), np.arange(Nk), offset, causal, window)
        if band is not None:
            keep &= band
        alive = np.arange(Nq)[None, None, :, None] < lq[:, None, None, None]  # (B, 1, Nq, 1): not a padded query
        keep &= alive & (np.arange(Nk)[None, None, None, :] < lk[:, None, None, None])
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype == bool:
                keep &= mask
            else:
                s = s + mask.astype(np.float64)
                keep &= mask != -np.inf  # NaN in the mask is visible (and makes the row NaN)
        if sinks is not None:  # the sink: one more column, visible unless its logit is -inf
            sk = np.broadcast_to(np.asarray(sinks, np.float64), (B, Hq))[:, :, None, None]
            s = np.concatenate([s, np.broadcast_to(sk, (B, Hq, Nq, 1))], axis=-1)
            keep = np.concatenate([keep, np.broadcast_to((sk != -np.inf) & alive, (B, Hq, Nq, 1))], axis=-1)
            v = np.concatenate([v, np.zeros((B, Hq, 1, v.shape[-1]))], axis=2)  # the sink has no value
        bad = (keep & ~np.isfinite(s)).any(axis=-1, keepdims=True)  # a non-finite visible score
        ok = keep & ~bad
        s = np.where(ok, s, -np.inf)

        live = ok.any(axis=-1, keepdims=True)
        m = np.where(live, s.max(axis=-1, keepdims=True, initial=-np.inf), 0.0)  # initial: no key at all (Nk = 0)
        e = np.where(ok, np.exp(s - m), 0.0)
        total = e.sum(axis=-1, keepdims=True)
        w = e / np.where(live, total, 1.0)  # rows sum to 1 (0 for dead rows)
        lse = np.where(live, m + np.log(np.where(live, total, 1.0)), -np.inf)
        w = np.where(keep & bad, np.nan, w)
        lse = np.where(bad, np.nan, lse)[..., 0]
        fin = np.isfinite(v)
        out = w @ np.where(fin, v, 0.0)  # a key of weight 0 contributes 0, even if its value is NaN/inf
        for b, h, j, d in zip(*np.nonzero(~fin)):
            out[b, h, :, d] += np.where(w[b, h, :, j] > 0, w[b, h, :, j] * v[b, h, j, d], 0.0)
    return out, w[..., :Nk], lse


def reference_lens(weights, lse, topk=0, rows=None, sinks=None, received_from=None, at=None, pool=None):
    """Every lens statistic from the dense float64 weights (see `attnlens.LensResult`); with ``sinks``
    (broadcastable to ``(B, Hq)``) also ``sink_weight = exp(sink - lse)``, and the entropy counts the sink.

    ``received_from``: query weights broadcastable to ``(B, Hq, Nq, T)`` → ``Pᵀ W``; ``at``: key indices
    broadcastable to ``(B, Hq, Nq, m)`` (-1 = none) → ``P[i, at]``; ``pool=(bq, bk)`` → block sums of ``P``."""
    w = weights
    bad = np.isnan(w).any(axis=-1)  # non-finite rows (see reference_attention): NaN statistics
    full = w
    if sinks is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            sk = np.broadcast_to(np.asarray(sinks, np.float64), lse.shape[:2])[..., None]
            sw = np.where(np.isneginf(lse), 0.0, np.exp(sk - np.where(np.isneginf(lse), 0.0, lse)))
            # the keys' weights and the sink's sum to 1: 1 - Σ w is exact to n ulps of 1, exp(sink - lse) to
            # |lse| ulps of sw (the lse's rounding: all of log l is lost beyond ~1e16); take the closer one
            rest = 1.0 - w.sum(axis=-1)
            closer = np.isfinite(sk) & np.isfinite(lse) & (sw * np.abs(lse) > w.shape[-1] + 1)
            sw = np.where(closer, np.clip(rest, 0.0, 1.0), sw)
        full = np.concatenate([w, sw[..., None]], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(full > 0, full * np.log(full), 0.0)
    entropy = np.where(bad, np.nan, -plogp.sum(axis=-1))
    res = LensResult(lse=lse, max_weight=w.max(axis=-1, initial=0.0), entropy=entropy, received=w.sum(axis=-2))
    if sinks is not None:
        res.sink_weight = sw
    if topk:  # k beyond the number of keys: the extra slots are (0, -1), as for a row with fewer visible keys
        idx = np.argsort(-w, axis=-1, kind="stable")[..., :topk]
        tw = np.take_along_axis(w, idx, axis=-1)
        pad = topk - tw.shape[-1]
        if pad:
            tw = np.concatenate([tw, np.zeros(tw.shape[:-1] + (pad,))], axis=-1)
            idx = np.concatenate([idx, np.zeros(idx.shape[:-1] + (pad,), dtype=idx.dtype)], axis=-1)
        tw = np.where(bad[..., None], np.nan, tw)
        res.topk_indices = np.where(tw > 0, idx, -1).astype(np.int64)
        res.topk_weights = tw
    if rows is not None:
        res.rows = tuple(rows)
        res.weights = w[..., list(rows), :]
    if received_from is not None:
        res.received_from = np.swapaxes(w, -1, -2) @ np.asarray(received_from, dtype=np.float64)
    if at is not None:
        idx = np.broadcast_to(np.asarray(at), w.shape[:-1] + (np.shape(at)[-1],))
        w0 = np.concatenate([w, np.zeros(w.shape[:-1] + (1,))], axis=-1)  # index -1 reads the 0 appended
        res.weights_at = np.take_along_axis(w0, np.where(idx >= 0, idx, w.shape[-1]), axis=-1)
    if pool is not None:
        bq, bk = pool
        pooled = np.add.reduceat(w, np.arange(0, w.shape[-2], bq), axis=-2)
        res.pooled = (np.add.reduceat(pooled, np.arange(0, w.shape[-1], bk), axis=-1) if w.shape[-1]
                      else pooled[..., :0])  # no keys: no key blocks
    return res


def reference_backward(q, k, v, weights, dout, scale=None, softcap=None, dlse=None):
    """Gradients ``(dq, dk, dv)`` of ``out = P v`` (and of ``lse`` when ``dlse (B, Hq, Nq)``, its gradient, is given)
    given the float64 weights ``P (B, Hq, Nq, Nk)``:

        dv = Pᵀ dO            dP = dO vᵀ            dS = P ∘ (dP - rowsum(dP ∘ P) + dlse)    (∂lse_i/∂s_ij = P_ij)
        dq = dS k · scale     dk = dSᵀ q · scale     (GQA: dk, dv summed over each kv head's query heads)

    With ``softcap`` c, ``dS`` is multiplied by ``1 - tanh²(q kᵀ · scale / c)``. With sinks, ``P`` holds the
    real keys' weights only (the sink's weight is what they miss) and the formulas are the same.
    """
    q, k, v, p, do = (np.asarray(x, dtype=np.float64) for x in (q, k, v, weights, dout))
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (B, Hq, Nk, ·)
    dp = do @ np.swapaxes(vr, -1, -2)  # (B, Hq, Nq, Nk)
    extra = 0.0 if dlse is None else np.asarray(dlse, dtype=np.float64)[..., None]  # the lse's own gradient
    ds = p * (dp - (dp * p).sum(-1, keepdims=True) + extra)
    if softcap is not None:
        ds = ds * (1.0 - np.tanh(q @ np.swapaxes(kr, -1, -2) * scale / softcap) ** 2)
    dq = ds @ kr * scale
    dk = (np.swapaxes(ds, -1, -2) @ q * scale).reshape(B, Hkv, group, -1, D).sum(2)
    dv = (np.swapaxes(p, -1, -2) @ do).reshape(B, Hkv, group, -1, v.shape[-1]).sum(2)
    return dq, dk, dv
