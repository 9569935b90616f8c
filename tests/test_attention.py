"""`attnlens.attention` on every backend against the float64 reference (and against PyTorch's SDPA)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (DEVICES, assert_close, check_topk, make_inputs, make_mask, np64, reference,
                      reference_with_full, visible)

import attnlens as al
from attnlens.core import LensField, MaskFeature, Memory, ScoreMod, dispatch
from attnlens.core.inputs import validate
from attnlens.core.backends import torch_chunked

LENS_BACKENDS = ["torch", "reference", "auto"]
OUT_BACKENDS = ["torch", "sdpa", "reference", "auto"]

# (B, Hq, Hkv, Nq, Nk, D, Dv, rank)
SHAPES = {
    "r2": (1, 1, 1, 13, 13, 8, 8, 2),
    "r2-Nq<Nk": (1, 1, 1, 5, 97, 16, 16, 2),
    "r3-D7": (1, 3, 3, 97, 97, 7, 7, 3),
    "r3-Nq>Nk-D33": (1, 2, 2, 97, 31, 33, 33, 3),
    "r3-gqa": (1, 6, 3, 40, 51, 8, 8, 3),
    "r4": (2, 4, 4, 97, 97, 16, 16, 4),
    "r4-Dv!=D": (2, 2, 2, 20, 97, 7, 33, 4),
    "gqa": (2, 6, 2, 97, 45, 16, 8, 4),
    "mqa": (1, 4, 1, 33, 97, 33, 5, 4),
    "decode-Nq1": (2, 4, 2, 1, 97, 16, 16, 4),
}

# name -> (kwargs, mask spec (kind, layout, dead rows) or None)
CONFIGS = {
    "plain": ({}, None),
    "scale": ({"scale": 0.37}, None),
    "causal": ({"causal": True}, None),
    "win-int": ({"window": 5}, None),
    "win-left": ({"window": (3, None)}, None),
    "win-right": ({"window": (None, 4)}, None),
    "win-lr": ({"window": (7, 2)}, None),
    "causal+win": ({"causal": True, "window": (6, None)}, None),
    "causal+win-lr": ({"causal": True, "window": (4, 3)}, None),
    "bool-k": ({}, ("bool", "k", 0)),
    "bool-qk-dead": ({}, ("bool", "qk", 2)),
    "bool-pad": ({}, ("bool", "pad", 0)),
    "bool-head-dead": ({}, ("bool", "head", 1)),
    "float-k": ({}, ("float", "k", 0)),
    "float-qk-dead": ({}, ("float", "qk", 2)),
    "float-pad": ({}, ("float", "pad", 0)),
    "float-head-dead": ({}, ("float", "head", 1)),
    "causal+bool-qk": ({"causal": True}, ("bool", "qk", 1)),
    "win+float-head": ({"window": (5, 5)}, ("float", "head", 0)),
}


def build_mask(spec, shape, rng):
    """A mask for the layout named in ``spec``, shaped for the input's rank."""
    if spec is None:
        return None
    kind, layout, dead = spec
    B, Hq, Hkv, Nq, Nk, D, Dv, rank = shape
    if layout == "k":
        return make_mask(kind, (Nk,), rng=rng)
    if layout == "qk":
        return make_mask(kind, (Nq, Nk), rng=rng, dead_rows=dead)
    if layout == "head":
        m = make_mask(kind, (1, Hq, Nq, Nk), rng=rng, dead_rows=dead)
        return m.reshape(m.shape[4 - rank:])
    if layout == "pad":  # key padding (B, 1, 1, Nk); with B > 1 one sequence has length 0
        lengths = rng.integers(1, Nk + 1, size=B)
        if B > 1:
            lengths[rng.integers(B)] = 0
        keep = torch.arange(Nk)[None, :] < torch.as_tensor(lengths)[:, None]
        m = keep[:, None, None, :]
        if kind == "float":
            m = torch.where(m, torch.tensor(rng.standard_normal((B, 1, 1, Nk)), dtype=torch.float32),
                            torch.tensor(float("-inf")))
        return m.reshape(m.shape[4 - rank:])
    raise AssertionError(layout)


def case(shape_name, cfg_name, rng, dtype=torch.float32, scale_factor=1.0):
    shape = SHAPES[shape_name]
    B, Hq, Hkv, Nq, Nk, D, Dv, rank = shape
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale_factor, rng=rng, rank=rank)
    kw, spec = CONFIGS[cfg_name]
    kw = dict(kw)
    mask = build_mask(spec, shape, rng)
    if mask is not None:
        kw["mask"] = mask
    return q, k, v, kw


def lens_tol(dtype):
    return (1e-9, 1e-9) if dtype == torch.float64 else (5e-5, 1e-4)


def check_lens(res, ref, dtype, *, atol=None, rtol=None):
    a, r = lens_tol(dtype)
    atol = a if atol is None else atol
    rtol = r if rtol is None else rtol
    assert_close(res.lse, ref.lse, atol=atol, rtol=rtol, what="lse")
    assert_close(res.max_weight, ref.max_weight, atol=atol, rtol=rtol, what="max_weight")
    assert_close(res.entropy, ref.entropy, atol=atol, rtol=rtol, what="entropy")
    assert_close(res.received, ref.received, atol=atol, rtol=rtol, what="received")
    if ref.topk_weights is not None:
        check_topk(res, ref, atol=atol)
    if ref.weights is not None:
        assert res.rows == ref.rows
        assert_close(res.weights, ref.weights, atol=atol, rtol=rtol, what="weights")


