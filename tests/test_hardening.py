"""Hardening (issue 13): edge cases each of which once failed — NaN from a non-positive scale, inputs
refused with errors that name the argument, and the reference's NaN/inf rule."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close, make_inputs, np64, reference

import attnlens as al
from attnlens.core.reference import reference_attention, reference_lens

BACKENDS = ["auto", "sdpa", "torch", "reference"]


# --------------------------------------------------------------------------------------------
# scale <= 0 (PyTorch's is_causal kernel scales after masking with -inf: -inf * 0 = NaN)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.5, -1e-3, 1e3])
def test_any_scale_matches_reference(backend, scale, rng):
    q, k, v = make_inputs(2, 4, 2, 9, 9, 8, dtype=torch.float64, rng=rng)
    out = al.attention(q, k, v, causal=True, scale=scale, backend=backend)
    r_out, _ = reference(q, k, v, causal=True, scale=scale)
    assert_close(out, r_out, atol=1e-9, what=f"out ({backend}, scale={scale})")


# --------------------------------------------------------------------------------------------
# inputs refused with an error that names the argument, or accepted without a leaked warning

def _qkv(rng, numpy=False, dtype=torch.float32):
    return make_inputs(1, 2, 2, 5, 6, 4, dtype=dtype, rng=rng, numpy=numpy)


def test_zero_kv_heads_is_a_value_error_naming_k(rng):
    q, _, _ = _qkv(rng)
    k, v = torch.zeros(1, 0, 6, 4), torch.zeros(1, 0, 6, 4)
    with pytest.raises(ValueError, match=r"non-empty.*k\(1, 0, 6, 4\)"):
        al.attention(q, k, v)


@pytest.mark.parametrize("with_mask", [False, True])
def test_meta_tensors_are_refused(with_mask, rng):
    q, k, v = (x.to("meta") for x in _qkv(rng))  # one meta among cpu tensors: the device error (test_inputs)
    mask = torch.ones(5, 6, dtype=torch.bool, device="meta") if with_mask else None
    with pytest.raises(ValueError, match=r"q, k, v are meta tensors \(shapes q\(1, 2, 5, 4\).*no data"):
        al.attention(q, k, v, mask=mask, lens=True)


@pytest.mark.parametrize("name", ["q", "k", "v", "mask"])
def test_sparse_tensors_are_refused(name, rng):
    args = dict(zip("qkv", _qkv(rng)), mask=torch.ones(1, 2, 5, 6, dtype=torch.bool))
    args[name] = args[name].to_sparse()
    with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        al.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("window", [2**70, (3, 2**63), (2**62 + 1, None)])
def test_huge_window_is_a_value_error_naming_window(window, rng):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match=r"window (left|right) must be <= 2\*\*62 \(use None"):
        al.attention(q, k, v, window=window)


def test_largest_window_equals_unbounded(rng):
    q, k, v = _qkv(rng, dtype=torch.float64)
    for backend in ("torch", "reference"):
        a = al.attention(q, k, v, window=(2**62, 2**62), backend=backend)
        torch.testing.assert_close(a, al.attention(q, k, v, backend=backend), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian_numpy_is_accepted(dtype, rng):
    q, k, v = _qkv(rng, numpy=True, dtype=np.float64)
    mask = rng.standard_normal((5, 6))
    be = [x.astype(dtype) for x in (q, k, v, mask)]
    out, res = al.attention(*be[:3], mask=be[3], causal=True, lens=al.Lens(topk=2))
    r_out, ref = reference(q, k, v, mask=mask, causal=True, topk=2)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    assert_close(out, r_out, atol=1e-5, what="out")
    assert_close(res.entropy, ref.entropy, atol=1e-5, what="entropy")


def test_read_only_numpy_leaks_no_warning_and_is_not_written(rng):
    q, k, v = _qkv(rng, numpy=True, dtype=np.float32)
    mask = rng.standard_normal((5, 6)).astype(np.float32)
    arrays = (q, k, v, mask)
    before = [a.copy() for a in arrays]
    for a in arrays:
        a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, res = al.attention(q, k, v, mask=mask, causal=True, lens=True)
    for a, b in zip(arrays, before):
        assert np.array_equal(a, b) and not a.flags.writeable
    r_out, _ = reference(q, k, v, mask=mask, causal=True)
    assert_close(out, r_out, atol=1e-5, what="out")


# --------------------------------------------------------------------------------------------
# the reference's NaN/inf rule, on inputs small enough to check by hand (B = H = 1, D = 1, scale 1)

NAN, INF = float("nan"), float("inf")


def _ref(q, k, v, mask=None, causal=False, window=None, topk=2):
    q, k, v = (np.asarray(x, dtype=np.float64).reshape(1, 1, -1, 1) for x in (q, k, v))
    if mask is not None:
        mask = np.asarray(mask).reshape(1, 1, q.shape[2], k.shape[2])
    out, w, lse = reference_attention(q, k, v, mask=mask, causal=causal, window=window, scale=1.0)
    res = reference_lens(w, lse, topk=topk)
    return out[0, 0, :, 0], w[0, 0], res.map_arrays(lambda a: a[0, 0])


def _assert_nan_row(out, w, res, i, visible):
    assert np.isnan(out[i]) and np.isnan(res.lse[i]) and np.isnan(res.max_weight[i]) and np.isnan(res.entropy[i])
    assert np.isnan(w[i][visible]).all() and (w[i][~np.asarray(visible)] == 0).all()
    assert np.isnan(res.topk_weights[i]).all() and (res.topk_indices[i] == -1).all()


def _assert_row(out, w, res, i, scores, values):
    """Row i is the exact softmax of ``scores`` (its visible keys, -inf = hidden) over ``values``."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.exp(s - s.max())
    p /= p.sum()
    np.testing.assert_allclose(w[i], p, rtol=1e-14, atol=0)
    np.testing.assert_allclose(out[i], p @ np.asarray(values, dtype=np.float64), rtol=1e-14)
    np.testing.assert_allclose(res.lse[i], s.max() + np.log(np.exp(s - s.max()).sum()), rtol=1e-14)
    assert np.isfinite(res.entropy[i]) and res.max_weight[i] == p.max()


