"""The ``triton`` backend: fused attention with the lens on CUDA, as ``torch.library`` custom ops.

Three ops, each a thin launcher of the kernels in `kernels` (imported lazily, so ``import attnlens``
never needs triton or CUDA, and ``TRITON_INTERPRET`` is read only at first use):

    attnlens::triton_attention(q, k, v, bias?, scale, left, right, entropy, topk)
        -> out (B,Hq,Nq,Dv), lse, max_weight (B,Hq,Nq), entropy (B,Hq,Nq) | (0,),
           topk_indices, topk_weights (B,Hq,Nq,k) | (0,)
        differentiable in q, k, v (``register_autograd`` calls the backward op below);
        the statistics are marked non-differentiable.
    attnlens::triton_attention_backward(dout, q, k, v, bias?, out, lse, scale, left, right) -> dq, dk, dv
    attnlens::triton_attention_lens_columns(q, k, bias?, lse, scale, left, right, received, rows?)
        -> received (B,Hq,Nk) | (0,), weights (B,Hq,R,Nk) | (0,)      (a second pass once lse is known)

Each has a ``register_fake``, so ``torch.compile`` traces a model through them without running
a kernel. The autograd wrapper is the one ``register_autograd`` builds (no separate
``torch.autograd.Function``: one wrapper, usable eagerly and under ``torch.compile``).

``bias`` is a key mask turned into a float32 ``(B, Hq, Nk)`` additive bias (bool False → -inf),
usually an expanded view with zero strides; ``left``/``right`` are the band of `masks.band`
(causal folded in), -1 meaning unbounded.

Precision: fp16/bf16 inputs use the tensor-core dot with fp32 accumulation and fp32 softmax;
``P`` is rounded to the input dtype before ``P @ V`` (as FlashAttention). fp32 inputs use IEEE
fp32 dots (``input_precision="ieee"``): exact to fp32, not TF32 — correct first; cast to bf16
for speed. Statistics are float32.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from ..._inputs import AttnInputs
from ...lens import LensResult
from ...masks import band
from .. import Backend

#: head dims (of q/k and of v) the kernels take; padded to a power of two >= 16 with masked loads
MAX_HEAD_DIM = 256
#: top-k per query kept in registers (a list of next_pow2(k) packed int64 per row)
MAX_TOPK = 16
#: finite float-mask entries are clamped to this (as `torch_chunked` does): a row whose entries are all
#: finfo.min averages its keys, as in PyTorch, instead of reading as masked; -inf still masks
BIAS_FLOOR = -2.5e29
#: replaces `_config`'s choices: flat entries ({"BLOCK_M": 16, "BLOCK_N": 16}, as the interpreter tests use) apply
#: to every kernel; an entry keyed by a kind ("fwd", "cols", "dkdv", "dq") holds a dict for that kind only, e.g.
#: {"dkdv": {"num_warps": 8}} (how benchmarks/gpu.py and benchmarks/triton_compile.py try variants). None = the table.
BLOCK_OVERRIDE: Optional[dict] = None

_TRUE = ("1", "true", "yes", "on", "y")
_kernels_mod = None
#: set by `aot.compile_launches`: every launch goes to this callable ``(kernel_name, args, kwargs)`` instead of
#: the GPU (the launchers' exact arguments, compiled for an architecture without running anything)
_launch_hook: contextvars.ContextVar = contextvars.ContextVar("attnlens_triton_launch_hook", default=None)


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's interpreter (the test mode)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _kernels():
    global _kernels_mod
    if _kernels_mod is None:
        from . import kernels  # imports triton; @triton.jit reads TRITON_INTERPRET here

        if interpret_mode():
            _patch_interpreter()
        _kernels_mod = kernels
    return _kernels_mod


def _patch_interpreter():
    """Fixes for Triton 3.6's interpreter (test mode only; compiled kernels are untouched):

    * when triton was imported before ``TRITON_INTERPRET=1`` was set (torch imports it for its own
      use), its library functions (``tl.sum``, ``tl.max``, ``tl.sort``, ...) are compiled-mode
      ``JITFunction``s that refuse to be called from an interpreted kernel. Interpret them too.
    * its scalars have shape (1,) and ``__index__`` converts them with ``int(array)``, which NumPy >= 2.4
      refuses ("only 0-dimensional arrays can be converted to Python scalars"): every ``range(lo, hi)``
      over runtime bounds fails. Convert through the single element instead.
    * ``tl.dot`` on bfloat16 multiplies the raw uint16 storage. Widen bf16 operands to fp32 first
      (exact: a bf16 is the top half of an fp32).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    orig_patch = getattr(interpreter, "_patch_lang_tensor", None)
    if orig_patch is not None and not getattr(orig_patch, "_attnlens_fix", False):
        def patched(tensor, scope):
            orig_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                           if self.handle.data.size == 1 else int(self.handle.data))

        patched._attnlens_fix = True
        interpreter._patch_lang_tensor = patched

    from triton.runtime.jit import JITFunction

    if isinstance(getattr(tl, "sum", None), JITFunction) and not getattr(JITFunction.__call__, "_attnlens_fix", False):
        interpreted = {}

        def call(self, *args, **kwargs):
            f = interpreted.get(self.fn)
            if f is None:
                f = interpreted[self.fn] = interpreter.InterpretedFunction(self.fn)
            return f(*args, **kwargs)

        call._attnlens_fix = True
        JITFunction.__call__ = call

    builder = getattr(interpreter, "InterpreterBuilder", None)
    orig_dot = getattr(builder, "create_dot", None)
    if orig_dot is not None and not getattr(orig_dot, "_attnlens_fix", False):
        def widen(h):
            if h.dtype == tl.bfloat16:
                f32 = (h.data.astype(np.uint32) << 16).view(np.float32)
                return interpreter.TensorHandle(f32, tl.float32)
            return h

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

        create_dot._attnlens_fix = True
        builder.create_dot = create_dot


