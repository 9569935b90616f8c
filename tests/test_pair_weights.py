"""Weights at chosen keys from a captured call (`AttnCall.weights_at`, `AttnCall.weight_sums`), for ragged key
sets — one query with no key, one with nearly every key, the rest in between, ``-1`` anywhere in a row, repeats,
different sets per head — in chunks of pairs down to one pair, against the float64 weights of the reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_inputs, np64

from attnlens.core import AttnCall
from attnlens.core.reference import reference_attention


def _ragged(rng, nq, nk, m):
    """``(Nq, m)`` key sets of very different sizes, ``-1`` scattered among the keys."""
    idx = np.full((nq, m), -1)
    sizes = rng.integers(0, 4, nq)
    sizes[0], sizes[nq // 2] = 0, m  # an empty set and a full one
    for i, n in enumerate(sizes):
        slots = rng.choice(m, size=n, replace=False)
        idx[i, slots] = rng.integers(0, nk, n)
    idx[nq // 2, : nk] = np.arange(nk)[: m]  # every key
    idx[1, :2] = [3, 3]  # the same key twice
    return idx


OPTIONS = {
    "causal": {"causal": True},
    "window-bool-mask": {"window": (3, 2), "mask": "bool"},
    "float-mask-softcap": {"mask": "float", "softcap": 2.0},
    "alibi-sinks": {"causal": True, "alibi_slopes": "per-batch", "sinks": True},
}


def _call(rng, dtype, opts):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 23, 31, 8
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, rng=rng, scale_factor=2.0)
    kw = dict(OPTIONS[opts])
    if kw.get("mask") == "bool":
        keep = torch.from_numpy(rng.random((B, 1, Nq, Nk)) < 0.6)
        keep[0, 0, 5] = False  # a row that sees no key
        kw["mask"] = keep
    elif kw.get("mask") == "float":
        kw["mask"] = torch.tensor(np.where(rng.random((1, Hq, Nq, Nk)) < 0.7, rng.standard_normal((1, Hq, Nq, Nk)),
                                           -np.inf), dtype=dtype)
    if kw.get("alibi_slopes"):
        kw["alibi_slopes"] = torch.tensor(rng.random((B, Hq)), dtype=dtype)
    if kw.get("sinks"):
        kw["sinks"] = torch.tensor(rng.standard_normal(Hq), dtype=dtype)
    call = AttnCall(None, q, k, v, **kw)
    ref = {n: np64(x) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    _, w, lse = reference_attention(np64(q), np64(k), np64(v), **ref)
    return call, w, lse


def _gather(w, idx):
    """The oracle: ``w[..., i, idx[..., i, m]]``, 0 where ``idx`` is -1."""
    idx = np.broadcast_to(idx, w.shape[:-1] + idx.shape[-1:])
    return np.where(idx >= 0, np.take_along_axis(w, np.maximum(idx, 0), axis=-1), 0.0)


@pytest.mark.parametrize("max_elems", [1, 8 * 8 * 5, 1 << 24])  # one pair per chunk, a few, all at once
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_ragged_key_sets_match_the_reference(opts, dtype, max_elems, rng):
    call, w, lse = _call(rng, dtype, opts)
    nq, nk = w.shape[-2:]
    idx = _ragged(rng, nq, nk, nk + 3)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for given in (None, torch.tensor(lse, dtype=dtype)):
        got = call.weights_at(torch.from_numpy(idx), lse=given, max_elems=max_elems)
        want = _gather(w, idx)
        np.testing.assert_allclose(np64(got), want, atol=tol, rtol=0)
        assert (np64(got)[:, :, idx == -1] == 0).all(), "-1 has weight 0"
        sums = call.weight_sums(torch.from_numpy(idx), lse=given, max_elems=max_elems)
        assert sums.dtype == torch.float64 and sums.shape == w.shape[:-1]
        np.testing.assert_allclose(np64(sums), want.sum(-1), atol=tol * nk, rtol=0)
        assert (np64(sums)[:, :, 0] == 0).all(), "an empty key set sums to 0"
    one = call.weight_sums(torch.from_numpy(idx), batch=1, max_elems=max_elems)  # one sequence, its own options
    np.testing.assert_allclose(np64(one)[0], want[1].sum(-1), atol=tol * nk, rtol=0)


@pytest.mark.parametrize("opts", list(OPTIONS))
def test_per_head_key_sets_and_the_dense_rule_agree(opts, rng):
    """Different key sets per batch and head (``(B, Hq, Nq, m)``); the flat pairs and the dense ``pair_weights``
    (the one score rule, two ways to form the dot products) give the same weights."""
    call, w, lse = _call(rng, torch.float64, opts)
    B, Hq, nq, nk = w.shape
    idx = np.stack([np.stack([_ragged(rng, nq, nk, 6) for _ in range(Hq)]) for _ in range(B)])
    idx[0, 1] = -1  # a head with no pair at all
    got = call.weights_at(torch.from_numpy(idx), max_elems=100)
    np.testing.assert_allclose(np64(got), _gather(w, idx), atol=1e-12, rtol=0)
    blk = call.block()
    lse_t = torch.from_numpy(lse)
    dense = blk.weights_at(lse_t, torch.from_numpy(idx))
    qi, col = np.nonzero(np.ones((nq, 6), dtype=bool))
    flat = blk.pair_weights(lse_t, torch.from_numpy(qi), torch.from_numpy(idx[:, :, qi, col]))
    np.testing.assert_allclose(np64(flat), np64(dense)[:, :, qi, col], atol=1e-14, rtol=0)
