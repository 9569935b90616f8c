"""The fused CPU backend (backends/fused.c) against the float64 oracle: every lens field, the backward, the column
pass, the NaN/inf rule, fp16/bf16, the portable SIMD build, the library cache under concurrent first builds, and the
fallback when no compiler works.

Tolerance (DESIGN.md's rule): the kernel's error against the float64 reference may be at most twice the error of the
same quantity computed naively in float32 by PyTorch (a dense softmax, `naive32`), plus a small absolute floor.

Sizes sit on the kernel's tile boundaries (64 keys, 48-row query tiles, 16-float SIMD rows): N = 1, 63, 64, 65, and
a few more; GQA 1/2/8 query heads per key/value head; D, Dv not multiples of 16.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from conftest import make_inputs, np64

import attnlens as al
from attnlens.core import dispatch
from attnlens.core.backends import fused as _fused
from attnlens.core.backends import native as _native
from attnlens.core.inputs import validate
from attnlens.core.reference import reference_attention, reference_backward, reference_lens

needs_kernel = pytest.mark.skipif(_fused.library()[0] is None, reason="the fused kernel cannot be built here")
pytestmark = needs_kernel
BE = al.FusedCpuBackend()
FLOOR = 2e-6


# --------------------------------------------------------------------------------------------
# oracles


def ref_all(inp, lens, W=None, at=None):
    """float64 reference ``(out, weights, lse, LensResult)`` of a checked call."""
    g = lambda t: None if t is None else np64(t)  # noqa: E731
    out, w, lse = reference_attention(g(inp.q), g(inp.k), g(inp.v), mask=g(inp.mask), causal=inp.causal,
                                      window=inp.window, scale=inp.scale, offset=inp.offset, softcap=inp.softcap,
                                      sinks=g(inp.sinks), alibi_slopes=g(inp.alibi_slopes))
    res = reference_lens(w, lse, topk=lens.topk if lens else 0, rows=inp.rows, sinks=g(inp.sinks),
                         received_from=None if W is None else np64(W), at=None if at is None else np64(at),
                         pool=lens.pool if lens else None)
    res._full_weights = w
    return out, w, lse, res


def naive32(inp):
    """The same call in plain float32 PyTorch ops, dense (the yardstick of the tolerance): ``(out, P, lse)``."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    G = Hq // Hkv
    q = inp.q.float()
    k = inp.k.float().repeat_interleave(G, 1)
    v = inp.v.float().repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) * inp.scale
    if inp.softcap is not None:
        s = inp.softcap * torch.tanh(s / inp.softcap)
    i = torch.arange(Nq)[:, None] + inp.offset
    j = torch.arange(Nk)[None, :]
    if inp.alibi_slopes is not None:
        s = s - inp.alibi_slopes.float()[..., None, None] * (i - j).abs().float()
    keep = torch.ones(Nq, Nk, dtype=torch.bool)
    left, right = inp.window if inp.window is not None else (None, None)
    if inp.causal:
        keep &= j <= i
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    keep = keep.expand(B, Hq, Nq, Nk)
    if inp.mask is not None:
        m = inp.mask
        keep = keep & (m if m.dtype == torch.bool else m > float("-inf"))
        if m.dtype != torch.bool:
            s = s + m.float()
    s = s.masked_fill(~keep, float("-inf"))
    if inp.sinks is not None:
        s = torch.cat([s, inp.sinks.float().expand(B, Hq)[..., None, None].expand(B, Hq, Nq, 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))[..., :Nk]
    return p @ v, p, lse


def tol(ours, naive, ref, floor=FLOOR):
    """2 × the naive float32 error + a floor."""
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf: NaN, skipped by nanmax
        return 2 * float(np.nanmax(np.abs(np64(naive) - ref), initial=0.0)) + floor


def check(name, ours, ref, atol):
    a = np64(ours)
    assert a.shape == ref.shape, f"{name}: shape {a.shape} != {ref.shape}"
    assert np.array_equal(np.isnan(a), np.isnan(ref)), f"{name}: NaN where the reference has none (or the reverse)"
    assert np.array_equal(np.isneginf(a), np.isneginf(ref)), f"{name}: -inf pattern differs"
    fin = np.isfinite(ref)
    err = float(np.max(np.abs(a[fin] - ref[fin]), initial=0.0))
    assert err <= atol, f"{name}: max error {err:.3g} > {atol:.3g}"


# --------------------------------------------------------------------------------------------
# the forward and every lens field

# (B, Hq, Hkv, Nq, Nk, D, Dv, kwargs): tile edges (1, 63, 64, 65 keys; 47/48/49 rows), GQA 1/2/8, odd dims
CASES = {
    "one-query": (1, 2, 2, 1, 65, 16, 16, {"causal": True}),
    "one-key": (1, 2, 1, 5, 1, 8, 8, {}),
    "63-causal": (1, 2, 2, 63, 63, 32, 32, {"causal": True}),
    "64-full-gqa2": (1, 4, 2, 64, 64, 16, 24, {}),
    "65-causal-gqa8": (1, 8, 1, 65, 65, 7, 5, {"causal": True}),
    "49x130-window": (2, 3, 3, 49, 130, 20, 12, {"window": (17, 3)}),
    "47x129-left-only": (1, 2, 2, 47, 129, 16, 16, {"causal": True, "window": (30, None)}),
    "right-only": (1, 2, 1, 33, 100, 9, 9, {"window": (None, 4)}),
    "keymask-dead": (2, 4, 2, 40, 70, 16, 16, {"mask": "keys"}),
    "querymask-float": (1, 2, 2, 50, 77, 12, 12, {"mask": "float"}),
    "querymask-bool-dead": (1, 2, 2, 50, 77, 12, 12, {"mask": "bool", "causal": True}),
    "d128": (1, 2, 2, 70, 70, 128, 128, {"causal": True}),
}
OFFSETS = ["default", "negative", "zero", "beyond"]


def draw(case, rng, offset="default", dtype=torch.float32, scale_factor=1.0):
    B, Hq, Hkv, Nq, Nk, D, Dv, kw = CASES[case]
    kw = dict(kw)
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, scale_factor=scale_factor, rng=rng)
    m = kw.get("mask")
    if m == "keys":  # a key mask; the last sequence sees no key at all
        keep = torch.from_numpy(rng.random((B, 1, 1, Nk)) < 0.7)
        keep[-1] = False
        kw["mask"] = keep
    elif m == "bool":
        keep = torch.from_numpy(rng.random((B, Hq, Nq, Nk)) < 0.6)
        keep[:, :, 3] = False  # a dead row
        kw["mask"] = keep
    elif m == "float":
        keep = rng.random((1, Hq, Nq, Nk)) < 0.6
        kw["mask"] = torch.tensor(np.where(keep, rng.standard_normal(keep.shape), -np.inf), dtype=torch.float32)
    kw["offset"] = {"default": None, "negative": -int(rng.integers(1, 9)), "zero": 0,
                    "beyond": Nk + int(rng.integers(0, 4))}[offset]
    return q, k, v, kw


