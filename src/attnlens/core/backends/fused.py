"""The fused CPU backend: one tiled C kernel (``fused.c``) for the forward, the lens, the column pass and the backward.

FlashAttention's structure, done for CPUs: the work stays in tiles that fit the L1/L2 caches, and nothing of size
``Nq × Nk`` is ever written to memory.

- **forward** — per query tile (the ``G = Hq/Hkv`` query heads of one key/value head stacked, so they share every
  K/V tile: GQA without copies), over the key tiles its band can see (causal, window and offset skip whole tiles;
  partial tiles are masked in registers), with online softmax (running max ``m`` and sum ``l``)::

      s = q·k·scale → softcap, ALiBi, mask          m' = max(m, max_j s)      α = exp(m − m')
      l = α·l + Σ exp(s − m')                       O = α·O + exp(s − m') V
      t = α·(t + l·(m − m')) + Σ e·(s − m')         (entropy = log l − t/l, the running Σ e·(s − m))

  then ``out = O/l``, ``lse = m + log l``, ``max_weight = 1/l``, top-k (a sorted list per row; a key vector is only
  scanned when it holds a score above the k-th), and the sink folded in last (as the torch backend does).
  ``received`` is summed in the same pass: each thread keeps its item's weights ``e = exp(s − m_tile)`` (rows × keys
  seen) and, once the rows are finished, adds ``Σ_i exp(m_tile − m_i)·e_ij · a_i / l_i`` (``a_i`` the keys' share
  next to a sink, else 1) into its own share of the column sums; threads run contiguous ranges of items of equal
  work and their shares are added in thread order, so for a given thread count the sums are the same bits on every
  run. Where a score may be non-finite (the NaN rule) or these buffers and shares would pass `IN_PASS_BYTES` for all
  threads, the column pass computes it.
- **column pass** (``received_from = Pᵀ W``, ``pooled``, weight ``rows``; ``received`` where not in the pass) — with
  the lse known, key tile
  by key tile: each work item owns a range of keys and runs every query row that sees it, so the column
  accumulators stay in cache and no thread shares one (pooled blocks straddling two items are added atomically).
- **backward** — flash-style from the lse: per key tile, every query row that sees it recomputes ``P``;
  ``dV += Pᵀ dO``, ``dS = P ∘ (dO Vᵀ − Δ)`` with ``Δ = rowsum(dO ∘ O)``, ``dK += dSᵀ Q``, ``dQ += dS K`` (times the
  softcap's ``1 − tanh²``), added into the caller's buffers.

Inputs are read through their strides in float32, float16 or bfloat16 and packed once per call in float32 (q scaled,
K transposed per tile, V padded): linear memory. Exactness as the torch backend: masked scores are ``-inf`` (no
finite sentinel), a row that sees no key gets out 0 and lse ``-inf``, and when scores may be non-finite
(`scores_may_be_nonfinite`, once per call) the kernel marks every row with a visible non-finite score NaN in all its
fields (the NaN/inf rule of `attnlens.core.reference`); value rows holding NaN/inf reach only the rows that give
their key a weight > 0.

Weights in the column pass and the backward are ``exp(s - lse - rowd)``: ``rowd`` is the lse's own rounding where the
torch backend's rule says a row's lse is its own and large (``own_rows``; from the forward's ``m`` and ``l`` directly
when the pass itself runs the column pass), so rows of scores near -1e30 keep their own weights, as in that backend.

The library is built on first use by `attnlens.core.backends.native` (private verified cache, atomic builds under
a lock, compile timeout); where it cannot be built this backend gives that as its reason and ``auto`` takes another
(``attnlens info`` says which and why). ``auto`` takes it for every CPU call it serves that SDPA does not — a lens,
or the block primitives — where it measured faster than the torch backend in every cell of the grid, and for plain
causal float32 forwards, where it measured faster than SDPA (`AUTO_RULE`, `takes_plain`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
from pathlib import Path

import torch

from ..capabilities import Capabilities, MaskFeature, Memory
from ..inputs import AttnInputs, stat_dtype
from ..lens import LensResult
from ..scores import pair_weights
from . import Backend, add_sink_grad, sink_weights
from . import native
from .torch_chunked import LSE_RENORM_ULPS

SOURCE = Path(__file__).with_name("fused.c")
#: largest Lens.topk the kernel keeps (a sorted list per row)
MAX_TOPK = 64
_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ENTRY = ("attnlens_fused_forward", "attnlens_fused_columns", "attnlens_fused_backward")
#: the most memory the forward's threads may hold together to compute ``received`` in the pass (each keeps its
#: item's weights, rows × visible keys); above it ``received`` comes from the column pass (one more Q·Kᵀ)
IN_PASS_BYTES = 256 << 20
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Args(ctypes.Structure):
    """The kernel's argument block (``Args`` in fused.c, field for field)."""

    _fields_ = [("B", _I64), ("Hq", _I64), ("Hkv", _I64), ("Nq", _I64), ("Nk", _I64), ("D", _I64), ("Dv", _I64),
                ("q", _P), ("k", _P), ("v", _P), ("sq", _I64 * 4), ("sk", _I64 * 4), ("sv", _I64 * 4),
                ("dtype", _I32), ("causal", _I32), ("scale", _F32), ("softcap", _F32), ("offset", _I64),
                ("win_left", _I64), ("win_right", _I64), ("mask", _P), ("mask_kind", _I32), ("check", _I32),
                ("sm", _I64 * 4), ("alibi", _P), ("alibi_sb", _I64), ("sinks", _P), ("sinks_sb", _I64),
                ("nthreads", _I32), ("topk", _I32),
                ("out", _P), ("lse", _P), ("maxw", _P), ("ent", _P), ("sinkw", _P), ("topk_w", _P), ("topk_i", _P),
                ("lse_in", _P), ("received", _P), ("rf", _P), ("w", _P), ("sw", _I64 * 4), ("T", _I64),
                ("pooled", _P), ("bq", _I64), ("bk", _I64), ("wrows", _P), ("wpos", _P), ("nwrows", _I64),
                ("rowlist", _P), ("nrowlist", _I64),
                ("dout", _P), ("outp", _P), ("sdo", _I64 * 4), ("so", _I64 * 4), ("dq", _P), ("dk", _P), ("dv", _P), ("dlse", _P),
                ("lse_delta", _P), ("rowd", _P)]


