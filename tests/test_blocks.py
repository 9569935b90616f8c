"""The block seam: every backend's block primitives against the float64 oracle, and `attnlens.merge`.

One parametrized test per primitive runs every backend with block primitives (reference, torch, and
triton under ``TRITON_INTERPRET=1`` on the CPU) over random offsets (negative, zero, past Nk), causal,
windows, GQA, Dv != D and fully masked rows:

- ``forward(inp) -> (out, lse, LensResult)``;
- ``backward(inp, out, lse, dout, dq, dk, dv)`` *adds* into caller-owned buffers (pre-filled here);
- ``column_sums(inp, lse, W)`` = ``Pᵀ W`` for a given (also a foreign, "global") lse.

The visibility rule with an offset is re-derived here with plain comparisons (not attnlens.masks), and the
reference is checked against it first.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported (see test_triton.py)

from conftest import assert_close, check_topk, make_inputs, np64  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens.core import Memory  # noqa: E402
from attnlens.core.inputs import validate  # noqa: E402
from attnlens.core.reference import reference_attention, reference_backward, reference_lens  # noqa: E402

BACKENDS = ["reference", "torch", "fused", pytest.param("triton", marks=pytest.mark.triton)]
FP32 = ("triton", "fused")  # backends that compute in float32


def backend_of(name):
    if name == "triton":
        return al.TritonBackend(config="16x16") if not torch.cuda.is_available() else al.TritonBackend()
    return {"reference": al.ReferenceBackend(), "torch": al.TorchChunkedBackend(chunk_bytes=3000),
            "fused": al.FusedCpuBackend()}[name]


def dtype_of(name):
    return torch.float32 if name in FP32 else torch.float64


def tol_of(name):
    return 1e-10 if name not in FP32 else 5e-5


def keep_rule(nq, nk, offset, causal, window):
    """Query i sees key j: j <= i + offset (causal); i + offset - L <= j <= i + offset + R (window)."""
    keep = np.ones((nq, nk), dtype=bool)
    for i in range(nq):
        for j in range(nk):
            p = i + offset
            if causal and j > p:
                keep[i, j] = False
            if window is not None:
                left, right = window
                if left is not None and j < p - left:
                    keep[i, j] = False
                if right is not None and j > p + right:
                    keep[i, j] = False
    return keep


# name -> (B, Hq, Hkv, Nq, Nk, D, Dv, kwargs); offsets are drawn per test
CASES = {
    "causal-gqa": (1, 4, 2, 19, 23, 8, 5, {"causal": True}),
    "window-mqa": (2, 3, 1, 17, 20, 6, 6, {"window": (3, 2)}),
    "causal-window-left": (1, 2, 2, 21, 21, 4, 7, {"causal": True, "window": (5, None)}),
    "plain-keymask-dead": (2, 2, 1, 13, 18, 5, 3, {"mask": "keys"}),
    "right-only": (1, 2, 1, 16, 33, 8, 8, {"window": (None, 4)}),
}


def draw(name, case, rng, offset_kind):
    B, Hq, Hkv, Nq, Nk, D, Dv, kw = CASES[case]
    kw = dict(kw)
    if kw.get("mask") == "keys":  # a key mask (every backend takes it); sequence 1 sees no key
        keep = torch.from_numpy(rng.random((B, 1, 1, Nk)) < 0.7)
        keep[-1] = False
        kw["mask"] = keep
    offset = {"negative": -int(rng.integers(1, Nq)), "zero": 0, "default": Nk - Nq,
              "beyond": Nk + int(rng.integers(0, 5))}[offset_kind]
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype_of(name), rng=rng)
    return q, k, v, dict(kw, offset=offset)


def ref_dense(q, k, v, kw):
    m = kw.get("mask")
    out, w, lse = reference_attention(np64(q), np64(k), np64(v), mask=None if m is None else np64(m),
                                      causal=kw.get("causal", False), window=kw.get("window"), offset=kw["offset"])
    return out, w, lse


OFFSETS = ["negative", "zero", "default", "beyond"]


@pytest.mark.parametrize("offset_kind", OFFSETS)
@pytest.mark.parametrize("case", list(CASES))
def test_reference_follows_the_offset_rule(case, offset_kind, rng):
    q, k, v, kw = draw("reference", case, rng, offset_kind)
    _, w, lse = ref_dense(q, k, v, kw)
    rule = keep_rule(q.shape[2], k.shape[2], kw["offset"], kw.get("causal", False), kw.get("window"))
    m = kw.get("mask")
    if m is not None:
        rule = rule & np64(m)
    assert (w[~np.broadcast_to(rule, w.shape)] == 0).all(), "weight on a key the rule hides"
    live = np.broadcast_to(rule, w.shape).any(-1)
    np.testing.assert_allclose(w.sum(-1)[live], 1.0, atol=1e-12)
    assert np.isneginf(lse[~live]).all() and (w[~live] == 0).all()


@pytest.mark.parametrize("offset_kind", OFFSETS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BACKENDS)
def test_forward_primitive(name, case, offset_kind, rng):
    q, k, v, kw = draw(name, case, rng, offset_kind)
    topk = 3
    lens = al.Lens(topk=topk, rows=[0, -1])
    inp = validate(q, k, v, lens=lens, **kw)
    be = backend_of(name)
    assert not be.not_supported_reasons(inp)
    out, lse, res = be.forward(inp)
    r_out, w, r_lse = ref_dense(q, k, v, kw)
    ref = reference_lens(w, r_lse, topk=topk, rows=inp.rows)
    ref._full_weights = w
    tol = tol_of(name)
    assert out.dtype == q.dtype and out.shape == r_out.shape
    assert_close(out, r_out, atol=tol, what="out")
    a, e = np64(lse), r_lse
    assert np.array_equal(np.isneginf(a), np.isneginf(e)), "dead rows: lse -inf"
    assert_close(np.where(np.isneginf(e), 0, a), np.where(np.isneginf(e), 0, e), atol=tol * 10, what="lse")
    for f in ("max_weight", "entropy", "received", "weights"):
        assert_close(getattr(res, f), getattr(ref, f), atol=tol * (q.shape[2] if f == "received" else 10), what=f)
    check_topk(res, ref, atol=tol * 10)


@pytest.mark.parametrize("offset_kind", OFFSETS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BACKENDS)
def test_backward_primitive_adds_into_buffers(name, case, offset_kind, rng):
    q, k, v, kw = draw(name, case, rng, offset_kind)
    inp = validate(q, k, v, **kw)
    be = backend_of(name)
    out, lse, _ = be.forward(inp)
    dout = torch.tensor(rng.standard_normal(out.shape), dtype=out.dtype)
    acc = torch.float32 if name in FP32 else torch.float64
    pre = [torch.tensor(rng.standard_normal(t.shape), dtype=acc) for t in (q, k, v)]
    bufs = [p.clone() for p in pre]
    be.backward(inp, out, lse, dout, *bufs)
    _, w, _ = ref_dense(q, k, v, kw)
    grads = reference_backward(np64(q), np64(k), np64(v), w, np64(dout), scale=inp.scale)
    tol = 1e-9 if name not in FP32 else 2e-4
    for n, b, p, g in zip("qkv", bufs, pre, grads):
        assert_close(b - p, g, atol=tol, rtol=tol, what=f"d{n} added into the buffer")


@pytest.mark.parametrize("offset_kind", ["negative", "default", "beyond"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BACKENDS)
def test_column_sums_primitive(name, case, offset_kind, rng):
    q, k, v, kw = draw(name, case, rng, offset_kind)
    inp = validate(q, k, v, **kw)
    be = backend_of(name)
    _, lse, _ = be.forward(inp)
    _, w, r_lse = ref_dense(q, k, v, kw)
    tol = tol_of(name) * q.shape[2] * 10
    assert_close(be.column_sums(inp, lse), w.sum(-2), atol=tol, what="received (W = 1)")
    B, Hq, Nq = q.shape[:3]
    W = torch.tensor(rng.random((B, 1, Nq, 3)), dtype=lse.dtype)  # broadcast over heads, T = 3
    assert_close(be.column_sums(inp, lse, W), np.swapaxes(w, -1, -2) @ np64(W), atol=tol, what="Pᵀ W")
    # a foreign ("global") lse: the weights become exp(s - lse_global) = P · exp(lse_own - lse_global)
    shift = torch.tensor(rng.random((B, Hq, Nq)), dtype=lse.dtype)
    scaled = w * np.exp(-np64(shift))[..., None]
    assert_close(be.column_sums(inp, lse + shift, W), np.swapaxes(scaled, -1, -2) @ np64(W), atol=tol,
                 what="Pᵀ W under a global lse")


@pytest.mark.parametrize("name", ["reference", "torch"])
@pytest.mark.parametrize("case", ["causal-gqa", "window-mqa"])
def test_gradcheck_through_the_one_wrapper(name, case, rng):
    B, Hq, Hkv, Nq, Nk, D, Dv, kw = CASES[case]
    q, k, v = make_inputs(1, Hq, Hkv, 5, 7, 3, 2, torch.float64, rng=rng, requires_grad=True)
    be = backend_of(name)

    def f(q, k, v):
        return al.attention(q, k, v, backend=be, offset=-1, lens=al.Lens(topk=2), **kw)[0]

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_lens_is_a_non_differentiable_output(rng):
    q, k, v = make_inputs(1, 2, 2, 6, 6, 4, 4, torch.float64, rng=rng, requires_grad=True)
    out, res = al.attention(q, k, v, backend="torch", lens=al.Lens(topk=2, rows="all"))
    assert out.requires_grad and res.lse.requires_grad
    for f in ("max_weight", "entropy", "received", "topk_weights", "weights"):
        assert not getattr(res, f).requires_grad, f


# --------------------------------------------------------------------------------------------
# attention(offset=...)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "reference"])
@pytest.mark.parametrize("offset", [-3, 0, 2, 40])
def test_attention_offset_on_every_backend(backend, offset, rng):
    q, k, v = make_inputs(2, 4, 2, 9, 14, 8, 5, torch.float64, rng=rng)
    for kw in ({"causal": True}, {"window": (2, 1)}, {"causal": True, "window": (4, None)}):
        out = al.attention(q, k, v, offset=offset, backend=backend, **kw)
        r_out, _, _ = ref_dense(q, k, v, dict(kw, offset=offset))
        assert_close(out, r_out, atol=1e-10, what=f"{backend} offset={offset} {kw}")


def test_offset_default_is_bottom_right_and_bad_offsets_are_refused(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 9, 4, 4, torch.float64, rng=rng)
    torch.testing.assert_close(al.attention(q, k, v, causal=True), al.attention(q, k, v, causal=True, offset=4))
    for bad, err in ((1.5, TypeError), (True, TypeError), ("3", TypeError), (2**60, ValueError)):
        with pytest.raises(err, match="offset"):
            al.attention(q, k, v, causal=True, offset=bad)


def test_sdpa_with_offset_zero_needs_no_dense_mask(rng):
    """offset=0 with causal is PyTorch's is_causal (top-left): sdpa keeps linear memory, so auto takes it."""
    from attnlens.core import dispatch

    q, k, v = make_inputs(1, 2, 2, 6, 10, 4, 4, torch.float16, rng=rng)  # fp16: plain causal fp32 goes to the kernel
    assert dispatch.get("sdpa").memory(validate(q, k, v, causal=True, offset=0)) is Memory.LINEAR
    assert dispatch.select(validate(q, k, v, causal=True, offset=0)).name == "sdpa"
    assert dispatch.get("sdpa").memory(validate(q, k, v, causal=True, offset=3)) is Memory.DENSE
    assert dispatch.select(validate(q, k, v, causal=True, offset=3)).name in ("fused", "torch")  # not (Nq, Nk)


