"""Hypothesis properties of attention weights and the lens, on random shapes, masks, causal and windows.

Every property is checked against an independent derivation of which keys each query sees
(`conftest.visible`), not against the library's own masking code.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close, check_topk, np64, reference, visible
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlens as al

SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MASK_LAYOUTS = ["k", "qk", "q1", "pad", "head", "full"]


@st.composite
def problems(draw, max_n=24):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    Nq = draw(st.integers(1, max_n))
    Nk = draw(st.integers(1, max_n))
    D = draw(st.integers(1, 9))
    Dv = draw(st.integers(1, 6))
    causal = draw(st.booleans())
    side = st.one_of(st.none(), st.integers(0, 6))
    window = draw(st.one_of(st.none(), st.integers(0, 6), st.tuples(side, side)))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    layout = draw(st.sampled_from(MASK_LAYOUTS))
    p_keep = draw(st.sampled_from([0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = torch.tensor(rng.standard_normal((B, Hq, Nq, D)) * rng.uniform(0.5, 3.0))
    k = torch.tensor(rng.standard_normal((B, Hkv, Nk, D)))
    v = torch.tensor(rng.standard_normal((B, Hkv, Nk, Dv)))
    mask = None
    if mask_kind is not None:
        shape = {"k": (Nk,), "qk": (Nq, Nk), "q1": (Nq, 1), "pad": (B, 1, 1, Nk), "head": (1, Hq, Nq, Nk),
                 "full": (B, Hq, Nq, Nk)}[layout]
        keep = rng.random(shape) < p_keep
        if mask_kind == "bool":
            mask = torch.from_numpy(keep)
        else:
            mask = torch.tensor(np.where(keep, rng.standard_normal(shape), -np.inf))
    kw = {"causal": causal, "window": window, "mask": mask}
    return q, k, v, kw


def _scores(q, k, kw):
    """Scaled, masked scores in float64, -inf where not visible (for the lse identity)."""
    q, k = np64(q), np64(k)
    G = q.shape[1] // k.shape[1]
    k = np.repeat(k, G, axis=1)
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    m = kw["mask"]
    if m is not None and m.dtype != torch.bool:
        s = s + np64(m).reshape((1,) * (4 - m.ndim) + tuple(m.shape))
    keep = visible(q.shape[2], k.shape[2], kw["causal"], kw["window"], kw["mask"], shape4=s.shape)
    return np.where(keep, s, -np.inf), keep


@SETTINGS
@given(problems())
def test_weights_are_a_distribution_over_visible_keys(prob):
    q, k, v, kw = prob
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    topk = min(3, Nk)
    out, res = al.attention(q, k, v, backend="torch", lens=al.Lens(topk=topk, rows="all"), **kw)
    w = np64(res.weights)
    assert w.shape == (B, Hq, Nq, Nk) and res.rows == tuple(range(Nq))
    s, keep = _scores(q, k, kw)
    n_vis = keep.sum(-1)
    live = n_vis > 0

    assert (w >= 0).all()
    assert (w[~keep] == 0).all(), "weight on a key the query may not see"
    sums = w.sum(-1)
    np.testing.assert_allclose(sums[live], 1.0, atol=1e-12)
    assert (sums[~live] == 0).all()

    # lse: weights are exp(s - lse) on visible keys; -inf exactly for dead rows
    lse = np64(res.lse)
    assert np.isneginf(lse[~live]).all() and np.isfinite(lse[live]).all()
    with np.errstate(invalid="ignore"):
        expect = np.where(keep, np.exp(s - np.where(live, lse, 0.0)[..., None]), 0.0)
    np.testing.assert_allclose(w, expect, atol=1e-12)

    # received: column sums; summed over keys it counts the live query rows
    rec = np64(res.received)
    np.testing.assert_allclose(rec, w.sum(-2), atol=1e-12)
    np.testing.assert_allclose(rec.sum(-1), live.sum(-1), atol=1e-10)

    # entropy in [0, log(visible)], equal to -Σ p log p
    ent = np64(res.entropy)
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.where(live, np.log(np.maximum(n_vis, 1)), 0.0)
        plogp = np.where(w > 0, w * np.log(w), 0.0)
    assert (ent >= 0).all() and (ent <= logn + 1e-10).all()
    np.testing.assert_allclose(ent, -plogp.sum(-1), atol=1e-10)
    assert (ent[~live] == 0).all()

    # max_weight in [1/visible, 1], equal to the row max
    mw = np64(res.max_weight)
    assert (mw[live] >= 1.0 / n_vis[live] - 1e-12).all() and (mw <= 1 + 1e-12).all()
    assert (mw[~live] == 0).all()
    np.testing.assert_allclose(mw, w.max(-1), atol=1e-12)

    # top-k are the k largest weights of each row
    np.testing.assert_allclose(np64(res.topk_weights), -np.sort(-w, axis=-1)[..., :topk], atol=1e-12)

    # output = weights @ v (kv head h // G for query head h)
    vv = np.repeat(np64(v), Hq // v.shape[1], axis=1)
    np.testing.assert_allclose(np64(out), w @ vv, atol=1e-12)
    assert not np.isnan(np64(out)).any()


def _lower_rank(q, k, v, kw):
    """Drop leading unit dims: rank 3 when B == 1, rank 2 when also Hq == Hkv == 1."""
    rank = 4 - (q.shape[0] == 1) - (q.shape[0] == 1 and q.shape[1] == 1 and k.shape[1] == 1)
    q, k, v = (t.reshape(t.shape[4 - rank:]) for t in (q, k, v))
    m = kw["mask"]
    if m is not None and m.ndim > rank:
        m = m.reshape(m.shape[m.ndim - rank:])
    return q, k, v, {**kw, "mask": m}


@SETTINGS
@given(problems(), st.sampled_from(["torch", "reference", "sdpa"]), st.booleans())
def test_backends_match_reference_float32(prob, backend, lower_rank):
    q, k, v, kw = prob
    q, k, v = q.float(), k.float(), v.float()
    if kw["mask"] is not None and kw["mask"].dtype != torch.bool:
        kw = {**kw, "mask": kw["mask"].float()}
    if lower_rank:
        q, k, v, kw = _lower_rank(q, k, v, kw)
    topk = min(2, k.shape[-2])
    ref_out, ref = reference(q, k, v, topk=topk, **kw)
    if backend == "sdpa":
        out = al.attention(q, k, v, backend=backend, **kw)
    else:
        out, res = al.attention(q, k, v, backend=backend, lens=al.Lens(topk=topk), **kw)
        for f in ("lse", "max_weight", "entropy", "received"):
            assert_close(getattr(res, f), getattr(ref, f), atol=5e-5, rtol=1e-4, what=f)
        check_topk(res, ref, atol=5e-5)
    assert out.dtype == torch.float32
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what="out")


@SETTINGS
@given(problems(max_n=40), st.integers(1, 40), st.integers(0, 4))
def test_chunk_size_does_not_change_anything(prob, rows_per_chunk, topk):
    q, k, v, kw = prob
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    topk = min(topk, Nk)
    lens = al.Lens(topk=topk, rows=[0, -1])
    out1, res1 = al.attention(q, k, v, backend="torch", lens=lens, **kw)
    be = al.TorchChunkedBackend(chunk_bytes=rows_per_chunk * B * Hq * Nk * 8)
    out2, res2 = al.attention(q, k, v, backend=be, lens=lens, **kw)
    torch.testing.assert_close(out2, out1, atol=1e-12, rtol=1e-12)
    for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "weights"):
        torch.testing.assert_close(getattr(res2, f), getattr(res1, f), atol=1e-12, rtol=1e-12, msg=f)


@SETTINGS
@given(problems())
def test_broadcast_mask_equals_expanded_mask(prob):
    """A mask of any broadcastable shape gives what the mask expanded to (B, Hq, Nq, Nk) gives."""
    q, k, v, kw = prob
    if kw["mask"] is None:
        kw["mask"] = torch.ones(k.shape[2], dtype=torch.bool)
    B, Hq, Nq, _ = q.shape
    full = kw["mask"].expand(B, Hq, Nq, k.shape[2]).contiguous()
    for backend in ("torch", "sdpa"):
        a = al.attention(q, k, v, backend=backend, **kw)
        b = al.attention(q, k, v, backend=backend, **{**kw, "mask": full})
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@SETTINGS
@given(problems(max_n=12))
def test_numpy_and_torch_agree(prob):
    q, k, v, kw = prob
    npkw = {**kw, "mask": None if kw["mask"] is None else kw["mask"].numpy()}
    out_t, res_t = al.attention(q, k, v, lens=al.Lens(topk=1), **kw)
    out_n, res_n = al.attention(q.numpy(), k.numpy(), v.numpy(), lens=al.Lens(topk=1), **npkw)
    assert isinstance(out_n, np.ndarray) and out_n.dtype == np.float64
    np.testing.assert_array_equal(out_n, out_t.numpy())
    for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "topk_indices"):
        np.testing.assert_array_equal(getattr(res_n, f), getattr(res_t, f).numpy(), err_msg=f)


@pytest.mark.parametrize("seed", range(3))
def test_properties_hold_at_a_larger_size(seed, monkeypatch):
    """A few non-hypothesis draws at a larger size, run in several chunks (of 64 rows)."""
    rng = np.random.default_rng(1000 + seed)
    B, Hq, Hkv, Nq, Nk = 1, 4, 2, 300, 257
    be = al.TorchChunkedBackend(chunk_bytes=64 * B * Hq * Nk * 8)
    q = torch.tensor(rng.standard_normal((B, Hq, Nq, 16)))
    k = torch.tensor(rng.standard_normal((B, Hkv, Nk, 16)))
    v = torch.tensor(rng.standard_normal((B, Hkv, Nk, 8)))
    kw = {"causal": bool(seed % 2), "window": (50, None) if seed == 2 else None,
          "mask": torch.from_numpy(rng.random((Nq, Nk)) < 0.8)}
    out, res = al.attention(q, k, v, lens=al.Lens(rows="all", topk=4), backend=be, **kw)
    keep = visible(Nq, Nk, kw["causal"], kw["window"], kw["mask"], shape4=(B, Hq, Nq, Nk))
    w = np64(res.weights)
    live = keep.any(-1)
    assert (w[~keep] == 0).all()
    np.testing.assert_allclose(w.sum(-1)[live], 1, atol=1e-12)
    np.testing.assert_allclose(np64(res.received).sum(-1), live.sum(-1), atol=1e-9)
    np.testing.assert_allclose(np64(out), w @ np.repeat(np64(v), 2, axis=1), atol=1e-12)