def run_forward(q, k, v, lens, **kw):
    """``Block.forward`` on the fused backend (its own pass, then the fields the Block fills) and the checked inputs."""
    blk = al.Block.build(q, k, v, lens=lens, backend="fused", **kw)
    return blk.forward(), blk.inputs


def check_forward(q, k, v, lens, W=None, at=None, **kw):
    (out, lse, res), inp = run_forward(q, k, v, lens, **kw)
    r_out, w, r_lse, ref = ref_all(inp, lens, W, at)
    n_out, n_p, n_lse = naive32(inp)
    n_out = n_out.to(out.dtype)  # the yardstick rounds its output to q's dtype too (fp16/bf16)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    check("out", out, r_out, tol(out, n_out, r_out))
    check("lse", lse, r_lse, tol(lse, n_lse, r_lse))
    if lens.lse:
        check("res.lse", res.lse, r_lse, tol(lse, n_lse, r_lse))
    p_tol = tol(None, n_p, w)
    for f in ("max_weight", "entropy", "received", "weights", "received_from", "weights_at", "pooled", "sink_weight"):
        want = getattr(ref, f)
        if want is None or getattr(res, f) is None:
            assert want is None or f in ("sink_weight",) and inp.sinks is None, f"{f} missing"
            continue
        scale = {"received": q.shape[2], "received_from": q.shape[2] * 2, "pooled": q.shape[2],
                 "entropy": 8, "weights_at": 1}.get(f, 1)
        check(f, getattr(res, f), want, p_tol * scale)
    if lens.topk:
        tw, ti = np64(res.topk_weights), np64(res.topk_indices)
        check("topk_weights", tw, ref.topk_weights, p_tol)
        assert ((ti == -1) == (tw == 0)).all(), "index -1 exactly where the weight is 0"
        live = ti >= 0
        got = np.take_along_axis(w, np.where(live, ti, 0), axis=-1)
        assert np.allclose(np.where(live, got, 0), np.where(live, tw, 0), atol=p_tol), "weights at our indices"
        srt = np.sort(np.where(live, ti, -np.arange(1, ti.shape[-1] + 1)), axis=-1)
        assert (np.diff(srt, axis=-1) != 0).all(), "repeated top-k index"
    live = ~np.isneginf(r_lse)
    assert (np64(out)[~live] == 0).all(), "a row that sees no key has output 0"
    return out, lse, res, inp


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_every_lens_field(case, offset, rng):
    q, k, v, kw = draw(case, rng, offset)
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    lens = al.Lens(topk=min(5, Nk), rows=[0, Nq // 2, -1, 0], pool=(7, 16),
                   received_from=torch.tensor(rng.random((B, 1, Nq, 3)), dtype=torch.float32),
                   at=torch.tensor(rng.integers(-1, Nk, (1, Hq, Nq, 4))))
    check_forward(q, k, v, lens, W=lens.received_from, at=lens.at, **kw)


@pytest.mark.parametrize("k_", [1, 8, 64])
def test_topk_sizes_and_ties(k_, rng):
    q, k, v = make_inputs(1, 2, 2, 70, 200, 16, 16, rng=rng)
    check_forward(q, k, v, al.Lens(topk=k_), causal=True)
    q0 = torch.zeros(1, 2, 70, 16)  # every score equal: the lowest keys first, as the reference's stable sort
    (_, _, res), _ = run_forward(q0, k, v, al.Lens(topk=k_), causal=True)
    assert res.topk_indices[0, 0, 0].tolist() == list(range(k_))


@pytest.mark.parametrize("mod", ["softcap", "alibi", "sinks", "all"])
def test_score_modifications(mod, rng):
    q, k, v = make_inputs(2, 4, 2, 65, 90, 16, 8, scale_factor=3.0, rng=rng)
    kw = {}
    if mod in ("softcap", "all"):
        kw["softcap"] = 2.5
    if mod in ("alibi", "all"):
        kw["alibi_slopes"] = al.masks.alibi_slopes(4)
    if mod in ("sinks", "all"):
        kw["sinks"] = torch.tensor([0.5, -1.0, 3.0, float("-inf")])
    mask = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    mask[1] = False  # sequence 1 sees no key: with a sink, out 0 and all weight on the sink
    check_forward(q, k, v, al.Lens(topk=3, rows="all", received_from=torch.ones(65, dtype=torch.float32)),
                  W=torch.ones(65, 1, dtype=torch.float64), causal=True, mask=mask, **kw)
    check_backward(q, k, v, causal=True, **kw)


def test_large_logits_do_not_overflow(rng):
    q, k, v = make_inputs(1, 2, 2, 80, 80, 16, 16, rng=rng)
    q = q / q.norm(dim=-1, keepdim=True) * 100.0
    k = k / k.norm(dim=-1, keepdim=True) * 400.0  # scores up to ±1e4
    out, lse, res, _ = check_forward(q, k, v, al.Lens(topk=2), causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(res.entropy).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype, rng):
    q, k, v, kw = draw("65-causal-gqa8", rng, dtype=dtype)
    out, lse, res, inp = check_forward(q, k, v, al.Lens(topk=3), **kw)
    assert out.dtype == dtype and res.entropy.dtype == torch.float32
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # the (B, N, H, D) layout models hand over
    out2 = al.attention(strided, k, v, backend="fused", **kw)
    assert torch.equal(out2, out), "strides are read as they are"


# --------------------------------------------------------------------------------------------
# the NaN/inf rule and dead rows


def test_nan_and_inf_reach_only_their_rows(rng):
    q, k, v = make_inputs(1, 2, 2, 70, 70, 16, 16, rng=rng)
    q[0, 0, 5, 3] = float("nan")  # query 5 of head 0: NaN everywhere it looks
    k[0, 1, 40, 0] = float("inf")  # key 40 of head 1: the rows that see it
    v[0, 0, 20, 2] = float("inf")  # value 20: only rows with weight > 0 on key 20, only column 2
    v[0, 1, 66, :] = float("nan")  # key 66 is seen by no causal row before it
    mask = torch.zeros(1, 1, 70, 70)
    mask[0, 0, 60, 10] = float("nan")  # a NaN mask entry: row 60 only
    lens = al.Lens(topk=3, rows=[5, 6, 60], pool=16)
    (out, lse, res), inp = run_forward(q, k, v, lens, causal=True, mask=mask)
    r_out, w, r_lse, ref = ref_all(inp, lens)
    for name, a, e in (("out", out, r_out), ("lse", lse, r_lse), ("entropy", res.entropy, ref.entropy),
                       ("max_weight", res.max_weight, ref.max_weight), ("received", res.received, ref.received),
                       ("weights", res.weights, ref.weights), ("pooled", res.pooled, ref.pooled),
                       ("topk_weights", res.topk_weights, ref.topk_weights)):
        check(name, a, e, 1e-5 * (70 if name in ("received", "pooled") else 1))
    assert (res.topk_indices[0, 0, 5] == -1).all()


def test_dead_rows_are_zero_and_minus_inf(rng):
    q, k, v = make_inputs(1, 2, 1, 30, 40, 16, 16, rng=rng)
    (out, lse, res), _ = run_forward(q, k, v, al.Lens(topk=2, rows="all"), causal=True, offset=-10)
    dead = torch.arange(30) < 10  # query i sees keys j <= i - 10
    assert (out[:, :, dead] == 0).all() and torch.isneginf(lse[:, :, dead]).all()
    for f in ("max_weight", "entropy"):
        assert (getattr(res, f)[:, :, dead] == 0).all(), f
    assert (res.topk_indices[:, :, dead] == -1).all() and (res.weights[:, :, dead] == 0).all()
    assert torch.isfinite(lse[:, :, ~dead]).all()


# --------------------------------------------------------------------------------------------
# backward


def check_backward(q, k, v, **kw):
    """The backward primitive with a loss on the output and on the lse (``dlse``; 0 at dead rows) and, with sinks,
    ``dsinks``, against the float64 reference backend's backward on the same inputs in float64."""
    inp = validate(q, k, v, **kw)
    out, lse, _ = BE.forward(inp)
    g = np.random.default_rng(7)
    dout = torch.tensor(g.standard_normal(out.shape), dtype=torch.float32)
    dlse = torch.tensor(g.standard_normal(lse.shape), dtype=torch.float32) * torch.isfinite(lse)
    pre = [torch.tensor(g.standard_normal(t.shape), dtype=torch.float32) for t in (q, k, v)]
    bufs = [p.clone() for p in pre]
    bufs[2] = bufs[2].transpose(-1, -2).contiguous().transpose(-1, -2)  # a strided buffer: added through a copy
    dsinks = None if inp.sinks is None else torch.zeros(inp.sinks.shape, dtype=torch.float32)
    BE.backward(inp, out, lse, dout, *bufs, dsinks=dsinks, dlse=dlse)
    # the oracle: the reference backend in float64
    kw64 = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    inp64 = validate(*(t.double() for t in (q, k, v)), **kw64)
    ref = al.ReferenceBackend()
    o64, l64, _ = ref.forward(inp64)
    want = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
    want_s = None if inp.sinks is None else torch.zeros(inp.sinks.shape, dtype=torch.float64)
    ref.backward(inp64, o64, l64, dout.double(), *want, dsinks=want_s, dlse=dlse.double())
    # the yardstick: the same gradients by PyTorch autograd through the dense float32 computation
    xs32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    s32 = None if inp.sinks is None else inp.sinks.detach().float().requires_grad_()
    n_out, _, n_lse = naive32(validate(*xs32, **dict(kw, sinks=s32) if s32 is not None else kw))
    ((n_out * dout).sum() + torch.where(dlse != 0, n_lse * dlse, 0.0).sum()).backward()
    for n, b, p, gr, nv in zip("qkv", bufs, pre, want, [x.grad for x in xs32]):
        check(f"d{n} added into the buffer", b - p, np64(gr), tol(None, torch.nan_to_num(nv), np64(gr), 1e-5))
    if dsinks is not None:
        check("dsinks", dsinks, np64(want_s), tol(None, s32.grad, np64(want_s), 1e-5))


@pytest.mark.parametrize("case", ["63-causal", "64-full-gqa2", "65-causal-gqa8", "49x130-window", "keymask-dead",
                                  "querymask-float", "d128"])
@pytest.mark.parametrize("offset", ["default", "negative", "beyond"])
def test_backward_adds_into_buffers(case, offset, rng):
    q, k, v, kw = draw(case, rng, offset)
    check_backward(q, k, v, **kw)


def test_backward_splits_keys_when_heads_are_few(rng, monkeypatch):
    """One (batch, kv head) and two threads: the keys are split between items and dQ is summed per thread."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    q, k, v = make_inputs(1, 2, 1, 200, 300, 16, 16, rng=rng)
    check_backward(q, k, v, causal=True)


@pytest.mark.parametrize("mods", [{}, {"sinks": True}, {"softcap": 1.5}], ids=["plain", "sinks", "softcap"])
def test_gradcheck_in_float64_through_the_one_wrapper(mods, rng):
    """float64 inputs, the fused kernel in float32 between two casts: finite differences of the wrapper's forward —
    a loss on the output and on the lse (its own gradient, ``dlse``), sinks included — against its backward (eps
    large enough for float32 outputs)."""
    q, k, v = make_inputs(1, 4, 2, 9, 11, 5, 3, torch.float64, rng=rng, requires_grad=True)
    sinks = torch.tensor(rng.standard_normal(4), requires_grad=True) if mods.get("sinks") else None
    mask = torch.from_numpy(rng.random((1, 1, 9, 11)) < 0.8)
    mask[..., 2, :] = False  # a row that sees no key (with a sink: all its weight on the sink)
    g_lse = torch.tensor(rng.standard_normal((1, 4, 9)))
    ins = (q, k, v) + ((sinks,) if sinks is not None else ())

    def f(*xs):
        s = None if sinks is None else xs[3].float()
        out, res = al.attention(*(x.float() for x in xs[:3]), backend="fused", causal=True, offset=1, mask=mask,
                                sinks=s, softcap=mods.get("softcap"), lens=al.Lens(topk=2))
        lse = res.lse.double()
        return out.double(), torch.where(torch.isfinite(lse), lse * g_lse, 0.0)

    assert torch.autograd.gradcheck(f, ins, eps=1e-3, atol=3e-3, rtol=3e-3)


def test_huge_rows_keep_their_own_weights(rng):
    """Rows of scores near -1e30 / finfo.min / -1e6 (fp32 cannot hold m + log l there): every field, the column sums
    and the backward give the row's own weights (the torch backend's rule), not exp(s - lse) with lse rounded."""
    fmin = torch.finfo(torch.float32).min
    mask = torch.tensor([[-1e30] * 3, [fmin] * 3, [-1e6, -1e6 + 0.5, -1e6 + 1.0], [0.1, -0.3, 0.2]])
    q, k = torch.zeros(1, 2, 4, 2), torch.zeros(1, 1, 3, 2)
    v = torch.tensor([[[[1.0, 0.0], [2.0, -1.0], [4.0, 3.0]]]])
    for sk in (None, torch.tensor([0.5, -2.0])):
        lens = al.Lens(topk=2, rows="all", at=torch.tensor([0, 1, 2]), received_from=torch.ones(4, 1))
        out, res = al.attention(q, k, v, mask=mask, sinks=sk, backend="fused", lens=lens)
        r_out, ref = al.attention(q.double(), k.double(), v.double(), mask=mask.double(),
                                  sinks=None if sk is None else sk.double(), backend="reference", lens=lens)
        check("out", out, np64(r_out), 1e-6)
        for f in ("lse", "max_weight", "entropy", "received", "weights", "topk_weights", "weights_at",
                  "received_from", "sink_weight"):
            if getattr(ref, f) is not None:
                check(f, getattr(res, f), np64(getattr(ref, f)), 1e-5 * (1 + 1e-7 * float(np.abs(np64(
                    getattr(ref, f))).max())) if f == "lse" else 1e-5)
        check_backward(q, k, v, mask=mask, sinks=sk)
        inp = validate(q, k, v, mask=mask, sinks=sk)
        check("column sums from the pass's lse", BE.column_sums(inp, res.lse), np64(ref.received), 1e-5)


# --------------------------------------------------------------------------------------------
# the column-sum primitive under a foreign lse


def test_column_sums_under_a_global_lse(rng):
    q, k, v, kw = draw("49x130-window", rng)
    inp = validate(q, k, v, **kw)
    _, lse, _ = BE.forward(inp)
    _, w, _, _ = ref_all(inp, None)
    shift = torch.tensor(rng.random(lse.shape), dtype=torch.float32)
    scaled = w * np.exp(-np64(shift))[..., None]
    W = torch.tensor(rng.random((1, 3, q.shape[2], 2)), dtype=torch.float32)
    check("received", BE.column_sums(inp, lse + shift), scaled.sum(-2), 1e-5)
    check("Pᵀ W", BE.column_sums(inp, lse + shift, W), np.swapaxes(scaled, -1, -2) @ np64(W), 1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("case", ["65-causal-gqa8", "49x130-window", "keymask-dead", "d128", "long-gqa4"])
def test_received_in_the_pass_matches_the_column_pass(case, threads, rng, monkeypatch):
    """``received`` from the forward's own tiles (threads own contiguous ranges of items, sums added in thread order)
    equals the column pass's and the reference's, for any thread count, and is the same bits on every run."""
    if case == "long-gqa4":
        q, k, v = make_inputs(1, 8, 2, 300, 300, 16, 16, rng=rng)
        kw = {"causal": True}
    else:
        q, k, v, kw = draw(case, rng)
    lens = al.Lens(entropy=True, received=True, topk=3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the kernel's thread count (a.nthreads)
    (_, _, res), inp = run_forward(q, k, v, lens, **kw)
    assert not _fused.scores_may_be_nonfinite(inp)  # so the pass computes received itself
    (_, _, again), _ = run_forward(q, k, v, lens, **kw)
    assert torch.equal(res.received, again.received), "the same sums in the same order on every run"
    _, w, _, ref = ref_all(inp, lens)
    n_p = naive32(inp)[1]
    check("received", res.received, ref.received, tol(None, n_p, w) * q.shape[2])
    monkeypatch.setattr(_fused, "IN_PASS_BYTES", 0)  # the column pass instead
    (_, _, col), _ = run_forward(q, k, v, lens, **kw)
    assert torch.allclose(res.received, col.received, rtol=1e-5, atol=1e-6)
    for f in ("entropy", "topk_weights", "topk_indices"):
        assert torch.equal(getattr(res, f), getattr(col, f)), f


# --------------------------------------------------------------------------------------------
# dispatch


def test_auto_takes_the_kernel_for_lens_and_block_calls_and_sdpa_for_plain_ones(rng):
    q, k, v = make_inputs(1, 2, 2, 20, 20, 16, 16, rng=rng)
    inp = validate(q, k, v, lens=True)
    assert BE.not_supported_reasons(inp) == [] and BE.auto_reasons(inp) == []
    assert dispatch.select(inp).name == "fused"
    assert dispatch.select(validate(q, k, v, causal=True, lens=al.Lens(topk=64))).name == "fused"
    assert dispatch.select(validate(q, k, v)).name == "sdpa"  # plain, not causal: SDPA
    assert dispatch.select(validate(q, k, v, causal=True)).name == "fused"  # plain causal float32: measured faster
    assert dispatch.select(validate(q.half(), k.half(), v.half(), causal=True)).name == "sdpa"  # not measured
    qg = q.clone().requires_grad_()
    assert dispatch.select(validate(qg, k, v, causal=True)).name == "sdpa"  # gradients: SDPA holds less memory
    assert dispatch.select(validate(qg, k, v, causal=True, lens=True)).name == "fused"
    assert dispatch.select(validate(q, k, v), primitives=True).name == "fused"
    assert dispatch.select(validate(q, k, v, causal=True), primitives=True).name == "fused"  # lse, backward, columns
    assert dispatch.select(validate(q, k, v, window=(4, 0))).name == "fused"  # SDPA would need a dense mask
    q2, k2, v2 = make_inputs(1, 2, 2, 20, 80, 16, 16, rng=rng)
    assert dispatch.select(validate(q2, k2, v2, lens=al.Lens(topk=65))).name == "torch"  # more than MAX_TOPK
    assert dispatch.select(validate(q.double(), k.double(), v.double(), lens=True)).name == "torch"  # float64
    assert dispatch.select(validate(q, k, v, lens=True, dropout_p=0.1)).name == "torch"  # dropout
    assert dispatch.select(validate(q, k, v, lens=True, seqlens_q=torch.tensor([20]), seqlens_k=torch.tensor([13]))
                           ).name == "torch"  # per-sequence lengths
    text = al.info()
    assert "fused" in text and "fused: kernel built (" in text and "a lens, or the block primitives" in text


# --------------------------------------------------------------------------------------------
# the build: portable SIMD path, concurrent first builds, no compiler

CHILD = textwrap.dedent("""
    import sys, warnings, torch, numpy as np
    torch.manual_seed(int(sys.argv[1]))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        import attnlens as al
        from attnlens.core.backends import fused
        from attnlens.core.inputs import validate
        from attnlens.core.reference import reference_attention, reference_lens, reference_backward
        lib, why = fused.library()
        q, k, v = (torch.randn(1, 4, 70, d) for d in (20, 20, 12))
        mask = torch.rand(1, 1, 70, 70) < 0.8
        chosen = al.Block.build(q, k, v, causal=True, mask=mask, lens=al.Lens(topk=3)).backend.name
        out, res = al.attention(q, k, v, causal=True, mask=mask, lens=al.Lens(topk=3, pool=8),
                                backend="fused" if lib is not None else "auto")
        info = al.info()
    r_out, w, lse = reference_attention(*(t.double().numpy() for t in (q, k, v)), mask=mask.numpy(), causal=True)
    ref = reference_lens(w, lse, topk=3, pool=(8, 8))
    err = max(float(np.abs(out.numpy() - r_out).max()), float(np.abs(res.received.numpy() - ref.received).max()) / 70,
              float(np.abs(res.entropy.numpy() - ref.entropy).max()), float(np.abs(res.pooled.numpy() - ref.pooled).max()) / 8)
    if lib is not None:  # the backward of the same build
        inp = validate(q, k, v, causal=True, mask=mask)
        o, l, _ = fused.FusedCpuBackend().forward(inp)
        do = torch.randn_like(o)
        g = [torch.zeros_like(t) for t in (q, k, v)]
        fused.FusedCpuBackend().backward(inp, o, l, do, *g)
        rg = reference_backward(*(t.double().numpy() for t in (q, k, v)), w, do.double().numpy())
        err = max(err, *(float(np.abs(a.numpy() - b).max()) for a, b in zip(g, rg)))
    warned = [str(x.message) for x in ws if issubclass(x.category, RuntimeWarning)]
    status = [ln for ln in info.splitlines() if ln.startswith("fused: ")]
    print("LOADED" if lib is not None else "FALLBACK", chosen, f"{err:.3g}", len(warned), warned, status)
