"""Validation of one `attention()` call into a frozen `AttnInputs` (rank-4 torch views)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .capabilities import FLOAT_DTYPES, MaskFeature, ScoreMod
from .lens import Lens
from .masks import SeqLens, Window, normalize_window

NP_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_DIM_NAMES = {2: "(N, D)", 3: "(H, N, D)", 4: "(B, H, N, D)"}


@dataclass(frozen=True)
class AttnInputs:
    """A checked attention call. ``q, k, v`` are rank-4 torch views ``(B, H, N, D)`` of the caller's
    arrays (zero-copy for NumPy); ``mask`` is rank 4, broadcastable to ``(B, Hq, Nq, Nk)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    causal: bool
    window: Window
    scale: float
    dropout_p: float
    lens: Optional[Lens]
    rows: Optional[tuple]
    rank: int
    numpy_io: bool
    #: query i sits at key position ``i + offset`` (for causal and window); default ``Nk - Nq``
    offset: int = 0
    #: seed of the dropout masks (drawn from torch's generator when ``dropout_p > 0``), so a backward pass
    #: regenerates the forward's masks
    seed: int = 0
    #: logit soft-capping ``s = c·tanh(s / c)`` after scaling, before ALiBi and masks (Gemma 2); None = off
    softcap: Optional[float] = None
    #: one extra logit per row with no value (gpt-oss), ``(B|1, Hq)`` (a view of the caller's tensor, so
    #: gradients reach it); None = off
    sinks: Optional[torch.Tensor] = None
    #: ALiBi slopes ``(B|1, Hq)`` in the statistics dtype: scores ``-= slope·|i + offset - j|``; None = off
    alibi_slopes: Optional[torch.Tensor] = None
    #: ``Lens.received_from`` as a rank-4 tensor ``(B|1, Hq|1, Nq, T)`` on q's device (stat dtype), or None
    received_from: Optional[torch.Tensor] = None
    #: ``Lens.at`` as a rank-4 int64 tensor ``(B|1, Hq|1, Nq|1, m)`` on q's device, or None
    at: Optional[torch.Tensor] = None
    #: per-sequence lengths and offsets of a padded batch (``seqlens_q`` / ``seqlens_k``), or None; when set,
    #: ``offset`` is unused (0) and each sequence's offset is ``seqlens.offset[b]``
    seqlens: Optional[SeqLens] = None

    @property
    def shape(self):
        """(B, Hq, Hkv, Nq, Nk, D, Dv)"""
        B, Hq, Nq, D = self.q.shape
        return B, Hq, self.k.shape[1], Nq, self.k.shape[2], D, self.v.shape[3]

    @property
    def requires_grad(self) -> bool:
        """Some input (q, k, v, a float mask, or sinks) needs a gradient."""
        ts = [t for t in (self.q, self.k, self.v, self.mask, self.sinks) if t is not None]
        return torch.is_grad_enabled() and any(t.requires_grad for t in ts)

    @property
    def score_mods(self) -> frozenset:
        """The `ScoreMod` members this call uses (softcap, sinks, ALiBi)."""
        on = ((ScoreMod.SOFTCAP, self.softcap), (ScoreMod.SINKS, self.sinks), (ScoreMod.ALIBI, self.alibi_slopes))
        return frozenset(mod for mod, val in on if val is not None)

    @property
    def mask_features(self) -> frozenset:
        """The `MaskFeature` members this call's mask needs: its kind (bool / float), ``QUERY`` when it varies along the
        queries (not a key mask), ``FLOAT_GRAD`` when a float mask needs a gradient. Empty without a mask."""
        m = self.mask
        if m is None:
            return frozenset()
        need = {MaskFeature.BOOL if m.dtype == torch.bool else MaskFeature.FLOAT}
        if m.shape[2] != 1:
            need.add(MaskFeature.QUERY)
        if m.dtype != torch.bool and m.requires_grad and torch.is_grad_enabled():
            need.add(MaskFeature.FLOAT_GRAD)
        return frozenset(need)

    @property
    def all_finite(self) -> bool:
        """No NaN/inf in q, k or v. One sum each, O(N·D): NaN and inf propagate through a sum; a sum
        that overflows reads as non-finite, which only costs a fallback to a slower backend."""
        acc = None
        for t in (self.q, self.k, self.v):
            part = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            acc = part if acc is None else acc + part
        return bool(torch.isfinite(acc))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Lens statistics and internal accumulation: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kind(x, name: str) -> str:
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """A torch view of ``a`` (zero-copy when it is C-contiguous, native byte order and writable), else of
    a native-order contiguous copy: torch cannot view big-endian data and warns on read-only arrays.
    attnlens never writes into its inputs."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(np.ascontiguousarray(a))


def _check_dense(t: torch.Tensor, name: str) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout} of shape {tuple(t.shape)}; "
                        f"call .to_dense() first")


def _as_torch(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.type not in NP_FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype (float16/32/64), got numpy {x.dtype}")
        return _from_numpy(x)
    _check_dense(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def _to4(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))


def check_dropout(p, name: str = "dropout_p") -> float:
    """A dropout probability in [0, 1), or a TypeError/ValueError naming ``name``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__} {p!r}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def check_offset(offset, nq: int, nk: int) -> int:
    """``offset=None`` → ``Nk - Nq`` (bottom-right); else an int, or a TypeError/ValueError naming ``offset``."""
    if offset is None:
        return nk - nq
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an int (query i sits at key position i + offset) or None (= Nk - Nq), "
                        f"got {type(offset).__name__} {offset!r}")
    if abs(int(offset)) > MAX_OFFSET:
        raise ValueError(f"offset must lie in [-{MAX_OFFSET}, {MAX_OFFSET}], got {offset}")
    return int(offset)