# --------------------------------------------------------------------------------------------
# the main matrix: shapes x masks/causal/windows x backends

@pytest.mark.parametrize("backend", OUT_BACKENDS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_output_matches_reference(shape, cfg, backend, rng):
    q, k, v, kw = case(shape, cfg, rng)
    before = [t.clone() for t in (q, k, v)]
    out = al.attention(q, k, v, backend=backend, **kw)
    ref_out, _ = reference(q, k, v, **kw)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v))), "inputs were modified"
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what=f"out ({backend})")


@pytest.mark.parametrize("backend", LENS_BACKENDS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lens_matches_reference_float64(shape, cfg, backend, rng):
    q, k, v, kw = case(shape, cfg, rng, dtype=torch.float64)
    Nq, Nk = q.shape[-2], k.shape[-2]
    topk = min(5, Nk)
    rows = [0, -1, Nq // 2]
    out, res = al.attention(q, k, v, backend=backend, lens=al.Lens(topk=topk, rows=rows), **kw)
    ref_out, ref = reference_with_full(q, k, v, topk=topk, rows=rows, **kw)
    assert_close(out, ref_out, atol=1e-10, rtol=1e-10, what="out")
    check_lens(res, ref, torch.float64)
    assert res.rows == tuple(r % Nq for r in rows)


@pytest.mark.parametrize("backend", LENS_BACKENDS)
@pytest.mark.parametrize("cfg", ["plain", "causal", "causal+win-lr", "bool-qk-dead", "float-head-dead", "bool-pad"])
@pytest.mark.parametrize("shape", ["r3-Nq>Nk-D33", "gqa", "r4-Dv!=D"])
def test_lens_matches_reference_float32(shape, cfg, backend, rng):
    q, k, v, kw = case(shape, cfg, rng, dtype=torch.float32)
    Nk = k.shape[-2]
    out, res = al.attention(q, k, v, backend=backend, lens=al.Lens(topk=min(4, Nk), rows="all"), **kw)
    ref_out, ref = reference_with_full(q, k, v, topk=min(4, Nk), rows="all", **kw)
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what="out")
    check_lens(res, ref, torch.float32)
    for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "weights"):
        assert getattr(res, f).dtype == torch.float32, f


