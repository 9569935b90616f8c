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