def test_auto_never_takes_a_dense_path_for_windows(rng):
    from attnlens.core import dispatch

    q, k, v = make_inputs(1, 2, 2, 16, 16, 4, 4, torch.float32, rng=rng)
    inp = validate(q, k, v, window=(4, 0))
    assert dispatch.get("sdpa").memory(inp) is Memory.DENSE
    assert dispatch.select(inp).name in ("fused", "torch")  # linear memory (fused where its kernel builds)
    assert dispatch.select(validate(q, k, v)).name == "sdpa"


# --------------------------------------------------------------------------------------------
# merge


def _cuts(rng, nk, n):
    inner = sorted(rng.choice(np.arange(1, nk), size=n - 1, replace=False).tolist()) if n > 1 else []
    return [0] + inner + [nk]


@pytest.mark.parametrize("n_parts", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_merge_of_key_pieces_equals_attention_over_all_keys(n_parts, kind, rng):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 11, 29, 6
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, 3, torch.float64, rng=rng)
    keep = torch.from_numpy(rng.random((B, 1, Nq, Nk)) < 0.8)
    cuts = _cuts(rng, Nk, n_parts)
    if n_parts >= 3:
        cuts = cuts[:1] + [1] + [c for c in cuts[1:] if c > 1]  # a piece of a single key
    keep[0, 0, 3] = False  # query 3 of sequence 0 sees no key at all
    keep[1, 0, :, cuts[1]:cuts[2] if len(cuts) > 2 else Nk] = False  # one piece entirely masked for sequence 1
    lens = al.Lens(topk=2, rows=[0, 3, -1])
    if kind == "numpy":
        q, k, v, keep = (x.numpy() for x in (q, k, v, keep))
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        sub = al.Lens(topk=min(2, b - a), rows=[0, 3, -1])
        parts.append(al.attention(q, k[..., a:b, :], v[..., a:b, :], mask=keep[..., a:b], lens=sub, backend="torch"))
    out, res = al.merge(parts)
    e_out, e_res = al.attention(q, k, v, mask=keep, lens=lens, backend="torch")
    assert type(out) is type(e_out)
    assert_close(out, e_out, atol=1e-12, what="out")
    a, e = np64(res.lse), np64(e_res.lse)
    assert np.array_equal(np.isneginf(a), np.isneginf(e))
    assert_close(np.where(np.isneginf(e), 0, a), np.where(np.isneginf(e), 0, e), atol=1e-12, what="lse")
    for f in ("max_weight", "entropy", "weights", "topk_weights"):
        assert_close(getattr(res, f), getattr(e_res, f), atol=1e-12, what=f)
    assert np.array_equal(np64(res.topk_indices), np64(e_res.topk_indices)), "top-k indices offset per piece"
    assert res.received is None, "column sums need the final lse: not merged"
    assert res.rows == e_res.rows


