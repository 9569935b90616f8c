"""The public block API, `attnlens.Block`: building (checks + backend choice), the primitives as methods, sub-blocks
(`rows`, `derive`), the lens fields it finishes from the primitives, and its errors — against the float64 oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close, make_inputs, np64

import attnlens as al
from attnlens.core.reference import reference_attention, reference_lens

OPTIONS = {
    "causal-window-offset": dict(causal=True, window=(4, None), offset=3),
    "query-mask": "query-mask",
    "score-mods": dict(causal=True, softcap=2.0, alibi_slopes="alibi", sinks="sinks"),
    "dead-rows": dict(causal=True, offset=-5),
}


def _call(rng, kind, Nq=21, Nk=24, dtype=torch.float64):
    q, k, v = make_inputs(2, 4, 2, Nq, Nk, 8, 6, dtype, rng=rng)
    kw = OPTIONS[kind]
    if kw == "query-mask":  # a float mask that varies along the queries, with -inf and a dead row
        m = torch.tensor(rng.standard_normal((2, 1, Nq, Nk)), dtype=dtype)
        m[rng.random(m.shape) < 0.3] = float("-inf")
        m[0, 0, 3] = float("-inf")
        kw = dict(mask=m)
    kw = dict(kw)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = al.masks.alibi_slopes(4).to(dtype)
        kw["sinks"] = torch.tensor(rng.standard_normal(4), dtype=dtype)
    return q, k, v, kw


def _reference(q, k, v, kw):
    sinks, slopes, mask = kw.get("sinks"), kw.get("alibi_slopes"), kw.get("mask")
    return reference_attention(np64(q), np64(k), np64(v), mask=None if mask is None else np64(mask),
                               causal=kw.get("causal", False), window=kw.get("window"), offset=kw.get("offset"),
                               softcap=kw.get("softcap"), sinks=None if sinks is None else np64(sinks),
                               alibi_slopes=None if slopes is None else np64(slopes))


def test_build_chooses_a_backend_with_primitives_when_asked(rng):
    q, k, v = make_inputs(1, 2, 2, 16, 16, 8, 8, torch.float32, rng=rng)
    kernel = "fused" if al.FusedCpuBackend().status().startswith("kernel built") else "torch"
    assert al.Block.build(q, k, v).backend.name == "sdpa"  # output only, not causal: PyTorch's SDPA
    assert al.Block.build(q, k, v, causal=True).backend.name == ("fused" if kernel == "fused" else "sdpa")  # causal fp32
    blk = al.Block.build(q, k, v, causal=True, primitives=True)
    assert blk.backend.name == kernel and blk.primitives
    with pytest.raises(ValueError, match="sdpa.*no block primitives"):
        al.Block.build(q, k, v, backend="sdpa", primitives=True)
    only_out = al.Block.build(q, k, v, backend="sdpa")
    out, lse, res = only_out.forward()
    assert lse is None and res is None
    for call in (lambda: only_out.column_sums(torch.zeros(1, 2, 16)),
                 lambda: only_out.backward(out, out, out, q, k, v)):
        with pytest.raises(ValueError, match="primitives=True"):
            call()
    with pytest.raises(ValueError, match="q, k, v must have"):
        al.Block.build(q[0, 0, 0], k, v)
    assert kernel in repr(blk) and "causal" in repr(blk)


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_forward_backward_and_columns_equal_the_oracle(kind, rng):
    q, k, v, kw = _call(rng, kind)
    blk = al.Block.build(q, k, v, lens=al.Lens(topk=3, rows=[0, 7]), primitives=True,
                         backend=al.TorchChunkedBackend(chunk_bytes=4000), **kw)
    out, lse, res = blk.forward()
    r_out, w, r_lse = _reference(q, k, v, kw)
    assert_close(out, r_out, atol=1e-10, what="out")
    dead = np.isneginf(r_lse)
    assert np.array_equal(np.isneginf(np64(lse)), dead)
    assert_close(np.where(dead, 0, np64(lse)), np.where(dead, 0, r_lse), atol=1e-10, what="lse")
    assert_close(res.weights, w[:, :, [0, 7]], atol=1e-10, what="weight rows")
    assert_close(blk.column_sums(lse), w.sum(-2), atol=1e-9, what="received")
    W = torch.tensor(rng.random((2, 1, q.shape[2], 2)))
    assert_close(blk.column_sums(lse, W), np.swapaxes(w, -1, -2) @ np64(W), atol=1e-9, what="Pᵀ W")
    vec = torch.tensor(rng.random(q.shape[2]))  # a (Nq,) vector: T = 1
    assert_close(blk.column_sums(lse, vec)[..., 0], np.einsum("bhij,i->bhj", w, np64(vec)), atol=1e-9, what="Pᵀ w")
    idx = torch.tensor(rng.integers(-1, k.shape[2], (q.shape[2], 5)))
    got = blk.weights_at(lse, idx)
    want = np.where(np64(idx) >= 0, np.take_along_axis(w, np.maximum(np64(idx), 0).astype(int)[None, None]
                                                         .repeat(2, 0).repeat(4, 1), -1), 0)
    assert_close(got, want, atol=1e-12, what="weights_at")
    qi = torch.tensor([0, 5, 5, 20])
    kj = torch.tensor([[[1, -1, 23, 0]]])
    flat = blk.pair_weights(lse, qi, kj)
    assert_close(flat, np.where(np64(kj) >= 0, w[:, :, np64(qi).astype(int), np.maximum(np64(kj), 0).astype(int)[0, 0]],
                                0), atol=1e-12, what="pair_weights")
    dout = torch.tensor(rng.standard_normal(out.shape))
    grads = blk.gradients(out, lse, dout)
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    kw2 = {n: (x.clone().requires_grad_() if n == "sinks" else x) for n, x in kw.items()}
    al.attention(q2, k2, v2, backend="reference", **kw2).backward(dout)
    for g, t, n in zip(grads, (q2, k2, v2, kw2.get("sinks")), ("dq", "dk", "dv", "dsinks")):
        assert_close(g.reshape(t.grad.shape), t.grad, atol=1e-9, what=n)  # dsinks: the checked (1, Hq) view


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_rows_are_the_same_queries_of_the_whole_call(kind, rng):
    q, k, v, kw = _call(rng, kind)
    blk = al.Block.build(q, k, v, lens=al.Lens(topk=2), primitives=True, **kw)
    out, lse, res = blk.forward()
    for a, b in ((0, 1), (3, 11), (20, 21)):
        part = blk.rows(a, b)
        assert part.backend is blk.backend and part.shape[3] == b - a
        o, l_, r = blk.rows(a, b, lens=al.Lens(topk=2)).forward()
        torch.testing.assert_close(o, out[:, :, a:b])
        torch.testing.assert_close(l_, lse[:, :, a:b])
        for f in ("entropy", "max_weight", "topk_weights"):
            torch.testing.assert_close(getattr(r, f), getattr(res, f)[:, :, a:b])
        torch.testing.assert_close(part.column_sums(lse[:, :, a:b]), blk.column_sums(
            lse, (torch.arange(q.shape[2]) >= a) & (torch.arange(q.shape[2]) < b)).squeeze(-1).to(lse.dtype))
    for a, b in ((5, 5), (-1, 2), (0, 22)):
        with pytest.raises(ValueError, match="rows"):
            blk.rows(a, b)


def test_derive_keeps_the_backend_and_checks_the_lens(rng):
    q, k, v = make_inputs(1, 2, 2, 12, 12, 4, 4, torch.float64, rng=rng)
    be = al.TorchChunkedBackend(chunk_bytes=2000)
    blk = al.Block.build(q, k, v, causal=True, backend=be, primitives=True)
    other = blk.derive(q[:, :, 4:], k[:, :, :9], v[:, :, :9], offset=1, lens=al.Lens(entropy=True))
    assert other.backend is be and other.inputs.causal and other.inputs.offset == 1
    ref = al.attention(q[:, :, 4:], k[:, :, :9], v[:, :, :9], causal=True, offset=1, lens=True, backend="reference")
    torch.testing.assert_close(other.forward()[2].entropy, ref[1].entropy)
    out_only = al.Block.build(q, k, v, backend="sdpa")
    with pytest.raises(ValueError, match="lens fields"):
        out_only.derive(lens=al.Lens())


def test_column_sum_weights_are_checked(rng):
    q, k, v = make_inputs(1, 2, 2, 6, 8, 4, 4, torch.float32, rng=rng)
    blk = al.Block.build(q, k, v, primitives=True)
    _, lse, _ = blk.forward()
    with pytest.raises(TypeError, match="weights must be a torch tensor"):
        blk.column_sums(lse, np.ones((6, 1)))
    for bad in (torch.ones(5, 1), torch.ones(3, 2, 6, 1), torch.ones(2, 1, 1, 6, 1)):
        with pytest.raises(ValueError, match=r"weights of shape .* do not broadcast to \(B=1, Hq=2, Nq=6, T\)"):
            blk.column_sums(lse, bad)


class _LeavesColumnFields(al.TorchChunkedBackend):
    """A backend whose pass leaves weights_at, received_from and pooled to the block (as the Triton one does)."""

    def forward(self, inp):
        out, lse, res = super().forward(inp)
        if res is not None:
            res.weights_at = res.received_from = res.pooled = None
        return out, lse, res


@pytest.mark.parametrize("pool", [(9, 16), (1, 2**40), (2**40, 2**40)])
@pytest.mark.parametrize("kind", ["causal-window-offset", "score-mods"])
def test_forward_finishes_the_column_fields_from_the_primitives(kind, pool, rng):
    """The pooled map from column sums of one-hot query blocks; a block longer than N is all of it (no padding of
    P's columns to the block size: (1, 2**40) asked for 35 TB before issue 24)."""
    q, k, v, kw = _call(rng, kind, Nq=70, Nk=75)
    W = torch.tensor(rng.random((1, 4, 70, 3)))
    at = torch.tensor(rng.integers(-1, 75, (70, 4)))
    lens = al.Lens(received_from=W, at=at, pool=pool)
    _, _, want = al.Block.build(q, k, v, lens=lens, backend="torch", **kw).forward()
    _, _, got = al.Block.build(q, k, v, lens=lens, backend=_LeavesColumnFields(), **kw).forward()
    for f in ("weights_at", "received_from", "pooled"):
        assert getattr(got, f) is not None, f
        torch.testing.assert_close(getattr(got, f), getattr(want, f), atol=1e-10, rtol=0)
    _, w, lse = _reference(q, k, v, kw)
    ref = reference_lens(w, lse, pool=(min(pool[0], 70), min(pool[1], 75)))
    assert_close(got.pooled, ref.pooled, atol=1e-9, what="pooled vs the oracle")


def test_run_and_finish_are_attention(rng):
    q, k, v = make_inputs(1, 1, 1, 9, 9, 4, 4, torch.float64, rng=rng, rank=2, numpy=True)
    blk = al.Block.build(q, k, v, causal=True, lens=al.Lens(topk=2))
    out, res = blk.finish(*blk.run()[::2])
    want_out, want_res = al.attention(q, k, v, causal=True, lens=al.Lens(topk=2))
    assert isinstance(out, np.ndarray) and out.shape == q.shape and isinstance(res.entropy, np.ndarray)
    np.testing.assert_allclose(out, want_out)
    np.testing.assert_allclose(res.topk_weights, want_res.topk_weights)
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tb = al.Block.build(qt, kt, vt, causal=True)
    o = tb.finish(tb.run()[0])
    assert o.requires_grad and o.shape == (9, 4)
    o.sum().backward()
    assert qt.grad is not None and torch.isfinite(qt.grad).all()