@functools.lru_cache(maxsize=None)
def library():
    """``(ctypes library, None)`` or ``(None, reason)``: built on first use, warned once when it cannot be."""
    lib, reason = native.open_library(SOURCE, "fused CPU kernel", _ENTRY, "backend='auto' uses another backend on "
                                      "the CPU (same results, slower)", stacklevel=6)
    if lib is not None:
        for name in _ENTRY:
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.POINTER(_Args)]
            fn.restype = ctypes.c_int
        lib.attnlens_fused_inpass_bytes.argtypes = [ctypes.POINTER(_Args)]
        lib.attnlens_fused_inpass_bytes.restype = ctypes.c_int64
    return lib, reason


#: where ``backend="auto"`` takes the kernel. It comes after SDPA in auto's order (`dispatch.PRIORITY`), so a plain CPU
#: call that SDPA serves goes there; every other CPU call it serves is the kernel's — a lens call, or one that needs the
#: block primitives (lse, column sums, a backward into buffers). benchmarks/results/fused-auto-2026-12-03.md
#: (2-core AMD EPYC, AVX2): with a lens it measured faster than the torch backend in every cell of the grid.
AUTO_RULE = ("for every CPU call it serves that SDPA does not (a lens, or the block primitives) and for plain causal "
             "float32 forwards: measured faster than the torch backend, and than SDPA on causal forwards "
             "(benchmarks/cpu.py); other plain calls go to SDPA")