@pytest.mark.parametrize("backend", ["torch", "auto", "sdpa"])
@pytest.mark.parametrize("shape,kw", [
    ((1, 2, 2, 1025, 1025, 16, 16), {"causal": True}),
    ((1, 2, 1, 64, 1025, 8, 8), {"window": (200, None), "mask": "pad"}),
], ids=["causal-1025", "gqa-64x1025-window-pad"])
def test_long_sequences(shape, kw, backend, rng):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, torch.float32, rng=rng)
    kw = dict(kw)
    if kw.get("mask") == "pad":
        kw["mask"] = al.masks.padding_mask([rng.integers(Nk // 2, Nk)], Nk)
    ref_out, ref = reference_with_full(q, k, v, topk=3, **kw)
    if backend == "sdpa":
        out = al.attention(q, k, v, backend=backend, **kw)
    else:
        out, res = al.attention(q, k, v, backend=backend, lens=al.Lens(topk=3), **kw)
        check_lens(res, ref, torch.float32)
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what="out")


# --------------------------------------------------------------------------------------------
# causal alignment, windows and fully masked rows, spelled out

@pytest.mark.parametrize("Nq,Nk", [(5, 12), (12, 5), (9, 9), (1, 7)])
@pytest.mark.parametrize("backend", LENS_BACKENDS)
def test_causal_is_bottom_right(Nq, Nk, backend, rng):
    q, k, v = make_inputs(2, 3, 3, Nq, Nk, 8, 8, torch.float64, rng=rng)
    out, res = al.attention(q, k, v, causal=True, backend=backend, lens=al.Lens(rows="all"))
    i = np.arange(Nq)[:, None]
    j = np.arange(Nk)[None, :]
    allowed = j <= i + (Nk - Nq)
    w = np64(res.weights)
    assert (w[..., ~allowed] == 0).all(), "weight on a key causal attention may not see"
    assert (w[..., allowed] > 0).all()
    dead = max(0, Nq - Nk)  # the first Nq - Nk queries see nothing
    o = np64(out)
    assert (o[..., :dead, :] == 0).all()
    assert np.isneginf(np64(res.lse)[..., :dead]).all()
    assert np.isfinite(np64(res.lse)[..., dead:]).all()
    # the same as an explicit bool mask
    out_m = al.attention(q, k, v, mask=torch.from_numpy(allowed), backend=backend)
    assert_close(out, np64(out_m), atol=1e-12, what="causal vs explicit mask")
    if Nq == Nk:  # = PyTorch's (top-left) is_causal
        assert_close(out, np64(F.scaled_dot_product_attention(q, k, v, is_causal=True)), atol=1e-12)


@pytest.mark.parametrize("window", [0, 3, (2, None), (None, 1), (1, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(7, 15), (15, 7), (10, 10)])
def test_window_pattern(window, causal, Nq, Nk, rng):
    q, k, v = make_inputs(1, 2, 1, Nq, Nk, 5, 6, torch.float64, rng=rng)
    out, res = al.attention(q, k, v, causal=causal, window=window, backend="torch", lens=al.Lens(rows="all"))
    keep = visible(Nq, Nk, causal=causal, window=window)[0, 0]
    w = np64(res.weights)
    assert (w[..., ~keep] == 0).all()
    assert (w[..., keep] > 0).all()
    ref_out, ref = reference(q, k, v, causal=causal, window=window, rows="all")
    assert_close(out, ref_out, atol=1e-12)
    assert_close(res.weights, ref.weights, atol=1e-12)


DEAD_CASES = {
    # name -> (Nq, Nk, kwargs builder); every case has at least one query that sees no key
    "bool-row": (9, 11, lambda Nq, Nk: {"mask": torch.ones(Nq, Nk, dtype=torch.bool).index_fill_(0, torch.tensor([0, 4]), False)}),
    "float-row": (9, 11, lambda Nq, Nk: {"mask": torch.zeros(Nq, Nk).index_fill_(0, torch.tensor([3, 8]), float("-inf"))}),
    "causal-Nq>Nk": (12, 5, lambda Nq, Nk: {"causal": True}),
    "window-Nq>Nk": (10, 4, lambda Nq, Nk: {"window": (1, 1)}),
    "pad-len0": (6, 8, lambda Nq, Nk: {"mask": al.masks.padding_mask([0, 5], Nk)}),
    "head-dead": (6, 8, lambda Nq, Nk: {"mask": torch.ones(1, 3, Nq, Nk, dtype=torch.bool).index_fill_(1, torch.tensor([1]), False)}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", OUT_BACKENDS)
@pytest.mark.parametrize("name", list(DEAD_CASES))
def test_fully_masked_rows(name, backend, dtype, rng):
    Nq, Nk, build = DEAD_CASES[name]
    q, k, v = make_inputs(2, 3, 3, Nq, Nk, 8, 4, dtype, rng=rng)
    kw = build(Nq, Nk)
    dead = ~visible(Nq, Nk, causal=kw.get("causal", False), window=kw.get("window"), mask=kw.get("mask"),
                    shape4=(2, 3, Nq, Nk)).any(-1)
    assert dead.any() and not dead.all()
    ref_out, ref = reference_with_full(q, k, v, topk=3, rows="all", **kw)
    if backend == "sdpa":
        out = al.attention(q, k, v, backend=backend, **kw)
    else:
        out, res = al.attention(q, k, v, backend=backend, lens=al.Lens(topk=3, rows="all"), **kw)
        for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "weights"):
            assert not torch.isnan(getattr(res, f)).any(), f"NaN in {f}"
        lse, ent, mw = np64(res.lse), np64(res.entropy), np64(res.max_weight)
        assert np.isneginf(lse[dead]).all() and np.isfinite(lse[~dead]).all()
        assert (ent[dead] == 0).all() and (mw[dead] == 0).all()
        assert (np64(res.weights)[dead] == 0).all()
        assert (np64(res.topk_weights)[dead] == 0).all() and (np64(res.topk_indices)[dead] == -1).all()
        check_lens(res, ref, dtype)
    o = np64(out)
    assert not np.isnan(o).any()
    assert (o[dead] == 0).all(), "a query that sees no key must give exactly 0"
    atol = 1e-10 if dtype == torch.float64 else 3e-5
    assert_close(out, ref_out, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-3)], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", OUT_BACKENDS)
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"mask": "qk"}, {"window": (3, 2)}], ids=["plain", "causal", "mask", "window"])
def test_huge_scores_do_not_overflow(kw, backend, dtype, atol, rng):
    """q scaled so the scores are of size ±1e4 (and up to ~5e4): no inf/NaN, still the reference."""
    Nq, Nk, D = 37, 41, 16
    q, k, v = make_inputs(2, 2, 2, Nq, Nk, D, D, dtype, scale_factor=1e4, rng=rng)
    kw = dict(kw)
    if kw.get("mask") == "qk":
        kw["mask"] = make_mask("float", (Nq, Nk), rng=rng, dead_rows=1)
    s = np64(q) @ np.swapaxes(np64(k), -1, -2) / np.sqrt(D)
    assert np.abs(s).max() > 1e4
    ref_out, ref = reference_with_full(q, k, v, topk=2, **kw)
    if backend == "sdpa":
        out = al.attention(q, k, v, backend=backend, **kw)
    else:
        out, res = al.attention(q, k, v, backend=backend, lens=al.Lens(topk=2), **kw)
        assert_close(res.lse, ref.lse, atol=atol * 10, rtol=1e-6, what="lse")  # lse ~ 1e4
        for f in ("max_weight", "entropy", "received"):
            assert_close(getattr(res, f), getattr(ref, f), atol=atol, rtol=atol, what=f)
        check_topk(res, ref, atol=atol)
    assert_close(out, ref_out, atol=atol, rtol=atol, what="out")


@pytest.mark.parametrize("backend", OUT_BACKENDS)
def test_float_mask_with_finite_very_negative_entries(backend, rng):
    """Hugging Face style float masks use ``finfo.min`` (finite) instead of -inf. A query whose every
    key carries finfo.min still sees all of them equally (the scores stay finite): the reference
    gives the uniform average, and so must every backend."""
    Nq, Nk = 8, 10
    q, k, v = make_inputs(1, 2, 2, Nq, Nk, 8, 8, torch.float32, rng=rng)
    mask = torch.zeros(Nq, Nk)
    mask[2] = torch.finfo(torch.float32).min  # whole row: finite but hugely negative
    mask[5, :4] = torch.finfo(torch.float32).min  # part of a row: those keys get weight 0
    out = al.attention(q, k, v, mask=mask, backend=backend)
    ref_out, _ = reference(q, k, v, mask=mask)
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what="out")