def test_reference_nan_in_q_makes_only_its_row_nan():
    out, w, res = _ref(q=[NAN, 1.0], k=[1.0, 2.0], v=[1.0, 3.0])
    _assert_nan_row(out, w, res, 0, [True, True])
    _assert_row(out, w, res, 1, [1.0, 2.0], [1.0, 3.0])


def test_reference_nan_in_a_float_mask_is_visible_and_makes_the_row_nan():
    mask = np.array([[0.0, NAN], [0.0, 0.0]])
    out, w, res = _ref(q=[1.0, 1.0], k=[1.0, 2.0], v=[1.0, 3.0], mask=mask)
    _assert_nan_row(out, w, res, 0, [True, True])
    _assert_row(out, w, res, 1, [1.0, 2.0], [1.0, 3.0])


def test_reference_nan_where_causal_hides_it_changes_nothing():
    mask = np.array([[0.5, NAN], [0.0, 0.0]])  # (0, 1) is above the diagonal: not visible
    out, w, res = _ref(q=[1.0, 1.0], k=[1.0, 2.0], v=[1.0, 3.0], mask=mask, causal=True)
    _assert_row(out, w, res, 0, [1.5, -INF], [1.0, 3.0])
    _assert_row(out, w, res, 1, [1.0, 2.0], [1.0, 3.0])


def test_reference_plus_inf_score_makes_the_row_non_finite():
    mask = np.array([[0.0, INF], [0.0, 0.0]])
    out, w, res = _ref(q=[1.0, 1.0], k=[1.0, 2.0], v=[1.0, 3.0], mask=mask)
    _assert_nan_row(out, w, res, 0, [True, True])
    _assert_row(out, w, res, 1, [1.0, 2.0], [1.0, 3.0])


