"""The fused native row kernel (backends/rowsoftmax.c) against the eager path and the float64 reference.

float32 CPU calls of the torch backend take the native kernel when it builds; these tests run each
case both ways (``path`` = native / eager) so both stay checked, and pin the fallback.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import assert_close, check_topk, make_inputs, make_mask, reference

import attnlens as al
from attnlens._backends import _native, torch_chunked

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture(params=["native", "eager"])
def path(request, monkeypatch):
    if request.param == "native":
        if not HAS_CC:
            pytest.skip("no C compiler: the native kernel cannot be built here")
        assert _native.load() is not None, "the native kernel did not build although a compiler is present"
    else:
        monkeypatch.setattr(_native, "load", lambda: None)
    return request.param


CASES = [
    # (Hq, Hkv, Nq, Nk, D, causal, window, mask_kind, topk)
    (2, 2, 97, 97, 16, True, None, None, 8),
    (4, 2, 33, 1025, 8, False, (200, 3), "bool", 16),
    (3, 1, 130, 70, 7, True, None, "float", 5),  # Nq > Nk: first rows see nothing
    (2, 2, 50, 300, 33, False, None, "float", 70),  # k > MAX_TOPK: the whole call takes the eager path
    (1, 1, 64, 64, 4, False, 5, None, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[0]}/{c[1]}-N{c[2]}x{c[3]}-D{c[4]}")
def test_matches_reference(case, path, rng, monkeypatch):
    Hq, Hkv, Nq, Nk, D, causal, window, mask_kind, topk = case
    be = al.TorchChunkedBackend(chunk_bytes=4 * Hq * Nk * 4 * 2 + 7)  # several chunks
    q, k, v = make_inputs(2, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, scale_factor=2.0, rng=rng)
    mask = None if mask_kind is None else make_mask(mask_kind, (2, 1, Nq, Nk), rng=rng, dead_rows=2)
    lens = al.Lens(topk=topk, rows=[0, Nq // 2, -1])
    out, res = al.attention(q, k, v, mask=mask, causal=causal, window=window, backend=be, lens=lens)
    r_out, ref = reference(q, k, v, mask=mask, causal=causal, window=window, topk=topk, rows=lens.rows)
    tol = 2e-5
    assert_close(out, r_out, atol=tol, what="out")
    for f in ("max_weight", "entropy", "received", "weights"):
        assert_close(getattr(res, f), getattr(ref, f), atol=tol * (Nq if f == "received" else 1), what=f)
    lse, rl = res.lse.numpy(), ref.lse
    assert np.array_equal(np.isneginf(lse), np.isneginf(rl))
    np.testing.assert_allclose(np.where(np.isinf(rl), 0, lse), np.where(np.isinf(rl), 0, rl), atol=1e-4)
    check_topk(res, ref, atol=tol)


def test_native_and_eager_agree_closely(rng, monkeypatch):
    q, k, v = make_inputs(1, 4, 4, 300, 500, 32, dtype=torch.float32, rng=rng)
    lens = al.Lens(topk=8, rows="all")
    if not HAS_CC:
        pytest.skip("no C compiler: the native kernel cannot be built here")
    out_n, res_n = al.attention(q, k, v, causal=True, backend="torch", lens=lens)
    monkeypatch.setattr(_native, "load", lambda: None)
    out_e, res_e = al.attention(q, k, v, causal=True, backend="torch", lens=lens)
    torch.testing.assert_close(out_n, out_e, atol=2e-6, rtol=1e-5)
    for f in ("lse", "max_weight", "entropy", "received", "topk_weights", "weights"):
        torch.testing.assert_close(getattr(res_n, f), getattr(res_e, f), atol=2e-6, rtol=1e-5, msg=f)


def test_nan_query_row_stays_nan_in_that_row_only(path, rng):
    q, k, v = make_inputs(1, 2, 2, 40, 40, 8, dtype=torch.float32, rng=rng)
    q[0, 1, 7, 3] = float("nan")
    out, res = al.attention(q, k, v, causal=True, backend="torch", lens=al.Lens(topk=4))
    assert torch.isnan(out[0, 1, 7]).all() and torch.isnan(res.lse[0, 1, 7])
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[0, 1, 7] = True
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(res.entropy[~bad[..., 0]]).all()


def test_kernel_exp_is_accurate_and_masked_keys_are_exactly_zero():
    if not HAS_CC:
        pytest.skip("no C compiler: the native kernel cannot be built here")
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 5, 700, generator=g) * 30
    s[0, 0, ::2] = torch_chunked.NEG  # masked keys
    s[1, 2] = torch_chunked.NEG  # a row that sees no key
    x = s.clone()
    m, l, t, (tv, ti) = _native.rowsoftmax(x, 6, torch_chunked.NEG / 2)
    m_ref = s.amax(-1, keepdim=True)
    m_ref = m_ref.masked_fill(m_ref <= torch_chunked.NEG / 2, 0.0)
    e_ref = torch.exp((s - m_ref).double())  # d = s - m rounds to float32 in any float32 path
    assert torch.equal(m, m_ref)
    torch.testing.assert_close(x.double(), e_ref, atol=1e-30, rtol=4e-7)
    assert (x[0, 0, ::2] == 0).all() and (x[1, 2] == 0).all() and l[1, 2, 0] == 0
    torch.testing.assert_close(l.double(), e_ref.sum(-1, keepdim=True), rtol=1e-5, atol=0)
    vals, idx = torch.topk(s, 6)
    live = (s[..., :1] > -1e29)  # rows with distinct values: the indices agree too
    assert torch.equal(tv, vals)
    assert torch.equal(ti[live.expand_as(ti)], idx[live.expand_as(idx)])


def test_build_failure_warns_once_and_falls_back(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ATTNLENS_CACHE", str(tmp_path / "cache"))
    _native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native row kernel could not be built"):
            assert _native.load() is None
        q, k, v = make_inputs(1, 1, 1, 20, 20, 4, dtype=torch.float32, rng=rng)
        out, res = al.attention(q, k, v, causal=True, lens=al.Lens(topk=3))  # eager path, no error
        r_out, ref = reference(q, k, v, causal=True, topk=3)
        assert_close(out, r_out, atol=2e-6, what="out")
    finally:
        _native.load.cache_clear()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("ATTNLENS_NATIVE", "0")
    _native.load.cache_clear()
    try:
        assert _native.load() is None
    finally:
        _native.load.cache_clear()