def _launch(name: str, grid: tuple, *args, **kwargs) -> None:
    """Launch kernel ``name`` of `kernels` on ``grid`` (or hand it to the ahead-of-time compile hook)."""
    hook = _launch_hook.get()
    if hook is not None:
        hook(name, args, kwargs)
    else:
        getattr(_kernels(), name)[grid](*args, **kwargs)


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def _config(kind: str, D: int, Dv: int, dtype: torch.dtype, topk: int = 0, arch: int = 90, group: int = 1) -> dict:
    """Block sizes, warps and stages per kernel kind ("fwd", "cols", "dkdv", "dq") for ``sm_<arch>``, ``group``
    query heads per kv head, then `BLOCK_OVERRIDE` on top.

    Every entry is compiled for sm_90, sm_80, sm_86, sm_89 and sm_120 without a GPU by
    benchmarks/triton_compile.py (table in benchmarks/results/triton-compile-*.md; tests/test_triton_compile.py
    checks the main ones in CI): each fits the architecture's shared memory and none spills registers (but
    two fp32 builds on sm_86/89, 8 B per thread).
    - fp16/bf16 start from the Triton tutorial's H100 tiles (forward 128 x 64, backward 32 x 128 for dK/dV and
      128 x 32 for dQ), with 8 warps where 4 spilled (the tutorial's 4-warp dK/dV spilled 968 B per thread at
      D = 128). Ampere-style mma holds more per thread than Hopper's wgmma: dK/dV takes 64-key tiles there at
      D = 128. D = 256 halves tiles.
    - With GQA (``group > 1``) dK/dV loops over the group in-program, which holds more live state: 16-row
      tiles on Hopper, no software pipelining elsewhere.
    - fp32 dots run on FMA units (IEEE, not TF32) with tiles in registers: small tiles (the tutorial shapes
      made the fp32 D = 256 backward need 264 KiB of shared memory, more than any GPU has).
    - GPUs with ~100 KiB of shared memory per block (sm_86/89/120: RTX 30xx/40xx/50xx) use two pipeline
      stages from D = 128 on.
    Speed is unmeasured (no GPU lent yet): benchmarks/gpu.py --variants compares alternatives.
    """
    dmax = max(_pow2(D), _pow2(Dv))
    hopper = arch == 90  # wgmma: accumulators per warp group; mma (Ampere/Ada/sm_120) holds more per thread
    small_smem = arch in (86, 87, 89) or arch >= 120
    big = dmax > 128
    if dtype == torch.float32:
        table = {"fwd": (32, 32, 4) if dmax <= 32 else (16, 32, 8) if dmax <= 64 else (16, 16, 8),
                 "cols": (32, 32, 4 if dmax <= 64 else 8),
                 "dkdv": (16, 32, 4 if dmax <= 64 else 8),
                 "dq": (32, 32, 8) if dmax <= 128 else (16, 16, 8)}
    else:
        fwd = (64 if big or topk else 128, 32 if big else 64, 8 if dmax >= 128 else 4)  # top-k list: 64 rows
        if big and topk and not hopper:
            fwd = (32, 32, 8)
        table = {"fwd": fwd,
                 "cols": (64, 32 if big else 64, 4),
                 "dkdv": (32, 32, 8) if big else (32, 64 if dmax == 128 and not hopper else 128,
                                                  8 if dmax >= 64 or arch >= 120 else 4),
                 "dq": (32 if big and small_smem else 64 if big else 128, 32, 8 if dmax >= 64 else 4)}
    if kind not in table:
        raise AssertionError(kind)
    bm, bn, warps = table[kind]
    stages = 2 if small_smem and dmax >= 128 else 3
    if kind == "dkdv" and group > 1:
        # the loop over the query heads of a kv head (compiled away when group == 1) holds more live state:
        # 16-row tiles on Hopper (half precision, D <= 128), no software pipelining elsewhere
        if hopper and dtype != torch.float32 and not big:
            bm, bn, warps = 16, 128, 8
        else:
            warps, stages = 8, 1
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    if BLOCK_OVERRIDE:
        cfg.update({key: val for key, val in BLOCK_OVERRIDE.items() if not isinstance(val, dict)})
        cfg.update(BLOCK_OVERRIDE.get(kind, {}))
    return cfg


