"""The ``triton`` backend: its kernels under ``TRITON_INTERPRET=1`` on the CPU (small sizes, 16/32 blocks)
against the float64 reference, its reasons, and — with CUDA — on the GPU through ``backend="auto"``.

The interpreter runs every kernel program in NumPy, so sizes stay small (N <= 70, few heads) and
one call checks the output and every lens field at once.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # before attnlens's kernels module is imported (@triton.jit reads it then); ideally before triton
    # itself, though the backend copes with a triton that torch imported earlier
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import HAS_CUDA, assert_close, check_topk, make_inputs, np64, reference  # noqa: E402

import attnlens as al  # noqa: E402
from attnlens.core import dispatch  # noqa: E402
from attnlens.core.inputs import validate  # noqa: E402
from attnlens.core.backends.triton import ops  # noqa: E402

pytestmark = pytest.mark.triton
CPU = not HAS_CUDA
DEV = "cuda" if HAS_CUDA else "cpu"


#: interpreter runs use 16 x 16 tiles, so N of 37..70 spans several tiles (ragged last ones)
TRITON = al.TritonBackend(config="16x16") if CPU else "triton"


def key_padding(lengths, nk):
    """Bool key-padding mask (B, 1, 1, Nk); a length of 0 gives that sequence no key (dead rows)."""
    return (torch.arange(nk)[None, :] < torch.as_tensor(lengths)[:, None])[:, None, None, :]


def math_attention(q, k, v, mask=None, causal=False, window=None, scale=None):
    """softmax(q kᵀ·scale + mask) v in plain differentiable torch, in q's dtype (dead rows -> 0)."""
    from conftest import visible

    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    keep = torch.from_numpy(np.ascontiguousarray(visible(q.shape[2], k.shape[2], causal, window,
                                                         None if mask is None else mask.cpu()))).to(q.device)
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(s.dtype)
    live = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~live, 0.0)
    return torch.softmax(s, dim=-1) * live @ v


# name -> (B, Hq, Hkv, Nq, Nk, D, Dv, kwargs builder)
CASES = {
    "plain-odd": (1, 2, 2, 37, 37, 32, 32, lambda: {}),
    "causal-Nq<Nk-gqa": (1, 4, 2, 20, 45, 64, 64, lambda: {"causal": True}),
    "causal-Nq>Nk-dead-mqa": (1, 3, 1, 45, 20, 32, 32, lambda: {"causal": True}),
    "window-Nq<Nk": (1, 2, 2, 37, 70, 32, 32, lambda: {"window": (5, 3)}),
    "causal+window-gqa": (1, 4, 2, 70, 70, 16, 16, lambda: {"causal": True, "window": (9, None)}),
    "window-right-only": (1, 2, 1, 45, 37, 32, 32, lambda: {"window": (None, 6)}),
    "D33-Dv20-scale": (1, 2, 2, 37, 37, 33, 20, lambda: {"scale": 0.3}),
    "mqa-D128": (1, 3, 1, 17, 37, 128, 128, lambda: {}),
    "key-padding-dead-batch": (2, 2, 2, 37, 45, 32, 32, lambda: {"mask": key_padding([30, 0], 45)}),
    "float-key-bias+causal": (1, 2, 2, 37, 37, 32, 32, lambda: {
        "causal": True, "mask": torch.where(torch.rand(37) < 0.8, torch.randn(37), torch.tensor(float("-inf")))}),
}


def run_case(name, dtype, rng, requires_grad=False):
    B, Hq, Hkv, Nq, Nk, D, Dv, build = CASES[name]
    torch.manual_seed(int(rng.integers(1 << 31)))
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, rng=rng, device=DEV, requires_grad=requires_grad)
    kw = build()
    if "mask" in kw:
        kw["mask"] = kw["mask"].to(DEV)
    return q, k, v, kw


