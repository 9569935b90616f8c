"""The fused native row kernel (backends/rowsoftmax.c) against the eager path and the float64 reference.

float32 CPU calls of the torch backend take the native kernel when it builds; these tests run each
case both ways (``path`` = native / eager) so both stay checked, and pin the fallback.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close, check_topk, make_inputs, make_mask, reference

import attnlens as al
from attnlens.core.backends import native as _native

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
    s[0, 0, ::2] = float("-inf")  # masked keys
    s[1, 2] = float("-inf")  # a row that sees no key
    s[2, 1, 5] = -1e31  # a finite score far below any other: exact, never read as masked
    x = s.clone()
    m, l, t, (tv, ti) = _native.rowsoftmax(x, 6, float("-inf"))
    m_ref = s.amax(-1, keepdim=True)
    m_ref = m_ref.masked_fill(torch.isneginf(m_ref), 0.0)
    d_ref = (s - m_ref).double()  # d = s - m rounds to float32 in any float32 path
    e_ref = torch.exp(d_ref)
    assert torch.equal(m, m_ref)
    torch.testing.assert_close(x.double(), e_ref, atol=1e-30, rtol=4e-7)
    assert (x[0, 0, ::2] == 0).all() and (x[1, 2] == 0).all() and l[1, 2, 0] == 0
    torch.testing.assert_close(l.double(), e_ref.sum(-1, keepdim=True), rtol=1e-5, atol=0)
    t_ref = torch.where(e_ref > 0, e_ref * d_ref, 0.0).sum(-1, keepdim=True)  # masked keys left out (no NaN)
    assert torch.isfinite(t).all()
    torch.testing.assert_close(t.double(), t_ref, rtol=1e-4, atol=1e-6)
    vals, idx = torch.topk(s, 6)
    live = torch.isfinite(s[..., :1])  # rows with distinct values: the indices agree too
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


# --------------------------------------------------------------------------------------------
# the cache: private, verified before dlopen, bounded build; every failure is one warning + the eager path

needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the native kernel cannot be built here")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory (not created yet) and a fresh `load`."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNLENS_CACHE", str(d))
    monkeypatch.delenv("ATTNLENS_NATIVE", raising=False)
    _native.load.cache_clear()
    yield d
    _native.load.cache_clear()


def _load_warnings():
    """``load()`` twice (the second from lru_cache) and the warnings both calls raised."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        fn = _native.load()
        assert _native.load() is fn
    return fn, [str(w.message) for w in ws if issubclass(w.category, RuntimeWarning)]


def _compile(tmp_path, name, code):
    src = tmp_path / f"{name}.c"
    src.write_text(code)
    out = tmp_path / f"{name}.so"
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", str(src), "-o", str(out)], check=True,
                   capture_output=True, timeout=60)
    return out


def _lib_name(tmp_path):
    """The file name this machine's kernel gets in a cache, learnt from a real build elsewhere."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLENS_CACHE", str(tmp_path / "probe"))
        _native.load.cache_clear()
        assert _native.load() is not None
        _native.load.cache_clear()
    (lib,) = (tmp_path / "probe").glob("rowsoftmax-*.so")
    return lib.name


def _plant(directory, name, lib):
    """Put ``lib`` in ``directory`` under ``name``, with a matching hash file (so only ownership can stop it)."""
    directory.mkdir(exist_ok=True)
    data = lib.read_bytes()
    (directory / name).write_bytes(data)
    (directory / name).with_suffix(".sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


@needs_cc
def test_cache_is_private_and_hashed(cache):
    fn, ws = _load_warnings()
    assert fn is not None and ws == []
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    (lib,) = cache.glob("rowsoftmax-*.so")
    assert lib.with_suffix(".sha256").read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == sorted([lib.name, lib.with_suffix(".sha256").name])


MARKER_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen("%s", "w"); if (f) fclose(f); }
int not_the_kernel(void) { return 1; }
"""


@needs_cc
@pytest.mark.parametrize("mode", [0o770, 0o777])
def test_planted_library_in_a_shared_directory_is_refused_unloaded(cache, tmp_path, mode):
    marker = tmp_path / "planted-code-ran"
    evil = _compile(tmp_path, "evil", MARKER_C % marker)
    _plant(cache, _lib_name(tmp_path), evil)
    os.chmod(cache, mode)
    fn, ws = _load_warnings()
    assert fn is None and not marker.exists()
    assert len(ws) == 1 and "cache was refused" in ws[0] and "writable by group or others" in ws[0]