def test_merge_needs_lse_and_offsets(rng):
    q, k, v = make_inputs(1, 1, 1, 4, 6, 3, 3, torch.float64, rng=rng)
    no_lse = al.attention(q, k, v, lens=al.Lens(lse=False))
    with pytest.raises(ValueError, match="lse"):
        al.merge([no_lse])
    with pytest.raises(ValueError, match="at least one"):
        al.merge([])
    bare = al.Lens(received=False, topk=1)
    parts = [al.attention(q, k[..., :3, :], v[..., :3, :], lens=bare), al.attention(q, k[..., 3:, :], v[..., 3:, :],
                                                                                     lens=bare)]
    with pytest.raises(ValueError, match="key_offsets"):
        al.merge(parts)
    out, res = al.merge(parts, key_offsets=[0, 3])
    _, e_res = al.attention(q, k, v, lens=al.Lens(topk=1))
    assert torch.equal(res.topk_indices, e_res.topk_indices)
    with pytest.raises(ValueError, match="same queries"):
        al.merge([parts[0], al.attention(q[..., :2, :], k, v, lens=bare)])


# --------------------------------------------------------------------------------------------
# merge: what a part is, key offsets, top-k of small pieces, empty pieces (issue 24, items 7 and 11)

def _pieces(q, k, v, cuts, lens, causal=False):
    """Attention over the key pieces [a, b) of ``cuts``; causal as over all keys (bottom-right): query i sits at key
    position i + Nk - Nq, which is i + Nk - Nq - a in the piece."""
    nq, nk = q.shape[-2], k.shape[-2]
    return [al.attention(q, k[..., a:b, :], v[..., a:b, :], lens=lens, backend="torch", causal=causal,
                         offset=nk - nq - a) for a, b in zip(cuts[:-1], cuts[1:])]