# --------------------------------------------------------------------------------------------
# forward + every lens field, float32 (IEEE dots: as tight as the torch backend)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_lens_match_reference(name, rng):
    q, k, v, kw = run_case(name, torch.float32, rng)
    topk = min(5, k.shape[2])
    rows = [0, 7, -1]
    out, res = al.attention(q, k, v, backend=TRITON, lens=al.Lens(topk=topk, rows=rows), **kw)
    ref_out, ref = reference(q, k, v, topk=topk, rows=rows, **kw)
    assert out.dtype == torch.float32 and out.device.type == DEV
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what="out")
    for f in ("lse", "max_weight", "entropy", "received", "weights"):
        assert_close(getattr(res, f), getattr(ref, f), atol=5e-5, rtol=1e-4, what=f)
    assert res.rows == ref.rows
    check_topk(res, ref, atol=5e-5)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=["BM32-BN16", "BM16-BN32"])
def test_other_block_shapes(blocks, rng):
    """Non-square tiles move the band's partial/full tile split; causal + window + odd lengths."""
    be = al.TritonBackend(config=f"{blocks[0]}x{blocks[1]}")
    q, k, v = make_inputs(1, 2, 1, 70, 53, 32, dtype=torch.float32, rng=rng, device=DEV)
    kw = {"causal": True, "window": (21, None)}
    out, res = al.attention(q, k, v, backend=be, lens=al.Lens(topk=3), **kw)
    ref_out, ref = reference(q, k, v, topk=3, **kw)
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what="out")
    for f in ("lse", "entropy", "received"):
        assert_close(getattr(res, f), getattr(ref, f), atol=5e-5, rtol=1e-4, what=f)
    check_topk(res, ref, atol=5e-5)


def test_rank2_numpy_and_lens_subsets(rng):
    """Rank-2 NumPy in → NumPy out; fields not asked for stay None; topk=16 (the kernel's limit)."""
    q, k, v = make_inputs(1, 1, 1, 20, 41, 32, dtype=np.float32, rng=rng, rank=2, numpy=True)
    out, res = al.attention(q, k, v, backend=TRITON, lens=al.Lens(entropy=False, received=False, topk=16))
    ref_out, ref = reference(q, k, v, topk=16)
    assert isinstance(out, np.ndarray) and out.shape == (20, 32)
    assert res.entropy is None and res.received is None and res.weights is None
    assert_close(out, ref_out, atol=3e-5, rtol=1e-5, what="out")
    assert_close(res.lse, ref.lse, atol=5e-5, rtol=1e-4, what="lse")
    check_topk(res, ref, atol=5e-5)


def test_huge_scores_do_not_overflow(rng):
    """Scores of ±1e4: no NaN/inf; entropy keeps its precision (Σp·s is taken relative to the max)."""
    q, k, v = make_inputs(1, 2, 2, 37, 37, 32, dtype=torch.float32, scale_factor=1e4 / 5.7, rng=rng, device=DEV)
    out, res = al.attention(q, k, v, backend=TRITON, causal=True, lens=al.Lens(topk=4))
    ref_out, ref = reference(q, k, v, causal=True, topk=4)
    assert_close(out, ref_out, atol=2e-3, rtol=2e-3, what="out")
    assert_close(res.lse, ref.lse, atol=2e-2, rtol=1e-6, what="lse")
    for f in ("max_weight", "entropy", "received"):
        assert_close(getattr(res, f), getattr(ref, f), atol=2e-3, rtol=2e-3, what=f)
    check_topk(res, ref, atol=2e-3)


# --------------------------------------------------------------------------------------------
# backward: FlashAttention-2 kernels recomputing from lse


@pytest.mark.parametrize("name", ["plain-odd", "causal-Nq>Nk-dead-mqa", "causal+window-gqa", "D33-Dv20-scale",
                                  "mqa-D128", "key-padding-dead-batch", "window-right-only"])
def test_backward_matches_torch_and_math(name, rng):
    q, k, v, kw = run_case(name, torch.float32, rng, requires_grad=True)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=DEV)
    out, res = al.attention(q, k, v, backend=TRITON, lens=al.Lens(), **kw)
    assert res.lse.requires_grad and not res.entropy.requires_grad
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_t = al.attention(q, k, v, backend="torch", **kw)
    grads_t = torch.autograd.grad(out_t, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    m = kw.get("mask")
    kw64 = dict(kw, mask=None if m is None else m.cpu())
    out64 = math_attention(q64, k64, v64, **kw64)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double().cpu())
    assert_close(out, out64, atol=3e-5, rtol=1e-5, what="out")
    for n, g, gt, g64 in zip("qkv", grads, grads_t, grads64):
        assert g.dtype == torch.float32 and g.shape == gt.shape
        assert_close(g, g64, atol=1e-4, rtol=1e-4, what=f"d{n} vs float64 math")
        assert_close(g, np64(gt), atol=1e-4, rtol=1e-4, what=f"d{n} vs backend='torch'")