#: positions are int64 everywhere; an offset beyond this is a bug in the caller, not a sequence
MAX_OFFSET = 2**53


def check_softcap(softcap, dtype: Optional[torch.dtype] = None) -> Optional[float]:
    """``None`` or a finite real ``c > 0``, else a TypeError/ValueError naming ``softcap``. With the compute ``dtype``
    (`stat_dtype` of the inputs), also ``finfo.tiny <= c <= 1 / finfo.tiny``: ``c`` and ``1/c`` are then normal
    numbers of it, so ``c·tanh(s/c)`` is computed to its precision (outside, fp32 turns ``1/c`` or ``c`` into inf or
    0: an error or all-NaN output)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a finite real number > 0 or None, got {type(softcap).__name__} {softcap!r}")
    if not (math.isfinite(softcap) and softcap > 0):
        off = " (use None for no soft-capping; FlashAttention's softcap=0.0)" if softcap == 0 else ""
        raise ValueError(f"softcap must be a finite real number > 0 (scores become c·tanh(s/c)){off}, got {softcap}")
    if dtype is not None:
        tiny = torch.finfo(dtype).tiny
        if not tiny <= softcap <= 1.0 / tiny:
            name = str(dtype).replace("torch.", "")
            raise ValueError(f"softcap={softcap} is outside what {name} computes (scores are computed in {name} for "
                             f"these inputs): expected {tiny:.3g} <= softcap <= {1.0 / tiny:.3g}, where softcap and "
                             f"1/softcap are normal {name} numbers")
    return float(softcap)


def _per_head(x, name: str, numpy_io: bool, q: torch.Tensor, B: int, Hq: int, shapes: str, allowed) -> torch.Tensor:
    """``sinks`` / ``alibi_slopes`` as a rank-2 ``(B|1, Hq)`` torch view, checked: same kind and device as ``q``,
    a floating dtype, a shape in ``allowed`` (a predicate on the shape)."""
    kind = _kind(x, name)
    if (kind == "numpy") != numpy_io:
        raise TypeError(f"{name} must be of the same kind as q ({'NumPy' if numpy_io else 'torch'}), "
                        f"got {type(x).__name__}")
    t = _as_torch(x, name)
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    shape = tuple(t.shape)
    if not allowed(shape):
        raise ValueError(f"{name} of shape {shape} does not fit q of shape (B={B}, Hq={Hq}, ...): expected {shapes}")
    t2 = t.reshape((1,) * (2 - t.ndim) + shape)
    return t2.expand(t2.shape[0], Hq)


def validate(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0, lens=None,
             offset=None, softcap=None, sinks=None, alibi_slopes=None, seqlens_q=None, seqlens_k=None) -> AttnInputs:
    """Check one `attnlens.attention` call (see its docstring) into a frozen `AttnInputs`; TypeError / ValueError
    naming the argument otherwise."""
    q4, k4, v4, rank, numpy_io = _check_qkv(q, k, v)
    B, Hq, Nq, D = q4.shape
    Nk = k4.shape[2]
    m4 = None if mask is None else _check_mask(mask, numpy_io, q4, (B, Hq, Nq, Nk), rank)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    win = normalize_window(window)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None (= 1/sqrt(D)), got {scale!r}")
    dropout_p = check_dropout(dropout_p)
    seqlens = None
    if seqlens_q is not None or seqlens_k is not None:
        seqlens = check_seqlens(seqlens_q, seqlens_k, offset, q4.device, B, Nq, Nk)
        offset = 0
    else:
        offset = check_offset(offset, Nq, Nk)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    softcap = check_softcap(softcap, stat_dtype(q4.dtype))
    sinks, alibi_slopes = _check_per_head(sinks, alibi_slopes, numpy_io, q4, B, Hq)
    lens = Lens.coerce(lens)
    rows = rf = at = None
    if lens is not None:
        rows, rf, at = _check_lens(lens, numpy_io, q4, Nk, rank)
    return AttnInputs(q=q4, k=k4, v=v4, mask=m4, causal=bool(causal), window=win, scale=float(scale),
                      dropout_p=float(dropout_p), lens=lens, rows=rows, rank=rank, numpy_io=numpy_io,
                      offset=offset, seed=seed, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                      received_from=rf, at=at, seqlens=seqlens)


def check_seqlens(seqlens_q, seqlens_k, offset, device, B: int, Nq: int, Nk: int) -> SeqLens:
    """The checked `SeqLens` of a padded batch (`SeqLens.check`); ``offset`` None (``seqlens_k - seqlens_q``,
    bottom-right per sequence), an int (every sequence, `check_offset`), or ``(B,)`` ints (one per sequence)."""
    if offset is not None and not isinstance(offset, (torch.Tensor, np.ndarray, list, tuple)):
        offset = check_offset(offset, Nq, Nk)
    return SeqLens.check(seqlens_q, seqlens_k, B, Nq, Nk, device, offset=offset, max_offset=MAX_OFFSET)


def _check_qkv(q, k, v):
    """``(q4, k4, v4, rank, numpy_io)``: rank-4 torch views of one kind, dtype and device, with agreeing shapes."""
    kinds = {name: _kind(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(kinds.values())) != 1:
        raise TypeError(f"q, k, v must all be torch tensors or all NumPy arrays, got {kinds}")
    numpy_io = kinds["q"] == "numpy"
    q, k, v = _as_torch(q, "q"), _as_torch(k, "k"), _as_torch(v, "v")
    shapes = f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
    ranks = (q.ndim, k.ndim, v.ndim)
    if not all(2 <= r <= 4 for r in ranks):
        raise ValueError(f"q, k, v must have rank 2 (N, D), 3 (H, N, D) or 4 (B, H, N, D); got shapes {shapes}")
    if len(set(ranks)) != 1:
        raise ValueError(f"q, k, v must have the same rank, got {shapes}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if q.is_meta:
        raise ValueError(f"q, k, v are meta tensors (shapes {shapes}, no data); attention needs tensors with values "
                         f"(cpu, cuda, ...)")
    rank = q.ndim
    q4, k4, v4 = _to4(q), _to4(k), _to4(v)
    B, Hq, Nq, D = q4.shape
    Bk, Hkv, Nk, Dk = k4.shape
    layout = _DIM_NAMES[rank]
    if Dk != D:
        raise ValueError(f"head dims disagree: q{tuple(q.shape)} has D={D} but k{tuple(k.shape)} has D={Dk} (layout {layout})")
    if (Bk, Hkv, Nk) != tuple(v4.shape[:3]):
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must agree on all but the last dim (layout {layout})")
    if Bk != B:
        raise ValueError(f"batch sizes disagree: q{tuple(q.shape)} has B={B}, k{tuple(k.shape)} has B={Bk}")
    if Hkv == 0 or Nq == 0 or D == 0:  # Nk = 0 is an empty key set: every query sees no key (a no-op merge part)
        raise ValueError(f"q, k, v must be non-empty (at least one key/value head, query and feature), got "
                         f"{shapes} (layout {layout})")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of key/value heads (grouped-query attention): "
                         f"q{tuple(q.shape)} has Hq={Hq}, k{tuple(k.shape)} has Hkv={Hkv}")
    return q4, k4, v4, rank, numpy_io


def _check_mask(mask, numpy_io: bool, q4: torch.Tensor, scores: tuple, rank: int) -> torch.Tensor:
    """The mask as a rank-4 torch tensor broadcastable to the ``scores`` shape ``(B, Hq, Nq, Nk)``."""
    mkind = _kind(mask, "mask")
    if (mkind == "numpy") != numpy_io:
        raise TypeError(f"mask must be of the same kind as q ({'NumPy' if numpy_io else 'torch'}), got "
                        f"{type(mask).__name__}")
    mt = _from_numpy(mask) if mkind == "numpy" else mask
    _check_dense(mt, "mask")
    if mt.dtype != torch.bool and mt.dtype not in FLOAT_DTYPES:
        raise TypeError(f"mask must be bool (True = may attend) or floating (added to the scores), got {mt.dtype}")
    if mt.device != q4.device:
        raise ValueError(f"mask must be on q's device {q4.device}, got {mt.device}")
    target = scores[4 - rank:]
    if mt.ndim > rank or any(m not in (1, t) for m, t in zip(tuple(mt.shape)[::-1], target[::-1])):
        raise ValueError(f"mask of shape {tuple(mt.shape)} does not broadcast to the scores' shape {target} "
                         f"(each dim must be 1 or equal, at most {rank} dims)")
    return mt.reshape((1,) * (4 - mt.ndim) + tuple(mt.shape))


def _check_per_head(sinks, alibi_slopes, numpy_io: bool, q4: torch.Tensor, B: int, Hq: int):
    """``sinks`` and ``alibi_slopes`` as rank-2 ``(B|1, Hq)`` torch tensors (or None)."""
    if sinks is not None:
        sinks = _per_head(sinks, "sinks", numpy_io, q4, B, Hq, f"({Hq},) or a shape broadcastable to ({B}, {Hq})",
                          lambda s: len(s) <= 2 and all(a in (1, b) for a, b in zip(s[::-1], (B, Hq)[::-1])))
    if alibi_slopes is not None:
        alibi_slopes = _per_head(alibi_slopes, "alibi_slopes", numpy_io, q4, B, Hq, f"({Hq},) or ({B}, {Hq})",
                                 lambda s: s in ((Hq,), (B, Hq), (1, Hq)))
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes requires a gradient, which attnlens does not compute (slopes are fixed); "
                             "pass alibi_slopes.detach()")
        alibi_slopes = alibi_slopes.to(stat_dtype(q4.dtype))
    return sinks, alibi_slopes


def _check_lens(lens: Lens, numpy_io: bool, q4: torch.Tensor, Nk: int, rank: int):
    """``(rows, received_from, at)`` of a `Lens`, checked against the call's shapes."""
    B, Hq, Nq, _ = q4.shape
    rows = lens.resolve_rows(Nq)
    rf = _lens_array(lens.received_from, "received_from", numpy_io, q4, (B, Hq, Nq), rank)
    at = _lens_array(lens.at, "at", numpy_io, q4, (B, Hq, Nq), rank)
    if at is not None and at.numel() and (int(at.min()) < -1 or int(at.max()) >= Nk):
        raise ValueError(f"Lens.at: key indices must lie in [0, Nk={Nk}) or be -1 (none), got values in "
                         f"[{int(at.min())}, {int(at.max())}]")
    _check_lens_bytes(lens, lens_nbytes(lens, q4.shape, Nk, stat_dtype(q4.dtype), rows, rf, at))
    return rows, rf, at


