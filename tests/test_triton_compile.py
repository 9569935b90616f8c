"""The triton backend's kernels compiled for real GPUs (sm_90 Hopper, sm_80 Ampere) on this CPU-only machine.

The interpreter tests (test_triton.py) check what the kernels compute; these check what the interpreter
cannot: that Triton's compiler accepts every kernel with the exact arguments the launchers pass, down to a
cubin, and that each binary can launch and run from registers — shared memory within the architecture's
limit, no register spills, the dots on tensor cores (``wgmma`` on Hopper). A config change that spills or
overflows shared memory fails here before any GPU time is spent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import attnlens as al
from attnlens.core import dispatch
from attnlens.core.inputs import validate
from attnlens.core.backends.triton import ops

pytest.importorskip("triton")
from attnlens.core.backends.triton import aot  # noqa: E402

pytestmark = pytest.mark.triton

LENS_KERNELS = {"attn_fwd_kernel", "attn_received_kernel", "attn_weights_kernel"}
BWD_KERNELS = {"attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}

#: name -> compile_attention arguments (Lens as a dict of its fields)
CALLS = {
    # causal + key padding + GQA, the whole lens (top-8, entropy, received, weight rows) and the backward
    "hopper-bf16-d64": dict(arch=90, dtype="bfloat16", heads=4, kv_heads=2, n=1024, d=64, causal=True,
                            key_padding=True, lens=dict(topk=8, rows=[0, 5]), backward=True),
    "hopper-bf16-d128": dict(arch=90, dtype="bfloat16", heads=4, kv_heads=2, n=1024, d=128, causal=True,
                             key_padding=True, lens=dict(topk=8, rows=[0, 5]), backward=True),
    "hopper-bf16-mha-d128": dict(arch=90, dtype="bfloat16", n=2048, d=128, causal=True, backward=True),
    "hopper-plain-fwd": dict(arch=90, dtype="bfloat16", n=2048, d=128),
    "ampere-fp16-window": dict(arch=80, dtype="float16", n=1000, nk=1500, d=64, window=[128, 0],
                               lens=dict(topk=16), backward=True),
    "fp32-d256": dict(arch=90, dtype="float32", n=512, d=256, causal=True, backward=True),
    # softcap, sinks and ALiBi compiled in, with the lens and the backward
    "hopper-bf16-score-mods": dict(arch=90, dtype="bfloat16", heads=4, kv_heads=2, n=1024, d=64, causal=True,
                                   lens=dict(topk=8, rows=[0, 5]), backward=True, softcap=30.0, sinks=True,
                                   alibi=True),
    # a padded batch (seqlens_q / seqlens_k): every kernel with HAS_SEQLENS, on Hopper and Ampere
    "hopper-bf16-seqlens": dict(arch=90, dtype="bfloat16", batch=3, heads=4, kv_heads=2, n=1024, d=128, causal=True,
                                lens=dict(topk=8, rows=[0, 5]), backward=True, seqlens=True),
    "ampere-fp16-window-seqlens": dict(arch=80, dtype="float16", batch=2, n=1000, nk=1500, d=64, window=[128, 0],
                                       lens=dict(topk=16), backward=True, seqlens=True),
}

_SCRIPT = """
import dataclasses, json, sys, torch
import attnlens as al
from attnlens.core.backends.triton import aot
out = {}
for name, kw in json.loads(sys.argv[1]).items():
    kw["dtype"] = getattr(torch, kw["dtype"])
    if "lens" in kw:
        kw["lens"] = al.Lens(**kw["lens"])
    if "window" in kw:
        kw["window"] = tuple(kw["window"])
    out[name] = [dataclasses.asdict(b) for b in aot.compile_attention(**kw)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def builds():
    """Every call of CALLS compiled in one fresh process (the interpreter tests leave triton.language patched
    in this one), as name -> [KernelBuild]."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CALLS)], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(r.stdout.strip().splitlines()[-1])
    return {name: [aot.KernelBuild(**b) for b in bs] for name, bs in data.items()}


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


@pytest.mark.parametrize("name", ["hopper-bf16-d64", "hopper-bf16-d128", "hopper-bf16-mha-d128"])
def test_hopper_bf16_every_kernel_compiles_on_tensor_cores_without_spills(builds, name):
    bs = builds[name]
    if "mha" in name:
        assert {b.kernel for b in bs} == {"attn_fwd_kernel"} | BWD_KERNELS
    else:
        assert {b.kernel for b in bs} == LENS_KERNELS | BWD_KERNELS
        assert all(b.constants["HAS_BIAS"] for b in bs if "HAS_BIAS" in b.constants)
    _check(bs, 90, "wgmma")


def test_hopper_plain_forward_uses_the_wide_tile(builds):
    """Without top-k the forward takes 128-row tiles (the per-row top-k list is what forces 64)."""
    (fwd,) = builds["hopper-plain-fwd"]
    assert fwd.kernel == "attn_fwd_kernel" and fwd.constants["BLOCK_M"] == 128 and fwd.constants["TOPK"] == 0
    _check([fwd], 90, "wgmma")


def test_score_modifications_compile_on_tensor_cores_without_spills(builds):
    bs = builds["hopper-bf16-score-mods"]
    assert {b.kernel for b in bs} == LENS_KERNELS | BWD_KERNELS
    assert all(b.constants["HAS_SOFTCAP"] and b.constants["HAS_ALIBI"] for b in bs if "HAS_SOFTCAP" in b.constants)
    assert [b.constants["HAS_SINKS"] for b in bs if b.kernel == "attn_fwd_kernel"] == [True]
    _check(bs, 90, "wgmma")


def test_ampere_fp16_window_compiles(builds):
    bs = builds["ampere-fp16-window"]
    assert {b.kernel for b in bs} == {"attn_fwd_kernel", "attn_received_kernel"} | BWD_KERNELS
    assert all(b.constants["HAS_LEFT"] for b in bs if "HAS_LEFT" in b.constants)
    _check(bs, 80, "mma")


def test_fp32_head_dim_256_fits_shared_memory(builds):
    """The widest case (fp32 tiles, D = 256): every kernel must at least launch (fp32 is the exact, slow path)."""
    for b in builds["fp32-d256"]:
        assert b.fits, f"{b.kernel}: {b.shared_bytes} B shared memory > {aot.MAX_SHARED[90]}"


def test_compile_refuses_interpreter_processes_and_bad_calls(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_attention()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(aot, "_compiled_module", lambda: None)  # refused before any kernel is needed
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


@pytest.mark.parametrize("name,arch,mma", [("hopper-bf16-seqlens", 90, "wgmma"),
                                           ("ampere-fp16-window-seqlens", 80, "mma")])
def test_padded_batches_compile_without_spills(builds, name, arch, mma):
    """Per-sequence lengths (HAS_SEQLENS) in every kernel a padded-batch call launches, forward, lens and backward."""
    bs = builds[name]
    assert {"attn_fwd_kernel", "attn_received_kernel"} | BWD_KERNELS <= {b.kernel for b in bs}
    assert all(b.constants["HAS_SEQLENS"] for b in bs if "HAS_SEQLENS" in b.constants)
    _check(bs, arch, mma)
