"""Differential fuzz of `attnlens.attention` (public API) against a float64 NumPy oracle written here.

The oracle below is a dense softmax in a few lines, independent of `attnlens.reference`. Hypothesis
draws the call (rank 2-4, B, Hq, Hkv, Nq != Nk, odd D/Dv, causal, windows, bool/float masks with
dead rows, scale incl. 0 and negative, scores up to ±1e4, huge finite float-mask values, float32 /
float64, NumPy or torch, lens with top-k and rows); NumPy draws the values from a drawn seed.
Every case runs on backends "torch", "reference" and "auto". NaN/inf inputs are left to their own
tests (the torch backend's NaN handling is being reworked).

Tolerance: each row gets a bound ``d`` on the error of its scores in the input precision
(``2·eps·(D·max_j scale·Σ|q||k| + max |float-mask entry|)``, the mask term only when the scores
are not exactly 0); weights may be off by ``4d`` plus a few ulps (capped at 1, so rows whose scores
a float32 computation cannot resolve are checked for structure only), lse by ``2d``. Rows that
see no key must be exactly out 0, lse -inf, entropy 0, max_weight 0, top-k (0, -1).

CI runs ``FUZZ_EXAMPLES`` draws, derandomized; ``ATTNLENS_FUZZ=full`` runs 4,000 random draws
(12,000 backend cases). The test prints how many cases ran and how long they took.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlens as al

FULL = os.environ.get("ATTNLENS_FUZZ") == "full"
FUZZ_EXAMPLES = 4000 if FULL else int(os.environ.get("ATTNLENS_FUZZ_N", 1500))
BACKENDS = ("torch", "reference", "auto")
LENGTHS = (1, 2, 3, 5, 7, 16, 33, 97)
EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
#: finite float-mask values, down to float32's most negative (no sentinel a finite input can reach)
HUGE = (-3e38, -1e31, -2e30, -1e30, -2e29, -1e29, -1e20, -1e4, 1e4, 1e20)


def oracle(q, k, v, mask, causal, window, scale):
    """Dense float64 softmax(q kᵀ·scale + mask) v on rank-4 arrays: (out, P, lse, visible)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    k, v = np.repeat(k, Hq // Hkv, axis=1), np.repeat(v, Hq // Hkv, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    pos = np.arange(Nq)[:, None] + (Nk - Nq)  # query i sits at key position i + Nk - Nq
    j = np.arange(Nk)[None, :]
    vis = np.ones((B, Hq, Nq, Nk), dtype=bool)
    if causal:
        vis &= j <= pos
    left, right = window if window is not None else (None, None)
    if left is not None:
        vis &= j >= pos - left
    if right is not None:
        vis &= j <= pos + right
    if mask is not None and mask.dtype == bool:
        vis &= mask
    elif mask is not None:
        s = s + mask
        vis &= mask > -np.inf
    s = np.where(vis, s, -np.inf)
    live = vis.any(-1, keepdims=True)
    m = np.where(live, s.max(-1, keepdims=True), 0.0)
    e = np.where(vis, np.exp(s - m), 0.0)
    total = np.where(live, e.sum(-1, keepdims=True), 1.0)
    p = e / total
    lse = np.where(live, m + np.log(total), -np.inf)[..., 0]
    return p @ v, p, lse, vis


@st.composite
def calls(draw):
    rank = draw(st.integers(2, 4))
    B = draw(st.integers(1, 2)) if rank == 4 else 1
    Hkv = draw(st.integers(1, 2)) if rank >= 3 else 1
    Hq = Hkv * (draw(st.integers(1, 3)) if rank >= 3 else 1)
    Nq, Nk = draw(st.sampled_from(LENGTHS)), draw(st.sampled_from(LENGTHS))
    side = st.one_of(st.none(), st.integers(0, 9))
    c = dict(rank=rank, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=draw(st.integers(1, 9)), Dv=draw(st.integers(1, 9)),
             causal=draw(st.booleans()),
             window=draw(st.one_of(st.none(), st.integers(0, 9), st.tuples(side, side))),
             mask=draw(st.sampled_from([None, "bool", "float", "huge"])),
             mask_ndim=draw(st.integers(1, rank)), mask_full=draw(st.lists(st.booleans(), min_size=4, max_size=4)),
             dead_rows=draw(st.integers(0, 2)),
             magnitude=draw(st.sampled_from([1.0, 1.0, 30.0, 1e4])),
             scale=draw(st.sampled_from([None, None, 0.0, -0.7, 1e-3, 2.0])),
             dtype=draw(st.sampled_from(["float32", "float64"])), numpy=draw(st.booleans()),
             topk=draw(st.integers(0, min(Nk, 5))), rows=draw(st.sampled_from([None, "all", "some"])),
             seed=draw(st.integers(0, 2**32 - 1)))
    return c


def make(c):
    """The call's arrays (NumPy, in the drawn dtype) from the drawn seed."""
    rng = np.random.default_rng(c["seed"])
    lead = (c["B"], c["Hq"], c["Hkv"])
    dt = np.dtype(c["dtype"])
    q = rng.standard_normal((lead[0], lead[1], c["Nq"], c["D"])) * c["magnitude"]
    k = rng.standard_normal((lead[0], lead[2], c["Nk"], c["D"]))
    v = rng.standard_normal((lead[0], lead[2], c["Nk"], c["Dv"]))
    mask = None
    if c["mask"] is not None:
        full = (c["B"], c["Hq"], c["Nq"], c["Nk"])
        shape = tuple(n if f else 1 for n, f in zip(full, c["mask_full"]))[4 - c["mask_ndim"]:]
        keep = rng.random(shape) < 0.7
        if c["dead_rows"] and len(shape) >= 2 and shape[-2] > 1:
            keep[..., rng.choice(shape[-2], size=min(c["dead_rows"], shape[-2]), replace=False), :] = False
        if c["mask"] == "bool":
            mask = keep
        else:
            mask = np.where(keep, rng.standard_normal(shape) * 3, -np.inf)
            if c["mask"] == "huge":
                mask = np.where(keep & (rng.random(shape) < 0.5), rng.choice(HUGE, size=shape), mask)
            mask = mask.astype(dt)
    return q.astype(dt), k.astype(dt), v.astype(dt), mask


def _shape_to_rank(x, rank):
    return x.reshape(x.shape[4 - rank:])


def _np(x):
    return x if isinstance(x, np.ndarray) else x.detach().cpu().double().numpy() if x.is_floating_point() else x.numpy()


def check(c, backend, q, k, v, mask):
    rank, dtype = c["rank"], c["dtype"]
    scale = 1 / np.sqrt(c["D"]) if c["scale"] is None else c["scale"]
    rows = {None: None, "all": "all", "some": [0, c["Nq"] // 2, -1]}[c["rows"]]
    lens = al.Lens(topk=c["topk"], rows=rows)
    args = [_shape_to_rank(x, rank) for x in (q, k, v)]
    m_in = None if mask is None else mask.reshape(mask.shape[max(0, mask.ndim - rank):])
    if not c["numpy"]:
        args = [torch.from_numpy(x) for x in args]
        m_in = None if m_in is None else torch.from_numpy(m_in)
    window = c["window"]
    out, res = al.attention(*args, mask=m_in, causal=c["causal"], window=window, scale=c["scale"], backend=backend,
                            lens=lens)
    assert isinstance(out, np.ndarray) == c["numpy"]

    m4 = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    win = (window, window) if isinstance(window, int) else window
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    m64 = m4 if m4 is None or m4.dtype == bool else m4.astype(np.float64)
    r_out, p, lse, vis = oracle(q64, k64, v64, m64, c["causal"], win, scale)
    live = vis.any(-1)  # (B, Hq, Nq)

    # per-row bound on the score error in the input precision
    eps = EPS[dtype]
    kk = np.repeat(np.abs(k64), c["Hq"] // c["Hkv"], axis=1)
    a = (np.abs(q64) @ kk.swapaxes(-1, -2) * abs(scale)).max(-1)  # (B, Hq, Nq)
    b = np.zeros_like(a)
    if m4 is not None and m4.dtype != bool:
        mm = np.broadcast_to(np.abs(m4.astype(np.float64)), vis.shape)
        b = np.where(vis & np.isfinite(mm), mm, 0.0).max(-1)
    d = 2 * eps * (c["D"] * a + np.where(a > 0, b, 0.0))
    n_log = np.log(c["Nk"] + 1)
    tol_w = np.minimum(4 * d + 32 * eps * n_log, 1.0)  # (B, Hq, Nq)
    vmax = np.abs(v64).max()

    o = _np(out).reshape(r_out.shape)
    what = f"{backend} {c}"
    assert o.shape == r_out.shape
    ok_out = np.abs(o - r_out) <= (2 * tol_w * vmax + 8 * eps * vmax)[..., None]
    assert ok_out.all(), f"out: {what}"
    # dead rows: exactly 0 / -inf
    g_lse = _np(res.lse).reshape(lse.shape)
    assert (o[~live] == 0).all() and np.isneginf(g_lse[~live]).all(), f"dead rows: {what}"
    assert np.isfinite(g_lse[live]).all(), f"lse not finite on a live row: {what}"
    err = np.abs(np.where(live, g_lse, 0.0) - np.where(live, lse, 0.0))
    assert (err <= 2 * d + 16 * eps * (1 + np.abs(np.where(live, lse, 0.0)))).all(), f"lse: {what}"
    g_max = _np(res.max_weight).reshape(lse.shape)
    assert (np.abs(g_max - p.max(-1)) <= tol_w).all() and (g_max[~live] == 0).all(), f"max_weight: {what}"
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    g_ent = _np(res.entropy).reshape(lse.shape)
    assert (g_ent[~live] == 0).all(), f"entropy of dead rows: {what}"
    assert (np.abs(g_ent - ent) <= np.minimum(tol_w * (2 + n_log) * 2, n_log + 1e-6) + 32 * eps * n_log).all(), \
        f"entropy: {what}"
    g_rec = _np(res.received).reshape(p.shape[:2] + p.shape[3:])
    assert (np.abs(g_rec - p.sum(-2)) <= tol_w.sum(-1)[..., None] + 1e-12).all(), f"received: {what}"
    if c["topk"]:
        tw = _np(res.topk_weights).reshape(lse.shape + (c["topk"],))
        ti = _np(res.topk_indices).reshape(tw.shape)
        ref_sorted = -np.sort(-p, axis=-1)[..., :c["topk"]]
        assert (np.abs(tw - ref_sorted) <= tol_w[..., None]).all(), f"topk_weights: {what}"
        assert ((ti == -1) == (tw == 0)).all(), f"topk index -1 exactly where the weight is 0: {what}"
        at = np.take_along_axis(p, np.maximum(ti, 0), axis=-1)
        assert (np.abs(np.where(ti >= 0, at - tw, 0.0)) <= tol_w[..., None]).all(), f"topk_indices: {what}"
        srt = np.sort(np.where(ti >= 0, ti, -1 - np.arange(c["topk"])), axis=-1)
        assert (np.diff(srt, axis=-1) != 0).all(), f"repeated top-k index: {what}"
        assert (tw[~live] == 0).all(), f"topk of dead rows: {what}"
    if rows is not None:
        idx = list(range(c["Nq"])) if rows == "all" else [r % c["Nq"] for r in rows]
        gw = _np(res.weights).reshape(p.shape[:2] + (len(idx), c["Nk"]))
        assert (np.abs(gw - p[:, :, idx]) <= tol_w[:, :, idx, None]).all(), f"weights: {what}"


def test_fuzz_against_an_independent_numpy_oracle():
    ran = {b: 0 for b in BACKENDS}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not FULL, database=None,
              suppress_health_check=list(HealthCheck))
    @given(c=calls())
    def run(c):
        arrays = make(c)
        for backend in BACKENDS:
            check(c, backend, *arrays)
            ran[backend] += 1

    t0 = time.perf_counter()
    run()
    took = time.perf_counter() - t0
    total = sum(ran.values())
    print(f"\nfuzz: {total} cases ({ran}) in {took:.1f} s")
    assert total >= 0.9 * FUZZ_EXAMPLES * len(BACKENDS), f"only {total} cases ran"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_mask_below_minus_2_5e29_is_exact(dtype):
    """Found by the fuzz: the torch backend clamped masked scores at -2.5e29 (a finite sentinel), so these tied."""
    q, k = torch.zeros(1, 1, dtype=dtype), torch.zeros(2, 1, dtype=dtype)  # scores exactly 0
    v = torch.tensor([[1.0], [2.0]], dtype=dtype)
    mask = torch.tensor([[-1e30, -5e29]], dtype=dtype)  # finite: key 1 takes all the weight
    out, res = al.attention(q, k, v, mask=mask, backend="torch", lens=al.Lens())
    assert out.item() == 2.0 and res.max_weight.item() == 1.0
    assert res.lse.item() == torch.tensor(-5e29, dtype=dtype).item()
