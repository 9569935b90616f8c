"""The ``triton`` backend: fused attention with the lens on CUDA, as ``torch.library`` custom ops.

Four ops, each a thin launcher of the kernels in `kernels` (imported lazily, so ``import attnlens``
never needs triton or CUDA, and ``TRITON_INTERPRET`` is read only at first use) — the backend's
block primitives:

    attnlens::triton_attention(q, k, v, bias?, scale, offset, left, right, entropy, topk, config, softcap,
                               slopes?, sinks?)
        -> out (B,Hq,Nq,Dv), lse, max_weight (B,Hq,Nq), entropy (B,Hq,Nq) | (0,),
           topk_indices, topk_weights (B,Hq,Nq,k) | (0,), sink_weight (B,Hq,Nq) | (0,)
    attnlens::triton_attention_backward(dout, q, k, v, bias?, out, lse, scale, offset, left, right, dq, dk, dv,
                                        config) -> ()   adds the gradients into dq, dk, dv (mutated)
    attnlens::triton_column_sums(q, k, bias?, lse, weights?, scale, offset, left, right, config)
        -> (B,Hq,Nk) column sums, or (B,Hq,Nk,T) = Pᵀ W with weights (B|1,Hq|1,Nq,T)
    attnlens::triton_weight_rows(q, k, bias?, lse, rows, scale, offset, left, right, config) -> (B,Hq,R,Nk)

Each has a ``register_fake``, so ``torch.compile`` traces a model through them without running a
kernel. Gradients go through attnlens's one autograd wrapper (`attnlens.core.blocks.differentiable`), which
calls the backward op — as for every backend with block primitives.

``bias`` is a key mask turned into a float32 ``(B, Hq, Nk)`` additive bias (bool False → -inf),
usually an expanded view with zero strides; ``left``/``right`` are the band of `masks.band`
(causal folded in), -1 meaning unbounded; ``offset``: query i sits at key position ``i + offset``.
``config``: block-size overrides as `parse_config` reads them ("" = the table of `block_config`). Every op also
takes the score modifications: ``softcap`` (0.0 = off) and ALiBi ``slopes (B|1, Hq)`` (float32, or None); the forward
takes ``sinks (B|1, Hq)``. The other ops need no sinks: the saved lse includes them. A padded batch: every op
takes ``seqlens (3, B)`` (query lengths, key lengths, per-sequence offsets; int32, or int64 for offsets beyond
``±2**30``; None otherwise), and ``offset`` is then unused (`_seqlens`).

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

import numpy as np
import torch
from torch import Tensor

from ...capabilities import Capabilities, MaskFeature, Memory
from ...inputs import AttnInputs
from ...lens import LensResult
from ...masks import band
from .. import Backend, add_sink_grad

#: head dims (of q/k and of v) the kernels take; padded to a power of two >= 16 with masked loads
MAX_HEAD_DIM = 256
#: top-k per query kept in registers (a list of next_pow2(k) packed int64 per row)
MAX_TOPK = 16
#: the kernels score in log2 units (bias · log2 e): finite float-mask entries below this would overflow to -inf
#: there and read as masked, so they are clamped to it (float32's most negative / log2 e). Entries from here up
#: are exact; a row whose entries are all finfo.min (Hugging Face's convention) averages its keys, as in
#: PyTorch; -inf still masks
BIAS_FLOOR = -2.35e38
#: the kernel kinds `block_config` sizes
KINDS = ("fwd", "cols", "dkdv", "dq")

_TRUE = ("1", "true", "yes", "on", "y")
_kernels_mod = None
#: set by `aot.compile_launches`: every launch goes to this callable ``(kernel_name, args, kwargs)`` instead of
#: the GPU (the launchers' exact arguments, compiled for an architecture without running anything)
launch_hook: contextvars.ContextVar = contextvars.ContextVar("attnlens_triton_launch_hook", default=None)


_FOUND: dict = {}


def triton_installed() -> bool:
    """Whether triton can be imported (looked up once; a plain dict, so torch.compile traces it without a warning)."""
    if "triton" not in _FOUND:
        _FOUND["triton"] = importlib.util.find_spec("triton") is not None
    return _FOUND["triton"]


def interpret_mode() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's interpreter (the test mode)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def kernels_module():
    """The `kernels` module (imports triton at first use; in the test mode, patches Triton's interpreter once)."""
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
    hook = launch_hook.get()
    if hook is not None:
        hook(name, args, kwargs)
    else:
        getattr(kernels_module(), name)[grid](*args, **kwargs)


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def parse_config(text: str) -> dict:
    """Block-size overrides: comma-separated ``[KIND:]BMxBN[xWARPS[xSTAGES]]`` (KIND one of `KINDS`; without
    it the entry applies to every kind), e.g. ``"16x16"`` (the interpreter tests) or ``"dkdv:16x128x8,dq:64x32"``.
    Returns ``{kind or "*": {"BLOCK_M": .., "BLOCK_N": .., "num_warps": .., "num_stages": ..}}``."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        kind, shape = item.split(":", 1) if ":" in item else ("*", item)
        try:
            parts = [int(x) for x in shape.lower().split("x")]
        except ValueError:
            parts = []
        if kind not in KINDS + ("*",) or not 2 <= len(parts) <= 4 or min(parts) < 1:
            raise ValueError(f"config: expected comma-separated [KIND:]BMxBN[xWARPS[xSTAGES]] with KIND in "
                             f"{'/'.join(KINDS)}, got {item!r}")
        out[kind] = dict(zip(["BLOCK_M", "BLOCK_N", "num_warps", "num_stages"], parts))
    return out


def block_config(kind: str, D: int, Dv: int, dtype: torch.dtype, topk: int = 0, arch: int = 90, group: int = 1,
            override: str = "", seqlens: bool = False) -> dict:
    """Block sizes, warps and stages per kernel kind ("fwd", "cols", "dkdv", "dq") for ``sm_<arch>``, ``group``
    query heads per kv head, ``seqlens`` (a padded batch's per-sequence lengths), then the ``override``
    (`parse_config`) on top.

    Every entry is compiled for sm_90, sm_80, sm_86, sm_89 and sm_120 without a GPU by
    benchmarks/triton_compile.py (table in benchmarks/results/triton-compile-*.md; tests/test_triton_compile.py
    checks the main ones in CI): each fits the architecture's shared memory and none spills registers (but
    two fp32 builds on sm_86/89, 8 B per thread).
    - fp16/bf16 start from the Triton tutorial's H100 tiles (forward 128 x 64, backward 32 x 128 for dK/dV and
      128 x 32 for dQ), with 8 warps where 4 spilled (the tutorial's 4-warp dK/dV spilled 968 B per thread at
      D = 128). Ampere-style mma holds more per thread than Hopper's wgmma: dK/dV takes 64-key tiles there at
      D = 128. D = 256 halves tiles.
    - With GQA (``group > 1``) dK/dV loops over the group in-program, which holds more live state: 16-row
      tiles and two pipeline stages on Hopper (three spilled at D = 128), no software pipelining elsewhere.
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
            bm, bn, warps, stages = 16, 128, 8, 2  # 3 stages spilled 8 B at D = 128 once offsets arrived
        else:
            warps, stages = 8, 1
    if kind == "dkdv" and seqlens and stages > 2:
        stages = 2  # the sequence's offset stays live in the loop: 3 stages spilled 8 B on sm_80 (D = 64, window)
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    if override:
        table = parse_config(override)
        cfg.update(table.get("*", {}))
        cfg.update(table.get(kind, {}))
    return cfg


