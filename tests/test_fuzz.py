"""Differential fuzz of `attnlens.attention` (public API) against a float64 NumPy oracle written here.

The oracle below is a dense softmax in a few lines, independent of `attnlens.reference`. Hypothesis
draws the call (rank 2-4, B, Hq, Hkv, Nq != Nk, odd D/Dv, causal, windows, offsets that leave rows and
whole query chunks without a key, bool/float masks with dead rows, scale incl. 0 and negative, scores
up to ±1e4, q = 0, huge finite float-mask values and whole rows of them (-1e30, fp32's finfo.min: exact
scores whose lse fp32 rounds to the max), attention sinks (finite or -inf), NaN/±inf in q, k or the float
mask, float32 / float64, NumPy or torch, lens with top-k, rows and ``at``, padded batches with per-sequence
lengths ``seqlens_q`` / ``seqlens_k`` — each sequence at its own bottom-right offset or the drawn one, lengths 0
included); NumPy draws the values from a drawn seed. Every case runs on backends "torch" (at a drawn chunk
size: one query row a chunk makes chunks that see no key), "reference" and "auto".

The NaN/inf rule (see `attnlens.attention`): a row with a visible non-finite score is NaN in out, lse,
max_weight, entropy, sink_weight and every top-k slot (indices -1), its weights (rows, ``at``) NaN at its
visible keys and 0 elsewhere, ``received`` NaN at the keys it sees; every other row is exact.

Tolerance: each row gets a bound ``d`` on the error of its scores in the input precision
(``2·eps·(D·max_j scale·Σ|q||k| + max |float-mask entry|)``, the mask term only when the scores
are not exactly 0); weights may be off by ``4d`` plus a few ulps (capped at 1, so rows whose scores
a float32 computation cannot resolve are checked for structure only), lse by ``2d``. Rows that
see no key must be exactly out 0, lse -inf (the sink's logit with sinks), entropy 0, max_weight 0,
top-k (0, -1); NaN and -inf must sit exactly where the oracle has them.

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
NAN, INF = float("nan"), float("inf")


def oracle(q, k, v, mask, causal, window, scale, offset, sinks, lq=None, lk=None):
    """Dense float64 softmax(q kᵀ·scale + mask) v on rank-4 arrays, a sink column per row when ``sinks (Hq,)``:
    ``(out, P, lse, visible, bad, sink_weight)``; ``bad`` rows have a visible non-finite score (the NaN rule).
    ``lq``, ``lk`` ``(B,)`` (a padded batch): sequence b's queries ``i < lq[b]`` see keys ``j < lk[b]`` only, at
    ``offset`` (an int or ``(B,)``, one per sequence); the other queries see nothing, not even the sink."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    k, v = np.repeat(k, Hq // Hkv, axis=1), np.repeat(v, Hq // Hkv, axis=1)
    with np.errstate(all="ignore"):
        s = q @ k.swapaxes(-1, -2) * scale
    offset = np.asarray(offset).reshape(-1, 1, 1, 1)  # (1|B, 1, 1, 1): one per sequence
    pos = np.arange(Nq)[:, None] + offset  # query i sits at key position i + offset
    j = np.arange(Nk)[None, :]
    vis = np.ones((B, Hq, Nq, Nk), dtype=bool)
    alive = np.ones((B, 1, Nq, 1), dtype=bool)
    if lq is not None:  # a padded batch
        alive = np.arange(Nq)[None, None, :, None] < np.asarray(lq)[:, None, None, None]
        vis &= alive & (j < np.asarray(lk)[:, None, None, None])
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
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, visible where the mask is not -inf
            s = s + mask
        vis &= ~np.isneginf(mask)  # NaN in a float mask is visible
    bad = (vis & ~np.isfinite(s)).any(-1, keepdims=True)
    s = np.where(vis & ~bad, s, -np.inf)
    sk = np.full((1, Hq, 1, 1), -np.inf) if sinks is None else sinks.reshape(1, Hq, 1, 1)
    live = (vis & ~bad).any(-1, keepdims=True) | ((sk > -np.inf) & alive & ~bad)
    m = np.where(live, np.maximum(s.max(-1, keepdims=True, initial=-np.inf), sk), 0.0)
    with np.errstate(over="ignore"):  # rows that are not live (NaN rows): exp(σ - 0) may overflow, unused
        e = np.where(vis & ~bad, np.exp(s - m), 0.0)
        es = np.where((sk > -np.inf) & alive, np.exp(sk - m), 0.0)
    total = np.where(live, e.sum(-1, keepdims=True) + es, 1.0)
    p = e / total
    lse = np.where(live, m + np.log(total), -np.inf)
    sw = np.where(live, es / total, 0.0)
    fin = np.isfinite(v)[:, :, None]  # (B, Hq, 1, Nk, Dv)
    out = p @ np.where(np.isfinite(v), v, 0.0)  # inputs here keep v finite
    p = np.where(vis & bad, np.nan, p)
    out = np.where(bad, np.nan, out)
    lse, sw = (np.where(bad, np.nan, x)[..., 0] for x in (lse, sw))
    assert fin.all()
    return out, p, lse, vis, bad[..., 0], sw