#: plain calls: causal float32 CPU forwards measured 0.78-1.00x SDPA's time in the 8 causal cells of the grid;
#: non-causal ones 0.95-1.19x, so those stay with SDPA (`SdpaBackend.auto_reasons`). Calls that need gradients stay
#: with SDPA too: the kernel's forward + backward is faster (0.80-0.90x) but holds more memory (its packed copies of
#: q, k, v, dO: 0.078 against 0.051 GiB at 16k tokens, one head, D = 64).
PLAIN_RULE = "causal float32 CPU forwards: 0.78-1.00x SDPA's time (benchmarks/results/fused-auto-2026-12-03.md)"


def takes_plain(inp: AttnInputs) -> bool:
    """Whether ``auto`` gives a plain call (no lens) that SDPA could serve to this kernel instead (`PLAIN_RULE`)."""
    return inp.q.device.type == "cpu" and inp.q.dtype == torch.float32 and inp.causal and not inp.requires_grad


def _absmax(x) -> float:
    """``max |x|`` as a float: NaN if ``x`` holds a NaN, inf if an inf, 0 if empty (one ``aminmax`` pass)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x.detach())
    return float(torch.maximum(lo.abs(), hi.abs()))


def scores_may_be_nonfinite(inp: AttnInputs) -> bool:
    """Whether a score of this call can be non-finite in float32 (then the kernel checks every visible score): NaN/inf
    in q or k, NaN/+inf in a float mask or a sink, or magnitudes whose scores may overflow — a bound
    ``max|q|·max|k|·D·|scale| + max|slope|·(max |i + offset − j|) + max|finite mask|``. False for ordinary calls."""
    B, Hq, Hkv, Nq, Nk, D, _ = inp.shape
    bound = _absmax(inp.q) * _absmax(inp.k) * D * abs(inp.scale)
    if inp.alibi_slopes is not None:
        bound += _absmax(inp.alibi_slopes) * (abs(inp.offset) + Nq + Nk)
    m = inp.mask
    if m is not None and m.dtype != torch.bool:
        mf = m.detach()
        bound += _absmax(mf.masked_fill(torch.isneginf(mf), 0.0))
    if inp.sinks is not None:
        s = inp.sinks.detach()
        bound += _absmax(s.masked_fill(torch.isneginf(s), 0.0))
    return not bound < torch.finfo(torch.float32).max / 4  # a NaN bound compares False: checked


def _strides(t, dims: int = 4):
    """Element strides of ``t``, 0 along dims of size 1 (broadcast)."""
    return [0 if n == 1 else s for n, s in zip(t.shape, t.stride())][:dims]


def _fill(a: _Args, inp: AttnInputs, keep: list) -> None:
    """The call's shapes, inputs and rules into ``a``; tensors that must outlive the call go into ``keep``."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    q, k, v = inp.q.detach(), inp.k.detach(), inp.v.detach()
    keep += [q, k, v]
    a.B, a.Hq, a.Hkv, a.Nq, a.Nk, a.D, a.Dv = B, Hq, Hkv, Nq, Nk, D, Dv
    a.q, a.k, a.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    a.sq[:], a.sk[:], a.sv[:] = _strides(q), _strides(k), _strides(v)
    a.dtype = _DTYPE[q.dtype]
    a.causal = int(inp.causal)
    a.scale = inp.scale
    a.softcap = inp.softcap or 0.0
    a.offset = inp.offset
    left, right = inp.window if inp.window is not None else (None, None)
    a.win_left = -1 if left is None else left
    a.win_right = -1 if right is None else right
    if inp.mask is not None:
        m = inp.mask.detach()
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)
            a.mask_kind = 1
        else:
            m = m.to(torch.float32)
            a.mask_kind = 2
        if m.shape[3] > 1 and m.stride(3) != 1:
            m = m.contiguous()
        keep.append(m)
        a.mask, a.sm[:] = m.data_ptr(), _strides(m)
    if inp.alibi_slopes is not None:
        al = inp.alibi_slopes.detach().to(torch.float32).contiguous()
        keep.append(al)
        a.alibi, a.alibi_sb = al.data_ptr(), Hq if al.shape[0] > 1 else 0
    if inp.sinks is not None:
        sk = inp.sinks.detach().to(torch.float32).contiguous()
        keep.append(sk)
        a.sinks, a.sinks_sb = sk.data_ptr(), Hq if sk.shape[0] > 1 else 0
    a.check = int(scores_may_be_nonfinite(inp))
    a.nthreads = torch.get_num_threads()