def _arch(t: Tensor) -> int:
    """Compute capability x10 the kernels are built for: the tensor's GPU, the `aot` target, or 90."""
    hook = launch_hook.get()
    if hook is not None:
        return hook.arch
    if _device_type(t) == "cuda":
        major, minor = _capability(t)
        return 10 * major + minor
    return 90  # the interpreter: the tests give small block sizes with TritonBackend(config=...)


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


def _head_strides(t: Tensor) -> tuple:
    """Strides of a ``(B|1, Hq)`` tensor, 0 along a dim of size 1 (read at every batch index)."""
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride()))


def _mod_args(scale: float, softcap: float, slopes: Optional[Tensor], dummy: Tensor,
              seqlens: Optional[Tensor] = None) -> tuple:
    """The score-modification and geometry arguments of every kernel: ``SLOPES, stride_slb, stride_slh, cap_in,
    cap_out, SEQ, stride_seq`` and the ``HAS_SOFTCAP`` / ``HAS_ALIBI`` / ``HAS_SEQLENS`` flags (``softcap`` 0.0 = off;
    ``slopes (B|1, Hq)`` or None; ``seqlens (3, B)`` int64 — query lengths, key lengths, offsets — or None)."""
    sl, sls = (dummy, (0, 0)) if slopes is None else (slopes, _head_strides(slopes))
    cap = softcap > 0
    seq = (dummy, 0) if seqlens is None else (seqlens.contiguous(), seqlens.shape[1])
    args = (sl, *sls, scale / softcap if cap else 0.0, softcap * LOG2E if cap else 0.0, *seq)
    return args, dict(HAS_SOFTCAP=cap, HAS_ALIBI=slopes is not None, HAS_SEQLENS=seqlens is not None)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------
