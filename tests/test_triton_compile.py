"""The triton backend's kernels compiled for real GPUs (sm_90 Hopper, sm_80 Ampere) on this CPU-only machine.

The interpreter tests (test_triton.py) check what the kernels compute; these check what the interpreter
cannot: that Triton's compiler accepts every kernel with the exact arguments the launchers pass, down to a
cubin, and that each binary can launch and run from registers — shared memory within the architecture's
limit, no register spills, the dots on tensor cores (``wgmma`` on Hopper). A config change that spills or
overflows shared memory fails here before any GPU time is spent.
"""
from __future__ import annotations

import pytest
import torch

import attnlens as al
from attnlens import dispatch
from attnlens._inputs import validate
from attnlens.backends.triton import ops

pytest.importorskip("triton")
from attnlens.backends.triton import aot  # noqa: E402

pytestmark = pytest.mark.triton

LENS_KERNELS = {"attn_fwd_kernel", "attn_received_kernel", "attn_weights_kernel"}
BWD_KERNELS = {"attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}


def _check(builds, arch, mma):
    assert builds, "no kernel was launched"
    for b in builds:
        label = f"{b.kernel} {b.constants} warps={b.num_warps}"
        assert b.arch == arch
        assert b.shared_bytes <= aot.MAX_SHARED[arch], f"{label}: {b.shared_bytes} B shared memory"
        assert b.registers <= aot.MAX_REGISTERS, label
        assert b.spill_bytes == 0, f"{label}: spills {b.spill_bytes} B per thread ({b.registers} registers)"
        assert b.fits
        if b.kernel != "attn_bwd_preprocess_kernel":  # the only kernel without a dot
            assert b.tensor_core == mma, f"{label}: dots became {b.tensor_core}, expected {mma}"


@pytest.mark.parametrize("d", [64, 128])
def test_hopper_bf16_every_kernel_compiles_on_tensor_cores_without_spills(d):
    """Causal + key padding + GQA, the whole lens (top-8, entropy, received, weight rows) and the backward."""
    builds = aot.compile_attention(arch=90, dtype=torch.bfloat16, heads=4, kv_heads=2, n=1024, d=d, causal=True,
                                   key_padding=True, lens=al.Lens(topk=8, rows=[0, 5]), backward=True)
    assert {b.kernel for b in builds} == LENS_KERNELS | BWD_KERNELS
    assert all(b.constants["HAS_BIAS"] for b in builds if "HAS_BIAS" in b.constants)
    _check(builds, 90, "wgmma")


def test_hopper_plain_forward_uses_the_wide_tile():
    """Without top-k the forward takes 128-row tiles (the per-row top-k list is what forces 64)."""
    (fwd,) = aot.compile_attention(arch=90, dtype=torch.bfloat16, n=2048, d=128)
    assert fwd.kernel == "attn_fwd_kernel" and fwd.constants["BLOCK_M"] == 128 and fwd.constants["TOPK"] == 0
    _check([fwd], 90, "wgmma")


def test_ampere_fp16_window_compiles():
    builds = aot.compile_attention(arch=80, dtype=torch.float16, n=1000, nk=1500, d=64, window=(128, 0),
                                   lens=al.Lens(topk=16), backward=True)
    assert {b.kernel for b in builds} == {"attn_fwd_kernel", "attn_received_kernel"} | BWD_KERNELS
    _check(builds, 80, "mma")


def test_fp32_head_dim_256_fits_shared_memory():
    """The widest case (fp32 tiles, D = 256): every kernel must at least launch (fp32 is the exact, slow path)."""
    builds = aot.compile_attention(arch=90, dtype=torch.float32, n=512, d=256, causal=True, backward=True)
    for b in builds:
        assert b.fits, f"{b.kernel}: {b.shared_bytes} B shared memory > {aot.MAX_SHARED[90]}"


def test_compile_refuses_what_the_backend_refuses():
    with pytest.raises(ValueError, match="head dim"):
        aot.compile_attention(d=512)


# --------------------------------------------------------------------------------------------
# backend="auto" on CUDA tensors: the decision, with the device check answering "cuda"


@pytest.fixture
def as_cuda(monkeypatch):
    """Make the triton backend see the (CPU) inputs as CUDA tensors of an sm_90 device."""
    monkeypatch.setattr(ops, "_device_type", lambda t: "cuda")
    monkeypatch.setattr(ops, "_capability", lambda t: (9, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_auto_picks_triton_for_supported_cuda_calls(as_cuda, dtype, rng):
    q = torch.zeros(2, 8, 100, 128, dtype=dtype)
    k = torch.zeros(2, 2, 130, 128, dtype=dtype)
    pad = torch.ones(2, 1, 1, 130, dtype=torch.bool)
    for kw in (dict(), dict(causal=True), dict(window=(64, 0)), dict(mask=pad),
               dict(causal=True, lens=al.Lens(topk=16, rows=[0, 3]))):
        assert dispatch.select(validate(q, k, k, **kw), "auto").name == "triton", kw


def test_auto_passes_over_triton_with_a_reason_on_cuda(as_cuda, monkeypatch):
    q = torch.zeros(1, 2, 32, 64, dtype=torch.bfloat16)
    for kw, needle in ((dict(dropout_p=0.1), "dropout"), (dict(mask=torch.ones(32, 32, dtype=torch.bool)),
                                                          "varies along the queries"),
                       (dict(lens=al.Lens(topk=17)), "at most 16")):
        inp = validate(q, q, q, **kw)
        reasons = ops.TritonBackend().not_supported_reasons(inp)
        assert any(needle in r for r in reasons), (kw, reasons)
        assert ops.TritonBackend().auto_reasons(inp) == []
        assert dispatch.select(inp, "auto").name != "triton"
    monkeypatch.setattr(ops, "_capability", lambda t: (7, 5))
    assert any("compute capability" in r for r in ops.TritonBackend().not_supported_reasons(validate(q, q, q)))


def test_config_override_flat_and_per_kind(monkeypatch):
    """BLOCK_OVERRIDE: flat keys reach every kernel kind, a kind's dict only that kind (gpu.py --variants)."""
    base = ops._config("fwd", 64, 64, torch.bfloat16)
    monkeypatch.setattr(ops, "BLOCK_OVERRIDE", {"BLOCK_N": 16, "dq": {"num_warps": 2, "num_stages": 1}})
    dq, fwd = ops._config("dq", 64, 64, torch.bfloat16), ops._config("fwd", 64, 64, torch.bfloat16)
    assert dq["BLOCK_N"] == fwd["BLOCK_N"] == 16
    assert (dq["num_warps"], dq["num_stages"]) == (2, 1)
    assert (fwd["num_warps"], fwd["num_stages"]) == (base["num_warps"], base["num_stages"])