def _assert_merged_equals(res, out, e_res, e_out):
    assert_close(out, e_out, atol=1e-12, what="out")
    a, e = np64(res.lse), np64(e_res.lse)
    assert np.array_equal(np.isneginf(a), np.isneginf(e))
    assert_close(np.where(np.isneginf(e), 0, a), np.where(np.isneginf(e), 0, e), atol=1e-12, what="lse")
    for f in ("max_weight", "entropy", "weights", "topk_weights"):
        if getattr(e_res, f) is not None:
            assert_close(getattr(res, f), getattr(e_res, f), atol=1e-12, what=f)
    if e_res.topk_indices is not None:
        assert np.array_equal(np64(res.topk_indices), np64(e_res.topk_indices)), "topk_indices"


@pytest.mark.parametrize("part, got", [("tensor", "got Tensor"), ("out-none", r"got \(Tensor, NoneType\)"),
                                       ("triple", "got tuple"), ("swapped", r"got \(LensResult, Tensor\)")])
def test_merge_part_that_is_not_a_pair_is_a_type_error(part, got, rng):
    q, k, v = make_inputs(1, 2, 1, 4, 6, 3, 3, torch.float64, rng=rng)
    good = al.attention(q, k, v, lens=True)
    bad = {"tensor": good[0], "out-none": (good[0], None), "triple": (*good, None), "swapped": good[::-1]}[part]
    with pytest.raises(TypeError, match=rf"merge: part 1 must be an \(out, LensResult\) pair.*{got}"):
        al.merge([good, bad])