""")


def child(env, seed=0, timeout=300):
    p = subprocess.run([sys.executable, "-c", CHILD, str(seed)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **env})
    assert p.returncode == 0, p.stderr[-3000:]
    line = p.stdout.strip().splitlines()[-1].split(" ", 4)
    return line[0], line[1], float(line[2]), int(line[3]), line[4]


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86-64 targets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_portable_simd_build_is_correct(march, tmp_path):
    """The kernel built without AVX-512 (AVX2, then plain SSE2): GCC vector extensions instead of intrinsics."""
    state, chosen, err, nwarn, _ = child({"ATTNLENS_CACHE": str(tmp_path), "ATTNLENS_MARCH": march})
    assert state == "LOADED" and nwarn == 0
    assert err < 1e-4
    (lib,) = tmp_path.glob("fused-*.so")
    import ctypes

    isa = ctypes.CDLL(str(lib)).attnlens_fused_isa
    isa.restype = ctypes.c_char_p
    assert isa() == b"vector extensions"


def test_concurrent_first_builds_share_one_library(tmp_path):
    """Four processes start on an empty cache at once: one compiles under the lock, the others load its library."""
    env = {**os.environ, "ATTNLENS_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for s in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
        state, chosen, err, nwarn, warned = o.strip().splitlines()[-1].split(" ", 4)
        assert state == "LOADED" and int(nwarn) == 0, warned
        assert float(err) < 1e-4
    libs = sorted(x.name for x in tmp_path.iterdir())
    fused_libs = [n for n in libs if n.startswith("fused-")]
    assert len(fused_libs) == 2 and fused_libs[0].endswith(".sha256") != fused_libs[1].endswith(".sha256"), libs
    assert not [n for n in libs if n.startswith(".build-")], "a temporary build directory was left behind"


@pytest.mark.parametrize("env", [{"CC": "false"}, {"ATTNLENS_NATIVE": "0"}], ids=["no-compiler", "disabled"])
def test_without_a_compiler_auto_falls_back(env, tmp_path):
    state, chosen, err, nwarn, warned = child({"ATTNLENS_CACHE": str(tmp_path), **env})
    assert state == "FALLBACK" and chosen == "torch" and err < 1e-4
    if "CC" in env:  # one warning per library (the row kernel's and the fused kernel's), naming what happened
        assert nwarn == 2 and "fused CPU kernel could not be built" in warned
        assert "fused: unavailable: the fused CPU kernel could not be built" in warned  # attnlens info says why
    else:
        assert nwarn == 0 and "fused: unavailable: disabled by ATTNLENS_NATIVE=0" in warned


def test_named_fused_backend_without_the_kernel_gives_the_reason(monkeypatch, rng):
    monkeypatch.setattr(_fused, "library", lambda: (None, "the fused CPU kernel could not be built (no cc)"))
    q, k, v = make_inputs(1, 2, 2, 8, 8, 4, 4, rng=rng)
    with pytest.raises(ValueError, match=r"'fused' cannot serve.*could not be built \(no cc\)"):
        al.attention(q, k, v, backend="fused", lens=True)
    assert dispatch.select(validate(q, k, v, lens=True)).name == "torch"


def test_kernel_exp_and_tanh_are_accurate(rng):
    """exp and tanh inside the kernel, seen through softcap = huge (tanh ~ identity) and plain softmax rows."""
    q, k, v = make_inputs(1, 1, 1, 40, 300, 8, 8, scale_factor=6.0, rng=rng)
    for kw in ({}, {"softcap": 1.5}, {"softcap": 0.05}):
        check_forward(q, k, v, al.Lens(rows="all"), **kw)


def test_an_empty_key_set(rng):
    """Nk = 0: every row sees nothing (out 0, lse -inf, or all weight on its sink); the backward adds nothing but the
    sinks' gradient (this divided by zero in the backward's split of the keys)."""
    q = torch.tensor(rng.standard_normal((1, 2, 3, 4)), dtype=torch.float32, requires_grad=True)
    k, v = torch.zeros(1, 1, 0, 4, requires_grad=True), torch.zeros(1, 1, 0, 5, requires_grad=True)
    sinks = torch.tensor([0.5, float("-inf")], requires_grad=True)
    out, res = al.attention(q, k, v, backend="fused", sinks=sinks, lens=al.Lens(topk=3, received=True, rows="all"))
    r_out, ref = al.attention(q.detach().double(), k.detach().double(), v.detach().double(), sinks=sinks.detach().double(),
                              backend="reference", lens=al.Lens(topk=3, received=True, rows="all"))
    for f in ("lse", "entropy", "max_weight", "sink_weight", "topk_weights", "received", "weights"):
        check(f, getattr(res, f), np64(getattr(ref, f)), 0.0)
    assert (out == 0).all() and (res.topk_indices == -1).all()
    (out.sum() + res.lse[0, 0].sum()).backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape and torch.equal(sinks.grad, torch.tensor([3.0, 0.0]))


@pytest.mark.parametrize("dv", [5, 16])
def test_an_empty_key_set_through_auto(dv, rng):
    """Nk = 0 through ``auto`` (SDPA refuses it; the kernel serves it), with a value width V could be read in place
    at (16) and one it could not (5): out 0, lse -inf."""
    q = torch.tensor(rng.standard_normal((1, 2, 3, 16)), dtype=torch.float32)
    k, v = torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, dv)
    for kw in ({}, {"causal": True}, {"lens": al.Lens(topk=2)}):
        out = al.attention(q, k, v, **kw)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == (1, 2, 3, dv) and (out == 0).all()
    assert al.Block.build(q, k, v, lens=True).backend.name == "fused"


def test_padded_batches_are_not_served(rng):
    """Per-sequence lengths (seqlens_q / seqlens_k): the kernel does not declare them, so a named fused backend says
    so and auto takes a backend that has them."""
    q, k, v = make_inputs(2, 2, 2, 8, 8, 4, 4, rng=rng)
    lengths = torch.tensor([8, 5])
    inp = validate(q, k, v, seqlens_q=lengths, seqlens_k=lengths, lens=True)
    assert any("per-sequence lengths" in r for r in BE.not_supported_reasons(inp))
    assert dispatch.select(inp).name == "torch"
