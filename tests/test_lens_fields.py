"""``Lens(received_from=W)``, ``Lens(at=idx)`` and ``Lens(pool=(bq, bk))`` on every lens backend against the
float64 oracle: GQA, key masks with dead rows, windows, causal, offsets (the cases of test_blocks), the caller's
kind and rank in and out, refusals from capabilities, and bad input naming the argument.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close, make_inputs, np64
from test_blocks import BACKENDS, CASES, backend_of, draw, ref_dense, tol_of  # also sets TRITON_INTERPRET

import attnlens as al
from attnlens.core.reference import reference_attention, reference_lens


def _request(q, k, rng):
    """Random W (T = 3, broadcast over heads or batch), indices with -1 and repeats, and block sizes."""
    B, Hq, Nq = q.shape[:3]
    Nk = k.shape[2]
    W = torch.tensor(rng.standard_normal((B, 1, Nq, 3) if rng.random() < 0.5 else (1, Hq, Nq, 3)), dtype=q.dtype)
    idx = torch.tensor(rng.integers(-1, Nk, (B, Hq, Nq, 4)))
    idx[..., 3] = idx[..., 2]  # the same key twice
    pool = (int(rng.integers(1, 6)), int(rng.integers(1, 8)))
    return W, idx, pool


@pytest.mark.parametrize("offset_kind", ["negative", "default", "beyond"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BACKENDS)
def test_new_fields_match_the_reference(name, case, offset_kind, rng):
    q, k, v, kw = draw(name, case, rng, offset_kind)
    W, idx, pool = _request(q, k, rng)
    lens = al.Lens(received_from=W, at=idx, pool=pool, topk=2)
    out, res = al.attention(q, k, v, backend=backend_of(name), lens=lens, **kw)
    _, w, lse = ref_dense(q, k, v, kw)
    ref = reference_lens(w, lse, received_from=np64(W), at=idx.numpy(), pool=pool)
    tol = tol_of(name)
    assert res.received_from.shape == (*q.shape[:2], k.shape[2], 3)
    assert_close(res.received_from, ref.received_from, atol=tol * q.shape[2] * 10, what="received_from")
    assert_close(res.weights_at, ref.weights_at, atol=tol * 10, what="weights_at")
    assert (np64(res.weights_at)[idx.numpy() == -1] == 0).all(), "index -1 has weight 0"
    assert_close(res.pooled, ref.pooled, atol=tol * q.shape[2] * 10, what="pooled")
    live = np.isfinite(lse)
    np.testing.assert_allclose(np64(res.pooled).sum((-1, -2)), live.sum(-1), atol=tol * q.shape[2] * 10)


@pytest.mark.parametrize("pool", [(1, 2**40), (2**40, 3), 2**40])
@pytest.mark.parametrize("name", BACKENDS)
def test_pool_blocks_longer_than_the_sequence_are_one_block(name, pool, rng):
    """Issue 24 item 6: the column-sum path (triton) padded P's columns to the block size: 35 TB asked for (1, 2**40).
    A block longer than N is one block of all of it, as the torch backend and the reference have it."""
    q, k, v, kw = draw(name, "causal-gqa", rng, "default")
    _, res = al.attention(q, k, v, backend=backend_of(name), lens=al.Lens(pool=pool), **kw)
    _, w, lse = ref_dense(q, k, v, kw)
    bq, bk = (pool, pool) if isinstance(pool, int) else pool
    ref = reference_lens(w, lse, pool=(min(bq, q.shape[2]), min(bk, k.shape[2])))
    assert res.pooled.shape == ref.pooled.shape
    assert_close(res.pooled, ref.pooled, atol=tol_of(name) * q.shape[2] * 10, what="pooled")


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_fields_not_asked_are_none_and_others_unchanged(name, rng):
    q, k, v, kw = draw(name, "causal-gqa", rng, "default")
    _, plain = al.attention(q, k, v, backend=backend_of(name), lens=al.Lens(topk=2), **kw)
    _, res = al.attention(q, k, v, backend=backend_of(name), lens=al.Lens(topk=2, pool=4), **kw)
    assert plain.received_from is None and plain.weights_at is None and plain.pooled is None
    assert res.received_from is None and res.weights_at is None and res.pooled is not None
    for f in ("lse", "entropy", "received", "topk_weights"):
        assert torch.equal(getattr(plain, f), getattr(res, f)), f


def test_numpy_rank2_vector_weights_and_indices(rng):
    q, k, v = make_inputs(1, 1, 1, 9, 11, 4, dtype=np.float64, rng=rng, rank=2, numpy=True)
    wq = rng.random(9)
    idx = np.array([0, 5, -1])  # the same keys for every query
    for be in ("reference", "torch"):
        _, res = al.attention(q, k, v, causal=True, backend=be, lens=al.Lens(received_from=wq, at=idx, pool=(4, 3)))
        _, w, lse = reference_lens_dense(q, k, v)
        assert isinstance(res.received_from, np.ndarray) and res.received_from.shape == (11, 1)
        np.testing.assert_allclose(res.received_from[:, 0], w.T @ wq, atol=1e-12)
        assert res.weights_at.shape == (9, 3)
        np.testing.assert_allclose(res.weights_at, np.stack([w[:, 0], w[:, 5], 0 * w[:, 0]], -1), atol=1e-12)
        assert res.pooled.shape == (3, 4)
        np.testing.assert_allclose(res.pooled[0, 0], w[:4, :3].sum(), atol=1e-12)


def reference_lens_dense(q, k, v):
    from attnlens.core.reference import reference_attention

    out, w, lse = reference_attention(q[None, None], k[None, None], v[None, None], causal=True)
    return out[0, 0], w[0, 0], lse[0, 0]


def test_one_hot_received_from_is_a_weight_row(rng):
    q, k, v = make_inputs(2, 4, 2, 30, 30, 8, dtype=torch.float64, rng=rng)
    W = torch.zeros(30, 1, dtype=torch.float64)
    W[17] = 1
    _, res = al.attention(q, k, v, causal=True, backend="torch", lens=al.Lens(received_from=W, rows=[17]))
    assert_close(res.received_from[..., 0], res.weights[:, :, 0], atol=1e-12, what="P[17, :]")


def test_sdpa_refuses_the_new_fields_by_name(rng):
    q, k, v = make_inputs(1, 2, 2, 5, 5, 4, rng=rng)
    with pytest.raises(ValueError, match="pool"):
        al.attention(q, k, v, backend="sdpa", lens=al.Lens(pool=2))
    # auto finds a lens backend
    _, res = al.attention(q, k, v, lens=al.Lens(at=torch.tensor([0])))
    assert res.weights_at.shape == (1, 2, 5, 1)


@pytest.mark.parametrize("kw, err, match", [
    (dict(pool=0), ValueError, "pool"),
    (dict(pool=(2, "a")), TypeError, "pool"),
    (dict(pool=(1, 2, 3)), TypeError, "pool"),
    (dict(received_from=[1.0, 2.0]), TypeError, "received_from"),
    (dict(received_from=np.ones(3, dtype=np.int64)), TypeError, "received_from"),
    (dict(at=np.ones(3)), TypeError, "at"),
])
def test_bad_lens_options(kw, err, match):
    with pytest.raises(err, match=match):
        al.Lens(**kw)


def test_bad_shapes_and_indices_name_the_argument(rng):
    q, k, v = make_inputs(2, 4, 2, 6, 7, 4, rng=rng)
    for lens, match in [(al.Lens(received_from=torch.ones(5, 1)), "received_from"),
                        (al.Lens(received_from=torch.ones(3, 4, 6, 1)), "received_from"),
                        (al.Lens(received_from=np.ones((6, 1))), "same kind"),
                        (al.Lens(at=torch.tensor([7])), "Lens.at"),
                        (al.Lens(at=torch.tensor([-2])), "Lens.at"),
                        (al.Lens(at=torch.zeros(4, 5, 1, dtype=torch.int64)), "Lens.at")]:
        with pytest.raises((ValueError, TypeError), match=match):
            al.attention(q, k, v, lens=lens)


def test_lens_equality_is_by_identity_of_arrays():
    W = torch.ones(3, 1)
    assert al.Lens(received_from=W) == al.Lens(received_from=W)
    assert al.Lens(received_from=W) != al.Lens(received_from=W.clone())
    assert hash(al.Lens(pool=2)) == hash(al.Lens(pool=(2, 2)))
    assert "received_from=<Tensor (3, 1)>" in repr(al.Lens(received_from=W))


def _block_sums(w, bq, bk):
    """NumPy block sums of dense weights ``w (..., Nq, Nk)`` over ``bq × bk`` blocks (the last ones partial)."""
    nq, nk = w.shape[-2:]
    out = np.zeros(w.shape[:-2] + (-(-nq // bq), -(-nk // bk)))
    for a in range(out.shape[-2]):
        for b in range(out.shape[-1]):
            out[..., a, b] = w[..., a * bq:(a + 1) * bq, b * bk:(b + 1) * bk].sum((-1, -2))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows_per_chunk", [1, 4, 7, 64])
@pytest.mark.parametrize("opts", ["causal-window-offset", "keymask-dead-sinks", "nan-row"])
def test_pool_with_blocks_straddling_chunks(opts, rows_per_chunk, dtype, rng):
    """``pooled`` of the torch backend with small chunks (query blocks straddle chunk boundaries, key ranges start
    and end inside blocks) and block sizes that do not divide N equals the block sums of the float64 weights."""
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 29, 37
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, 8, dtype=dtype, rng=rng)
    kw = {}
    if opts == "causal-window-offset":
        kw = {"causal": True, "window": (int(rng.integers(3, 12)), None), "offset": int(rng.integers(-3, 10))}
    elif opts == "keymask-dead-sinks":
        keep = torch.from_numpy(rng.random((B, 1, Nq, Nk)) < 0.6)
        keep[0, 0, [2, 11]] = False  # rows that see no key
        kw = {"mask": keep, "sinks": torch.tensor(rng.standard_normal(Hq), dtype=dtype)}
    else:
        q[1, 2, 9, 0] = float("nan")  # a row whose weights are all NaN: only its own blocks become NaN
    be = al.TorchChunkedBackend(chunk_bytes=rows_per_chunk * B * Hq * Nk * (dtype.itemsize))
    for bq, bk in [(3, 5), (5, 4), (1, 7), (10, 37), (29, 1)]:
        _, res = al.attention(q, k, v, backend=be, lens=al.Lens(pool=(bq, bk)), **kw)
        _, w, _ = reference_attention(*(np64(x) for x in (q, k, v)),
                                      **{n: np64(x) if isinstance(x, torch.Tensor) else x for n, x in kw.items()})
        want = _block_sums(w, bq, bk)
        tol = 1e-12 if dtype == torch.float64 else 2e-6 * bq * bk
        got = np64(res.pooled)
        assert got.shape == want.shape
        assert np.isnan(want).any() == (opts == "nan-row")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=f"pool=({bq}, {bk})")