@pytest.mark.parametrize("offsets, match", [
    ([-4, 3], "ints >= 0"), ([0.5, 3], "ints >= 0"), ([True, 3], "ints >= 0"), ([0], "1 entries for 2 parts"),
    ([0, 0], r"overlap: part 0 holds keys \[0, 3\), part 1 \[0, 3\)"),
    ([4, 2], r"overlap: part 1 holds keys \[2, 5\), part 0 \[4, 7\)")])
def test_merge_refuses_key_offsets_that_are_not_disjoint_pieces(offsets, match, rng):
    """Negative offsets gave index -4; repeated ones repeated indices in the merged top-k."""
    q, k, v = make_inputs(1, 2, 1, 4, 6, 3, 3, torch.float64, rng=rng)
    parts = _pieces(q, k, v, [0, 3, 6], al.Lens(topk=2))
    with pytest.raises(ValueError, match=match):
        al.merge(parts, key_offsets=offsets)
    bare = _pieces(q, k, v, [0, 3, 6], al.Lens(received=False, topk=2))  # sizes unknown: the offsets must differ
    with pytest.raises(ValueError, match=r"overlap: part 0 holds keys from key 1, part 1 from key 1"):
        al.merge(bare, key_offsets=[1, 1])
    al.merge(parts, key_offsets=[3, 0])  # disjoint, in any order


def test_merge_of_weight_rows_of_different_queries_says_so(rng):
    q, k, v = make_inputs(1, 2, 1, 4, 6, 3, 3, torch.float64, rng=rng)
    a = al.attention(q, k[..., :3, :], v[..., :3, :], lens=al.Lens(rows=[0, 1]))
    b = al.attention(q, k[..., 3:, :], v[..., 3:, :], lens=al.Lens(rows=[2, 3]))
    with pytest.raises(ValueError, match=r"different queries: part 0 rows \[0, 1\], part 1 rows \[2, 3\]"):
        al.merge([a, b])
    c = al.attention(q, k[..., 3:, :], v[..., 3:, :], lens=al.Lens())  # no weight rows: the merge has none
    assert al.merge([a, c])[1].weights is None


@pytest.mark.parametrize("cuts", [[0, 2, 4, 6], [0, 1, 3], [0, 1]])
def test_merge_top_k_of_pieces_with_fewer_than_k_keys(cuts, rng):
    """Every piece has fewer than k keys: asked with the same Lens(topk=4) they pad to k, and the merge is the top-4
    over all their keys (itself padded when they hold fewer than 4); it was as narrow as the widest piece."""
    q, k, v = make_inputs(2, 2, 1, 5, cuts[-1], 3, 3, torch.float64, rng=rng)
    lens = al.Lens(topk=4, rows="all")
    out, res = al.merge(_pieces(q, k, v, cuts, lens, causal=True))
    e_out, e_res = al.attention(q, k, v, lens=lens, causal=True, backend="torch")
    assert res.topk_indices.shape[-1] == 4
    _assert_merged_equals(res, out, e_res, e_out)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_merge_of_an_empty_key_piece_is_a_no_op(kind, rng):
    """k[a:a] is a part with no key: every row sees none (out 0, lse -inf, top-k (-1, 0)); merged, it changes nothing.
    attention() refused it (q, k, v must be non-empty)."""
    q, k, v = make_inputs(1, 2, 1, 5, 7, 3, 4, torch.float64, rng=rng)
    if kind == "numpy":
        q, k, v = (x.numpy() for x in (q, k, v))
    lens = al.Lens(topk=3, rows=[0, -1])
    for backend in ("torch", "reference", "auto"):
        out, res = al.attention(q, k[..., 4:4, :], v[..., 4:4, :], lens=lens, backend=backend)
        assert (np64(out) == 0).all() and np.isneginf(np64(res.lse)).all() and (np64(res.topk_indices) == -1).all()
        assert res.received.shape[-1] == 0 and res.weights.shape[-1] == 0 and (np64(res.entropy) == 0).all()
    for cuts in ([0, 4, 4, 7], [0, 0, 7], [0, 7, 7]):
        parts = [al.attention(q, k[..., a:b, :], v[..., a:b, :], lens=lens) for a, b in zip(cuts[:-1], cuts[1:])]
        out, res = al.merge(parts)
        e_out, e_res = al.attention(q, k, v, lens=lens)
        _assert_merged_equals(res, out, e_res, e_out)