# launchers


def _forward_impl(q, k, v, bias, scale, offset, left, right, entropy, topk, config, softcap, slopes, sinks,
                  seqlens=None):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.empty((B, Hq, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Nq), **f32)
    maxw = torch.empty((B, Hq, Nq), **f32)
    ent = torch.empty((B, Hq, Nq) if entropy else (0,), **f32)
    tk_i = torch.empty((B, Hq, Nq, topk) if topk else (0,), dtype=torch.int64, device=q.device)
    tk_w = torch.empty((B, Hq, Nq, topk) if topk else (0,), **f32)
    sinkw = torch.empty((B, Hq, Nq) if sinks is not None else (0,), **f32)
    cfg = block_config("fwd", D, Dv, q.dtype, topk, _arch(q), override=config)
    L, R, has_l, has_r = _band_args(left, right)
    bias_t, sb, has_b = _bias_args(bias, lse)
    mods, mod_flags = _mod_args(scale, softcap, slopes, lse, seqlens)
    sk, sks = (lse, (0, 0)) if sinks is None else (sinks, _head_strides(sinks))
    grid = (_cdiv(Nq, cfg["BLOCK_M"]), B * Hq)
    with _device_ctx(q):
        _launch("attn_fwd_kernel", grid,
            q, k, v, bias_t, out, lse, maxw, ent if entropy else lse, tk_i if topk else lse, tk_w if topk else lse,
            sk, sinkw if sinks is not None else lse, *sks,
            *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
            Hq, Hq // Hkv, Nq, Nk, D, Dv, scale * LOG2E, offset, L, R, *mods,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
            HAS_LEFT=has_l, HAS_RIGHT=has_r, HAS_BIAS=has_b, **mod_flags, HAS_SINKS=sinks is not None,
            WANT_ENT=entropy, TOPK=topk,
            TOPK_P=1 << max(1, (topk - 1).bit_length()),  # list width: next power of two >= max(k, 2)
            DOT_PREC=_dot_prec(q.dtype), **_launch_opts(cfg))
    return out, lse, maxw, ent, tk_i, tk_w, sinkw


