"""Padded batches with per-sequence lengths (``seqlens_q`` / ``seqlens_k``): FlashAttention's varlen semantics.

The oracle is each sequence sliced out of the padded batch and run alone through the float64 reference with its own
default offset (``Lk - Lq``, bottom-right per sequence), embedded back into the padded shapes: padded query rows
out 0 / lse -inf / lens zeros, padded keys weight 0. Every lens backend (reference, torch, triton under
``TRITON_INTERPRET=1``) must match it, and so must a dense varlen computation written from FlashAttention's
``attention_ref`` (its documented local-mask and ALiBi formulas with ``sk - sq`` per sequence).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before attnlens's triton kernels are imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import HAS_CUDA, HAS_TRITON  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens.core.reference import reference_attention, reference_lens  # noqa: E402

LENS_FIELDS = ("lse", "max_weight", "entropy", "received", "topk_weights", "topk_indices", "weights",
               "received_from", "weights_at", "pooled", "sink_weight")
TRITON = (al.TritonBackend(config="16x16") if not HAS_CUDA else "triton") if HAS_TRITON else None


def draw(rng, B=3, Hq=4, Hkv=2, Nq=7, Nk=9, D=5, Dv=3, dtype=torch.float64, lq=None, lk=None):
    q = torch.from_numpy(rng.standard_normal((B, Hq, Nq, D))).to(dtype)
    k = torch.from_numpy(rng.standard_normal((B, Hkv, Nk, D))).to(dtype)
    v = torch.from_numpy(rng.standard_normal((B, Hkv, Nk, Dv))).to(dtype)
    lq = torch.from_numpy(rng.integers(0, Nq + 1, B)) if lq is None else torch.tensor(lq)
    lk = torch.from_numpy(rng.integers(0, Nk + 1, B)) if lk is None else torch.tensor(lk)
    return q, k, v, lq, lk


def np64(t):
    return None if t is None else t.detach().cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy()


def per_sequence(q, k, v, lq, lk, *, mask=None, causal=False, window=None, scale=None, softcap=None, sinks=None,
                 alibi=None, topk=0, rows=None, received_from=None, at=None, pool=None):
    """The oracle: each sequence alone through `reference_attention` at its default offset, embedded in the padded
    shapes; then every lens field by `reference_lens` on the padded float64 weights. Returns ``(out, LensResult)``."""
    q, k, v = np64(q), np64(k), np64(v)
    B, Hq, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    out = np.zeros((B, Hq, Nq, Dv))
    w = np.zeros((B, Hq, Nq, Nk))
    lse = np.full((B, Hq, Nq), -np.inf)
    sk = None if sinks is None else np.broadcast_to(np64(sinks), (B, Hq))
    sl = None if alibi is None else np.broadcast_to(np64(alibi), (B, Hq))
    m = None if mask is None else np.broadcast_to(np64(mask), (B, Hq, Nq, Nk))
    for b in range(B):
        a, n = int(lq[b]), int(lk[b])
        if a == 0:
            continue
        o, p, ls = reference_attention(q[b:b + 1, :, :a], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                       mask=None if m is None else m[b:b + 1, :, :a, :n], causal=causal,
                                       window=al.masks.normalize_window(window),
                                       scale=scale, softcap=softcap, sinks=None if sk is None else sk[b],
                                       alibi_slopes=None if sl is None else sl[b:b + 1])  # default offset n - a
        out[b, :, :a], w[b, :, :a, :n], lse[b, :, :a] = o[0], p[0], ls[0]
    res = reference_lens(w, lse, topk=topk, rows=rows, sinks=sk, received_from=np64(received_from),
                         at=None if at is None else np64(at), pool=pool)
    return out, res


def assert_close(got, want, tol, what):
    got = np64(got) if isinstance(got, torch.Tensor) else np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert (np.isneginf(got) == np.isneginf(want)).all(), f"{what}: -inf positions differ"
    fin = np.isfinite(want)
    err = np.abs(np.where(fin, got, 0) - np.where(fin, want, 0)).max(initial=0.0)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def check_all(out, res, want_out, want, tol):
    assert_close(out, want_out, tol, "out")
    for f in LENS_FIELDS:
        g, w = getattr(res, f), getattr(want, f, None)
        if g is None or w is None:
            continue
        if f == "topk_indices":  # ties may order differently: check the weights at the indices instead
            continue
        assert_close(g, w, tol, f)


BACKENDS = ["reference", "torch", pytest.param("torch-chunk1", id="torch-chunk1"),
            pytest.param("triton", marks=[pytest.mark.triton])]


def backend_of(name):
    return {"torch-chunk1": al.TorchChunkedBackend(chunk_bytes=1), "triton": TRITON}.get(name, name)


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(2, 1)),
    "causal-window": dict(causal=True, window=(3, None)),
    "alibi": dict(alibi=True),
    "causal-alibi-sinks": dict(causal=True, alibi=True, sinks=True),
    "sinks": dict(sinks=True),
    "softcap-window": dict(softcap=1.5, window=1),
    "key-mask-causal": dict(mask=True, causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_equals_each_sequence_alone(backend, case, rng):
    """Output and every lens field against the per-sequence oracle: GQA (4 query heads on 2), Nq != Nk, lengths
    drawn in [0, N] (0 included: a sequence with no query or no key)."""
    spec = CASES[case]
    fp32 = backend == "triton"
    dtype = torch.float32 if fp32 else torch.float64
    B, Hq, Nq, Nk = 3, 4, 19 if fp32 else 7, 35 if fp32 else 9  # triton (interpreter): 16 x 16 tiles, ragged ends
    q, k, v, lq, lk = draw(rng, B=B, Hq=Hq, Nq=Nq, Nk=Nk, dtype=dtype,
                           lq=[Nq, rng.integers(1, Nq), 0], lk=[rng.integers(1, Nk), Nk, rng.integers(0, Nk)])
    sinks = torch.from_numpy(rng.standard_normal(Hq)).to(dtype) if spec.get("sinks") else None
    alibi = al.masks.alibi_slopes(Hq).to(dtype) if spec.get("alibi") else None
    mask = torch.from_numpy(rng.random((B, 1, 1, Nk)) < 0.8) if spec.get("mask") else None
    W = torch.from_numpy(rng.standard_normal((B, Hq, Nq, 2))).to(dtype)
    at = torch.from_numpy(rng.integers(-1, Nk, (Nq, 3)))
    lens = al.Lens(topk=3, rows=[0, 1, Nq - 1], received_from=W, at=at, pool=(2, 3))
    kw = dict(causal=spec.get("causal", False), window=spec.get("window"), softcap=spec.get("softcap"))
    out, res = al.attention(q, k, v, mask=mask, sinks=sinks, alibi_slopes=alibi, seqlens_q=lq, seqlens_k=lk,
                            backend=backend_of(backend), lens=lens, **kw)
    want_out, want = per_sequence(q, k, v, lq, lk, mask=mask, sinks=sinks, alibi=alibi, topk=3, rows=[0, 1, Nq - 1],
                                  received_from=W, at=at, pool=(2, 3), **kw)
    check_all(out, res, want_out, want, 2e-5 if fp32 else 1e-10)
    ti, tw = np64(res.topk_indices), np64(res.topk_weights)  # indices point at keys of those weights, -1 past them
    p = per_sequence(q, k, v, lq, lk, mask=mask, sinks=sinks, alibi=alibi, rows=list(range(Nq)), **kw)[1].weights
    assert ((ti == -1) == (tw == 0)).all()
    at_ti = np.take_along_axis(p, np.maximum(ti, 0), axis=-1)
    assert np.abs(np.where(ti >= 0, at_ti - tw, 0.0)).max() <= (2e-5 if fp32 else 1e-10)
    # padded rows and keys exactly: out 0, lse -inf, nothing received
    for b in range(B):
        a, n = int(lq[b]), int(lk[b])
        assert (out[b, :, a:] == 0).all() and torch.isneginf(res.lse[b, :, a:]).all()
        assert (res.received[b, :, n:] == 0).all() and (res.max_weight[b, :, a:] == 0).all()
        if sinks is not None:
            assert (res.sink_weight[b, :, a:] == 0).all()


def test_issue_example_row_0_of_2_queries_and_3_keys_sees_k0_k1():
    """Issue 24 item 10: sequence 0 has 2 queries and 3 keys in a batch padded to Nq = Nk = 5, causal — row 0 sits
    at key position 1 (bottom-right per sequence) and sees k0, k1, as FlashAttention's varlen does."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for backend in ("reference", "torch", "auto"):
        _, res = al.attention(q, k, v, causal=True, seqlens_q=[2, 5], seqlens_k=[3, 5], backend=backend,
                              lens=al.Lens(rows="all"))
        w = res.weights[0, 0]
        assert (w[0, :2] > 0).all() and (w[0, 2:] == 0).all(), backend
        assert (w[1, :3] > 0).all() and (w[1, 3:] == 0).all(), backend
        assert (w[2:] == 0).all(), backend  # padded rows
        assert (res.weights[1, 0] > 0).sum() == 1 + 2 + 3 + 4 + 5  # the full sequence: plain causal
    # what a single offset with a padding mask gives instead (the issue's mismatch): row 0 sees only k0
    _, res = al.attention(q, k, v, causal=True, mask=al.masks.padding_mask([3, 5], 5), lens=al.Lens(rows=[0]),
                          backend="torch")
    assert (res.weights[0, 0, 0, :1] > 0).all() and (res.weights[0, 0, 0, 1:] == 0).all()