# --------------------------------------------------------------------------------------------
# lens fields: defaults, selection, rows specs

def test_lens_true_gives_defaults_and_none_gives_out_only(rng):
    q, k, v = make_inputs(2, 2, 2, 9, 11, 4, 4, torch.float32, rng=rng)
    out = al.attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 9, 4)
    for off in (None, False):
        out_f = al.attention(q, k, v, lens=off)
        assert isinstance(out_f, torch.Tensor) and torch.equal(out_f, out)
    out2, res = al.attention(q, k, v, lens=True)
    assert isinstance(res, al.LensResult)
    assert torch.allclose(out, out2, atol=1e-6)
    default = al.Lens()
    for f in ("lse", "max_weight", "entropy", "received"):
        assert (getattr(res, f) is not None) == getattr(default, f)
    assert res.lse.shape == (2, 2, 9) and res.received.shape == (2, 2, 11)
    assert res.topk_indices is None and res.topk_weights is None and res.weights is None and res.rows is None
    _, res2 = al.attention(q, k, v, lens=al.Lens())
    for f in ("lse", "max_weight", "entropy", "received"):
        assert torch.equal(getattr(res, f), getattr(res2, f))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("only", ["lse", "max_weight", "entropy", "received", "topk", "rows"])
def test_fields_not_asked_for_are_none(only, backend, rng):
    q, k, v = make_inputs(1, 2, 1, 7, 9, 4, 3, torch.float64, rng=rng)
    flags = {f: f == only for f in ("lse", "max_weight", "entropy", "received")}
    lens = al.Lens(**flags, topk=3 if only == "topk" else 0, rows=[1, 2] if only == "rows" else None)
    _, res = al.attention(q, k, v, lens=lens, backend=backend, causal=True)
    _, ref = reference_with_full(q, k, v, causal=True, topk=3, rows=[1, 2])
    present = {"topk": ("topk_indices", "topk_weights"), "rows": ("weights", "rows")}.get(only, (only,))
    for f in ("lse", "max_weight", "entropy", "received", "topk_indices", "topk_weights", "weights", "rows"):
        if f in present:
            assert getattr(res, f) is not None, f
        else:
            assert getattr(res, f) is None, f"{f} was not asked for but is {getattr(res, f)!r}"
    if only == "topk":
        check_topk(res, ref, atol=1e-10)
    elif only == "rows":
        assert res.rows == (1, 2)
        assert_close(res.weights, ref.weights, atol=1e-12)
    else:
        assert_close(getattr(res, only), getattr(ref, only), atol=1e-10, rtol=1e-10)
    repr(res)  # repr works with None fields


@pytest.mark.parametrize("backend", LENS_BACKENDS)
@pytest.mark.parametrize("rows,expected", [
    ([0, -1, 3, -2, 3], None),
    (slice(2, 9, 3), None),
    (slice(None, None, -4), None),
    (range(1, 10, 2), None),
    ("all", None),
    ([], None),
], ids=["list-neg-dup", "slice", "slice-rev", "range", "all", "empty"])
def test_rows_specs(rows, expected, backend, rng):
    Nq, Nk = 10, 13
    q, k, v = make_inputs(2, 4, 2, Nq, Nk, 6, 6, torch.float64, rng=rng)
    mask = make_mask("bool", (Nq, Nk), rng=rng, dead_rows=1)
    _, res = al.attention(q, k, v, mask=mask, lens=al.Lens(rows=rows), backend=backend)
    want = tuple(range(Nq)) if rows == "all" else (tuple(range(Nq)[rows]) if isinstance(rows, slice)
                                                   else tuple(r % Nq for r in rows))
    assert res.rows == want
    assert res.weights.shape == (2, 4, len(want), Nk)
    _, ref = reference(q, k, v, mask=mask, rows=list(want))
    assert_close(res.weights, ref.weights, atol=1e-12)


def test_rows_on_rank2_and_rank3(rng):
    q, k, v = make_inputs(1, 1, 1, 6, 8, 4, 4, torch.float64, rng=rng, rank=2)
    _, res = al.attention(q, k, v, lens=al.Lens(rows=[-1], topk=2))
    assert res.weights.shape == (1, 8) and res.lse.shape == (6,) and res.received.shape == (8,)
    assert res.topk_indices.shape == (6, 2)
    q, k, v = make_inputs(1, 3, 3, 6, 8, 4, 4, torch.float64, rng=rng, rank=3)
    _, res = al.attention(q, k, v, lens=al.Lens(rows=[0, 5], topk=2))
    assert res.weights.shape == (3, 2, 8) and res.lse.shape == (3, 6) and res.received.shape == (3, 8)


# --------------------------------------------------------------------------------------------
# against torch.nn.functional.scaled_dot_product_attention directly