# --------------------------------------------------------------------------------------------
# fp16 / bf16: the tolerance rule of DESIGN.md


def _err(a, ref):
    return float(np.abs(np64(a) - np64(ref)).max())


def _floor(dtype, ref):
    """The absolute floor: rounding the exact answer once to ``dtype`` (unit roundoff x its largest entry)."""
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return u * max(1.0, float(np.abs(np64(ref)).max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["causal-Nq<Nk-gqa", "key-padding-dead-batch"])
def test_low_precision_within_twice_naive_error(name, dtype, rng):
    """Error vs float64 at most 2x that of the same math done naively in ``dtype`` by PyTorch, + a floor."""
    q, k, v, kw = run_case(name, dtype, rng, requires_grad=True)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=DEV).to(dtype)
    out, res = al.attention(q, k, v, backend=TRITON, lens=al.Lens(topk=3), **kw)
    assert out.dtype == dtype and res.lse.dtype == torch.float32
    grads = torch.autograd.grad(out, (q, k, v), dout)
    m = kw.get("mask")
    kwc = dict(kw, mask=None if m is None else m.cpu())
    naive_in = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    naive = math_attention(*naive_in, **kwc)
    naive_grads = torch.autograd.grad(naive, naive_in, dout.cpu())
    x64 = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    out64 = math_attention(*x64, **kwc)
    grads64 = torch.autograd.grad(out64, x64, dout.double().cpu())
    assert _err(out, out64) <= 2 * _err(naive, out64) + _floor(dtype, out64), "out"
    for n, g, gn, g64 in zip("qkv", grads, naive_grads, grads64):
        assert g.dtype == dtype
        assert _err(g, g64) <= 2 * _err(gn, g64) + _floor(dtype, g64), f"d{n}"
    _, ref = reference(q, k, v, topk=3, **kw)
    for f in ("lse", "max_weight", "entropy", "received"):  # fp32 statistics of the rounded inputs
        assert_close(getattr(res, f), getattr(ref, f), atol=2e-2, rtol=2e-2, what=f)


# --------------------------------------------------------------------------------------------
# dispatch and reasons


def _reasons(q, k, v, **kw):
    return ops.TritonBackend().not_supported_reasons(validate(q, k, v, **kw))


def test_refusals_name_their_reason(rng):
    q, k, v = make_inputs(1, 2, 2, 8, 20, 16, dtype=torch.float32, rng=rng)
    cases = {
        "float64": (dict(), torch.float64, "float64"),
        "query mask": (dict(mask=torch.ones(8, 20, dtype=torch.bool)), None, "varies along the queries"),
        "dropout": (dict(dropout_p=0.1), None, "dropout"),
        "topk": (dict(lens=al.Lens(topk=17)), None, "at most 16"),
    }
    for label, (kw, dt, needle) in cases.items():
        qq, kk, vv = (t.to(dt) for t in (q, k, v)) if dt else (q, k, v)
        with pytest.raises(ValueError, match=needle):
            al.attention(qq, kk, vv, backend=TRITON, **kw)
        assert any(needle in r for r in _reasons(qq, kk, vv, **kw)), label
    big = make_inputs(1, 1, 1, 4, 4, 300, dtype=torch.float32, rng=rng)
    assert any("head dim" in r for r in _reasons(*big))
    fm = torch.zeros(20, requires_grad=True)
    assert any("float mask" in r for r in _reasons(q, k, v, mask=fm))
    qn = q.clone()
    qn[0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):  # checked last (a sync): only when nothing else refuses
        al.attention(qn, k, v, backend=TRITON)
    assert any("Nk = 0" in r for r in _reasons(q, k[:, :, :0], v[:, :, :0])), "an empty key set: torch serves it"