def _run(name: str, a: _Args) -> None:
    rc = getattr(library()[0], name)(ctypes.byref(a))
    if rc == -1:
        raise MemoryError(f"attnlens fused CPU kernel: could not allocate its workspace ({name})")
    if rc != 0:
        raise RuntimeError(f"attnlens fused CPU kernel: {name} returned {rc}")


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def columns(inp: AttnInputs, lse, *, received: bool = False, weights=None, pool=None, rows=None, rowd=None):
    """The column pass from a known ``lse (B, Hq, Nq)``: ``(received (B, Hq, Nk) | None, Pᵀ W (B, Hq, Nk, T) | None,
    pooled (B, Hq, ⌈Nq/bq⌉, ⌈Nk/bk⌉) | None, weight rows (B, Hq, len(rows), Nk) | None)``, float32. Rows with
    ``lse = -inf`` contribute 0. ``rowd (B, Hq, Nq)`` or None: the weights are ``exp(s - lse - rowd)`` (`own_rows`)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    a, keep = _Args(), []
    _fill(a, inp, keep)
    f32 = dict(dtype=torch.float32)
    lse = lse.detach().to(torch.float32).contiguous()
    a.lse_in = lse.data_ptr()
    if rowd is not None:
        rowd = rowd.contiguous()
        keep.append(rowd)
        a.rowd = rowd.data_ptr()
    rec = rf = pooled = wrows = None
    if received:
        rec = torch.zeros(B, Hq, Nk, **f32)
        a.received = rec.data_ptr()
    if weights is not None:
        w = weights.detach().to(torch.float32)
        keep.append(w)
        a.T = w.shape[-1]
        rf = torch.zeros(B, Hq, Nk, a.T, **f32)
        a.rf, a.w, a.sw[:] = rf.data_ptr(), w.data_ptr(), _strides(w)
    if pool is not None:
        a.bq, a.bk = pool
        pooled = torch.zeros(B, Hq, -(-Nq // a.bq), -(-Nk // a.bk), **f32)
        a.pooled = pooled.data_ptr()
    uniq = inverse = None
    if rows is not None:
        uniq = sorted(set(rows))
        wpos = torch.full((Nq,), -1, dtype=torch.int64)
        wpos[torch.tensor(uniq, dtype=torch.int64)] = torch.arange(len(uniq))
        wrows = torch.zeros(B, Hq, len(uniq), Nk, **f32)
        keep.append(wpos)
        a.wrows, a.wpos, a.nwrows = wrows.data_ptr(), wpos.data_ptr(), len(uniq)
        if rec is None and rf is None and pooled is None:  # only the asked rows need running
            rl = torch.tensor(uniq, dtype=torch.int64)
            keep.append(rl)
            a.rowlist, a.nrowlist = rl.data_ptr(), len(uniq)
        if list(rows) != uniq:
            inverse = torch.tensor([uniq.index(r) for r in rows], dtype=torch.int64)
    _run("attnlens_fused_columns", a)
    if inverse is not None:
        wrows = wrows.index_select(2, inverse)
    return rec, rf, pooled, wrows


def forward(inp: AttnInputs, delta: bool = False):
    """``out (B, Hq, Nq, Dv)`` in q's dtype, ``lse (B, Hq, Nq)`` float32 and a rank-4 `LensResult` (or None); with
    ``delta``, a fourth item: ``(m - lse) + log l`` per row (the lse's rounding: ``exp(s - lse - delta)`` is the row's
    own weight ``e / l``, also where fp32 cannot hold ``m + log l``; 0 for dead and NaN rows)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    lens = inp.lens
    a, keep = _Args(), []
    _fill(a, inp, keep)
    f32 = dict(dtype=torch.float32)
    out, lse = torch.empty(B, Hq, Nq, Dv, **f32), torch.empty(B, Hq, Nq, **f32)
    a.out, a.lse = out.data_ptr(), lse.data_ptr()
    # received in the pass: where no score can be non-finite (else the column pass's NaN rule) and the threads'
    # buffers fit IN_PASS_BYTES
    inpass = (lens is not None and lens.received and not a.check
              and library()[0].attnlens_fused_inpass_bytes(ctypes.byref(a)) <= IN_PASS_BYTES)
    rec = torch.zeros(B, Hq, Nk, **f32) if inpass else None
    a.received = _ptr(rec)
    cols = lens is not None and ((lens.received and not inpass) or inp.received_from is not None
                                 or lens.pool is not None or inp.rows is not None or inp.at is not None)
    lse_delta = torch.empty(B, Hq, Nq, **f32) if cols or delta else None
    a.lse_delta = _ptr(lse_delta)
    maxw = ent = sinkw = tk_w = tk_i = None
    if lens is not None:
        maxw = torch.empty(B, Hq, Nq, **f32) if lens.max_weight else None
        ent = torch.empty(B, Hq, Nq, **f32) if lens.entropy else None
        sinkw = torch.empty(B, Hq, Nq, **f32) if inp.sinks is not None else None
        if lens.topk:
            a.topk = lens.topk
            tk_w, tk_i = torch.empty(B, Hq, Nq, lens.topk, **f32), torch.empty(B, Hq, Nq, lens.topk, dtype=torch.int64)
        a.maxw, a.ent, a.sinkw, a.topk_w, a.topk_i = map(_ptr, (maxw, ent, sinkw, tk_w, tk_i))
    _run("attnlens_fused_forward", a)
    res = None
    if lens is not None:
        res = LensResult(lse=lse if lens.lse else None, max_weight=maxw, entropy=ent, topk_weights=tk_w,
                         topk_indices=tk_i, sink_weight=sinkw)
        res.received = rec
        if cols:
            col_received = lens.received and not inpass
            if col_received or inp.received_from is not None or lens.pool is not None or inp.rows is not None:
                rec2, res.received_from, res.pooled, res.weights = columns(
                    inp, lse, received=col_received, weights=inp.received_from, pool=lens.pool, rows=inp.rows,
                    rowd=lse_delta)
                res.received = rec if inpass else rec2
                res.rows = inp.rows
            if inp.at is not None:  # P[i, at] = exp(s - lse) · exp(-delta): the row's own weights
                res.weights_at = pair_weights(inp, inp.at, lse) * torch.exp(-lse_delta)[..., None]
    o = out if inp.q.dtype == torch.float32 else out.to(inp.q.dtype)
    return (o, lse, res, lse_delta) if delta else (o, lse, res)