def _column_sums_impl(q, k, bias, lse, weights, scale, offset, left, right, config, softcap, slopes, seqlens=None):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    cfg = block_config("cols", D, D, q.dtype, arch=_arch(q), override=config)
    L, R, has_l, has_r = _band_args(left, right)
    bias_t, sb, has_b = _bias_args(bias, lse)
    mods, mod_flags = _mod_args(scale, softcap, slopes, lse, seqlens)
    T = 0 if weights is None else weights.shape[-1]
    rec = torch.empty((B, Hq, Nk, T) if T else (B, Hq, Nk), dtype=torch.float32, device=q.device)
    if weights is None:
        w_t, sw = lse, (0, 0, 0, 0)
    else:
        w_t = weights.to(torch.float32).expand(B, Hq, Nq, T)  # zero strides where it broadcasts
        sw = tuple(w_t.stride())
    with _device_ctx(q):
        _launch("attn_received_kernel", (_cdiv(Nk, cfg["BLOCK_N"]), B * Hq),
            q, k, bias_t, lse, w_t, rec, *q.stride(), *k.stride(), *sb, *sw,
            Hq, Hq // Hkv, Nq, Nk, D, max(T, 1), scale * LOG2E, offset, L, R, *mods,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_pow2(D), BLOCK_T=_pow2(max(T, 1)),
            HAS_LEFT=has_l, HAS_RIGHT=has_r, HAS_BIAS=has_b, **mod_flags, WEIGHTED=T > 0, DOT_PREC=_dot_prec(q.dtype),
            **_launch_opts(cfg))
    return rec


def _weight_rows_impl(q, k, bias, lse, rows, scale, offset, left, right, config, softcap, slopes, seqlens=None):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    cfg = block_config("cols", D, D, q.dtype, arch=_arch(q), override=config)
    L, R, has_l, has_r = _band_args(left, right)
    bias_t, sb, has_b = _bias_args(bias, lse)
    mods, mod_flags = _mod_args(scale, softcap, slopes, lse, seqlens)
    nr = rows.numel()
    w = torch.empty((B, Hq, nr, Nk), dtype=torch.float32, device=q.device)
    if nr:
        with _device_ctx(q):
            _launch("attn_weights_kernel", (_cdiv(nr, cfg["BLOCK_M"]), _cdiv(Nk, cfg["BLOCK_N"]), B * Hq),
                q, k, bias_t, lse, rows, w, *q.stride(), *k.stride(), *sb,
                Hq, Hq // Hkv, Nq, Nk, D, nr, scale * LOG2E, offset, L, R, *mods,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_pow2(D), HAS_LEFT=has_l, HAS_RIGHT=has_r,
                HAS_BIAS=has_b, **mod_flags, DOT_PREC=_dot_prec(q.dtype), **_launch_opts(cfg))
    return w


def _backward_impl(dout, q, k, v, bias, out, lse, scale, offset, left, right, dq, dk, dv, config, softcap, slopes,
                   dlse=None, seqlens=None):
    """Adds the gradients into ``dq, dk, dv``. The kernels store each tile's gradient once into fresh tensors, which
    are then added: a load-add-store of the accumulator tile inside the dK/dV kernel raised its register pressure
    into spills on sm_90 (the compile check showed 8-80 B per thread)."""
    new = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (dq, dk, dv)]
    _backward_kernels(dout, q, k, v, bias, out, lse, scale, offset, left, right, *new, config, softcap, slopes, dlse,
                      seqlens)
    for buf, g in zip((dq, dk, dv), new):
        buf.add_(g)