def test_topk_beyond_the_keys_pads_with_minus_one_and_zero(rng):
    """Issue 24: Lens(topk=k) with k > Nk (a key piece smaller than k) pads as the other backends do."""
    q, k, v = make_inputs(1, 2, 1, 9, 6, 16, dtype=torch.float32, rng=rng, device=DEV)
    _, res = al.attention(q, k, v, causal=True, backend=TRITON, lens=al.Lens(topk=9))
    _, ref = al.attention(q, k, v, causal=True, backend="reference", lens=al.Lens(topk=9))
    assert torch.equal(res.topk_indices.cpu(), ref.topk_indices.cpu()) and (res.topk_indices[..., 6:] == -1).all()
    assert_close(res.topk_weights, np64(ref.topk_weights), atol=1e-5, what="topk_weights")


def test_auto_on_cpu_never_picks_triton(rng, monkeypatch):
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, dtype=torch.float32, rng=rng)
    for interp in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        assert dispatch.select(validate(q, k, v), "auto").name != "triton"
        assert dispatch.select(validate(q, k, v, lens=True), "auto").name != "triton"
        be, inp = ops.TritonBackend(), validate(q, k, v)
        reasons = be.not_supported_reasons(inp) + be.auto_reasons(inp)
        assert reasons and any("CPU" in r or "cpu" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select(validate(q, k, v), "triton").name == "triton"
    with al.use_backend("triton"):
        assert dispatch.select(validate(q, k, v), "auto").name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        al.attention(q, k, v, backend="triton")


def test_without_triton_a_reason_not_an_error(rng, monkeypatch):
    monkeypatch.setattr(ops, "triton_installed", lambda: False)
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, dtype=torch.float32, rng=rng)
    assert ops.TritonBackend().not_supported_reasons(validate(q, k, v)) == ["triton is not installed (pip install triton)"]
    assert dispatch.select(validate(q, k, v), "auto").name != "triton"


def test_import_needs_neither_triton_nor_cuda():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import attnlens, numpy as np\n"
            "assert 'attnlens.core.backends.triton.kernels' not in sys.modules\n"
            "print(attnlens.attention(np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 4))).shape)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "(3, 4)" in r.stdout


# --------------------------------------------------------------------------------------------
# torch.library: schema and fake kernels of the four ops; torch.compile through attention()


def test_custom_ops_opcheck_and_compile(rng):
    q, k, v = make_inputs(1, 2, 1, 20, 24, 16, dtype=torch.float32, rng=rng, device=DEV, requires_grad=True)
    utils = ("test_schema", "test_faketensor")
    cfg = TRITON.config if CPU else ""
    qd, kd, vd = (t.detach() for t in (q, k, v))
    torch.library.opcheck(ops.attention_op, (qd, kd, vd, None, 0.25, 4, -1, 0, True, 3, cfg), test_utils=utils)
    out, lse = ops.attention_op(qd, kd, vd, None, 0.25, 4, -1, 0, False, 0, cfg)[:2]
    torch.library.opcheck(ops.column_sums_op, (qd, kd, None, lse, torch.rand(1, 2, 20, 3, device=DEV), 0.25, 4, -1, 0,
                                               cfg), test_utils=utils)
    rows = torch.tensor([0, 19], dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.weight_rows_op, (qd, kd, None, lse, rows, 0.25, 4, -1, 0, cfg), test_utils=utils)
    bufs = [torch.zeros(t.shape, device=DEV) for t in (q, k, v)]
    torch.library.opcheck(ops.attention_backward_op, (torch.randn_like(out), qd, kd, vd, None, out, lse, 0.25, 4, -1, 0,
                                                      *bufs, cfg), test_utils=utils)

    def f(q, k, v):
        return al.attention(q, k, v, causal=True, backend=TRITON).sum()

    compiled = torch.compile(f, backend="aot_eager")
    g = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    g_eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(g, g_eager):
        assert_close(a, np64(b), atol=1e-6, what="compiled grad")