def flash_attention_ref(q, k, v, lq, lk, causal=False, window=(-1, -1), alibi=None):
    """A dense varlen attention written from FlashAttention's ``tests/test_flash_attn.py`` ``attention_ref`` for padded
    batches (query/key padding masks, ``construct_local_mask`` with ``sk - sq`` per sequence, ``attn_bias_from_
    alibi_slopes``): float64 torch, returns ``(out, P)``. Window sides of -1 are unbounded; causal sets the right side
    to 0. ALiBi: ``-slope·|i + sk - sq - j|`` without causal, ``slope·(j - Nk + 1)`` with it."""
    q, k, v = (torch.as_tensor(np64(x)) for x in (q, k, v))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    qpad = torch.arange(Nq)[None, :] < torch.as_tensor(lq)[:, None]  # (B, Nq) True = real
    kpad = torch.arange(Nk)[None, :] < torch.as_tensor(lk)[:, None]
    if causal:
        window = (window[0], 0)
    scores = q @ k.transpose(-1, -2) / D ** 0.5
    if alibi is not None:
        slopes = torch.as_tensor(np64(alibi)).expand(B, H)[:, :, None, None]
        if causal:
            scores = scores + torch.arange(-Nk + 1, 1, dtype=torch.float64) * slopes
        else:
            sk = kpad.sum(-1)[:, None, None, None]
            sq = qpad.sum(-1)[:, None, None, None]
            rel = (torch.arange(Nq)[:, None] + sk - sq - torch.arange(Nk)).abs()
            scores = scores - slopes * rel
    scores = scores.masked_fill(~kpad[:, None, None, :], float("-inf"))
    row = torch.arange(Nq)[:, None]
    col = torch.arange(Nk)
    sk = kpad.sum(-1)[:, None, None, None]
    sq = qpad.sum(-1)[:, None, None, None]
    local = None
    if window[0] >= 0 or window[1] >= 0:
        if window[0] < 0:
            local = col > row + sk - sq + window[1]
        else:
            right = row + sk - sq + (window[1] if window[1] >= 0 else Nk)
            local = (col > torch.minimum(right, sk)) | (col < row + sk - sq - window[0])
        scores = scores.masked_fill(local, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if local is not None:
        p = p.masked_fill(local.all(-1, keepdim=True), 0.0)
    p = p.nan_to_num(0.0)  # rows with every key padded
    p = p.masked_fill(~qpad[:, None, :, None], 0.0)
    return p @ v, p


@pytest.mark.parametrize("spec", [dict(), dict(causal=True), dict(window=(2, 3)), dict(causal=True, window=(4, -1)),
                                  dict(window=(-1, 1)), dict(alibi=True), dict(alibi=True, causal=True)],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_matches_flash_attention_attention_ref_varlen(spec, rng):
    """Out and weights equal FlashAttention's reference on padded batches (causal ALiBi: the same weights; the lse
    differs on purpose by a constant per row, see `attnlens.attention`)."""
    Hq = 2
    q, k, v, lq, lk = draw(rng, B=4, Hq=Hq, Hkv=1, Nq=6, Nk=8, lq=[6, 2, 5, 1], lk=[8, 3, 4, 8])
    win = spec.get("window", (-1, -1))
    alibi = al.masks.alibi_slopes(Hq).double() if spec.get("alibi") else None
    want_out, want_p = flash_attention_ref(q, k, v, lq, lk, causal=spec.get("causal", False), window=win, alibi=alibi)
    ours_win = None if win == (-1, -1) else tuple(None if w < 0 else w for w in win)
    for backend in ("reference", "torch"):
        out, res = al.attention(q, k, v, causal=spec.get("causal", False), window=ours_win, alibi_slopes=alibi,
                                seqlens_q=lq, seqlens_k=lk, backend=backend, lens=al.Lens(rows="all"))
        assert_close(out, want_out.numpy(), 1e-12, f"out {backend}")
        assert_close(res.weights, want_p.numpy(), 1e-12, f"weights {backend}")


def dense_grads(q, k, v, lq, lk, g, h, **kw):
    """``(dq, dk, dv)`` of ``Σ out·g + Σ lse·h`` from each sequence alone (reference backend, its own default
    offset), zero at the padded positions."""
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    for b in range(q.shape[0]):
        a, n = int(lq[b]), int(lk[b])
        if a == 0 or n == 0:
            continue
        xs = [x[b:b + 1, :, :m].detach().clone().requires_grad_() for x, m in ((q, a), (k, n), (v, n))]
        out, res = al.attention(*xs, backend="reference", lens=al.Lens(), **kw)
        lse = res.lse.masked_fill(torch.isneginf(res.lse), 0.0)
        ((out * g[b:b + 1, :, :a]).sum() + (lse * h[b:b + 1, :, :a]).sum()).backward()
        for buf, x, m in zip(grads, xs, (a, n, n)):
            buf[b:b + 1, :, :m] = x.grad
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [dict(causal=True), dict(window=(1, 2), softcap=2.0), dict(causal=True, alibi=True)],
                         ids=["causal", "window-softcap", "causal-alibi"])
def test_gradients_equal_each_sequence_alone(backend, spec, rng):
    """dq, dk, dv of a loss on out and lse (the lse carries a gradient) against per-sequence autograd."""
    fp32 = backend == "triton"
    dtype = torch.float32 if fp32 else torch.float64
    Nq, Nk = (19, 35) if fp32 else (6, 8)
    q, k, v, lq, lk = draw(rng, B=3, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, dtype=dtype, lq=[Nq, 3, 0], lk=[Nk - 2, Nk, 4])
    alibi = al.masks.alibi_slopes(4).to(dtype) if spec.get("alibi") else None
    kw = dict(causal=spec.get("causal", False), window=spec.get("window"), softcap=spec.get("softcap"),
              alibi_slopes=alibi)
    g = torch.from_numpy(rng.standard_normal((3, 4, Nq, 3))).to(dtype)
    h = torch.from_numpy(rng.standard_normal((3, 4, Nq))).to(dtype)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, res = al.attention(*xs, seqlens_q=lq, seqlens_k=lk, backend=backend_of(backend), lens=al.Lens(), **kw)
    lse = res.lse.masked_fill(torch.isneginf(res.lse), 0.0)
    ((out * g).sum() + (lse * h).sum()).backward()
    want = dense_grads(q.double(), k.double(), v.double(), lq, lk, g.double(), h.double(), **kw) if not fp32 else \
        dense_grads(q.double(), k.double(), v.double(), lq, lk, g.double(), h.double(),
                    **{**kw, "alibi_slopes": None if alibi is None else alibi.double()})
    for name, x, w in zip("qkv", xs, want):
        assert_close(x.grad, np64(w), 1e-4 if fp32 else 1e-10, f"d{name}")


def test_gradcheck_float64_with_sinks_and_lse():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 1, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 1, 5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    sinks = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)

    def f(q, k, v, sinks):
        out, res = al.attention(q, k, v, causal=True, sinks=sinks, seqlens_q=[3, 4], seqlens_k=[5, 2],
                                backend="torch", lens=al.Lens(max_weight=False, entropy=False, received=False))
        return out, res.lse.masked_fill(torch.isneginf(res.lse), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_rows_of_a_padded_block_keep_each_sequence_s_positions(rng):
    """`Block.rows(a, b)` (what `AttnCall` slices with) keeps per-sequence offsets and cuts the lengths."""
    from attnlens.core import Block

    q, k, v, lq, lk = draw(rng, B=2, Nq=7, Nk=9, lq=[5, 7], lk=[9, 4])
    blk = Block.build(q, k, v, causal=True, seqlens_q=lq, seqlens_k=lk, backend="torch", lens=al.Lens())
    _, lse, _ = blk.forward()
    _, part, _ = blk.rows(2, 6).forward()
    assert_close(part, np64(lse[:, :, 2:6]), 1e-12, "lse of rows [2, 6)")


def test_inputs_are_checked():
    q, k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)
    with pytest.raises(TypeError, match="seqlens_q"):
        al.attention(q, k, v, seqlens_q=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="seqlens_k"):
        al.attention(q, k, v, seqlens_k=np.array([True, False]))
    with pytest.raises(TypeError, match="seqlens_k"):
        al.attention(q, k, v, seqlens_k="3")
    with pytest.raises(ValueError, match=r"seqlens_q must have shape \(B,\) = \(2,\)"):
        al.attention(q, k, v, seqlens_q=[1, 2, 3])
    with pytest.raises(ValueError, match=r"seqlens_q must lie in \[0, 3\]"):
        al.attention(q, k, v, seqlens_q=[1, 4])
    with pytest.raises(ValueError, match=r"seqlens_k must lie in \[0, 5\]"):
        al.attention(q, k, v, seqlens_k=[-1, 4])
    with pytest.raises(ValueError, match="offset must have shape"):
        al.attention(q, k, v, seqlens_k=[2, 4], offset=[1, 2, 3])
    with pytest.raises(ValueError, match="no per-sequence lengths"):
        al.attention(q, k, v, seqlens_k=[2, 4], backend="sdpa")