def _arch(t: Tensor) -> int:
    """Compute capability x10 the kernels are built for: the tensor's GPU, the `aot` target, or 90."""
    hook = _launch_hook.get()
    if hook is not None:
        return hook.arch
    if _device_type(t) == "cuda":
        major, minor = _capability(t)
        return 10 * major + minor
    return 90  # the interpreter: block sizes come from BLOCK_OVERRIDE in the tests


def _launch_opts(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 operands


def _band_args(left: int, right: int):
    return max(left, 0), max(right, 0), left >= 0, right >= 0


def _bias_args(bias: Optional[Tensor], dummy: Tensor):
    if bias is None:
        return dummy, (0, 0, 0), False
    return bias, tuple(bias.stride()), True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------
# launchers


def _forward_impl(q, k, v, bias, scale, left, right, entropy, topk):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.empty((B, Hq, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Nq), **f32)
    maxw = torch.empty((B, Hq, Nq), **f32)
    ent = torch.empty((B, Hq, Nq) if entropy else (0,), **f32)
    tk_i = torch.empty((B, Hq, Nq, topk) if topk else (0,), dtype=torch.int64, device=q.device)
    tk_w = torch.empty((B, Hq, Nq, topk) if topk else (0,), **f32)
    cfg = _config("fwd", D, Dv, q.dtype, topk, _arch(q))
    L, R, has_l, has_r = _band_args(left, right)
    bias_t, sb, has_b = _bias_args(bias, lse)
    grid = (_cdiv(Nq, cfg["BLOCK_M"]), B * Hq)
    with _device_ctx(q):
        _launch("attn_fwd_kernel", grid,
            q, k, v, bias_t, out, lse, maxw, ent if entropy else lse, tk_i if topk else lse, tk_w if topk else lse,
            *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
            Hq, Hq // Hkv, Nq, Nk, D, Dv, scale * LOG2E, L, R,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
            HAS_LEFT=has_l, HAS_RIGHT=has_r, HAS_BIAS=has_b, WANT_ENT=entropy, TOPK=topk,
            TOPK_P=1 << max(1, (topk - 1).bit_length()),  # list width: next power of two >= max(k, 2)
            DOT_PREC=_dot_prec(q.dtype), **_launch_opts(cfg))
    return out, lse, maxw, ent, tk_i, tk_w


def _columns_impl(q, k, bias, lse, scale, left, right, received, rows):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    f32 = dict(dtype=torch.float32, device=q.device)
    cfg = _config("cols", D, D, q.dtype, arch=_arch(q))
    L, R, has_l, has_r = _band_args(left, right)
    bias_t, sb, has_b = _bias_args(bias, lse)
    common = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_pow2(D), HAS_LEFT=has_l, HAS_RIGHT=has_r,
                  HAS_BIAS=has_b, DOT_PREC=_dot_prec(q.dtype), **_launch_opts(cfg))
    rec = torch.empty((B, Hq, Nk) if received else (0,), **f32)
    w = torch.empty((0,), **f32)
    with _device_ctx(q):
        if received:
            _launch("attn_received_kernel", (_cdiv(Nk, cfg["BLOCK_N"]), B * Hq),
                q, k, bias_t, lse, rec, *q.stride(), *k.stride(), *sb,
                Hq, Hq // Hkv, Nq, Nk, D, scale * LOG2E, L, R, **common)
        if rows is not None:
            nr = rows.numel()
            w = torch.empty((B, Hq, nr, Nk), **f32)
            if nr:
                _launch("attn_weights_kernel", (_cdiv(nr, cfg["BLOCK_M"]), _cdiv(Nk, cfg["BLOCK_N"]), B * Hq),
                    q, k, bias_t, lse, rows, w, *q.stride(), *k.stride(), *sb,
                    Hq, Hq // Hkv, Nq, Nk, D, nr, scale * LOG2E, L, R, **common)
    return rec, w


def _backward_impl(dout, q, k, v, bias, out, lse, scale, left, right):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    L, R, has_l, has_r = _band_args(left, right)
    bias_t, sb, has_b = _bias_args(bias, lse)
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)  # D_i = rowsum(dO ∘ O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags = dict(BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), HAS_LEFT=has_l, HAS_RIGHT=has_r, HAS_BIAS=has_b,
                 DOT_PREC=_dot_prec(q.dtype))
    with _device_ctx(q):
        pre = 64
        _launch("attn_bwd_preprocess_kernel", (_cdiv(Nq, pre), B * Hq),
            out, dout, delta, *out.stride(), *dout.stride(), Hq, Nq, Dv, BLOCK_M=pre, BLOCK_DV=_pow2(Dv))
        cfg = _config("dkdv", D, Dv, q.dtype, arch=_arch(q), group=Hq // Hkv)
        _launch("attn_bwd_dkdv_kernel", (_cdiv(Nk, cfg["BLOCK_N"]), B * Hkv),
            q, k, v, bias_t, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *sb, *dout.stride(),
            *dk.stride(), *dv.stride(), Hq, Hkv, Hq // Hkv, Nq, Nk, D, Dv, scale, scale * LOG2E, L, R,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **flags, **_launch_opts(cfg))
        cfg = _config("dq", D, Dv, q.dtype, arch=_arch(q))
        _launch("attn_bwd_dq_kernel", (_cdiv(Nq, cfg["BLOCK_M"]), B * Hq),
            q, k, v, bias_t, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *sb, *dout.stride(),
            *dq.stride(), Hq, Hq // Hkv, Nq, Nk, D, Dv, scale, scale * LOG2E, L, R,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **flags, **_launch_opts(cfg))
    return dq, dk, dv


# ------------------------------------------------------------------------------------------
# torch.library registration: custom ops, fake (meta) kernels, autograd


@torch.library.custom_op("attnlens::triton_attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, left: int, right: int,
                 entropy: bool, topk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(q, k, v, bias, scale, left, right, entropy, topk)


@attention_op.register_fake
def _attention_fake(q, k, v, bias, scale, left, right, entropy, topk):
    B, Hq, Nq, _ = q.shape
    st = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty((B, Hq, Nq, v.shape[3])), q.new_empty((B, Hq, Nq), **st), q.new_empty((B, Hq, Nq), **st),
            q.new_empty((B, Hq, Nq) if entropy else (0,), **st),
            q.new_empty((B, Hq, Nq, topk) if topk else (0,), dtype=torch.int64),
            q.new_empty((B, Hq, Nq, topk) if topk else (0,), **st))


@torch.library.custom_op("attnlens::triton_attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                          lse: Tensor, scale: float, left: int, right: int) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(dout, q, k, v, bias, out, lse, scale, left, right)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, bias, out, lse, scale, left, right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("attnlens::triton_attention_lens_columns", mutates_args=())
def lens_columns_op(q: Tensor, k: Tensor, bias: Optional[Tensor], lse: Tensor, scale: float, left: int, right: int,
                    received: bool, rows: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _columns_impl(q, k, bias, lse, scale, left, right, received, rows)


@lens_columns_op.register_fake
def _lens_columns_fake(q, k, bias, lse, scale, left, right, received, rows):
    B, Hq = q.shape[:2]
    Nk = k.shape[2]
    st = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty((B, Hq, Nk) if received else (0,), **st),
            q.new_empty((B, Hq, rows.shape[0], Nk) if rows is not None else (0,), **st))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, left, right, _, _ = inputs
    out, lse = output[0], output[1]
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale, ctx.left, ctx.right = scale, left, right
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dout, *_stat_grads):
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, q, k, v, bias, out, lse, ctx.scale, ctx.left, ctx.right)
    return dq, dk, dv, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# the backend


def key_bias(inp: AttnInputs) -> Optional[Tensor]:
    """A key mask ``(B|1, Hq|1, 1, Nk|1)`` as a float32 additive bias viewed as ``(B, Hq, Nk)`` (zero strides
    where the mask broadcasts); None without a mask."""
    m = inp.mask
    if m is None:
        return None
    B, Hq, _, _, Nk, _, _ = inp.shape
    m3 = m[:, :, 0, :]
    if m3.dtype == torch.bool:
        bias = torch.zeros(m3.shape, dtype=torch.float32, device=m3.device).masked_fill_(~m3, float("-inf"))
    else:
        mf = m3.detach().to(torch.float32)
        bias = torch.where(torch.isneginf(mf), mf, mf.clamp(min=BIAS_FLOOR))
    return bias.expand(B, Hq, Nk)


def _device_type(t: Tensor) -> str:
    """``t.device.type``; one function, so the dispatch tests can answer "cuda" on a machine without one."""
    return t.device.type


def _capability(t: Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device)


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton kernels on CUDA: online softmax with the lens in-kernel, recomputing backward"
    capabilities = {"devices": "cuda (cpu only under TRITON_INTERPRET=1 with backend='triton')",
                    "dtypes": "fp16/bf16 (fp32 accumulation), fp32 (IEEE dots)", "lens": "yes (top-k <= 16)",
                    "grad": "yes (FlashAttention-2 backward)", "dropout": "no",
                    "masks": "causal, window, key masks (B|1, H|1, 1, Nk)", "memory": "O(N)"}

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        if not triton_installed():
            return ["triton is not installed (pip install triton)"]
        reasons = []
        dev = inp.q.device
        on = _device_type(inp.q)
        if on == "cpu" and (interpret_mode() or _launch_hook.get() is not None):
            pass  # the interpreter's test mode (served when named, see auto_reasons), or `aot` compiling
        elif on != "cuda":
            reasons.append(f"tensors on {dev}: needs CUDA (or CPU tensors with TRITON_INTERPRET=1 and "
                           "backend='triton', the test mode)")
        dt = inp.q.dtype
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {dt}: the kernels take float16, bfloat16 or float32 (use backend='torch' "
                           "for float64)")
        elif dt == torch.bfloat16 and on == "cuda" and _capability(inp.q) < (8, 0):
            reasons.append("bfloat16 needs a GPU of compute capability >= 8.0")
        B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
        if max(D, Dv) > MAX_HEAD_DIM:
            reasons.append(f"head dim D={D}, Dv={Dv}: the kernels take head dims up to {MAX_HEAD_DIM}")
        m = inp.mask
        if m is not None:
            if m.shape[2] != 1:
                reasons.append(f"mask of shape {tuple(m.shape)} (as rank 4) varies along the queries: only key masks "
                               f"(B|1, H|1, 1, Nk), e.g. key padding, are fused; use backend='torch'")
            if m.dtype != torch.bool and m.requires_grad and torch.is_grad_enabled():
                reasons.append("no gradient with respect to a float mask (use backend='sdpa')")
        if inp.dropout_p > 0:
            reasons.append(f"dropout_p={inp.dropout_p}: dropout is not fused (use backend='torch' or 'sdpa')")
        if inp.lens is not None and inp.lens.topk > MAX_TOPK:
            reasons.append(f"Lens.topk={inp.lens.topk}: the kernel keeps at most {MAX_TOPK} per query "
                           "(use backend='torch')")
        if not reasons and not inp.all_finite:
            reasons.append("q, k or v holds NaN/inf: a fused kernel would spread it to rows that give it weight 0")
        return reasons

    def auto_reasons(self, inp: AttnInputs) -> list[str]:
        if _device_type(inp.q) == "cpu":
            return ["CPU tensors run only when backend='triton' is named (TRITON_INTERPRET=1 is a test mode, far "
                    "slower than the CPU backends)"]
        return []

    def run(self, inp: AttnInputs):
        B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
        left, right = band(Nq, Nk, inp.causal, inp.window)
        left = -1 if left is None else left
        right = -1 if right is None else right
        bias = key_bias(inp)
        lens = inp.lens
        want_ent = bool(lens is not None and lens.entropy)
        topk = lens.topk if lens is not None else 0
        out, lse, maxw, ent, tk_i, tk_w = attention_op(inp.q, inp.k, inp.v, bias, inp.scale, left, right,
                                                       want_ent, topk)
        if lens is None:
            return out, None
        res = LensResult(lse=lse if lens.lse else None, max_weight=maxw if lens.max_weight else None,
                         entropy=ent if want_ent else None)
        if topk:
            res.topk_indices, res.topk_weights = tk_i, tk_w
        if lens.received or inp.rows is not None:
            rows = None if inp.rows is None else torch.tensor(inp.rows, dtype=torch.int32, device=inp.q.device)
            rec, w = lens_columns_op(inp.q.detach(), inp.k.detach(), bias, lse, inp.scale, left, right,
                                     lens.received, rows)
            if lens.received:
                res.received = rec
            if rows is not None:
                res.weights, res.rows = w, inp.rows
        return out, res