def _backward_kernels(dout, q, k, v, bias, out, lse, scale, offset, left, right, dq, dk, dv, config, softcap, slopes,
                      dlse=None, seqlens=None):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    L, R, has_l, has_r = _band_args(left, right)
    bias_t, sb, has_b = _bias_args(bias, lse)
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)  # D_i = rowsum(dO ∘ O)
    mods, mod_flags = _mod_args(scale, softcap, slopes, lse, seqlens)
    flags = dict(BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), HAS_LEFT=has_l, HAS_RIGHT=has_r, HAS_BIAS=has_b, **mod_flags,
                 DOT_PREC=_dot_prec(q.dtype))
    with _device_ctx(q):
        pre = 64
        _launch("attn_bwd_preprocess_kernel", (_cdiv(Nq, pre), B * Hq),
            out, dout, delta, *out.stride(), *dout.stride(), Hq, Nq, Dv, BLOCK_M=pre, BLOCK_DV=_pow2(Dv))
        if dlse is not None:  # the lse's own gradient: dS = P ∘ (dP - (D - dlse))
            delta.sub_(dlse.to(torch.float32))
        cfg = block_config("dkdv", D, Dv, q.dtype, arch=_arch(q), group=Hq // Hkv, override=config,
                           seqlens=seqlens is not None)
        _launch("attn_bwd_dkdv_kernel", (_cdiv(Nk, cfg["BLOCK_N"]), B * Hkv),
            q, k, v, bias_t, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *sb, *dout.stride(),
            *dk.stride(), *dv.stride(), Hq, Hkv, Hq // Hkv, Nq, Nk, D, Dv, scale, scale * LOG2E, offset, L, R, *mods,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **flags, **_launch_opts(cfg))
        cfg = block_config("dq", D, Dv, q.dtype, arch=_arch(q), override=config)
        _launch("attn_bwd_dq_kernel", (_cdiv(Nq, cfg["BLOCK_M"]), B * Hq),
            q, k, v, bias_t, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *sb, *dout.stride(),
            *dq.stride(), Hq, Hq // Hkv, Nq, Nk, D, Dv, scale, scale * LOG2E, offset, L, R, *mods,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **flags, **_launch_opts(cfg))


# ------------------------------------------------------------------------------------------
# torch.library registration: custom ops and fake (meta) kernels


@torch.library.custom_op("attnlens::triton_attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float, offset: int, left: int,
                 right: int, entropy: bool, topk: int, config: str, softcap: float = 0.0,
                 slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None, seqlens: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(q, k, v, bias, scale, offset, left, right, entropy, topk, config, softcap, slopes, sinks,
                         seqlens)


@attention_op.register_fake
def _attention_fake(q, k, v, bias, scale, offset, left, right, entropy, topk, config, softcap=0.0, slopes=None,
                    sinks=None, seqlens=None):
    B, Hq, Nq, _ = q.shape
    st = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty((B, Hq, Nq, v.shape[3])), q.new_empty((B, Hq, Nq), **st), q.new_empty((B, Hq, Nq), **st),
            q.new_empty((B, Hq, Nq) if entropy else (0,), **st),
            q.new_empty((B, Hq, Nq, topk) if topk else (0,), dtype=torch.int64),
            q.new_empty((B, Hq, Nq, topk) if topk else (0,), **st),
            q.new_empty((B, Hq, Nq) if sinks is not None else (0,), **st))


@torch.library.custom_op("attnlens::triton_attention_backward", mutates_args=("dq", "dk", "dv"))
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                          lse: Tensor, scale: float, offset: int, left: int, right: int, dq: Tensor, dk: Tensor,
                          dv: Tensor, config: str, softcap: float = 0.0, slopes: Optional[Tensor] = None,
                          dlse: Optional[Tensor] = None, seqlens: Optional[Tensor] = None) -> None:
    _backward_impl(dout, q, k, v, bias, out, lse, scale, offset, left, right, dq, dk, dv, config, softcap, slopes,
                   dlse, seqlens)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, bias, out, lse, scale, offset, left, right, dq, dk, dv, config,
                             softcap=0.0, slopes=None, dlse=None, seqlens=None):
    return None


@torch.library.custom_op("attnlens::triton_column_sums", mutates_args=())
def column_sums_op(q: Tensor, k: Tensor, bias: Optional[Tensor], lse: Tensor, weights: Optional[Tensor], scale: float,
                   offset: int, left: int, right: int, config: str, softcap: float = 0.0,
                   slopes: Optional[Tensor] = None, seqlens: Optional[Tensor] = None) -> Tensor:
    return _column_sums_impl(q, k, bias, lse, weights, scale, offset, left, right, config, softcap, slopes, seqlens)