def test_auto_passes_over_backends_without_the_capability(rng):
    from attnlens.core import dispatch
    from attnlens.core.backends import Backend
    from attnlens.core.inputs import validate

    q, k, v, lq, lk = draw(rng, B=2, dtype=torch.float32)
    inp = validate(q, k, v, seqlens_q=lq, seqlens_k=lk)
    assert dispatch.select(inp).name == "torch"  # sdpa would come first without seqlens
    assert dispatch.select(validate(q, k, v)).name == "sdpa"

    class Plain(Backend):
        name = "plain"

    assert "no per-sequence lengths (seqlens_q / seqlens_k)" in Plain().not_supported_reasons(inp)
    assert Plain().not_supported_reasons(validate(q, k, v)) == []


def test_full_lengths_equal_no_lengths_and_int_offset(rng):
    """Full lengths are the plain call; an int offset applies to every sequence; (B,) offsets one each."""
    q, k, v, _, _ = draw(rng, B=2, Nq=5, Nk=8)
    plain = al.attention(q, k, v, causal=True, backend="torch")
    full = al.attention(q, k, v, causal=True, seqlens_q=[5, 5], seqlens_k=[8, 8], backend="torch")
    assert torch.equal(plain, full)
    one = al.attention(q, k, v, causal=True, offset=1, backend="torch")
    assert torch.allclose(al.attention(q, k, v, causal=True, seqlens_k=[8, 8], offset=1, backend="torch"), one)
    each = al.attention(q, k, v, causal=True, seqlens_k=[8, 8], offset=[1, -2], backend="torch")
    assert torch.allclose(each[0], one[0])
    assert torch.allclose(each[1], al.attention(q[1:], k[1:], v[1:], causal=True, offset=-2, backend="torch")[0])