@needs_cc
def test_cache_directory_owned_by_someone_else_is_refused(cache, monkeypatch):
    cache.mkdir(mode=0o700)
    monkeypatch.setattr(_native, "_uid", lambda: os.getuid() + 1)
    fn, ws = _load_warnings()
    assert fn is None and len(ws) == 1 and "cache was refused" in ws[0] and "not by this user" in ws[0]


@needs_cc
def test_library_owned_by_someone_else_is_refused_unloaded(cache, tmp_path, monkeypatch):
    marker = tmp_path / "planted-code-ran"
    cache.mkdir(mode=0o700)
    _plant(cache, _lib_name(tmp_path), _compile(tmp_path, "evil", MARKER_C % marker))
    real = os.lstat

    def lstat(p, *a, **kw):  # the library reads as another user's file
        st = real(p, *a, **kw)
        return os.stat_result((*st[:4], st.st_uid + 1, *st[5:10])) if str(p).endswith(".so") else st

    monkeypatch.setattr(os, "lstat", lstat)
    fn, ws = _load_warnings()
    assert fn is None and not marker.exists()
    assert len(ws) == 1 and "not by this user" in ws[0]


@needs_cc
def test_library_without_the_symbol_falls_back_with_one_warning(cache, tmp_path):
    marker = tmp_path / "loaded"
    cache.mkdir(mode=0o700)
    _plant(cache, _lib_name(tmp_path), _compile(tmp_path, "other", MARKER_C % marker))
    fn, ws = _load_warnings()
    assert fn is None and marker.exists()  # private and hashed: loaded, but it is not the kernel
    assert len(ws) == 1 and "could not be loaded" in ws[0] and _native.SYMBOL in ws[0]


TRUNCATED = """
import warnings, torch, attnlens as al
from attnlens.core.backends import native as _native
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    fn = _native.load()
    q = torch.randn(1, 2, 50, 16)
    out, res = al.attention(q, q, q, causal=True, backend="torch", lens=al.Lens(topk=4))
ws = [str(w.message) for w in ws if issubclass(w.category, RuntimeWarning)]
print("LOADED" if fn is not None else "FALLBACK", len(ws), ws, bool(torch.isfinite(res.entropy).all()))
"""


@needs_cc
def test_truncated_library_is_rebuilt_or_falls_back_never_sigbus(cache, tmp_path):
    """Run in subprocesses: mapping a truncated library used to kill the process with SIGBUS."""
    def run(**env):
        p = subprocess.run([sys.executable, "-c", TRUNCATED], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "ATTNLENS_CACHE": str(cache), **env})
        assert p.returncode == 0, f"exit status {p.returncode}: {p.stderr[-2000:]}"
        return p.stdout.strip().splitlines()[-1]

    assert run().startswith("LOADED 0 []")
    (lib,) = cache.glob("rowsoftmax-*.so")
    good = lib.read_bytes()
    os.truncate(lib, len(good) // 2)
    line = run(CC=str(tmp_path / "no-such-compiler"))  # cannot rebuild: one warning, eager path
    assert line.startswith("FALLBACK 1") and "could not be built" in line and line.endswith("True"), line
    assert lib.stat().st_size == len(good) // 2  # left as it was, never mapped
    os.truncate(lib, len(good) // 2)
    assert run().startswith("LOADED 0 []")  # with a compiler: rebuilt
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == lib.with_suffix(".sha256").read_text().strip()


@needs_cc
def test_hanging_compiler_times_out_with_a_clear_message_and_no_leftovers(cache, tmp_path, monkeypatch):
    cc = tmp_path / "slow-cc"
    # writes a partial library where it was told to, then hangs (and so does a child it started)
    cc.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho partial > "$2"\nsleep 20 &\nsleep 20\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(_native, "COMPILE_TIMEOUT_S", 1)
    t0 = time.monotonic()
    fn, ws = _load_warnings()
    assert time.monotonic() - t0 < 10
    assert fn is None and len(ws) == 1 and "did not finish within 1 s" in ws[0]
    assert list(cache.iterdir()) == []  # no partial library, no temporary directory


@needs_cc
def test_a_killed_build_leaves_nothing_behind_for_long(cache):
    cache.mkdir(mode=0o700)
    stale, fresh = cache / ".build-stale", cache / ".build-running"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert _native.load() is not None
    assert not stale.exists() and fresh.exists()  # another process may still be building in a recent one