def own_rows(inp: AttnInputs, lse):
    """``rowd (B, Hq, Nq)`` for weights ``exp(s - lse - rowd)`` rebuilt from a given ``lse``, or None.

    The torch backend's rule (`attnlens.core.backends.torch_chunked`, ``LSE_RENORM_ULPS``): in calls with a finite row
    of huge |lse| (``|lse| · eps > 2**-12``: scores of ±1e4, or near -1e30 where fp32 rounds ``m + log l`` to ``m``),
    a row whose ``lse`` is its own (the weights it gives sum to ``r`` with ``|log r| <= eps · (|lse|/2 + 1)``) gets its
    own weights ``exp(s - lse) / r``: ``rowd = log r``, from one more forward pass of this block (rare calls only). A
    row whose lse is global (ring attention, split-KV: it also sees other blocks' keys) keeps ``exp(s - lse)``."""
    lse = lse.detach().to(torch.float32)
    eps = torch.finfo(torch.float32).eps
    if not bool((torch.isfinite(lse) & (lse.abs() * eps > LSE_RENORM_ULPS)).any()):
        return None
    plain = dataclasses.replace(inp, lens=None) if inp.lens is not None else inp
    _, own, _, d = forward(plain, delta=True)
    logr = (own - lse) + d  # log Σ_j exp(s_ij - lse_i), sink included
    ok = torch.isfinite(lse) & torch.isfinite(logr) & (logr.abs() <= eps * (0.5 * lse.abs() + 1.0))
    return torch.where(ok, logr, torch.zeros((), dtype=torch.float32)).contiguous()