def test_merge_of_padded_key_pieces_equals_the_whole(rng):
    """Split-KV over a padded batch: piece [a, b) of the keys has lengths ``clamp(lk - a, 0, b - a)`` and offsets
    ``lk - lq - a`` (``(B,)`` offsets, one per sequence); `merge` of the pieces is the whole call, gradients too."""
    q, k, v, lq, lk = draw(rng, B=3, Nq=6, Nk=9, lq=[6, 2, 0], lk=[9, 3, 5])
    lens = al.Lens(topk=2)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    parts = [al.attention(xs[0], xs[1][:, :, a:b], xs[2][:, :, a:b], causal=True, window=(3, None), seqlens_q=lq,
                          seqlens_k=(lk - a).clamp(0, b - a), offset=lk - lq - a, backend="torch", lens=lens)
             for a, b in ((0, 4), (4, 9))]
    out, res = al.merge(parts)
    whole, wres = al.attention(q, k, v, causal=True, window=(3, None), seqlens_q=lq, seqlens_k=lk, backend="torch",
                               lens=lens)
    assert_close(out, np64(whole), 1e-12, "out")
    for f in ("lse", "max_weight", "entropy", "topk_weights"):
        assert_close(getattr(res, f), np64(getattr(wres, f)), 1e-12, f)
    assert torch.equal(res.topk_indices, wres.topk_indices)
    g = torch.from_numpy(rng.standard_normal(out.shape))
    (out * g).sum().backward()
    want = dense_grads(q, k, v, lq, lk, g, torch.zeros(q.shape[:3], dtype=q.dtype), causal=True, window=(3, None))
    for name, x, w in zip("qkv", xs, want):
        assert_close(x.grad, np64(w), 1e-10, f"d{name}")


@pytest.mark.triton
def test_triton_offsets_beyond_int32(rng):
    """Per-sequence offsets beyond ±2**30 travel as int64 (the kernels' other specialisation): sequence 0 at key
    position 2**40 sees every key under causal, sequence 1 at -2**40 none."""
    q, k, v, lq, lk = draw(rng, B=2, Hq=2, Hkv=1, Nq=19, Nk=21, dtype=torch.float32, lq=[19, 7], lk=[21, 9])
    off = torch.tensor([2**40, -2**40])
    out, res = al.attention(q, k, v, causal=True, seqlens_q=lq, seqlens_k=lk, offset=off, backend=TRITON,
                            lens=al.Lens(received=True))
    want, wres = al.attention(q.double(), k.double(), v.double(), causal=True, seqlens_q=lq, seqlens_k=lk, offset=off,
                              backend="reference", lens=al.Lens(received=True))
    assert_close(out, np64(want), 2e-5, "out")
    assert_close(res.lse, np64(wres.lse), 2e-5, "lse")
    assert_close(res.received, np64(wres.received), 2e-5, "received")
    assert torch.isneginf(res.lse[1]).all() and (res.received[1] == 0).all()