@st.composite
def calls(draw):
    rank = draw(st.integers(2, 4))
    B = draw(st.integers(1, 2)) if rank == 4 else 1
    Hkv = draw(st.integers(1, 2)) if rank >= 3 else 1
    Hq = Hkv * (draw(st.integers(1, 3)) if rank >= 3 else 1)
    Nq, Nk = draw(st.sampled_from(LENGTHS)), draw(st.sampled_from(LENGTHS))
    side = st.one_of(st.none(), st.integers(0, 9))
    mask = draw(st.sampled_from([None, "bool", "float", "huge"]))
    c = dict(rank=rank, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=draw(st.integers(1, 9)), Dv=draw(st.integers(1, 9)),
             causal=draw(st.booleans()),
             window=draw(st.one_of(st.none(), st.integers(0, 9), st.tuples(side, side))),
             offset=draw(st.one_of(st.none(), st.none(), st.integers(-Nq - 2, Nk + 2))),
             mask=mask,
             mask_ndim=draw(st.integers(1, rank)), mask_full=draw(st.lists(st.booleans(), min_size=4, max_size=4)),
             dead_rows=draw(st.integers(0, 2)),
             huge_rows=draw(st.integers(0, 2)) if mask in ("float", "huge") else 0,
             magnitude=draw(st.sampled_from([1.0, 1.0, 30.0, 1e4, 0.0])),
             scale=draw(st.sampled_from([None, None, 0.0, -0.7, 1e-3, 2.0])),
             sinks=draw(st.sampled_from([None, None, "finite", "huge", "some-inf"])),
             nonfinite=draw(st.sampled_from([None, None, None, "q", "k"] + (["mask"] if mask in ("float", "huge")
                                                                             else []))),
             nonfinite_value=draw(st.sampled_from([NAN, INF, -INF])),
             dtype=draw(st.sampled_from(["float32", "float64"])), numpy=draw(st.booleans()),
             topk=draw(st.integers(0, min(Nk, 5) + 2)), rows=draw(st.sampled_from([None, "all", "some"])),
             at=draw(st.sampled_from([None, "vector", "per-query"])), chunk=draw(st.sampled_from([None, 1, 400])),
             seqlens=draw(st.sampled_from([None, None, None, "q", "k", "both"])),
             seed=draw(st.integers(0, 2**32 - 1)))
    return c


def make(c):
    """The call's arrays (NumPy, in the drawn dtype) from the drawn seed: q, k, v, mask, sinks, at, and the padded
    batch's lengths seqlens_q, seqlens_k (None when not drawn)."""
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
            if c["huge_rows"] and len(shape) >= 2:  # whole rows of one huge value: ties at -1e30 or finfo.min
                rows = rng.choice(shape[-2], size=min(c["huge_rows"], shape[-2]), replace=False)
                mask[..., rows, :] = np.where(keep[..., rows, :], rng.choice([-1e30, -3.4028234e38, -1e6]), -np.inf)
            mask = mask.astype(dt)
    if c["nonfinite"] is not None:  # one or two entries: their rows become NaN where the entry is visible
        x = {"q": q, "k": k, "mask": mask}[c["nonfinite"]]
        for _ in range(rng.integers(1, 3)):
            x[tuple(rng.integers(0, n) for n in x.shape)] = c["nonfinite_value"]
    sinks = None
    if c["sinks"] is not None:
        sinks = rng.standard_normal(c["Hq"]) * 3
        if c["sinks"] == "huge":
            sinks = rng.choice([-1e30, -1e4, 1e4, 40.0], size=c["Hq"])
        elif c["sinks"] == "some-inf":
            sinks[rng.random(c["Hq"]) < 0.5] = -np.inf
        sinks = sinks.astype(dt)
    at = None
    if c["at"] is not None:
        m = int(rng.integers(1, 5))
        at = rng.integers(-1, c["Nk"], size=(m,) if c["at"] == "vector" else (c["Nq"], m))
    lq = lk = None
    if c["seqlens"] in ("q", "both"):
        lq = rng.integers(0, c["Nq"] + 1, c["B"])
    if c["seqlens"] in ("k", "both"):
        lk = rng.integers(0, c["Nk"] + 1, c["B"])
    return q.astype(dt), k.astype(dt), v.astype(dt), mask, sinks, at, lq, lk