@pytest.mark.parametrize("mask", [None, np.zeros((2, 2)), np.ones((2, 2), dtype=bool)])
def test_reference_minus_inf_from_inf_inputs_is_non_finite_not_masked(mask):
    # q_0 = inf against negative keys: both scores -inf by arithmetic, not masking
    out, w, res = _ref(q=[INF, 1.0], k=[-1.0, -2.0], v=[1.0, 3.0], mask=mask)
    _assert_nan_row(out, w, res, 0, [True, True])
    _assert_row(out, w, res, 1, [-1.0, -2.0], [1.0, 3.0])
    # one -inf key among finite ones: every row that sees key 0 is touched
    out, w, res = _ref(q=[1.0, 2.0], k=[-INF, 1.0], v=[1.0, 3.0], mask=mask, causal=False)
    _assert_nan_row(out, w, res, 0, [True, True])
    _assert_nan_row(out, w, res, 1, [True, True])


def test_reference_a_row_hidden_by_masking_stays_empty_whatever_it_holds():
    mask = np.array([[False, False], [True, True]])
    out, w, res = _ref(q=[NAN, 1.0], k=[1.0, 2.0], v=[1.0, 3.0], mask=mask)
    assert out[0] == 0 and res.lse[0] == -INF and res.entropy[0] == 0 and res.max_weight[0] == 0
    assert (w[0] == 0).all() and (res.topk_indices[0] == -1).all() and (res.topk_weights[0] == 0).all()
    _assert_row(out, w, res, 1, [1.0, 2.0], [1.0, 3.0])
    fmask = np.array([[-INF, -INF], [0.0, 0.0]])  # a float -inf is masking too
    out, w, res = _ref(q=[INF, 1.0], k=[1.0, 2.0], v=[1.0, 3.0], mask=fmask)
    assert out[0] == 0 and res.lse[0] == -INF and res.entropy[0] == 0


def test_reference_nan_row_reaches_received_only_at_the_keys_it_sees():
    # window (0, 0): each query sees only its own key; row 1 is NaN
    out, w, res = _ref(q=[1.0, NAN, 1.0], k=[1.0, 2.0, 3.0], v=[1.0, 2.0, 3.0], window=(0, 0), topk=1)
    _assert_nan_row(out, w, res, 1, [False, True, False])
    np.testing.assert_array_equal(res.received, [1.0, NAN, 1.0])
    np.testing.assert_array_equal(out[[0, 2]], [1.0, 3.0])


def test_reference_nan_in_v_reaches_only_rows_that_weigh_that_key():
    out, w, res = _ref(q=[1.0, 1.0], k=[1.0, 2.0], v=[1.0, NAN], causal=True)
    assert out[0] == 1.0 and np.isnan(out[1])
    _assert_row(np.array([1.0, 0.0]), w, res, 1, [1.0, 2.0], [0.0, 0.0])  # the weights stay finite


# --------------------------------------------------------------------------------------------
# one NaN/inf rule on every backend: the torch backend (native row kernel and eager path) matches the reference
# field by field, NaN for NaN; sdpa and triton refuse non-finite inputs with a reason


def _nan_cases(rng):
    """name -> (q, k, v, kwargs) with a non-finite input reaching some rows only (float64 and float32)."""
    def base(dtype, nq=6, nk=7):
        return (torch.tensor(rng.standard_normal((1, 2, nq, 4)), dtype=dtype),
                torch.tensor(rng.standard_normal((1, 1, nk, 4)), dtype=dtype),
                torch.tensor(rng.standard_normal((1, 1, nk, 3)), dtype=dtype))

    cases = {}
    for dt in (torch.float32, torch.float64):
        tag = str(dt).split(".")[1]
        q, k, v = base(dt)
        q[0, 0, 2, 1] = float("inf")  # scores ±inf: row 2 of head 0 is non-finite, not empty
        cases[f"inf-in-q-{tag}"] = (q, k, v, {"causal": True})
        q, k, v = base(dt)
        q[0, 1, 4] = float("-inf")
        cases[f"all-minus-inf-row-{tag}"] = (q, k, v, {"mask": torch.ones(6, 7, dtype=torch.bool)})
        q, k, v = base(dt)
        q[0, 1, 3, 0] = float("nan")  # a NaN row: its lens must not look like an empty row
        cases[f"nan-in-q-{tag}"] = (q, k, v, {"window": (2, 1)})
        q, k, v = base(dt)
        k[0, 0, 5, 2] = float("nan")  # every row that sees key 5 is NaN; rows that cannot see it are exact
        cases[f"nan-in-k-causal-{tag}"] = (q, k, v, {"causal": True})
        q, k, v = base(dt)
        fm = torch.tensor(rng.standard_normal((6, 7)), dtype=dt)
        fm[1, 3] = float("nan")
        fm[4, :] = float("-inf")  # masked row: empty, whatever it holds
        cases[f"nan-in-float-mask-{tag}"] = (q, k, v, {"mask": fm})
    return cases


