"""Hardening (issue 13): edge cases each of which once failed — NaN from a non-positive scale, inputs
refused with errors that name the argument, and the reference's NaN/inf rule."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close, make_inputs, reference

import attnlens as al
from attnlens.reference import reference_attention, reference_lens

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