@column_sums_op.register_fake
def _column_sums_fake(q, k, bias, lse, weights, scale, offset, left, right, config, softcap=0.0, slopes=None,
                      seqlens=None):
    B, Hq, Nk = q.shape[0], q.shape[1], k.shape[2]
    shape = (B, Hq, Nk) if weights is None else (B, Hq, Nk, weights.shape[-1])
    return q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("attnlens::triton_weight_rows", mutates_args=())
def weight_rows_op(q: Tensor, k: Tensor, bias: Optional[Tensor], lse: Tensor, rows: Tensor, scale: float, offset: int,
                   left: int, right: int, config: str, softcap: float = 0.0, slopes: Optional[Tensor] = None,
                   seqlens: Optional[Tensor] = None) -> Tensor:
    return _weight_rows_impl(q, k, bias, lse, rows, scale, offset, left, right, config, softcap, slopes, seqlens)


@weight_rows_op.register_fake
def _weight_rows_fake(q, k, bias, lse, rows, scale, offset, left, right, config, softcap=0.0, slopes=None,
                      seqlens=None):
    return q.new_empty((q.shape[0], q.shape[1], rows.shape[0], k.shape[2]), dtype=torch.float32)


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


def _mods(inp: AttnInputs) -> tuple:
    """``(softcap, slopes)`` as the ops take them: 0.0 = no softcap; float32 ``(B|1, Hq)`` slopes or None."""
    slopes = None if inp.alibi_slopes is None else inp.alibi_slopes.to(torch.float32)
    return (0.0 if inp.softcap is None else inp.softcap), slopes


#: per-sequence offsets within this bound travel as int32 (positions ``i + offset`` then stay in int32): three
#: fewer registers per program than int64, which kept the dK/dV kernel (sm_90, D = 128) and the top-16 forward
#: (sm_80) from spilling 8 B at 255 registers
_INT32_OFFSET = 2**30


def _seqlens(inp: AttnInputs) -> Optional[Tensor]:
    """A padded batch's ``(3, B)`` lengths and offsets (query lengths, key lengths, offsets) as the ops take them —
    int32 when the offsets lie within ``±2**30`` (lengths always fit: a dimension of a tensor), else int64 — or
    None."""
    sl = inp.seqlens
    if sl is None:
        return None
    small = max(abs(sl.bounds[2]), abs(sl.bounds[3])) <= _INT32_OFFSET and max(sl.bounds[:2]) < 2**31
    return torch.stack([sl.q, sl.k, sl.offset]).to(torch.int32 if small else torch.int64).contiguous()


def _band(inp: AttnInputs) -> tuple[int, int]:
    left, right = band(inp.causal, inp.window)
    return -1 if left is None else left, -1 if right is None else right