def _same(a, e, what, tol):
    a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
    assert a.shape == e.shape, what
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"{what}: NaN positions differ"
    assert np.array_equal(np.isneginf(a), np.isneginf(e)), f"{what}: -inf positions differ"
    fin = np.isfinite(e)
    np.testing.assert_allclose(a[fin], e[fin], atol=tol, rtol=tol, err_msg=what)


@pytest.mark.parametrize("path", ["native", "eager"])
def test_torch_backend_follows_the_nan_inf_rule_on_every_field(path, rng, monkeypatch):
    from attnlens.core.backends import native as _native

    if path == "eager":
        monkeypatch.setattr(_native, "load", lambda: None)
    for name, (q, k, v, kw) in _nan_cases(rng).items():
        lens = al.Lens(topk=3, rows="all")
        out, res = al.attention(q, k, v, backend="torch", lens=lens, **kw)
        r_out, ref = al.attention(q, k, v, backend="reference", lens=lens, **kw)
        tol = 1e-5 if q.dtype == torch.float32 else 1e-10
        _same(out, r_out, f"{name}: out", tol)
        for f in ("lse", "max_weight", "entropy", "received", "weights", "topk_weights"):
            _same(getattr(res, f), getattr(ref, f), f"{name}: {f}", tol * 10)
        assert torch.equal(res.topk_indices, ref.topk_indices), f"{name}: topk_indices"
        assert torch.isnan(res.lse).any(), f"{name}: the non-finite input reached no row"


