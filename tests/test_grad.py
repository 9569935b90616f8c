"""Gradients of `attention()`: gradcheck in float64, agreement with SDPA / plain math, and dropout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_mask, visible

import attnlens as al


def math_attention(q, k, v, mask=None, causal=False, window=None, scale=None):
    """softmax(q kᵀ · scale + mask) v written out in differentiable torch (dead rows -> 0)."""
    if q.ndim > 2:
        Hq, Hkv = q.shape[-3], k.shape[-3]
        k = k.repeat_interleave(Hq // Hkv, dim=-3)
        v = v.repeat_interleave(Hq // Hkv, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    Nq, Nk = s.shape[-2:]
    keep = torch.from_numpy(np.ascontiguousarray(visible(Nq, Nk, causal, window, mask)))  # rank 4
    keep = keep.reshape(keep.shape[4 - q.ndim:])
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(s.dtype)
    live = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0)
    p = torch.softmax(s, dim=-1) * live
    return p @ v


GRADCHECK_CASES = {
    # name -> (B, Hq, Hkv, Nq, Nk, D, Dv, rank, kwargs builder)
    "plain": (1, 2, 2, 5, 5, 3, 3, 4, lambda rng, Nq, Nk: {}),
    "causal-Nq<Nk": (1, 2, 2, 3, 6, 3, 2, 4, lambda rng, Nq, Nk: {"causal": True}),
    "causal-Nq>Nk": (1, 1, 1, 6, 3, 3, 2, 4, lambda rng, Nq, Nk: {"causal": True}),
    "window": (1, 2, 2, 6, 7, 3, 3, 4, lambda rng, Nq, Nk: {"window": (2, 1)}),
    "gqa": (2, 4, 2, 4, 5, 3, 2, 4, lambda rng, Nq, Nk: {"causal": True}),
    "mqa": (1, 3, 1, 4, 4, 2, 3, 4, lambda rng, Nq, Nk: {}),
    "bool-mask-dead-row": (1, 2, 2, 5, 6, 3, 3, 4,
                           lambda rng, Nq, Nk: {"mask": make_mask("bool", (Nq, Nk), rng=rng, dead_rows=1, p_keep=0.6)}),
    "float-mask": (1, 2, 2, 5, 6, 3, 3, 4,
                   lambda rng, Nq, Nk: {"mask": make_mask("float", (1, 2, Nq, Nk), rng=rng, dead_rows=1).double()}),
    "scale": (1, 1, 1, 4, 5, 3, 3, 4, lambda rng, Nq, Nk: {"scale": 0.9}),
    "rank2": (1, 1, 1, 5, 7, 3, 2, 2, lambda rng, Nq, Nk: {"causal": True}),
    "rank3": (1, 3, 3, 4, 6, 2, 3, 3, lambda rng, Nq, Nk: {"window": 1}),
}


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "2-row-chunks"])
@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64(name, chunked, rng, monkeypatch):
    B, Hq, Hkv, Nq, Nk, D, Dv, rank, build = GRADCHECK_CASES[name]
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, torch.float64, rng=rng, rank=rank, requires_grad=True)
    kw = build(rng, Nq, Nk)
    if "mask" in kw and kw["mask"].ndim > rank:
        kw["mask"] = kw["mask"].reshape(kw["mask"].shape[kw["mask"].ndim - rank:])
    be = al.TorchChunkedBackend(chunk_bytes=2 * B * Hq * Nk * 8) if chunked else "torch"

    def f(q, k, v):
        out, res = al.attention(q, k, v, backend=be, lens=al.Lens(topk=1), **kw)
        return out

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)
    # and the gradient is that of the plain math
    out = f(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(math_attention(q, k, v, **kw), (q, k, v), g)
    for a, b, n in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"d{n}")


CASES_300 = {
    # name -> (B, Hq, Hkv, Nq, Nk, kwargs builder, sdpa kwargs builder or None)
    "plain": (1, 2, 2, 300, 300, lambda rng, Nq, Nk: {}, lambda kw: {}),
    "causal": (1, 2, 2, 300, 300, lambda rng, Nq, Nk: {"causal": True}, lambda kw: {"is_causal": True}),
    "gqa-causal": (2, 4, 2, 300, 300, lambda rng, Nq, Nk: {"causal": True},
                   lambda kw: {"is_causal": True, "enable_gqa": True}),
    "causal-Nq<Nk": (1, 2, 2, 120, 300, lambda rng, Nq, Nk: {"causal": True}, None),
    "window": (1, 2, 1, 300, 257, lambda rng, Nq, Nk: {"window": (40, 7)}, None),
    "bool-mask": (1, 2, 2, 300, 280, lambda rng, Nq, Nk: {"mask": make_mask("bool", (Nq, Nk), rng=rng, p_keep=0.5)},
                  lambda kw: {"attn_mask": kw["mask"]}),
    "bool-mask-dead-rows": (1, 2, 2, 300, 280,
                            lambda rng, Nq, Nk: {"mask": make_mask("bool", (Nq, Nk), rng=rng, dead_rows=5)}, None),
    "float-mask": (1, 2, 2, 300, 280, lambda rng, Nq, Nk: {"mask": make_mask("float", (Nq, Nk), rng=rng, dead_rows=3)},
                   None),
}


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("name", list(CASES_300))
def test_float32_gradients_match_sdpa_and_math(name, backend, rng, monkeypatch):
    """N = 300 in float32, the torch backend run in chunks of 37 rows (several chunks, ragged last)."""
    B, Hq, Hkv, Nq, Nk, build, sdpa_kw = CASES_300[name]
    if backend == "torch":
        backend = al.TorchChunkedBackend(chunk_bytes=37 * B * Hq * Nk * 4)
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, 16, 12, torch.float32, rng=rng, requires_grad=True)
    kw = build(rng, Nq, Nk)
    out = al.attention(q, k, v, backend=backend, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for t, n in zip(grads, "qkv"):
        assert torch.isfinite(t).all(), f"non-finite d{n}"
    # float64 math on the same float32 values
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    kw64 = {**kw, "mask": kw["mask"].double()} if "mask" in kw and kw["mask"].dtype != torch.bool else kw
    ref_grads = torch.autograd.grad(math_attention(q64, k64, v64, **kw64), (q64, k64, v64), g.double())
    for a, b, n in zip(grads, ref_grads, "qkv"):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=2e-5 * scale, rtol=1e-3, msg=f"d{n} vs float64 math")
    if sdpa_kw is not None:
        qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        expected = F.scaled_dot_product_attention(qs, ks, vs, **sdpa_kw(kw))
        sdpa_grads = torch.autograd.grad(expected, (qs, ks, vs), g)
        for a, b, n in zip(grads, sdpa_grads, "qkv"):
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, atol=2e-5 * scale, rtol=1e-3, msg=f"d{n} vs F.sdpa")


def test_no_gradient_to_a_float_mask_is_refused_not_dropped(rng):
    """The torch backend has no gradient for a float mask and says so; ``auto`` must then either
    give a differentiable output (through a backend that can) or refuse — never silently drop it."""
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, torch.float64, rng=rng)
    m = torch.tensor(rng.standard_normal((5, 6)), requires_grad=True)
    with pytest.raises(ValueError, match="mask"):
        al.attention(q, k, v, mask=m, backend="torch", lens=True)
    out = al.attention(q, k, v, mask=m)  # sdpa: differentiable in the mask
    assert out.requires_grad
    (gm,) = torch.autograd.grad(out.sum(), m)
    assert torch.isfinite(gm).all()
    try:
        out, res = al.attention(q, k, v, mask=m, lens=True)
    except ValueError as e:
        assert "mask" in str(e)
    else:
        assert out.requires_grad, "auto served a call whose mask needs a gradient with a backend that drops it"


def test_double_backward_is_refused(rng):
    q, k, v = make_inputs(1, 1, 1, 4, 4, 3, 3, torch.float64, rng=rng, requires_grad=True)
    out = al.attention(q, k, v, backend="torch")
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gq.sum(), q)


def test_fp16_bf16_gradients_have_input_dtype(rng):
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = make_inputs(1, 2, 1, 9, 11, 8, 8, dtype, rng=rng, requires_grad=True)
        out = al.attention(q, k, v, backend="torch", causal=True)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        for t in grads:
            assert t.dtype == dtype and torch.isfinite(t.float()).all()
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ref = torch.autograd.grad(math_attention(q64, k64, v64, causal=True).sum(), (q64, k64, v64))
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------------------------
# dropout

def _drop_inputs(rng, **kw):
    return make_inputs(kw.get("B", 1), 2, 2, kw.get("Nq", 6), kw.get("Nk", 8), 4, 5, torch.float64, rng=rng)


@pytest.mark.parametrize("grad", [False, True])
def test_dropout_reproducible_under_manual_seed(grad, rng, monkeypatch):
    be = al.TorchChunkedBackend(chunk_bytes=2 * 2 * 8 * 8)  # several chunks
    q, k, v = _drop_inputs(rng)
    if grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(123)
    a = al.attention(q, k, v, dropout_p=0.3, backend=be)
    torch.manual_seed(123)
    b = al.attention(q, k, v, dropout_p=0.3, backend=be)
    torch.manual_seed(124)
    c = al.attention(q, k, v, dropout_p=0.3, backend=be)
    clean = al.attention(q, k, v, backend=be)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, clean)
    # the autograd path and the no-grad path draw the same masks for the same seed
    with torch.no_grad():
        torch.manual_seed(123)
        d = al.attention(q, k, v, dropout_p=0.3, backend=be)
    torch.testing.assert_close(a.detach(), d, atol=1e-12, rtol=0)


def test_dropout_drops_weights_and_rescales(rng):
    """With v = I the output rows are the dropped weights: each is 0 or w / (1 - p), ~p of them 0."""
    Nq, Nk, p = 64, 64, 0.3
    q = torch.tensor(rng.standard_normal((1, 2, Nq, 8)))
    k = torch.tensor(rng.standard_normal((1, 2, Nk, 8)))
    v = torch.eye(Nk, dtype=torch.float64).expand(1, 2, Nk, Nk)
    _, res = al.attention(q, k, v, lens=al.Lens(rows="all"))
    w = res.weights
    torch.manual_seed(7)
    out = al.attention(q, k, v, dropout_p=p, backend="torch")
    kept = out != 0
    torch.testing.assert_close(out[kept], (w / (1 - p))[kept], atol=1e-12, rtol=1e-12)
    frac = 1 - kept.double().mean().item()
    assert abs(frac - p) < 0.03, f"dropped fraction {frac:.3f}, expected {p}"


def test_dropout_mean_over_seeds_approaches_clean_output(rng):
    q, k, v = _drop_inputs(rng, Nq=5, Nk=7)
    clean = al.attention(q, k, v, backend="torch")
    n = 400
    acc = torch.zeros_like(clean)
    for s in range(n):
        torch.manual_seed(s)
        acc += al.attention(q, k, v, dropout_p=0.3, backend="torch")
    mean = acc / n
    err = (mean - clean).abs()
    assert err.mean() < 0.03 and err.max() < 0.12, (err.mean().item(), err.max().item())


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"mask": "dead"}], ids=["plain", "causal", "mask-dead"])
def test_lens_under_dropout_equals_lens_without(kw, rng):
    q, k, v = _drop_inputs(rng, Nq=9, Nk=11)
    kw = dict(kw)
    if kw.get("mask") == "dead":
        kw["mask"] = make_mask("bool", (9, 11), rng=rng, dead_rows=2)
    lens = al.Lens(topk=3, rows=[0, -1])
    torch.manual_seed(5)
    out_d, res_d = al.attention(q, k, v, dropout_p=0.3, lens=lens, **kw)
    out_c, res_c = al.attention(q, k, v, lens=lens, **kw)
    assert not torch.equal(out_d, out_c)
    for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "topk_indices", "weights"):
        torch.testing.assert_close(getattr(res_d, f), getattr(res_c, f), atol=1e-12, rtol=0, msg=f)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "2-row-chunks"])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"gqa": True}], ids=["plain", "causal", "gqa"])
def test_dropout_gradcheck_fixed_seed(kw, chunked, rng, monkeypatch):
    """Dropout masks are regenerated per chunk from a saved seed in backward: the analytic gradient
    must match finite differences taken with the same seed before every forward."""
    Hkv = 1 if kw.get("gqa") else 2
    B, Hq, Nq, Nk = 1, 2, 6, 7
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, 3, 3, torch.float64, rng=rng, requires_grad=True)
    be = al.TorchChunkedBackend(chunk_bytes=2 * B * Hq * Nk * 8) if chunked else "torch"
    causal = bool(kw.get("causal"))

    def f(q, k, v):
        torch.manual_seed(2024)
        return al.attention(q, k, v, dropout_p=0.3, causal=causal, backend=be)

    out = f(q, k, v)
    assert not torch.equal(out, al.attention(q, k, v, causal=causal, backend=be)), "no dropout happened"
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dropout_statistics_not_applied_on_reference(rng):
    q, k, v = _drop_inputs(rng)
    with pytest.raises(ValueError, match="dropout"):
        al.attention(q, k, v, dropout_p=0.2, backend="reference")
    # sdpa serves dropout (its own RNG): the expectation still matches
    acc = torch.zeros(1, 2, 6, 5, dtype=torch.float64)
    for s in range(300):
        torch.manual_seed(s)
        acc += al.attention(q, k, v, dropout_p=0.3, backend="sdpa")
    clean = al.attention(q, k, v, backend="sdpa")
    assert ((acc / 300) - clean).abs().mean() < 0.04


# ------------------------------------------------------------------ the lse's gradient and merge (issue 24 item 9)

LSE_BACKENDS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)]


def _lse_backend(name):
    if name == "triton":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        return al.TritonBackend(config="16x16")
    return name


def _lse_math(q, k, v, mask=None, causal=False, sinks=None, softcap=None):
    """lse written out in differentiable torch (sinks as one more logit per row; dead rows -inf)."""
    Hq, Hkv = q.shape[-3], k.shape[-3]
    k = k.repeat_interleave(Hq // Hkv, dim=-3)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    Nq, Nk = s.shape[-2:]
    keep = torch.from_numpy(np.ascontiguousarray(visible(Nq, Nk, causal, None, mask)))
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    return torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("mods", [{}, {"sinks": True}, {"softcap": 1.5}], ids=["plain", "sinks", "softcap"])
@pytest.mark.parametrize("name", ["reference", "torch"])
def test_lse_gradient_is_p_and_gradchecks(name, mods, rng):
    """d lse_i / d s_ij = P_ij: the lse the lens returns differentiates (gradcheck in float64), and a loss on both
    the output and the lse gives the gradients of the plain math, sinks included."""
    q, k, v = make_inputs(1, 2, 1, 5, 6, 3, 2, torch.float64, rng=rng, requires_grad=True)
    mask = torch.from_numpy(rng.random((1, 1, 5, 6)) < 0.8)
    mask[..., 2, :] = False  # a row that sees no key: lse -inf, gradient 0 (never NaN)
    sinks = torch.tensor(rng.standard_normal(2), requires_grad=True) if mods.get("sinks") else None
    kw = dict(mask=mask, causal=True, softcap=mods.get("softcap"), sinks=sinks)
    ins = (q, k, v) + ((sinks,) if sinks is not None else ())

    def f(*xs):
        extra = dict(kw, sinks=xs[3]) if sinks is not None else kw
        return al.attention(*xs[:3], lens=al.Lens(lse=True), backend=name, **extra)[1].lse.nan_to_num(neginf=0.0)

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)
    out, res = al.attention(q, k, v, lens=True, backend=name, **kw)
    g_out = torch.tensor(rng.standard_normal(out.shape))
    g_lse = torch.tensor(rng.standard_normal(res.lse.shape)) * torch.isfinite(res.lse)
    got = torch.autograd.grad((out * g_out).sum() + (res.lse.nan_to_num(neginf=0.0) * g_lse).sum(), ins)
    o_ref = al.attention(q, k, v, backend="reference", **kw)  # the reference's own autograd path for out
    l_ref = _lse_math(q, k, v, mask=mask, causal=True, sinks=sinks, softcap=mods.get("softcap"))
    want = torch.autograd.grad((o_ref * g_out).sum() + (l_ref.nan_to_num(neginf=0.0) * g_lse).sum(), ins)
    for a, b, n in zip(got, want, "qkvs"):
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"d{n}")


@pytest.mark.parametrize("name", LSE_BACKENDS)
def test_merge_of_pieces_has_the_gradients_of_attention_over_all_keys(name, rng):
    """Issue 24 item 9: merge()'s output was differentiable but wrong (dq off by 0.4, dk by 0.5): the parts' lse
    carried no gradient. Now dq, dk, dv through merge equal those of attention over all keys — with a piece that
    some rows do not see and rows that see no key at all."""
    dt = torch.float32 if name == "triton" else torch.float64
    q, k, v = make_inputs(2, 4, 2, 9, 13, 8, 5, dt, rng=rng, requires_grad=True)
    be = _lse_backend(name)
    off = -2  # queries 0 and 1 see no key at all
    g = torch.tensor(rng.standard_normal((2, 4, 9, 5)), dtype=dt)
    whole = al.attention(q, k, v, causal=True, offset=off, backend=be)
    want = torch.autograd.grad(whole, (q, k, v), g)
    cuts = (0, 3, 8, 13)
    parts = [al.attention(q, k[:, :, a:b], v[:, :, a:b], causal=True, offset=off - a, backend=be,
                          lens=al.Lens(lse=True, entropy=True)) for a, b in zip(cuts, cuts[1:])]
    out, res = al.merge(parts)
    assert not res.entropy.requires_grad
    torch.testing.assert_close(out, whole)
    got = torch.autograd.grad(out, (q, k, v), g)
    tol = dict(atol=2e-5, rtol=2e-4) if dt == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for a, b, n in zip(got, want, "qkv"):
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, **tol, msg=f"d{n} through merge")