def backward(inp: AttnInputs, out, lse, dout, dq, dk, dv, dsinks=None, dlse=None) -> None:
    """Add the gradients into ``dq``, ``dk``, ``dv`` (any float dtype, strided views allowed) and ``dsinks``;
    ``dlse``: the lse's own gradient (``Δ = rowsum(dO ∘ O) − dlse``, `Backend.backward`)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    a, keep = _Args(), []
    _fill(a, inp, keep)
    dt = inp.q.dtype
    do, o = dout.detach().to(dt), out.detach().to(dt)
    keep += [do, o]
    a.dout, a.outp, a.sdo[:], a.so[:] = do.data_ptr(), o.data_ptr(), _strides(do), _strides(o)
    lse = lse.detach().to(torch.float32).contiguous()
    a.lse_in = lse.data_ptr()
    rowd = own_rows(inp, lse)
    if rowd is not None:
        keep.append(rowd)
        a.rowd = rowd.data_ptr()
    if dlse is not None:
        dl = dlse.detach().to(torch.float32).contiguous()
        keep.append(dl)
        a.dlse = dl.data_ptr()
    direct = [g.dtype == torch.float32 and g.is_contiguous() for g in (dq, dk, dv)]
    bufs = [g if ok else torch.zeros(g.shape, dtype=torch.float32) for g, ok in zip((dq, dk, dv), direct)]
    a.dq, a.dk, a.dv = (b.data_ptr() for b in bufs)
    _run("attnlens_fused_backward", a)
    for g, b, ok in zip((dq, dk, dv), bufs, direct):
        if not ok:
            g += b.to(g.dtype)
    p_sink = None
    if rowd is not None and dsinks is not None and inp.sinks is not None:  # the sink's own weight too
        p_sink = sink_weights(inp, lse) * torch.exp(-rowd)
    add_sink_grad(inp, out, lse, dout, dsinks, p_sink, dlse=dlse)


class FusedCpuBackend(Backend):
    """The fused tiled C kernel on the CPU (`attnlens.core.backends.fused`): forward with the lens in the pass,
    the column pass from the lse, and a flash-style backward. float32 compute (fp16/bf16 read and converted in
    the kernel); no dropout."""

    name = "fused"
    description = "fused tiled C kernel on the CPU: online softmax, the lens in the pass, flash-style backward"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset(_DTYPE), max_topk=MAX_TOPK,
                                masks=frozenset({MaskFeature.BOOL, MaskFeature.FLOAT, MaskFeature.QUERY}),
                                dropout=False, memory=Memory.LINEAR,
                                notes="CPU; fp16/bf16 computed in fp32; built with the C compiler on first use")

    def extra_reasons(self, inp: AttnInputs, reasons: list[str]) -> list[str]:
        if reasons:
            return []
        lib, why = library()
        return [] if lib is not None else [why]

    def status(self) -> str:
        lib, why = library()
        if lib is None:
            return f"unavailable: {why}; backend='auto' uses torch on the CPU (same results, slower)"
        isa = lib.attnlens_fused_isa
        isa.restype = ctypes.c_char_p
        return f"kernel built ({isa().decode()}); backend='auto' takes it {AUTO_RULE}"

    def forward(self, inp: AttnInputs):
        return forward(inp)

    def backward(self, inp: AttnInputs, out, lse, dout, dq, dk, dv, dsinks=None, dlse=None) -> None:
        backward(inp, out, lse, dout, dq, dk, dv, dsinks, dlse)

    def column_sums(self, inp: AttnInputs, lse, weights=None):
        rec, rf, _, _ = columns(inp, lse, received=weights is None, weights=weights, rowd=own_rows(inp, lse))
        return rec if weights is None else rf