def test_config_overrides_parse_and_refuse_bad_specs():
    assert ops.parse_config("16x16") == {"*": {"BLOCK_M": 16, "BLOCK_N": 16}}
    assert ops.parse_config("dkdv:16x128x8, dq:64x32x4x2")["dq"] == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4,
                                                                      "num_stages": 2}
    cfg = ops.block_config("dq", 64, 64, torch.bfloat16, override="16x16,dq:32x16x2")
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]) == (32, 16, 2)
    assert ops.block_config("fwd", 64, 64, torch.bfloat16, override="dq:32x16")["BLOCK_M"] == 128  # other kinds untouched
    for bad in ("16", "fwd:16x16x4x1x9", "bwd:16x16", "axb", "0x16"):
        with pytest.raises(ValueError, match="config"):
            al.TritonBackend(config=bad)


# --------------------------------------------------------------------------------------------
# CUDA: auto picks triton; moderate sizes


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_auto_picks_triton_and_matches(D, causal, rng, cuda_device):
    q, k, v = make_inputs(2, 4, 2, 1000, 1025, D, dtype=torch.bfloat16, rng=rng, device=cuda_device,
                          requires_grad=True)
    assert dispatch.select(validate(q, k, v, causal=causal), "auto").name == "triton"
    out, res = al.attention(q, k, v, causal=causal, lens=al.Lens(topk=8, rows=[0, 999]))
    ref_out, ref = reference(q, k, v, causal=causal, topk=8, rows=[0, 999])
    naive = math_attention(*(t.detach() for t in (q, k, v)), causal=causal)
    assert _err(out, ref_out) <= 2 * _err(naive, ref_out) + _floor(torch.bfloat16, ref_out)
    for f in ("lse", "max_weight", "entropy", "received", "weights"):
        assert_close(getattr(res, f), getattr(ref, f), atol=2e-2, rtol=2e-2, what=f)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_s = torch.autograd.grad(al.attention(q, k, v, causal=causal, backend="sdpa"), (q, k, v), dout)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    grads64 = torch.autograd.grad(math_attention(*x64, causal=causal), x64, dout.double())
    for n, g, gs, g64 in zip("qkv", grads, grads_s, grads64):
        assert _err(g, g64) <= 2 * _err(gs, g64) + _floor(torch.bfloat16, g64), f"d{n}"


def test_extreme_finite_scores_and_masks_are_exact(rng):
    """No sentinel a finite score can reach: scores near -1e30 (the old running-max start) are a row, not an empty one;
    float-mask entries of -1e38 are exact and a row masked everywhere with finfo.min averages (as in PyTorch)."""
    q = torch.ones(1, 1, 3, 16, device=DEV)
    k = torch.full((1, 1, 20, 16), -1e30 / 16, device=DEV)
    k[0, 0, 5] *= 0.5
    v = torch.tensor(rng.standard_normal((1, 1, 20, 8)), dtype=torch.float32, device=DEV)
    out, res = al.attention(q, k, v, scale=1.0, backend=TRITON, lens=al.Lens(topk=2))
    ref_out, ref = reference(q, k, v, scale=1.0, topk=2)
    assert_close(out, ref_out, atol=1e-5, what="out")
    assert_close(res.lse, ref.lse, atol=0, rtol=1e-6, what="lse")
    assert (res.topk_indices[..., 0] == 5).all()
    mask = torch.zeros(1, 1, 1, 20, device=DEV)
    mask[..., 3:] = torch.finfo(torch.float32).min
    mask[..., :3] = -1e38
    q, k = (torch.tensor(rng.standard_normal((1, 1, n, 16)), dtype=torch.float32, device=DEV) for n in (4, 20))
    out, res = al.attention(q, k, v, mask=mask, backend=TRITON, lens=True)
    ref_out, ref = reference(q, k, v, mask=mask, topk=0)
    assert_close(out, ref_out, atol=1e-5, what="out with -1e38 mask entries")
    assert_close(res.lse, ref.lse, atol=0, rtol=1e-6, what="lse")
    full = torch.full((1, 1, 1, 20), torch.finfo(torch.float32).min, device=DEV)
    out = al.attention(q, k, v, mask=full, backend=TRITON)
    assert_close(out, np64(v).mean(-2, keepdims=True).repeat(4, axis=-2), atol=1e-5, what="all-finfo.min row averages")