@pytest.mark.parametrize("dtype,atol", [(torch.float32, 3e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", OUT_BACKENDS)
@pytest.mark.parametrize("what", ["plain", "is_causal", "bool-mask", "float-mask", "gqa", "gqa-causal-mask", "scale", "Nq!=Nk"])
def test_matches_torch_sdpa(what, backend, dtype, atol, rng):
    B, Hq, Hkv, Nq, Nk, D, Dv = 2, 4, 4, 33, 33, 16, 12
    if what.startswith("gqa"):
        Hkv = 2
    if what == "Nq!=Nk":
        Nq = 20
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, rng=rng)
    ours, theirs = {}, {}
    if what == "is_causal":
        ours, theirs = {"causal": True}, {"is_causal": True}
    elif what == "bool-mask":
        m = make_mask("bool", (B, 1, Nq, Nk), rng=rng, p_keep=0.6)
        m[..., 0] = True  # PyTorch gives NaN for rows with no key; keep every row live here
        ours, theirs = {"mask": m}, {"attn_mask": m}
    elif what == "float-mask":
        m = make_mask("float", (Hq, Nq, Nk), rng=rng).to(dtype)
        m[..., 0] = 0.5
        ours, theirs = {"mask": m}, {"attn_mask": m}
    elif what == "gqa":
        theirs = {"enable_gqa": True}
    elif what == "gqa-causal-mask":
        m = torch.ones(Nq, Nk, dtype=torch.bool).tril()
        ours, theirs = {"causal": True}, {"attn_mask": m, "enable_gqa": True}
    elif what == "scale":
        ours, theirs = {"scale": 0.05}, {"scale": 0.05}
    expected = F.scaled_dot_product_attention(q, k, v, **theirs)
    if backend == "sdpa" or backend == "auto":
        out = al.attention(q, k, v, backend=backend, **ours)
    else:
        out, _ = al.attention(q, k, v, backend=backend, lens=True, **ours)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=atol, rtol=atol)


# --------------------------------------------------------------------------------------------
# kinds, dtypes and devices

@pytest.mark.parametrize("backend", LENS_BACKENDS)
@pytest.mark.parametrize("np_dtype", [np.float32, np.float64, np.float16])
def test_numpy_in_numpy_out(np_dtype, backend, rng):
    q, k, v = make_inputs(2, 4, 2, 9, 12, 8, 5, np_dtype, rng=rng, numpy=True)
    mask = make_mask("bool", (9, 12), rng=rng, numpy=True, dead_rows=1)
    out, res = al.attention(q, k, v, mask=mask, causal=True, lens=al.Lens(topk=3, rows=[0, -1]), backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np_dtype and out.shape == (2, 4, 9, 5)
    sd = np.float64 if np_dtype == np.float64 else np.float32
    for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "weights"):
        a = getattr(res, f)
        assert isinstance(a, np.ndarray) and a.dtype == sd, (f, type(a), getattr(a, "dtype", None))
    assert isinstance(res.topk_indices, np.ndarray) and res.topk_indices.dtype == np.int64
    ref_out, ref = reference_with_full(q, k, v, mask=mask, causal=True, topk=3, rows=[0, -1])
    tol = {np.float16: 2e-3, np.float32: 3e-5, np.float64: 1e-10}[np_dtype]
    assert_close(out, ref_out, atol=tol, rtol=tol)
    check_lens(res, ref, torch.float64 if np_dtype == np.float64 else torch.float32,
               atol=max(tol, 5e-5) if np_dtype != np.float64 else None)
    out_only = al.attention(q, k, v, mask=mask, causal=True)
    assert isinstance(out_only, np.ndarray) and out_only.dtype == np_dtype


@pytest.mark.parametrize("np_dtype", [np.float16, np.float32, np.float64])
def test_numpy_rank2_and_output_not_aliasing_input(np_dtype, rng):
    q, k, v = make_inputs(1, 1, 1, 7, 9, 4, 4, np_dtype, rng=rng, numpy=True, rank=2)
    q0, k0, v0 = q.copy(), k.copy(), v.copy()
    for backend in ("torch", "reference", "sdpa"):
        out = al.attention(q, k, v, backend=backend)
        assert isinstance(out, np.ndarray) and out.dtype == np_dtype and out.shape == (7, 4)
        assert not np.shares_memory(out, v) and not np.shares_memory(out, q)
    assert (q == q0).all() and (k == k0).all() and (v == v0).all(), "inputs were modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "reference", "auto", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_torch_dtype_and_device_preserved(dtype, backend, device, rng):
    q, k, v = make_inputs(2, 4, 2, 11, 13, 8, 6, dtype, rng=rng, device=device)
    mask = make_mask("bool", (2, 1, 1, 13), rng=rng).to(device)
    if backend == "sdpa":
        out = al.attention(q, k, v, mask=mask, backend=backend)
        res = None
    else:
        out, res = al.attention(q, k, v, mask=mask, backend=backend, lens=al.Lens(topk=2, rows=[3]))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.device == q.device and out.shape == (2, 4, 11, 6)
    if res is not None:
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "weights"):
            t = getattr(res, f)
            assert isinstance(t, torch.Tensor) and t.dtype == sd and t.device == q.device, f
        assert res.topk_indices.dtype == torch.int64 and res.topk_indices.device == q.device
    ref_out, _ = reference(q, k, v, mask=mask)
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 3e-5, torch.float64: 1e-10}[dtype]
    assert_close(out.float() if dtype in (torch.float16, torch.bfloat16) else out, ref_out, atol=tol, rtol=tol)


def test_lens_fields_carry_no_gradient_but_the_lse(rng):
    q, k, v = make_inputs(1, 2, 2, 8, 8, 4, 4, torch.float64, rng=rng, requires_grad=True)
    out, res = al.attention(q, k, v, lens=al.Lens(topk=2, rows="all"))
    assert out.requires_grad and res.lse.requires_grad  # d lse_i / d s_ij = P_ij (issue 24 item 9)
    for f in ("max_weight", "entropy", "received", "topk_weights", "weights"):
        assert not getattr(res, f).requires_grad, f