def test_fused_backends_refuse_non_finite_inputs(rng):
    q, k, v = (torch.tensor(rng.standard_normal((1, 2, 5, 4)), dtype=torch.float32) for _ in range(3))
    q[0, 0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        al.attention(q, k, v, backend="sdpa")
    assert al.attention(q, k, v).isnan().sum() == 4, "auto goes to a backend that confines NaN to its row"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_finite_scores_are_exact_not_masked(dtype):
    """Finite scores far beyond the old -1e30 sentinel: a row of scores around -1e31 is a row, not an empty one;
    a row masked everywhere with finfo.min (Hugging Face's convention) averages and has lse near finfo.min."""
    big = 1e31 if dtype == torch.float32 else 1e200
    q = torch.tensor([[[[1.0]], [[1.0]]]], dtype=dtype)  # (1, 2, 1, 1)
    k = torch.tensor([[[[-big], [-2 * big]]]], dtype=dtype)  # scores -big, -2·big (scale 1)
    v = torch.tensor([[[[1.0], [2.0]]]], dtype=dtype)
    for backend in ("torch", "reference"):
        out, res = al.attention(q, k, v, scale=1.0, backend=backend, lens=al.Lens(topk=2))
        assert torch.equal(out[0, :, 0, 0], torch.ones(2, dtype=dtype)), backend  # all weight on key 0
        assert res.lse[0, 0, 0].item() == pytest.approx(-big, rel=1e-6), backend
        assert torch.equal(res.topk_indices[0, 0, 0], torch.tensor([0, -1])), backend
    fmin = torch.finfo(dtype).min
    q, k = torch.zeros(1, 1, 3, 2, dtype=dtype), torch.zeros(1, 1, 4, 2, dtype=dtype)
    v = torch.arange(4, dtype=dtype).reshape(1, 1, 4, 1)
    mask = torch.zeros(3, 4, dtype=dtype)
    mask[1] = fmin
    for backend in ("torch", "reference", "sdpa"):
        out, res = (al.attention(q, k, v, mask=mask, backend=backend, lens=True) if backend != "sdpa"
                    else (al.attention(q, k, v, mask=mask, backend=backend), None))
        assert out[0, 0, 1, 0].item() == pytest.approx(1.5), backend  # averages, as in PyTorch
        if res is not None:
            assert res.lse[0, 0, 1].item() == pytest.approx(fmin, rel=1e-6), backend


# --------------------------------------------------------------------------------------------
# issue 24: an adversarial differential pass against the reference (torch backend, native kernel and eager path)

ALL_FIELDS = ("lse", "max_weight", "entropy", "received", "weights", "topk_weights", "sink_weight", "weights_at")


def _against_reference(q, k, v, lens, backend="torch", tol=None, **kw):
    """Run ``backend`` and the reference on the same call; every field equal, NaN for NaN, -inf for -inf."""
    out, res = al.attention(q, k, v, backend=backend, lens=lens, **kw)
    r_out, ref = al.attention(q, k, v, backend="reference", lens=lens, **kw)
    tol = tol if tol is not None else (1e-5 if q.dtype == torch.float32 else 1e-10)
    _same(out, r_out, "out", tol)
    for f in ALL_FIELDS:
        a, e = getattr(res, f), getattr(ref, f)
        assert (a is None) == (e is None), f
        if a is not None:
            _same(a, e, f, tol * 10)
    if ref.topk_indices is not None:
        assert torch.equal(res.topk_indices, ref.topk_indices), "topk_indices"
    return res, ref


@pytest.fixture(params=["native", "eager"])
def torch_path(request, monkeypatch):
    """The torch backend's two row paths: the native C kernel (CPU float32) and the eager PyTorch one."""
    from attnlens.core.backends import native as _native

    if request.param == "eager":
        monkeypatch.setattr(_native, "load", lambda: None)
    return request.param


@pytest.mark.parametrize("chunk_bytes", [None, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinks_on_query_chunks_that_see_no_key(chunk_bytes, dtype, torch_path, rng):
    """Item 1: a row that sees no key puts all its weight on its sink (lse = sink, sink_weight 1) also when its
    whole query chunk sees no key (the chunk used to be skipped before the sink was folded in: lse -inf, 0)."""
    backend = "torch" if chunk_bytes is None else al.TorchChunkedBackend(chunk_bytes=chunk_bytes)  # 1 row a chunk
    q, k, v = make_inputs(1, 2, 2, 4, 6, 8, dtype=dtype, rng=rng)
    sinks = torch.tensor([0.5, -1.0], dtype=dtype)
    lens = al.Lens(topk=2, rows="all", at=torch.tensor([0, 5]))
    res, _ = _against_reference(q, k, v, lens, backend, causal=True, offset=-10, sinks=sinks)
    assert torch.equal(res.lse[0, :, 0], sinks.to(res.lse.dtype)) and (res.sink_weight == 1).all()
    # some chunks live, some keyless (offset -3: rows 0-2 see nothing); a -inf sink leaves its rows empty
    q, k, v = make_inputs(1, 2, 1, 6, 6, 8, dtype=dtype, rng=rng)
    sinks = torch.tensor([0.25, float("-inf")], dtype=dtype)
    res, _ = _against_reference(q, k, v, lens, backend, causal=True, offset=-3, sinks=sinks)
    assert torch.isneginf(res.lse[0, 1, :3]).all() and (res.sink_weight[0, 1, :3] == 0).all()
    assert (res.lse[0, 0, :3] == 0.25).all()


def test_nan_row_fills_every_topk_slot_beyond_its_chunk_keys(torch_path, rng):
    """Item 3: a row with a non-finite visible score is NaN in all k top-k slots, also in those beyond the nk keys its
    chunk's key range holds (they stayed 0)."""
    q, k, v = make_inputs(1, 1, 1, 8, 8, 4, dtype=torch.float32, rng=rng)
    q[0, 0, 5, 2] = float("nan")
    backend = al.TorchChunkedBackend(chunk_bytes=1)  # one row a chunk: row 5 sees keys 4, 5 only (window (1, 0))
    res, _ = _against_reference(q, k, v, al.Lens(topk=4), backend, window=(1, 0))
    assert torch.isnan(res.topk_weights[0, 0, 5]).all() and (res.topk_indices[0, 0, 5] == -1).all()
    assert not torch.isnan(res.topk_weights[0, 0, [0, 1, 2, 3, 4, 6, 7]]).any()


def test_weights_at_is_nan_at_a_visible_key_whose_score_is_minus_inf(torch_path):
    """Item 3: ``inf · (-x)`` is a visible score of -inf by arithmetic, not a mask: the row is NaN and so is its
    weight there (it was 0), in the torch pass and in the pair-weights path the fused backends use."""
    from attnlens.core.inputs import validate
    from attnlens.core.scores import pair_weights

    q = torch.tensor([[float("inf")], [1.0]])  # (2, 1): row 0 is inf
    k = torch.tensor([[-1.0], [2.0], [0.5]])
    v = torch.tensor([[1.0], [2.0], [3.0]])
    at = torch.tensor([[0, 2], [0, 2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # key 2 hidden from row 0
    res, ref = _against_reference(q, k, v, al.Lens(at=at), mask=mask, scale=1.0)
    assert torch.isnan(res.weights_at[0, 0]) and res.weights_at[0, 1] == 0  # visible -inf: NaN; hidden: 0
    assert torch.isfinite(res.weights_at[1]).all()
    inp = validate(q, k, v, mask=mask, scale=1.0, lens=al.Lens(at=at))
    _same(pair_weights(inp, inp.at, ref.lse.reshape(1, 1, 2))[0, 0], ref.weights_at,
          "pair_weights", 1e-6)


@pytest.mark.parametrize("scores", ["finfo.min", "-1e30"])
def test_entropy_with_sinks_and_huge_negative_scores_is_finite(scores, torch_path):
    """Item 4: sinks and a row of finite scores near finfo.min: the keys' term of the entropy is a · l · (m - σ) with
    a = 0 and l · (m - σ) overflowing to -inf: 0 · -inf was NaN on finite inputs."""
    fill = torch.finfo(torch.float32).min if scores == "finfo.min" else -1e30
    q, k = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 4, 2)
    v = torch.randn(1, 1, 4, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 4)
    mask[1] = fill  # row 1: every key at finfo.min (Hugging Face's padding), a score, not a mask
    for sink in (0.0, fill / 2):
        res, ref = _against_reference(q, k, v, al.Lens(), mask=mask, sinks=torch.tensor([sink]))
        assert torch.isfinite(res.entropy).all()


def _huge_rows(dtype=torch.float32):
    """q = 0 (scores = the float mask, exactly): row 0 all -1e30, row 1 all finfo.min (Hugging Face's padding), row 2
    -1e6 + [0, 0.5, 1] (fp32 cannot hold m + log l there: 0.0625 apart), row 3 ordinary. Each row's lse rounds away
    some or all of log l."""
    fmin = torch.finfo(dtype).min
    mask = torch.tensor([[-1e30] * 3, [fmin] * 3, [-1e6, -1e6 + 0.5, -1e6 + 1.0], [0.1, -0.3, 0.2]], dtype=dtype)
    q, k = torch.zeros(1, 2, 4, 2, dtype=dtype), torch.zeros(1, 1, 3, 2, dtype=dtype)
    v = torch.tensor([[[[1.0, 0.0], [2.0, -1.0], [4.0, 3.0]]]], dtype=dtype)
    return q, k, v, mask


@pytest.mark.parametrize("sinks", [None, "finite", "huge"])
def test_rows_of_huge_finite_scores_rebuild_exact_weights(sinks, torch_path):
    """Item 2: ``lse = m + log l`` rounds to ``m`` when |m| is ~1e30 in fp32, so weights rebuilt as ``exp(s - lse)``
    were l times too large: weights_at [1, 1, 1] for [1/3, 1/3, 1/3], dv 3x too large. The pass gathers weights_at
    from its own weights; the backward and the column sums rebuild the row's own weights where lse is its own."""
    from attnlens.core.reference import reference_attention, reference_backward

    q, k, v, mask = _huge_rows()
    sk = {None: None, "finite": torch.tensor([0.5, -2.0]), "huge": torch.tensor([-1e30, -3e38])}[sinks]
    at = torch.tensor([0, 1, 2])
    res, ref = _against_reference(q, k, v, al.Lens(at=at, received_from=torch.ones(4, 1)), mask=mask, sinks=sk)
    if sinks is None:
        assert torch.allclose(res.weights_at[0, 0, :2], torch.full((2, 3), 1 / 3))
    # backward against the float64 oracle on the dense weights of the same (fp32-exact) inputs
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    sg = None if sk is None else sk.clone().requires_grad_()
    dout = torch.tensor(np.random.default_rng(0).standard_normal((1, 2, 4, 2)), dtype=torch.float32)
    out = al.attention(qg, kg, vg, mask=mask, sinks=sg, backend="torch")
    out.backward(dout)
    _, w, _ = reference_attention(*(np64(t) for t in (q, k, v)), mask=np64(mask)[None, None], scale=2 ** -0.5,
                                  sinks=None if sk is None else np64(sk))
    grads = reference_backward(*(np64(t) for t in (q, k, v)), w, np64(dout), scale=2 ** -0.5)
    for name, g, r in zip("qkv", (qg.grad, kg.grad, vg.grad), grads):
        _same(g, r, f"d{name}", 1e-5)
    if sk is not None:  # d sink = -Σ_i P_sink,i · rowsum(dO ∘ O)_i: the sink's weight is rebuilt from lse too
        r_out, _, r_lse = reference_attention(*(np64(t) for t in (q, k, v)), mask=np64(mask)[None, None],
                                              scale=2 ** -0.5, sinks=np64(sk))
        sw = reference_lens(w, r_lse, sinks=np64(sk)).sink_weight
        _same(sg.grad, -(sw * (np64(dout) * r_out).sum(-1)).sum((0, 2)), "dsinks", 1e-5)
        for name in ("torch", "reference"):
            sg2 = sk.clone().requires_grad_()
            al.attention(q, k, v, mask=mask, sinks=sg2, backend=name).backward(dout)
            _same(sg2.grad, sg.grad, f"{name} dsinks", 1e-5)
    # the column sums from the pass's lse (what received_from and ring attention use)
    from attnlens.core.inputs import validate
    from attnlens.core.dispatch import get

    inp = validate(q, k, v, mask=mask, sinks=sk, lens=True)
    for name in ("torch", "reference"):
        cs = get(name).column_sums(inp, res.lse)
        _same(cs, w.sum(-2), f"{name} column_sums", 1e-5)
        _same(get(name).column_sums(inp, res.lse, torch.ones(1, 1, 4, 1))[..., 0], w.sum(-2), f"{name} Pᵀ W", 1e-5)


def test_column_sums_with_a_global_lse_keep_exp_s_minus_lse(torch_path):
    """The own-row rebuild must not touch a row whose lse is global (ring attention, split-KV: the row also sees other
    blocks' keys): a block's column sums are its share of the row, exp(s - lse), not renormalised to 1."""
    from attnlens.core.inputs import validate
    from attnlens.core.dispatch import get

    g = torch.Generator().manual_seed(1)
    base = torch.tensor([-3000.0, -3000.5, -2999.75, -3001.0, -3000.25, -2999.5])  # |lse| · eps > 2**-12: rebuilt
    mask = (base + torch.zeros(5, 1)).contiguous()
    q, k, v = torch.zeros(1, 1, 5, 4), torch.randn(1, 1, 6, 4, generator=g), torch.randn(1, 1, 6, 3, generator=g)
    lse = al.attention(q, k, v, mask=mask, backend="reference", lens=al.Lens())[1].lse  # over all 6 keys
    r_out, ref = al.attention(q, k, v, mask=mask, backend="reference", lens=al.Lens(rows="all"))
    for a, b in ((0, 3), (3, 6)):
        inp = validate(q, k[:, :, a:b], v[:, :, a:b], mask=mask[:, a:b], offset=0, lens=True)
        for name in ("torch", "reference"):
            cs = get(name).column_sums(inp, lse)
            _same(cs, ref.weights.sum(-2)[..., a:b], f"{name} block [{a}, {b})", 3e-4)


# --------------------------------------------------------------------------------------------
# item 8: N²-sized requests are sized from the shapes and refused before any work, naming the field and the size

N_BIG = 100_000


@pytest.mark.parametrize("ask, field", [
    (dict(rows="all"), "weights"), (dict(pool=1), "pooled"), (dict(topk=N_BIG), "topk"),
    (dict(at=torch.arange(N_BIG)), "weights_at"), (dict(received_from=torch.ones(1).expand(N_BIG, N_BIG)), "received_from"),
    (dict(rows=range(0, N_BIG, 2), pool=(1, 2)), r"weights .* 20 GB.*pooled .* 20 GB")])
def test_quadratic_lens_requests_are_refused_up_front(ask, field):
    """At N = 100k these failed in PyTorch's allocator (Lens(at=arange(N)) after 184 s of work)."""
    q = torch.zeros(1, 1, N_BIG, 8)
    with pytest.raises(ValueError, match=rf"the lens asks for \d+ GB \({field}.*above Lens.max_bytes = 8.59 GB.*"
                                         rf"max_bytes=None"):
        al.attention(q, q, q, causal=True, lens=al.Lens(**ask))


def test_lens_max_bytes_is_a_per_call_limit(rng):
    q, k, v = make_inputs(1, 2, 1, 40, 50, 4, dtype=torch.float64, rng=rng)  # weights: 2 · 40 · 50 · 8 = 32,000 B
    with pytest.raises(ValueError, match=r"weights \(1, 2, 40, 50\) float64 3.2e-05 GB.*above Lens.max_bytes = 3.1e-05"):
        al.attention(q, k, v, lens=al.Lens(rows="all", max_bytes=31_000))
    for mb in (32_000, None):
        _, res = al.attention(q, k, v, lens=al.Lens(rows="all", max_bytes=mb))
        assert res.weights.shape == (1, 2, 40, 50)
    with pytest.raises(ValueError, match=r"topk \(1, 2, 40, 3\) float64 \+ int64"):  # 16 bytes a slot
        al.attention(q, k, v, lens=al.Lens(topk=3, max_bytes=2 * 40 * 3 * 16 - 1))
    with pytest.raises(TypeError, match="Lens.max_bytes must be an int >= 0 or None"):
        al.Lens(max_bytes=1.5)
    assert repr(al.Lens(rows="all", max_bytes=None)) == "Lens(rows='all', max_bytes=None)"


def test_named_sdpa_refuses_a_dense_band_mask_beyond_its_limit():
    from attnlens.core.inputs import validate

    q = torch.zeros(1, 1, N_BIG, 8)
    with pytest.raises(ValueError, match=r"window=\(64, 0\) needs a dense \(Nq, Nk\) mask of 10 GB here, above its "
                                         r"max_mask_bytes = 8.59 GB: use backend='torch'.*max_mask_bytes=None"):
        al.attention(q, q, q, window=(64, 0), backend="sdpa")
    inp = validate(q, q, q, window=(64, 0))
    assert al.SdpaBackend(max_mask_bytes=None).not_supported_reasons(inp) == []
    assert al.SdpaBackend().not_supported_reasons(validate(q, q, q, causal=True, offset=0)) == []  # no mask: linear
    with pytest.raises(ValueError, match="max_mask_bytes must be an int >= 0 or None"):
        al.SdpaBackend(max_mask_bytes=-1)


@pytest.mark.parametrize("name", ["received_from", "at"])
def test_meta_lens_arrays_are_a_value_error(name, rng):
    q, k, v = _qkv(rng)
    a = torch.ones(5, 1, device="meta") if name == "received_from" else torch.zeros(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=rf"Lens.{name} is a meta tensor of shape"):
        al.attention(q, k, v, lens=al.Lens(**{name: a}))


def test_entropy_of_a_keyless_row_with_a_very_negative_sink_is_zero(torch_path):
    """Found by the extended fuzz: a row that sees no key in a chunk that does, with a sink below -88: the keys'
    rescale exp(0 - σ) overflowed to inf and inf · 0 made the entropy NaN (it is 0: all weight on the sink)."""
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 3)
    mask = torch.tensor([[False] * 5, [True] * 5])  # row 0 sees no key, row 1 every key
    for sink in (-1e4, -100.0, -3e38):
        res, _ = _against_reference(q, k, v, al.Lens(topk=2), mask=mask, sinks=torch.tensor([sink]))
        assert res.entropy[0, 0, 0] == 0 and res.sink_weight[0, 0, 0] == 1
