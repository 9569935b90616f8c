"""Logit soft-capping, attention sinks and ALiBi (issue 11): each alone and all three together, on every backend
that declares them, forward, lens and backward, against the float64 oracle — and the oracle against a plain
definition written the way Gemma 2 / gpt-oss / BLOOM write it.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before attnlens's kernels module is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import HAS_CUDA, HAS_TRITON, assert_close, make_inputs, np64  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens.masks import alibi_slopes, normalize_window  # noqa: E402
from attnlens.core.reference import reference_attention, reference_lens  # noqa: E402

TRITON = al.TritonBackend(config="16x16") if not HAS_CUDA else "triton"
BACKENDS = ["reference", "torch", pytest.param(TRITON, id="triton", marks=pytest.mark.triton)]
MODS = ["softcap", "sinks", "alibi", "all"]


def mod_args(which, Hq, rng, B=1):
    """Keyword arguments of one score modification (or all three), with values that matter: a cap below the
    score range, sinks around the row maxima, slopes large enough to move the weights."""
    kw = {}
    if which in ("softcap", "all"):
        kw["softcap"] = 1.5
    if which in ("sinks", "all"):
        kw["sinks"] = torch.tensor(rng.standard_normal(Hq) + 1.0, dtype=torch.float32)
    if which in ("alibi", "all"):
        kw["alibi_slopes"] = torch.tensor(rng.random((B, Hq)) * 0.5, dtype=torch.float32)
    return kw


def oracle(q, k, v, *, mask=None, causal=False, window=None, offset=None, topk=0, **mods):
    """float64 NumPy ``(out, LensResult)`` from `attnlens.reference`, rank 4."""
    out, w, lse = reference_attention(np64(q), np64(k), np64(v), mask=np64(mask), causal=causal,
                                      window=normalize_window(window), offset=offset, softcap=mods.get("softcap"),
                                      sinks=np64(mods.get("sinks")), alibi_slopes=np64(mods.get("alibi_slopes")))
    res = reference_lens(w, lse, topk=topk, rows=list(range(q.shape[2])), sinks=np64(mods.get("sinks")))
    return out, res


def plain(q, k, v, *, causal=False, softcap=None, sinks=None, alibi_slopes=None):
    """The models' own way, float64 torch, Nq == Nk: scores, tanh cap (Gemma 2), -slope·|i - j| (ALiBi), causal
    -inf, a sink column concatenated and dropped after the softmax (gpt-oss)."""
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    n = s.shape[-1]
    if alibi_slopes is not None:
        dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().double()
        s = s - alibi_slopes.double().reshape(-1, s.shape[1], 1, 1) * dist
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().reshape(1, -1, 1, 1).expand(s.shape[0], -1, n, 1)], -1)
    p = torch.softmax(s, -1)[..., :n]
    return p @ v, p


@pytest.mark.parametrize("causal", [False, True])
def test_oracle_equals_the_models_definition(rng, causal):
    q, k, v = make_inputs(2, 4, 2, 9, 9, 8, dtype=torch.float64, scale_factor=3.0, rng=rng)
    kw = mod_args("all", 4, rng, B=2)
    ref_out, ref_p = plain(q, k, v, causal=causal, **kw)
    out, res = al.attention(q, k, v, causal=causal, backend="reference", lens=al.Lens(rows="all"), **kw)
    assert_close(out, ref_out, atol=1e-12, what="out")
    assert_close(res.weights, ref_p, atol=1e-12, what="weights")
    assert_close(res.sink_weight, 1 - ref_p.sum(-1), atol=1e-12, what="sink_weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", MODS)
@pytest.mark.parametrize("case", ["plain", "causal", "gqa-cross-offset", "window", "dead-rows"])
def test_forward_and_lens_against_the_oracle(rng, backend, which, case):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 37, 37, 16
    kw = dict(causal=False, window=None, offset=None, mask=None)
    if case == "causal":
        kw["causal"] = True
    elif case == "gqa-cross-offset":
        Nq, Nk = 19, 45
        kw.update(causal=True, offset=7)
    elif case == "window":
        kw.update(window=(5, 3), causal=False)
    elif case == "dead-rows":  # the second sequence has no key: with a sink all its weight goes there
        kw["mask"] = (torch.arange(Nk)[None, :] < torch.tensor([Nk - 5, 0])[:, None])[:, None, None, :]
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, scale_factor=2.0, rng=rng)
    mods = mod_args(which, Hq, rng, B=B)
    lens = al.Lens(topk=3, rows="all")
    out, res = al.attention(q, k, v, backend=backend, lens=lens, **kw, **mods)
    r_out, ref = oracle(q, k, v, topk=3, **kw, **mods)
    atol = 2e-5
    assert_close(out, r_out, atol=atol, what="out")
    assert_close(res.lse, ref.lse, atol=atol, what="lse")
    assert_close(res.max_weight, ref.max_weight, atol=atol, what="max_weight")
    assert_close(res.entropy, ref.entropy, atol=1e-4, what="entropy")
    assert_close(res.received, ref.received, atol=1e-4, what="received")
    assert_close(res.weights, ref.weights, atol=atol, what="weights")
    assert_close(res.topk_weights, ref.topk_weights, atol=atol, what="topk_weights")
    if "sinks" in mods:
        assert_close(res.sink_weight, ref.sink_weight, atol=atol, what="sink_weight")
        assert_close(res.weights.sum(-1) + res.sink_weight, np.ones(res.lse.shape), atol=1e-5, what="rows sum to 1")
    else:
        assert res.sink_weight is None
    if case == "dead-rows":
        assert (out[1] == 0).all()
        if "sinks" in mods:
            assert (res.sink_weight[1] == 1).all() and (res.entropy[1] == 0).all()
            assert_close(res.lse[1], mods["sinks"][:, None].expand(Hq, Nq), atol=1e-6, what="lse = sink")
        else:
            assert torch.isneginf(res.lse[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_sums_and_pair_scores_see_the_modified_scores(rng, backend):
    from attnlens.core import dispatch
    from attnlens.core.inputs import validate
    from attnlens.core.scores import pair_weights

    q, k, v = make_inputs(1, 2, 1, 21, 33, 16, rng=rng)
    mods = mod_args("all", 2, rng)
    inp = validate(q, k, v, causal=True, **mods)
    be = dispatch.get(backend)
    _, lse, _ = be.forward(inp)
    _, ref = oracle(q, k, v, causal=True, **mods)
    W = torch.tensor(rng.standard_normal((1, 2, 21, 3)), dtype=torch.float32)
    assert_close(be.column_sums(inp, lse, W), np.swapaxes(ref.weights, -1, -2) @ np64(W), atol=1e-4, what="Pᵀ W")
    idx = torch.tensor(rng.integers(-1, 33, (1, 2, 21, 5)))
    expect = np.where(np64(idx) >= 0, np.take_along_axis(ref.weights, np.maximum(np64(idx), 0).astype(int), -1), 0)
    assert_close(pair_weights(inp, idx, lse), expect, atol=1e-5, what="pair_weights")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("which", MODS)
def test_gradcheck_float64_including_sinks(rng, backend, which):
    q, k, v = make_inputs(1, 2, 1, 5, 7, 4, dtype=torch.float64, scale_factor=2.0, rng=rng, requires_grad=True)
    mods = mod_args(which, 2, rng)
    mods = {n: (t.double().requires_grad_(n == "sinks") if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
    mask = torch.ones(1, 1, 5, 7, dtype=torch.bool)
    mask[..., 1, :] = False  # a row with no key: only the sink (if any) sees it

    def f(q, k, v, *s):
        extra = {"sinks": s[0]} if s else {}
        return al.attention(q, k, v, mask=mask, causal=True, offset=3, backend=backend,
                            **{**mods, **extra})

    args = (q, k, v) + ((mods["sinks"],) if "sinks" in mods else ())
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", pytest.param(TRITON, id="triton", marks=pytest.mark.triton)])
def test_backward_against_the_float64_reference(rng, backend):
    q, k, v = make_inputs(2, 4, 2, 37, 45, 16, scale_factor=2.0, rng=rng, requires_grad=True)
    mods = mod_args("all", 4, rng, B=2)
    mods["sinks"] = mods["sinks"].requires_grad_(True)
    dout = torch.randn(2, 4, 37, 16)
    grads = {}
    for name, be in (("ref", "reference"), ("got", backend)):
        for t in (q, k, v, mods["sinks"]):
            t.grad = None
        out = al.attention(q, k, v, causal=True, window=(20, None), backend=be, **mods)
        out.backward(dout)
        grads[name] = [t.grad.clone() for t in (q, k, v, mods["sinks"])]
    for n, a, e in zip("q k v sinks".split(), grads["got"], grads["ref"]):
        assert_close(a, e, atol=2e-4, rtol=1e-4, what=f"d{n}")


def test_sinks_broadcast_over_the_batch_sum_their_gradient(rng):
    q, k, v = make_inputs(3, 2, 2, 6, 6, 8, dtype=torch.float64, rng=rng)
    s1 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    s3 = s1.detach().expand(3, 2).clone().requires_grad_(True)
    al.attention(q, k, v, causal=True, sinks=s1, backend="torch").sum().backward()
    al.attention(q, k, v, causal=True, sinks=s3, backend="torch").sum().backward()
    assert_close(s1.grad, s3.grad.sum(0), atol=1e-12, what="d sinks (Hq,) = Σ_b d sinks (B, Hq)")


def test_numpy_in_numpy_out_and_ranks(rng):
    q, k, v = make_inputs(1, 1, 1, 6, 6, 4, rng=rng, rank=2, numpy=True, dtype=np.float64)
    out, res = al.attention(q, k, v, causal=True, softcap=2.0, sinks=np.array([0.5]), alibi_slopes=np.array([0.3]),
                            lens=True)
    assert isinstance(out, np.ndarray) and out.shape == (6, 4) and res.sink_weight.shape == (6,)
    r_out, ref = oracle(q[None, None], k[None, None], v[None, None], causal=True, softcap=2.0,
                        sinks=np.array([0.5]), alibi_slopes=np.array([0.3]))
    assert_close(out, r_out[0, 0], atol=1e-12, what="out")
    assert_close(res.sink_weight, ref.sink_weight[0, 0], atol=1e-12, what="sink_weight")


def test_alibi_slopes_are_the_standard_ones():
    assert torch.allclose(alibi_slopes(8), 2.0 ** (-torch.arange(1, 9, dtype=torch.float32)))
    s = alibi_slopes(12)  # 8 of 2^(-8/8 · i), then every other of the 16-head slopes
    assert torch.allclose(s[:8], alibi_slopes(8)) and torch.allclose(s[8:], alibi_slopes(16)[0::2][:4])
    try:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    except ImportError:
        return
    for n in (4, 6, 12):
        ref = build_alibi_tensor(torch.ones(1, 3), n, torch.float32)  # (n, 1, 3) = slope · position
        assert torch.allclose(ref[:, 0, 1], alibi_slopes(n))


def test_refusals_name_what_is_missing(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 5, 8, rng=rng)
    for kw, what in ((dict(softcap=2.0), "soft-capping"), (dict(sinks=torch.zeros(2)), "sinks"),
                     (dict(alibi_slopes=torch.ones(2)), "ALiBi")):
        with pytest.raises(ValueError, match=what):
            al.attention(q, k, v, backend="sdpa", **kw)
        al.attention(q, k, v, **kw)  # auto passes over sdpa
    with pytest.raises(ValueError, match="sinks cannot be merged"):
        part = al.attention(q, k, v, sinks=torch.zeros(2), lens=True)
        al.merge([part, part])


@pytest.mark.parametrize("kw, err, match", [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks of shape \(3,\)"),
    (dict(sinks=torch.zeros(2, 2, 1)), ValueError, "sinks"),
    (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks"),
    (dict(sinks=np.zeros(2)), TypeError, "sinks must be of the same kind"),
    (dict(sinks=[0.0, 0.0]), TypeError, "sinks"),
    (dict(alibi_slopes=torch.ones(1)), ValueError, r"alibi_slopes of shape \(1,\)"),
    (dict(alibi_slopes=torch.ones(2, 1)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(2, requires_grad=True)), ValueError, "alibi_slopes requires a gradient"),
])
def test_bad_input_gets_a_clear_error(rng, kw, err, match):
    q, k, v = make_inputs(1, 2, 2, 5, 5, 8, rng=rng)
    with pytest.raises(err, match=match):
        al.attention(q, k, v, **kw)


@pytest.mark.parametrize("softcap", [1e-300, 1e-39, 1e38, 1e39])
def test_softcap_beyond_float32_is_refused_naming_it(rng, softcap):
    """Issue 24 item 5: fp32 turned 1/softcap into inf (a RuntimeError that did not name softcap, at 1e-300) or
    softcap into inf (all-NaN output, silently, at 1e39)."""
    q, k, v = make_inputs(1, 2, 2, 5, 5, 8, rng=rng)
    for backend in ("auto", "torch", "reference"):
        with pytest.raises(ValueError, match=r"softcap=.* is outside what float32 computes.*<= softcap <="):
            al.attention(q, k, v, softcap=softcap, backend=backend)


@pytest.mark.parametrize("dtype, softcap", [(torch.float32, 1.2e-38), (torch.float32, 8.5e37), (torch.float32, 1e-20),
                                            (torch.float32, 1e30), (torch.float64, 1e-300), (torch.float64, 1e300)])
def test_softcap_at_the_ends_of_its_range_is_exact(rng, dtype, softcap):
    """The accepted extremes compute c·tanh(s/c) to the dtype's precision (≈ c·sign(s) for a tiny cap, s for a huge
    one), forward and backward, as the float64 oracle."""
    q, k, v = make_inputs(1, 2, 1, 6, 7, 8, dtype=dtype, rng=rng, requires_grad=True)
    out, res = al.attention(q, k, v, causal=True, softcap=softcap, backend="torch", lens=al.Lens(topk=2))
    out.sum().backward()
    r_out, w, lse = reference_attention(*(np64(t) for t in (q, k, v)), causal=True, softcap=softcap)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(out, r_out, atol=tol, what="out")
    assert_close(res.lse, lse, atol=tol, rtol=tol, what="lse")
    from attnlens.core.reference import reference_backward

    grads = reference_backward(*(np64(t) for t in (q, k, v)), w, np.ones(out.shape), softcap=softcap)
    for name, g, r in zip("qkv", (q.grad, k.grad, v.grad), grads):
        assert_close(g, r, atol=tol * 10, what=f"d{name}")


@pytest.mark.parametrize("nq, nk", [(5, 5), (3, 8)])
def test_causal_alibi_differs_from_flash_attentions_reference_by_the_documented_lse_shift(nq, nk, rng):
    """Issue 24 item 11, the one convention that differs on purpose: FlashAttention's reference adds
    slope·(j - Nk + 1) under causal, attnlens -slope·|i + offset - j|: the same weights, lse larger by
    slope·(Nq - 1 - i)."""
    q, k, v = make_inputs(1, 2, 1, nq, nk, 8, dtype=torch.float64, rng=rng)
    slopes = torch.tensor([0.5, 0.125], dtype=torch.float64)
    out, res = al.attention(q, k, v, causal=True, alibi_slopes=slopes, lens=al.Lens(rows="all"), backend="torch")
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5 + slopes.reshape(1, 2, 1, 1) * (j - nk + 1)  # flash_attn's attention_ref
    s = s.masked_fill(j > i + nk - nq, float("-inf"))
    torch.testing.assert_close(res.weights, torch.softmax(s, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=0, atol=1e-12)
    shift = slopes.reshape(1, 2, 1) * (nq - 1 - torch.arange(nq))
    torch.testing.assert_close(res.lse - torch.logsumexp(s, -1), shift.expand(1, 2, nq), rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), -1])
def test_flash_attention_window_minus_one_says_use_none(rng, window):
    """Issue 24 item 11: FlashAttention spells an unbounded side -1; attnlens keeps None and says so."""
    q, k, v = make_inputs(1, 2, 2, 5, 5, 8, rng=rng)
    with pytest.raises(ValueError, match=r"must be >= 0 .*got -1; use None for an unbounded side, or window=None"):
        al.attention(q, k, v, window=window)


def test_softcap_zero_says_use_none(rng):
    """Issue 24 item 11: FlashAttention spells 'no softcap' 0.0; attnlens keeps None and says so."""
    q, k, v = make_inputs(1, 2, 2, 5, 5, 8, rng=rng)
    with pytest.raises(ValueError, match=r"use None for no soft-capping; FlashAttention's softcap=0.0"):
        al.attention(q, k, v, softcap=0.0)


def test_module_options(rng):
    from attnlens.nn import MultiHeadAttention, capture

    m = MultiHeadAttention(16, 4, causal=True, softcap=5.0, sinks=True, alibi=True)
    assert isinstance(m.sinks, torch.nn.Parameter) and m.sinks.shape == (4,)
    assert torch.equal(m.alibi_slopes, alibi_slopes(4))
    x = torch.randn(2, 7, 16)
    with capture(m) as cap:
        out = m(x)
    out.sum().backward()
    assert m.sinks.grad is not None and m.sinks.grad.abs().sum() > 0
    assert cap.results[0].result.sink_weight.shape == (2, 4, 7)
    with pytest.raises(TypeError, match="sinks must be a bool"):
        MultiHeadAttention(16, 4, sinks=torch.zeros(4))
    with pytest.raises(TypeError, match="alibi"):
        MultiHeadAttention(16, 4, alibi=torch.ones(3))


def test_terminal_summary_shows_the_sink_weight():
    from rich.console import Console
    from test_report import synthetic

    from attnlens.faces.cli import explain_summary

    data = synthetic(["a", "b", "c", "d"], L=2, H=3)
    console = Console(record=True, width=200)
    explain_summary(console, data)
    assert "attention sinks:" not in console.export_text()  # (head kinds may say "first-token sink")
    data.sink_weight = np.array([[0.1, 0.2, 0.3], [0.0, 0.6, 0.2]])
    console = Console(record=True, width=200)
    explain_summary(console, data)
    text = console.export_text()
    assert "0.233 of its weight on its sink" in text and "L1 h1, 0.600" in text