class TritonBackend(Backend):
    """Fused Triton kernels. ``config``: block-size overrides for this backend object (`parse_config`), e.g.
    ``TritonBackend(config="16x16")`` — how the interpreter tests and benchmarks/gpu.py try tile shapes."""

    name = "triton"
    description = "fused Triton kernels on CUDA: online softmax with the lens in-kernel, recomputing backward"
    capabilities = Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16, torch.bfloat16,
                                                                                torch.float32}),
                                max_head_dim=MAX_HEAD_DIM, max_topk=MAX_TOPK, masks=frozenset({MaskFeature.BOOL, MaskFeature.FLOAT}),
                                dropout=False, memory=Memory.LINEAR, seqlens=True,
                                notes="CPU only under TRITON_INTERPRET=1 with backend='triton' (the test mode); "
                                      "FlashAttention-2 backward")

    def __init__(self, config: str = ""):
        parse_config(config)  # a bad spec fails here, not at the first launch
        self.config = config

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        if not triton_installed():
            return ["triton is not installed (pip install triton)"]
        return super().not_supported_reasons(inp)

    def mask_reasons(self, inp: AttnInputs) -> list[str]:
        return [r + ("; use backend='torch'" if "queries" in r else "") for r in super().mask_reasons(inp)]

    def device_reasons(self, inp: AttnInputs) -> list[str]:
        on = _device_type(inp.q)
        if on == "cuda" or (on == "cpu" and (interpret_mode() or launch_hook.get() is not None)):
            return []  # CUDA; or the interpreter's test mode (served when named, see auto_reasons), or `aot`
        return [f"tensors on {inp.q.device}: needs CUDA (or CPU tensors with TRITON_INTERPRET=1 and "
                "backend='triton', the test mode)"]

    def extra_reasons(self, inp: AttnInputs, reasons: list[str]) -> list[str]:
        out = []
        if inp.q.dtype == torch.bfloat16 and _device_type(inp.q) == "cuda" and _capability(inp.q) < (8, 0):
            out.append("bfloat16 needs a GPU of compute capability >= 8.0")
        if inp.shape[4] == 0:
            out.append("Nk = 0 (an empty key set; backend='torch' gives every row output 0, lse -inf)")
        if not reasons and not out and not inp.all_finite:
            out.append("q, k or v holds NaN/inf: a fused kernel would spread it to rows that give it weight 0")
        return out

    def auto_reasons(self, inp: AttnInputs) -> list[str]:
        if _device_type(inp.q) == "cpu":
            return ["CPU tensors run only when backend='triton' is named (TRITON_INTERPRET=1 is a test mode, far "
                    "slower than the CPU backends)"]
        return []

    def forward(self, inp: AttnInputs):
        left, right = _band(inp)
        bias = key_bias(inp)
        lens = inp.lens
        want_ent = bool(lens is not None and lens.entropy)
        topk = lens.topk if lens is not None else 0
        q, k, v = inp.q.detach(), inp.k.detach(), inp.v.detach()
        sinks = None if inp.sinks is None else inp.sinks.detach().to(torch.float32)
        out, lse, maxw, ent, tk_i, tk_w, sinkw = attention_op(q, k, v, bias, inp.scale, inp.offset, left, right,
                                                              want_ent, topk, self.config, *_mods(inp), sinks,
                                                              _seqlens(inp))
        if lens is None:
            return out, lse, None
        res = LensResult(lse=lse if lens.lse else None, max_weight=maxw if lens.max_weight else None,
                         entropy=ent if want_ent else None, sink_weight=None if sinks is None else sinkw)
        if topk:
            res.topk_indices, res.topk_weights = tk_i, tk_w
        if lens.received:
            res.received = self.column_sums(inp, lse)
        if inp.rows is not None:
            rows = torch.tensor(inp.rows, dtype=torch.int32, device=q.device)
            res.weights = weight_rows_op(q, k, bias, lse, rows, inp.scale, inp.offset, left, right, self.config,
                                         *_mods(inp), _seqlens(inp))
            res.rows = inp.rows
        return out, lse, res  # received_from, weights_at, pooled: `finish_lens` (column-sum kernel, pair weights)

    def backward(self, inp: AttnInputs, out, lse, dout, dq, dk, dv, dsinks=None, dlse=None) -> None:
        left, right = _band(inp)
        bufs = [b if b.dtype == torch.float32 else b.float() for b in (dq, dk, dv)]  # the kernels add in fp32
        attention_backward_op(dout.contiguous(), inp.q.detach(), inp.k.detach(), inp.v.detach(), key_bias(inp),
                              out.detach(), lse.to(torch.float32).contiguous(), inp.scale, inp.offset, left, right,
                              *bufs, self.config, *_mods(inp),
                              None if dlse is None else dlse.detach().to(torch.float32).contiguous(), _seqlens(inp))
        for b, f in zip((dq, dk, dv), bufs):
            if f is not b:
                b.copy_(f)
        add_sink_grad(inp, out, lse, dout, dsinks, dlse=dlse)

    def column_sums(self, inp: AttnInputs, lse, weights=None):
        left, right = _band(inp)
        return column_sums_op(inp.q.detach(), inp.k.detach(), key_bias(inp), lse.to(torch.float32).contiguous(),
                              weights, inp.scale, inp.offset, left, right, self.config, *_mods(inp), _seqlens(inp))
