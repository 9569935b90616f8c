"""Bad inputs raise ValueError/TypeError naming the argument; NaN stays in the rows it touches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_inputs, np64, visible

import attnlens as al


@pytest.fixture
def qkv(rng):
    return make_inputs(2, 4, 2, 5, 6, 8, 8, torch.float32, rng=rng)


def _t(rng, *shape, dtype=torch.float32):
    return torch.tensor(rng.standard_normal(shape), dtype=dtype)


# --------------------------------------------------------------------------------------------
# shapes

def test_head_dims_disagree(rng):
    q, k, v = _t(rng, 1, 2, 5, 8), _t(rng, 1, 2, 6, 7), _t(rng, 1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"head dims.*D=8.*D=7"):
        al.attention(q, k, v)


@pytest.mark.parametrize("vshape", [(1, 2, 7, 8), (2, 2, 6, 8), (1, 1, 6, 8)], ids=["length", "batch", "heads"])
def test_k_and_v_disagree(vshape, rng):
    q, k, v = _t(rng, 1, 2, 5, 8), _t(rng, 1, 2, 6, 8), _t(rng, *vshape)
    with pytest.raises(ValueError, match=r"k\(1, 2, 6, 8\) and v\(" + ", ".join(map(str, vshape)) + r"\)"):
        al.attention(q, k, v)


def test_batch_mismatch_q_k(rng):
    q, k, v = _t(rng, 2, 2, 5, 8), _t(rng, 3, 2, 6, 8), _t(rng, 3, 2, 6, 8)
    with pytest.raises(ValueError, match=r"batch.*B=2.*B=3"):
        al.attention(q, k, v)


def test_heads_not_a_multiple(rng):
    q, k, v = _t(rng, 1, 5, 5, 8), _t(rng, 1, 2, 6, 8), _t(rng, 1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"Hq=5.*Hkv=2"):
        al.attention(q, k, v)


@pytest.mark.parametrize("shape", [(8,), (1, 1, 1, 4, 8)], ids=["rank1", "rank5"])
def test_bad_rank(shape, rng):
    x = _t(rng, *shape)
    with pytest.raises(ValueError, match=r"rank 2 \(N, D\), 3 \(H, N, D\) or 4 \(B, H, N, D\)"):
        al.attention(x, x, x)


def test_mismatched_ranks(rng):
    q, k, v = _t(rng, 2, 5, 8), _t(rng, 1, 2, 6, 8), _t(rng, 1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"same rank.*q\(2, 5, 8\)"):
        al.attention(q, k, v)


def test_empty_inputs(rng):
    q, k, v = _t(rng, 1, 2, 0, 8), _t(rng, 1, 2, 6, 8), _t(rng, 1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"non-empty"):
        al.attention(q, k, v)


# --------------------------------------------------------------------------------------------
# masks

@pytest.mark.parametrize("shape", [(7,), (5, 7), (3, 1, 1, 6), (1, 3, 5, 6), (1, 1, 1, 1, 6)],
                         ids=["Nk", "Nq-Nk", "batch", "heads", "too-many-dims"])
def test_mask_that_does_not_broadcast(shape, qkv):
    q, k, v = qkv  # scores (2, 4, 5, 6)
    with pytest.raises(ValueError, match=r"mask of shape .*does not broadcast.*\(2, 4, 5, 6\)"):
        al.attention(q, k, v, mask=torch.ones(shape, dtype=torch.bool))


def test_rank4_mask_on_rank2_input(rng):
    q, k, v = make_inputs(1, 1, 1, 5, 6, 4, 4, torch.float32, rng=rng, rank=2)
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 1, 6\).*\(5, 6\)"):
        al.attention(q, k, v, mask=torch.ones(1, 1, 1, 6, dtype=torch.bool))


def test_numpy_mask_with_torch_q(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"mask must be of the same kind as q \(torch\).*ndarray"):
        al.attention(q, k, v, mask=np.ones((5, 6), dtype=bool))


def test_torch_mask_with_numpy_q(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, np.float32, rng=rng, numpy=True)
    with pytest.raises(TypeError, match=r"mask must be of the same kind as q \(NumPy\)"):
        al.attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
def test_int_mask_dtype(dtype, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=rf"mask must be bool.*or floating.*{dtype}"):
        al.attention(q, k, v, mask=torch.ones(5, 6, dtype=dtype))


def test_int_numpy_mask(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, np.float64, rng=rng, numpy=True)
    with pytest.raises(TypeError, match=r"mask must be bool"):
        al.attention(q, k, v, mask=np.ones((5, 6), dtype=np.int64))


def test_mask_not_an_array(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor or numpy.ndarray, got list"):
        al.attention(q, k, v, mask=[[True] * 6] * 5)


def test_mask_on_another_device(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"mask must be on q's device cpu, got meta"):
        al.attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool, device="meta"))


# --------------------------------------------------------------------------------------------
# kinds and dtypes

def test_mixed_dtypes(rng):
    q, k, v = _t(rng, 2, 5, 4), _t(rng, 2, 6, 4, dtype=torch.float64), _t(rng, 2, 6, 4)
    with pytest.raises(TypeError, match=r"share one dtype.*q torch.float32, k torch.float64"):
        al.attention(q, k, v)


def test_mixed_numpy_dtypes(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 6, 4, 4, np.float32, rng=rng, numpy=True)
    with pytest.raises(TypeError, match=r"share one dtype.*v torch.float64"):
        al.attention(q, k, v.astype(np.float64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_float_torch_inputs(dtype, rng):
    x = torch.ones(2, 5, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"q must have a floating dtype.*got {dtype}"):
        al.attention(x, x, x)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128])
def test_non_float_numpy_inputs(dtype, rng):
    x = np.ones((2, 5, 4), dtype=dtype)
    with pytest.raises(TypeError, match=r"q must have a floating dtype.*numpy"):
        al.attention(x, x, x)


def test_integer_k_only(rng):
    q = _t(rng, 2, 5, 4)
    with pytest.raises(TypeError, match=r"k must have a floating dtype"):
        al.attention(q, torch.ones(2, 6, 4, dtype=torch.int64), _t(rng, 2, 6, 4))


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_list_input(which, rng):
    args = {"q": _t(rng, 2, 5, 4), "k": _t(rng, 2, 6, 4), "v": _t(rng, 2, 6, 4)}
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"{which} must be a torch.Tensor or numpy.ndarray, got list"):
        al.attention(args["q"], args["k"], args["v"])


def test_mixed_numpy_and_torch(rng):
    q = _t(rng, 2, 5, 4)
    with pytest.raises(TypeError, match=r"all be torch tensors or all NumPy arrays"):
        al.attention(q, np64(_t(rng, 2, 6, 4)).astype(np.float32), _t(rng, 2, 6, 4))


def test_inputs_on_different_devices(rng):
    q = _t(rng, 2, 5, 4)
    with pytest.raises(ValueError, match=r"one device.*q cpu, k meta"):
        al.attention(q, torch.empty(2, 6, 4, device="meta"), _t(rng, 2, 6, 4))


# --------------------------------------------------------------------------------------------
# scalar arguments

@pytest.mark.parametrize("p,exc", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                   ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_dropout(p, exc, qkv):
    q, k, v = qkv
    with pytest.raises(exc, match=r"dropout_p"):
        al.attention(q, k, v, dropout_p=p)


@pytest.mark.parametrize("window,exc,msg", [
    (-1, ValueError, r"window left must be >= 0.*-1"),
    ((2, -3), ValueError, r"window right must be >= 0.*-3"),
    ((-2, None), ValueError, r"window left must be >= 0"),
    (2.5, TypeError, r"window must be None, an int"),
    ((1.0, 2), TypeError, r"window left must be an int"),
    ((1, "2"), TypeError, r"window right must be an int"),
    ((1, 2, 3), TypeError, r"window must be None, an int"),
    ("3", TypeError, r"window must be None, an int"),
    (True, TypeError, r"window must be .*bool"),
    ((True, 2), TypeError, r"window left must be an int"),
])
def test_bad_window(window, exc, msg, qkv):
    q, k, v = qkv
    with pytest.raises(exc, match=msg):
        al.attention(q, k, v, window=window)


@pytest.mark.parametrize("causal", ["yes", 1, None])
def test_bad_causal(causal, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        al.attention(q, k, v, causal=causal)


@pytest.mark.parametrize("scale", ["0.5", [0.5], float("nan"), float("inf"), True, torch.tensor([0.5, 1.0])])
def test_bad_scale(scale, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"scale must be a finite real number"):
        al.attention(q, k, v, scale=scale)


def test_numpy_scalar_scale_and_dropout_are_fine(qkv):
    q, k, v = qkv
    a = al.attention(q, k, v, scale=np.float32(0.25))
    b = al.attention(q, k, v, scale=0.25)
    torch.testing.assert_close(a, b)
    al.attention(q, k, v, dropout_p=np.float64(0.1))


@pytest.mark.parametrize("backend,exc,msg", [
    ("flash", ValueError, r"unknown backend 'flash'.*expected one of \['auto', 'triton', 'sdpa', 'fused', 'torch', 'reference'\]"),
    ("Torch", ValueError, r"unknown backend 'Torch'"),
    (None, TypeError, r"backend must be a string"),
    (3, TypeError, r"backend must be a string"),
])
def test_unknown_backend(backend, exc, msg, qkv):
    q, k, v = qkv
    with pytest.raises(exc, match=msg):
        al.attention(q, k, v, backend=backend)


# --------------------------------------------------------------------------------------------
# Lens arguments

@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_topk_larger_than_nk_pads_with_minus_one_and_zero(qkv, backend):
    """k > Nk: the slots beyond the keys are (index -1, weight 0), as for a row with fewer than k visible keys, so
    key pieces of any size asked with one Lens(topk=k) merge into the top-k over all keys (issue 24)."""
    q, k, v = qkv  # Nk = 6
    _, res = al.attention(q, k, v, lens=al.Lens(topk=8), backend=backend)
    _, six = al.attention(q, k, v, lens=al.Lens(topk=6), backend=backend)
    assert res.topk_indices.shape[-1] == 8
    assert torch.equal(res.topk_indices[..., :6], six.topk_indices) and (res.topk_indices[..., 6:] == -1).all()
    assert torch.equal(res.topk_weights[..., :6], six.topk_weights) and (res.topk_weights[..., 6:] == 0).all()


@pytest.mark.parametrize("rows", [[5], [-6], [0, 1, 99], range(3, 8)], ids=["5", "-6", "99", "range"])
def test_rows_out_of_range(rows, qkv):
    q, k, v = qkv  # Nq = 5
    with pytest.raises(ValueError, match=r"Lens.rows: row -?\d+ is out of range for Nq=5"):
        al.attention(q, k, v, lens=al.Lens(rows=rows))


@pytest.mark.parametrize("kw,exc,msg", [
    ({"topk": -1}, ValueError, r"Lens.topk must be >= 0, got -1"),
    ({"topk": 2.0}, TypeError, r"Lens.topk must be an int"),
    ({"topk": True}, TypeError, r"Lens.topk must be an int"),
    ({"rows": [0, 1.5]}, TypeError, r"Lens.rows must hold ints, got float 1.5"),
    ({"rows": [True]}, TypeError, r"Lens.rows must hold ints"),
    ({"rows": "first"}, ValueError, r"Lens.rows must be .*'first'"),
    ({"rows": 3}, TypeError, r"Lens.rows must be a list of ints"),
    ({"rows": 2.5}, TypeError, r"Lens.rows must be a list of ints"),
    ({"entropy": 1}, TypeError, r"Lens.entropy must be a bool"),
    ({"lse": "yes"}, TypeError, r"Lens.lse must be a bool"),
])
def test_bad_lens_args(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        al.Lens(**kw)


@pytest.mark.parametrize("lens", ["all", 1, {"topk": 2}])
def test_lens_of_wrong_type(lens, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"lens must be None, True, or an attnlens.Lens"):
        al.attention(q, k, v, lens=lens)


def test_numpy_integer_rows_accepted(qkv):
    q, k, v = qkv
    _, res = al.attention(q, k, v, lens=al.Lens(rows=np.array([0, -1])))
    assert res.rows == (0, 4)


# --------------------------------------------------------------------------------------------
# NaN: stays in the rows it touches; never appears in a row that sees no key

# sdpa refuses non-finite inputs (its fused kernels zero or spread them); auto then serves them with torch
BACKENDS = ["torch", "reference", "auto"]


def test_sdpa_refuses_nonfinite_inputs_and_auto_falls_back(rng):
    q, k, v = make_inputs(1, 2, 2, 8, 8, 4, 4, torch.float32, rng=rng)
    q[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="sdpa.*NaN/inf"):
        al.attention(q, k, v, backend="sdpa")
    out = al.attention(q, k, v)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, :3]).all()


def _run(q, k, v, backend, **kw):
    if backend in ("sdpa", "auto"):
        return al.attention(q, k, v, backend=backend, **kw), None
    return al.attention(q, k, v, backend=backend, lens=al.Lens(topk=2), **kw)


def _nan_rows(out):
    return torch.isnan(out).any(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nk,causal", [(9, True), (8, True), (8, False), (5, False)],
                         ids=["causal-Nq<Nk", "causal-square", "plain-square", "plain-Nq>Nk"])
def test_nan_in_a_query_row_stays_in_that_row(Nk, causal, backend, rng):
    """A NaN in query row i makes output row i NaN (the result is undefined) and nothing else."""
    q, k, v = make_inputs(1, 2, 2, 8, Nk, 4, 4, torch.float32, rng=rng)
    q[0, 1, 3, 2] = float("nan")
    out, res = _run(q, k, v, backend, causal=causal)
    bad = torch.zeros(1, 2, 8, dtype=torch.bool)
    bad[0, 1, 3] = True
    assert torch.equal(_nan_rows(out), bad), _nan_rows(out)
    if res is not None:
        assert torch.equal(torch.isnan(res.lse), bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_key_row_reaches_only_queries_that_see_it(backend, rng):
    Nq, Nk, j = 8, 8, 5
    q, k, v = make_inputs(1, 2, 2, Nq, Nk, 4, 4, torch.float32, rng=rng)
    k[0, 0, j, 1] = float("nan")
    out, _ = _run(q, k, v, backend, causal=True)
    sees_j = torch.zeros(1, 2, Nq, dtype=torch.bool)
    sees_j[0, 0, j:] = True  # causal: queries i >= j see key j
    assert torch.equal(_nan_rows(out), sees_j), _nan_rows(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_value_row_reaches_only_queries_that_see_it(backend, rng):
    """Documented: "NaN or inf in an input propagates to the outputs of the rows it touches only"."""
    Nq, Nk, j = 8, 8, 5
    q, k, v = make_inputs(1, 2, 2, Nq, Nk, 4, 4, torch.float32, rng=rng)
    v[0, 0, j, 1] = float("nan")
    out, _ = _run(q, k, v, backend, causal=True)
    sees_j = torch.zeros(1, 2, Nq, dtype=torch.bool)
    sees_j[0, 0, j:] = True
    assert torch.equal(_nan_rows(out), sees_j), _nan_rows(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal"])
def test_no_nan_in_rows_that_see_no_key(mask_kind, where, backend, rng):
    """A query that sees no key gives 0 (lse -inf, entropy 0), never NaN — whatever NaN sits in an
    input row it cannot see, or in its own query."""
    Nq, Nk = 7, 6
    q, k, v = make_inputs(1, 2, 2, Nq, Nk, 4, 4, torch.float64, rng=rng)
    dead = 2
    kw = {}
    if mask_kind == "bool":
        m = torch.ones(Nq, Nk, dtype=torch.bool)
        m[dead] = False
        kw["mask"] = m
    elif mask_kind == "float":
        m = torch.zeros(Nq, Nk, dtype=torch.float64)
        m[dead] = float("-inf")
        kw["mask"] = m
    else:  # Nq > Nk causal: the first Nq - Nk = 1 query sees nothing
        dead = 0
        kw["causal"] = True
    {"q": q, "k": k, "v": v}[where][0, 0, dead if where == "q" else 3, 0] = float("nan")
    out, res = _run(q, k, v, backend, **kw)
    assert not torch.isnan(out[0, :, dead]).any(), f"NaN in the output of dead row {dead}: {out[0, :, dead]}"
    assert (out[0, :, dead] == 0).all()
    if res is not None:
        assert torch.isneginf(res.lse[0, :, dead]).all()
        assert (res.entropy[0, :, dead] == 0).all() and (res.max_weight[0, :, dead] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_inf_in_a_key_row_gives_nan_only_where_seen(backend, rng):
    """+inf scores are undefined for softmax: whatever comes out, rows that do not see the key stay
    exactly as without it."""
    Nq, Nk, j = 6, 6, 4
    q, k, v = make_inputs(1, 1, 1, Nq, Nk, 4, 4, torch.float64, rng=rng)
    clean = al.attention(q, k, v, causal=True, backend=backend)
    k2 = k.clone()
    k2[0, 0, j] = float("inf")
    out = al.attention(q, k2, v, causal=True, backend=backend)
    torch.testing.assert_close(out[..., :j, :], clean[..., :j, :], atol=1e-12, rtol=0)
    keep = visible(Nq, Nk, causal=True)[0, 0]
    assert keep[:j, j].sum() == 0