def lens_nbytes(lens: Lens, qshape: tuple, Nk: int, dtype: torch.dtype, rows, rf, at) -> dict:
    """Bytes of the lens fields of one call that can grow as Nq · Nk, ``{field: (bytes, shape and dtype)}``:
    ``weights``, top-k (weights and int64 indices), ``pooled``, ``weights_at``, ``received_from`` (in ``dtype``, the
    statistics dtype), for q of ``qshape (B, Hq, Nq, D)``; fields not asked for are left out."""
    B, Hq, Nq, _ = qshape
    isz = torch.finfo(dtype).bits // 8
    name = str(dtype).replace("torch.", "")
    out = {}

    def add(field, shape, per):
        out[field] = (math.prod(shape) * per, f"{tuple(shape)} {name}" + (" + int64" if per > isz else ""))

    if rows is not None:
        add("weights", (B, Hq, len(rows), Nk), isz)
    if lens.topk:
        add("topk", (B, Hq, Nq, lens.topk), isz + 8)
    if lens.pool is not None:
        add("pooled", (B, Hq, -(-Nq // lens.pool[0]), -(-Nk // lens.pool[1])), isz)
    if at is not None:
        add("weights_at", (B, Hq, Nq, at.shape[-1]), isz)
    if rf is not None:
        add("received_from", (B, Hq, Nk, rf.shape[-1]), isz)
    return out


def _check_lens_bytes(lens: Lens, sizes: dict) -> None:
    """A ValueError naming every field and its size when they exceed ``lens.max_bytes`` together."""
    total = sum(n for n, _ in sizes.values())
    if lens.max_bytes is None or total <= lens.max_bytes:
        return
    what = ", ".join(f"{f} {shape} {n / 1e9:.3g} GB" for f, (n, shape) in sorted(sizes.items(), key=lambda x: -x[1][0]))
    raise ValueError(f"the lens asks for {total / 1e9:.3g} GB ({what}), above Lens.max_bytes = {lens.max_bytes / 1e9:.3g} "
                     f"GB; ask for fewer rows, keys or larger pool blocks, or allow it with Lens(..., max_bytes=None) "
                     f"or a larger limit")


def _lens_array(a, name: str, numpy_io: bool, q4: torch.Tensor, lead: tuple, rank: int):
    """``Lens.received_from`` (``(..., Nq, T)`` or a ``(Nq,)`` vector) or ``Lens.at`` (``(..., Nq|1, m)``) as a
    rank-4 torch tensor on q's device, checked against ``lead = (B, Hq, Nq)`` for an input of rank ``rank``."""
    if a is None:
        return None
    if isinstance(a, np.ndarray) != numpy_io:
        raise TypeError(f"Lens.{name} must be of the same kind as q ({'NumPy' if numpy_io else 'torch'}), "
                        f"got {type(a).__name__}")
    if isinstance(a, torch.Tensor) and a.is_meta:
        raise ValueError(f"Lens.{name} is a meta tensor of shape {tuple(a.shape)} (no data); pass a tensor with values "
                         f"(on q's device {q4.device})")
    t = _from_numpy(a) if isinstance(a, np.ndarray) else a.detach()
    if name == "received_from":
        t = t.to(device=q4.device, dtype=stat_dtype(q4.dtype))
        if t.ndim == 1:
            t = t[:, None]  # a (Nq,) vector: T = 1
        what = "(B, Hq, Nq, T) or a (Nq,) vector"
    else:
        t = t.to(device=q4.device, dtype=torch.int64)
        what = "(B, Hq, Nq, m)"
    target = lead[4 - rank:]  # (B, Hq, Nq) less the dims the input does not have
    dims = tuple(t.shape[:-1])
    ok = len(dims) <= len(target) and all(d in (1, n) for d, n in zip(dims[::-1], target[::-1]))
    if name == "received_from" and ok:
        ok = len(dims) >= 1 and dims[-1] == lead[2]  # every query needs its own weight row
    if not ok:
        raise ValueError(f"Lens.{name} of shape {tuple(a.shape)} does not broadcast to {what} for q of "
                         f"(B={lead[0]}, Hq={lead[1]}, Nq={lead[2]}) at rank {rank}")
    return t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))