def naive_low_precision(q, k, v, mask=None, causal=False):
    """softmax(q kᵀ · scale + mask) v done the obvious way in q's own dtype (the yardstick)."""
    Hq, Hkv = q.shape[-3], k.shape[-3]
    k = k.repeat_interleave(Hq // Hkv, dim=-3)
    v = v.repeat_interleave(Hq // Hkv, dim=-3)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    Nq, Nk = s.shape[-2:]
    keep = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        keep = torch.from_numpy(visible(Nq, Nk, causal=True)[0, 0])
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p @ v, nan=0.0)


@pytest.mark.parametrize("backend", OUT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", ["plain", "causal", "mask-dead", "gqa-causal"])
def test_low_precision_error_within_2x_naive(kw, dtype, backend, rng):
    """DESIGN.md's rule: error vs the float64 reference <= 2 x the error of the naive computation in
    the same precision, + a small absolute floor."""
    Hkv = 2 if kw == "gqa-causal" else 4
    B, Hq, Nq, Nk, D = 2, 4, 97, 113, 33
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, D, dtype, rng=rng)
    mask = None
    causal = kw in ("causal", "gqa-causal")
    if kw == "mask-dead":
        mask = make_mask("bool", (Nq, Nk), rng=rng, dead_rows=3)
    ref_out, ref = reference(q, k, v, mask=mask, causal=causal)
    naive = naive_low_precision(q, k, v, mask=mask, causal=causal)
    naive_err = np.abs(np64(naive) - ref_out).max()
    floor = 1e-4 if dtype == torch.float16 else 1e-3  # well below one rounding of an O(1) output
    kwargs = {"mask": mask, "causal": causal, "backend": backend}
    if backend == "sdpa":
        out = al.attention(q, k, v, **kwargs)
    else:
        out, res = al.attention(q, k, v, lens=al.Lens(topk=2), **kwargs)
        assert res.lse.dtype == torch.float32
        # the lens is computed in float32 from the (rounded) inputs: float32 accuracy
        assert_close(res.lse, ref.lse, atol=1e-4, rtol=1e-5, what="lse")
        assert_close(res.entropy, ref.entropy, atol=1e-4, rtol=1e-4, what="entropy")
        assert_close(res.max_weight, ref.max_weight, atol=1e-5, rtol=1e-4, what="max_weight")
        assert_close(res.received, ref.received, atol=1e-4, rtol=1e-4, what="received")
    assert out.dtype == dtype
    err = np.abs(np64(out) - ref_out).max()
    assert not np.isnan(np64(out)).any()
    assert err <= 2 * naive_err + floor, f"error {err:.3g} > 2 x naive {naive_err:.3g} + {floor}"


# --------------------------------------------------------------------------------------------
# chunking of the torch backend does not change results

@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
@pytest.mark.parametrize("cfg", ["plain", "causal", "causal+win-lr", "win-right", "bool-qk-dead", "float-head-dead", "bool-pad"])
@pytest.mark.parametrize("shape", ["r3-Nq>Nk-D33", "gqa", "r2-Nq<Nk"])
def test_chunking_does_not_change_results(shape, cfg, rows_per_chunk, monkeypatch, rng):
    q, k, v, kw = case(shape, cfg, rng, dtype=torch.float64)
    q, k, v = q[..., :23, :], k, v  # keep the row loop short; 23 is not a multiple of 3 or 7
    if "mask" in kw and kw["mask"].ndim >= 2 and kw["mask"].shape[-2] > 1:
        kw["mask"] = kw["mask"][..., :23, :]
    B, Hq, Nq, _ = (1,) * (4 - q.ndim) + tuple(q.shape)
    Nk = k.shape[-2]
    chunk_bytes = rows_per_chunk * B * Hq * Nk * 8
    inp = validate(q, k, v, lens=al.Lens(), **kw)
    assert torch_chunked.chunk_rows(inp, chunk_bytes) == min(rows_per_chunk, Nq)
    rows = [0, Nq // 2, -1]
    be = al.TorchChunkedBackend(chunk_bytes=chunk_bytes)
    out, res = al.attention(q, k, v, backend=be, lens=al.Lens(topk=min(4, Nk), rows=rows), **kw)
    ref_out, ref = reference_with_full(q, k, v, topk=min(4, Nk), rows=rows, **kw)
    assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    check_lens(res, ref, torch.float64)


def test_chunk_rows_respects_chunk_bytes(rng):
    q, k, v = make_inputs(2, 3, 3, 50, 40, 4, 4, torch.float32, rng=rng)
    inp = validate(q, k, v)
    per_row = 2 * 3 * 40 * 4
    assert torch_chunked.chunk_rows(inp, 5 * per_row + 7) == 5
    assert torch_chunked.chunk_rows(inp, 1) == 1
    assert torch_chunked.chunk_rows(inp, 1 << 40) == 50
    assert torch_chunked.chunk_rows(validate(q.double(), k.double(), v.double()), 5 * per_row) == 2  # 8-byte floats
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="chunk_bytes"):
            al.TorchChunkedBackend(chunk_bytes=bad)


# --------------------------------------------------------------------------------------------
# backend selection

def test_backends_listed_in_priority_order():
    rows = al.backends()
    names = [r.name for r in rows]
    assert names == ["triton", "sdpa", "fused", "torch", "reference"]
    assert names == dispatch.names() == [b.name for b in dispatch.PRIORITY]
    for r in rows:
        shown = r.describe()
        for key in ("description", "lens", "grad", "dropout", "dtypes", "devices", "memory"):
            assert key in shown, (r.name, key)
    caps = {r.name: r.capabilities for r in rows}
    assert not caps["sdpa"].lens and not caps["sdpa"].block and rows[1].describe()["lens"] == "no"
    assert caps["fused"].block and caps["fused"].max_topk == 64 and caps["fused"].devices == frozenset({"cpu"})
    assert caps["torch"].block and LensField.TOPK in caps["torch"].lens and caps["torch"].dropout
    assert caps["triton"].max_topk == 16 and caps["triton"].devices == frozenset({"cuda"})
    assert caps["reference"].memory is Memory.DENSE and caps["torch"].memory is Memory.CHUNKED
    assert caps["sdpa"].memory is Memory.LINEAR and caps["sdpa"].worst_memory is Memory.DENSE
    assert MaskFeature.QUERY in caps["torch"].masks and MaskFeature.QUERY not in caps["triton"].masks
    assert ScoreMod.SINKS in caps["triton"].score_mods and not caps["sdpa"].score_mods
    shown = {r.name: r.describe()["masks"] for r in rows}  # per-sequence lengths shown where a backend serves them
    assert {n for n, m in shown.items() if "seqlens" in m} == {n for n, c in caps.items() if c.seqlens} \
        == {"triton", "torch", "reference"}
    text = al.info()
    for n in names:
        assert n in text


def _spy(monkeypatch):
    called = []
    for b in dispatch.PRIORITY:
        orig = b.forward

        def forward(inp, _orig=orig, _name=b.name):
            called.append(_name)
            return _orig(inp)
        monkeypatch.setattr(b, "forward", forward)
    return called


def test_auto_picks_sdpa_without_lens_and_the_fused_kernel_with_lens(monkeypatch, rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, torch.float32, rng=rng)
    fused, inp = al.FusedCpuBackend(), validate(q, k, v, lens=True)  # the fused kernel where auto takes it (its rule)
    lensed = "torch" if fused.not_supported_reasons(inp) or fused.auto_reasons(inp) else "fused"
    assert dispatch.select(validate(q, k, v)).name == "sdpa"
    assert dispatch.select(validate(q, k, v, lens=True)).name == lensed
    called = _spy(monkeypatch)
    al.attention(q, k, v)
    al.attention(q, k, v, lens=True)
    al.attention(q, k, v, lens=al.Lens(topk=1), dropout_p=0.2)  # dropout: the torch backend
    assert called == ["sdpa", lensed, "torch"]


def test_forcing_sdpa_with_lens_raises_with_reason(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, torch.float32, rng=rng)
    with pytest.raises(ValueError, match=r"(?s)'sdpa'.*lens"):
        al.attention(q, k, v, backend="sdpa", lens=True)
    with pytest.raises(ValueError, match=r"(?s)'sdpa'.*lens"):
        with al.use_backend("sdpa"):
            al.attention(q, k, v, lens=al.Lens(topk=2))


def test_forcing_reference_with_dropout_raises_and_grad_is_the_oracle(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, torch.float64, rng=rng)
    with pytest.raises(ValueError, match=r"(?s)'reference'.*q \(B=1, Hq=2, Nq=5, D=4\).*dropout"):
        al.attention(q, k, v, backend="reference", dropout_p=0.1)
    grads = {}
    for name in ("reference", "torch"):  # the float64 oracle's backward primitive serves gradients too
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        al.attention(qg, kg, vg, causal=True, backend=name).pow(2).sum().backward()
        grads[name] = (qg.grad, kg.grad, vg.grad)
    for a, b in zip(grads["reference"], grads["torch"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_no_backend_fits_lists_every_reason(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, torch.float64, rng=rng, requires_grad=True)
    m = torch.zeros(5, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"(?s)no backend can serve this call \(q \(B=1.*float64.*float mask.*"
                                         r"sdpa: no lens.*torch: .*float mask.*reference: .*float mask"):
        al.attention(q, k, v, mask=m, lens=True)


def test_use_backend_forces_and_restores(monkeypatch, rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, torch.float32, rng=rng)
    called = _spy(monkeypatch)
    with al.use_backend("torch"):
        al.attention(q, k, v)
        with al.use_backend("reference"):
            al.attention(q, k, v)
            al.attention(q, k, v, backend="torch")  # an explicit name wins over the forced one
        al.attention(q, k, v)
        with al.use_backend("auto"):
            al.attention(q, k, v)
    al.attention(q, k, v)
    assert called == ["torch", "reference", "torch", "torch", "sdpa", "sdpa"]
    called.clear()
    with pytest.raises(RuntimeError):
        with al.use_backend("reference"):
            raise RuntimeError("boom")
    al.attention(q, k, v)
    assert called == ["sdpa"], "use_backend was not restored after an exception"
    with pytest.raises(ValueError, match="backend"):
        with al.use_backend("no-such-backend"):
            pass


def test_use_backend_results_equal_explicit_backend(rng):
    q, k, v = make_inputs(2, 4, 2, 17, 19, 8, 8, torch.float64, rng=rng)
    for name in ("torch", "reference", "sdpa"):
        with al.use_backend(name):
            a = al.attention(q, k, v, causal=True)
        b = al.attention(q, k, v, causal=True, backend=name)
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------
# layouts

@pytest.mark.parametrize("backend", OUT_BACKENDS)
def test_non_contiguous_inputs(backend, rng):
    """(B, N, H, D) tensors viewed as (B, H, N, D) by a transpose, the common layout of projections."""
    B, H, Nq, Nk, D = 2, 3, 14, 17, 8
    qb, kb, vb = (torch.tensor(rng.standard_normal((B, n, H, D)), dtype=torch.float64) for n in (Nq, Nk, Nk))
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
    assert not q.is_contiguous()
    out = al.attention(q, k, v, causal=True, backend=backend)
    ref_out, _ = reference(q, k, v, causal=True)
    assert_close(out, ref_out, atol=1e-10)


# --------------------------------------------------------------------------------------------
# top-k: many key counts (block boundaries, a short tail block), fewer visible keys than k, ties

@pytest.mark.parametrize("topk", [1, 3, 8])
@pytest.mark.parametrize("Nk", [33, 64, 65, 200, 257])
@pytest.mark.parametrize("cfg", ["plain", "causal", "block-masked", "narrow-window", "pad", "ties"])
def test_topk_matches_reference(cfg, Nk, topk, rng):
    Nq = 19
    q, k, v = make_inputs(2, 4, 2, Nq, Nk, 8, 4, torch.float64, rng=rng)
    kw = {}
    if cfg == "causal":
        kw["causal"] = True
    elif cfg == "block-masked":  # whole runs of keys hidden, different per row; one row sees 2 keys only
        keep = torch.ones(Nq, Nk, dtype=torch.bool)
        for i in range(Nq):
            a = int(rng.integers(0, Nk))
            keep[i, a:a + int(rng.integers(1, 100))] = False
        keep[3] = False
        keep[3, [0, Nk - 1]] = True
        kw["mask"] = keep
    elif cfg == "narrow-window":
        kw["window"] = (1, 1)  # at most 3 visible keys; k > 3 leaves -1 / 0 slots
    elif cfg == "pad":
        kw["mask"] = al.masks.padding_mask([Nk - 1, int(rng.integers(1, Nk))], Nk)
    elif cfg == "ties":  # repeated keys: equal scores, equal weights
        k = k.clone()
        k[:, :, 1::2] = k[:, :, 0:-1:2]
    out, res = al.attention(q, k, v, lens=al.Lens(topk=topk), backend="torch", **kw)
    _, ref = reference(q, k, v, topk=topk, **kw)
    check_topk(res, ref, atol=1e-10)
    if cfg == "narrow-window" and topk > 3:
        assert (np64(res.topk_indices)[..., 3:] == -1).all()


@pytest.mark.parametrize("backend", OUT_BACKENDS)
def test_scale_zero_averages_visible_values(backend, rng):
    q, k, v = make_inputs(1, 2, 2, 6, 6, 4, 3, torch.float64, rng=rng)
    out = al.attention(q, k, v, scale=0.0, causal=True, backend=backend)
    expected = torch.cumsum(v, dim=-2) / torch.arange(1, 7, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_scores_may_be_nonfinite_bound_matches_vector_norm():
    """`_scores_may_be_nonfinite` takes max|x| by one aminmax pass (`_absmax`): the same decision as the
    ``linalg.vector_norm(x, inf)`` bound it replaced, on NaN / ±inf / overflowing inputs and masks, strided views,
    half precision; `_absmax` of an empty tensor is 0 (as vector_norm)."""
    def old_rule(inp):
        cdt = torch_chunked.stat_dtype(inp.q.dtype)
        qa = float(torch.linalg.vector_norm(inp.q, float("inf"), dtype=cdt))
        ka = float(torch.linalg.vector_norm(inp.k, float("inf"), dtype=cdt))
        bound = qa * ka * inp.shape[5] * abs(inp.scale)
        if inp.mask is not None and inp.mask.dtype != torch.bool:
            bound += float(torch.linalg.vector_norm(inp.mask.masked_fill(torch.isneginf(inp.mask), 0.0),
                                                    float("inf"), dtype=cdt))
        return not bound < torch.finfo(cdt).max / 4

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 6, 2, 4, generator=g).transpose(1, 2)  # (1, 2, 6, 4), strided like a transformers view
    cases = []
    for fill in (None, float("nan"), float("inf"), -float("inf"), 1e20, -1e20):
        for where in ("q", "k"):
            q, k = base.clone(), base.clone() * 0.5
            if fill is not None:
                (q if where == "q" else k)[0, 1, 3, 2] = fill
            cases.append(dict(q=q, k=k, mask=None))
    for fill in (float("nan"), float("inf"), -float("inf"), 1e38, -1e38, -3.0):
        mask = torch.zeros(1, 1, 6, 6)
        mask[0, 0, 2, 1] = fill
        cases.append(dict(q=base, k=base, mask=mask))
    cases.append(dict(q=base, k=base, mask=torch.rand(1, 1, 6, 6, generator=g) > 0.3))
    cases.append(dict(q=base.half(), k=(base * 300).half(), mask=None))  # bound over half's range (D·300² > 65504/4)
    cases.append(dict(q=base.half(), k=base.half(), mask=None))
    seen = set()
    for c in cases:
        inp = validate(c["q"], c["k"], c["k"].clone(), mask=c["mask"])
        got = torch_chunked._scores_may_be_nonfinite(inp)
        assert got == old_rule(inp), c
        seen.add(got)
    assert seen == {True, False}
    assert torch_chunked._absmax(torch.empty(0)) == 0.0