def _shape_to_rank(x, rank):
    return x.reshape(x.shape[4 - rank:])


def _np(x):
    return x if isinstance(x, np.ndarray) else x.detach().cpu().double().numpy() if x.is_floating_point() else x.numpy()


def _close(got, want, tol, what):
    """NaN and ±inf exactly where ``want`` has them; elsewhere within ``tol`` (broadcast against ``want``)."""
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    assert (np.isnan(got) == np.isnan(want)).all(), f"NaN positions: {what}"
    inf = np.isinf(want)
    assert (got[inf] == want[inf]).all() and not np.isinf(got[~inf]).any(), f"inf positions: {what}"
    fin = np.isfinite(want)
    err = np.where(fin, np.abs(np.where(fin, got, 0.0) - np.where(fin, want, 0.0)), 0.0)
    assert (err <= np.broadcast_to(tol, want.shape)).all(), what


def check(c, backend, q, k, v, mask, sinks, at, lq=None, lk=None):
    rank, dtype = c["rank"], c["dtype"]
    scale = 1 / np.sqrt(c["D"]) if c["scale"] is None else c["scale"]
    rows = {None: None, "all": "all", "some": [0, c["Nq"] // 2, -1]}[c["rows"]]
    args = [_shape_to_rank(x, rank) for x in (q, k, v)]
    m_in = None if mask is None else mask.reshape(mask.shape[max(0, mask.ndim - rank):])
    kw_np = dict(sinks=sinks, at=at, seqlens_q=lq, seqlens_k=lk)
    if not c["numpy"]:
        args = [torch.from_numpy(x) for x in args]
        m_in = None if m_in is None else torch.from_numpy(m_in)
        kw_np = {n: None if x is None else torch.from_numpy(x) for n, x in kw_np.items()}
    lens = al.Lens(topk=c["topk"], rows=rows, at=kw_np["at"])
    window = c["window"]
    be = al.TorchChunkedBackend(chunk_bytes=c["chunk"]) if backend == "torch" and c["chunk"] else backend
    out, res = al.attention(*args, mask=m_in, causal=c["causal"], window=window, scale=c["scale"], backend=be,
                            lens=lens, offset=c["offset"], sinks=kw_np["sinks"], seqlens_q=kw_np["seqlens_q"],
                            seqlens_k=kw_np["seqlens_k"])
    assert isinstance(out, np.ndarray) == c["numpy"]

    m4 = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    win = (window, window) if isinstance(window, int) else window
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    m64 = m4 if m4 is None or m4.dtype == bool else m4.astype(np.float64)
    offset = c["Nk"] - c["Nq"] if c["offset"] is None else c["offset"]
    if c["seqlens"] is not None:  # a padded batch: each sequence at its own bottom-right offset unless one is drawn
        lq = np.full(c["B"], c["Nq"]) if lq is None else lq
        lk = np.full(c["B"], c["Nk"]) if lk is None else lk
        offset = lk - lq if c["offset"] is None else c["offset"]
    s64 = None if sinks is None else sinks.astype(np.float64)
    r_out, p, lse, vis, bad, sw = oracle(q64, k64, v64, m64, c["causal"], win, scale, offset, s64, lq, lk)
    live = np.isfinite(lse) | bad  # rows with some weight (keys or sink), NaN rows included
    keys = vis.any(-1) & ~bad  # finite rows that see a key

    # per-row bound on the score error in the input precision
    eps = EPS[dtype]
    kk = np.repeat(np.abs(k64), c["Hq"] // c["Hkv"], axis=1)
    with np.errstate(all="ignore"):  # NaN/inf scores make their rows NaN: the bound is over the finite ones
        a = np.nan_to_num(np.abs(q64) @ kk.swapaxes(-1, -2) * abs(scale), nan=0.0, posinf=0.0).max(-1)
    b = np.zeros_like(a)
    if m4 is not None and m4.dtype != bool:
        mm = np.broadcast_to(np.abs(m4.astype(np.float64)), vis.shape)
        b = np.where(vis & np.isfinite(mm), mm, 0.0).max(-1)
    d = 2 * eps * (c["D"] * a + np.where(a > 0, b, 0.0))
    n_log = np.log(c["Nk"] + 2)
    tol_w = np.minimum(4 * d + 32 * eps * n_log, 1.0)  # (B, Hq, Nq)
    vmax = np.abs(v64).max()

    what = f"{backend} {c}"
    o = _np(out).reshape(r_out.shape)
    _close(o, r_out, (2 * tol_w * vmax + 8 * eps * vmax)[..., None], f"out: {what}")
    assert (o[~live & ~bad] == 0).all(), f"out of rows that see nothing: {what}"
    _close(_np(res.lse), lse, 2 * d + 16 * eps * (1 + np.abs(np.nan_to_num(lse, posinf=0.0, neginf=0.0))),
           f"lse: {what}")
    if sinks is not None:
        _close(_np(res.sink_weight), sw, tol_w, f"sink_weight: {what}")
    else:
        assert res.sink_weight is None
    g_max = _np(res.max_weight).reshape(lse.shape)
    _close(g_max, np.where(bad, np.nan, np.nan_to_num(p).max(-1)), tol_w, f"max_weight: {what}")
    assert (g_max[~keys & ~bad] == 0).all(), f"max_weight of rows that see no key: {what}"
    full = p if sinks is None else np.concatenate([p, sw[..., None]], -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(bad, np.nan, -np.where(full > 0, full * np.log(full), 0.0).sum(-1))
    g_ent = _np(res.entropy).reshape(lse.shape)
    _close(g_ent, ent, np.minimum(tol_w * (2 + n_log) * 2, n_log + 1e-6) + 32 * eps * n_log, f"entropy: {what}")
    assert (g_ent[~live & ~bad] == 0).all(), f"entropy of dead rows: {what}"
    rec = np.where((vis & bad[..., None]).any(-2), np.nan, np.nan_to_num(p).sum(-2))
    _close(_np(res.received), rec, tol_w.sum(-1)[..., None] + 1e-12, f"received: {what}")
    if c["topk"]:
        K = c["topk"]
        tw = _np(res.topk_weights).reshape(lse.shape + (K,))
        ti = _np(res.topk_indices).reshape(tw.shape)
        srt = -np.sort(-np.nan_to_num(p), axis=-1)[..., :K]
        ref_sorted = np.concatenate([srt, np.zeros(srt.shape[:-1] + (K - srt.shape[-1],))], -1)  # k > Nk: (0, -1)
        _close(tw, np.where(bad[..., None], np.nan, ref_sorted), tol_w[..., None], f"topk_weights: {what}")
        assert ((ti == -1) == ((tw == 0) | np.isnan(tw))).all(), f"topk index -1 exactly where the weight is 0: {what}"
        at_ti = np.take_along_axis(np.nan_to_num(p), np.maximum(ti, 0), axis=-1)
        assert (np.abs(np.where(ti >= 0, at_ti - tw, 0.0)) <= tol_w[..., None]).all(), f"topk_indices: {what}"
        srt_i = np.sort(np.where(ti >= 0, ti, -1 - np.arange(K)), axis=-1)
        assert (np.diff(srt_i, axis=-1) != 0).all(), f"repeated top-k index: {what}"
    if rows is not None:
        idx = list(range(c["Nq"])) if rows == "all" else [r % c["Nq"] for r in rows]
        gw = _np(res.weights).reshape(p.shape[:2] + (len(idx), c["Nk"]))
        _close(gw, p[:, :, idx], tol_w[:, :, idx, None], f"weights: {what}")
    if at is not None:
        ia = np.broadcast_to(at, p.shape[:3] + (at.shape[-1],))
        p0 = np.concatenate([p, np.zeros(p.shape[:3] + (1,))], -1)  # index -1 reads 0
        want = np.take_along_axis(p0, np.where(ia >= 0, ia, c["Nk"]), axis=-1)
        _close(_np(res.weights_at), want, tol_w[..., None], f"weights_at: {what}")


def test_fuzz_against_an_independent_numpy_oracle():
    ran = {b: 0 for b in BACKENDS}
    padded = [0]  # cases of padded batches (seqlens_q / seqlens_k)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not FULL, database=None,
              suppress_health_check=list(HealthCheck))
    @given(c=calls())
    def run(c):
        arrays = make(c)
        for backend in BACKENDS:
            check(c, backend, *arrays)
            ran[backend] += 1
            padded[0] += c["seqlens"] is not None

    t0 = time.perf_counter()
    run()
    took = time.perf_counter() - t0
    total = sum(ran.values())
    print(f"\nfuzz: {total} cases ({ran}; {padded[0]} of them padded batches with seqlens) in {took:.1f} s")
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
