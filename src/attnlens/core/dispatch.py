"""Backend priority, selection and forcing — all from the backends' typed `Capabilities`.

``backend="auto"`` takes the first backend, in priority order, that gives no reason it cannot serve
the call (`Backend.not_supported_reasons`) nor a reason to be passed over by auto
(`Backend.auto_reasons`) — and never one whose memory for this call is dense ``O(Nq·Nk)``
(`Backend.memory`) when a later backend serves it in linear memory. Naming a backend (or passing a
backend object) that cannot serve the call raises an error that describes the input and lists its
reasons; when none can, the error lists every backend's reasons.
"""
from __future__ import annotations

import contextlib
import contextvars
import platform
from dataclasses import dataclass

import numpy
import torch

from .backends import Backend
from .backends.fused import FusedCpuBackend
from .backends.reference import ReferenceBackend
from .backends.sdpa import SdpaBackend
from .backends.torch_chunked import TorchChunkedBackend
from .backends.triton import TritonBackend
from .capabilities import Capabilities, Memory
from .inputs import AttnInputs
from .version import __version__

#: priority order for backend="auto"
#: — on the CPU a plain call (no lens, no block primitives) goes to PyTorch's SDPA, but a plain causal float32 forward
#: to the fused kernel (`SdpaBackend.auto_reasons`); a lens call, or one that needs the block primitives, to the fused
#: kernel (`attnlens.core.backends.fused.AUTO_RULE`, from benchmarks/cpu.py), then the torch backend where the kernel
#: cannot serve it
PRIORITY: list[Backend] = [TritonBackend(), SdpaBackend(), FusedCpuBackend(), TorchChunkedBackend(), ReferenceBackend()]
_BY_NAME = {b.name: b for b in PRIORITY}
_FORCED: contextvars.ContextVar = contextvars.ContextVar("attnlens_backend", default=None)
#: the reason a backend without block primitives gives when a caller needs them (`select(primitives=True)`)
NO_PRIMITIVES = "no block primitives (lse, backward into buffers, column sums)"


def names() -> list[str]:
    return [b.name for b in PRIORITY]


def get(backend) -> Backend:
    """A backend by name, or a `Backend` object as it is."""
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {['auto'] + names()}, or an attnlens backend object; got "
                        f"{type(backend).__name__}")
    if backend not in _BY_NAME:
        raise ValueError(f"unknown backend {backend!r}; expected one of {['auto'] + names()}")
    return _BY_NAME[backend]


@contextlib.contextmanager
def use_backend(backend):
    """Within the block, ``attention(..., backend="auto")`` uses ``backend`` (a name or a backend object).

    >>> with attnlens.use_backend("torch"):
    ...     out = attnlens.attention(q, k, v)
    """
    forced = None if backend == "auto" else get(backend)
    token = _FORCED.set(forced)
    try:
        yield
    finally:
        _FORCED.reset(token)


def describe(inp: AttnInputs) -> str:
    """The call in one line: shapes, dtype, device, mask, flags and lens."""
    B, Hq, Hkv, Nq, Nk, D, Dv = inp.shape
    parts = [f"q (B={B}, Hq={Hq}, Nq={Nq}, D={D})", f"k/v (Hkv={Hkv}, Nk={Nk}, Dv={Dv})",
             str(inp.q.dtype).replace("torch.", ""), f"on {inp.q.device}"]
    if inp.mask is not None:
        parts.append(f"{'bool' if inp.mask.dtype == torch.bool else 'float'} mask {tuple(inp.mask.shape)}")
    if inp.causal:
        parts.append("causal")
    if inp.window is not None:
        parts.append(f"window={inp.window}")
    if inp.seqlens is not None:
        sl = inp.seqlens
        parts.append(f"seqlens_q={sl.q.tolist()}, seqlens_k={sl.k.tolist()}, offsets={sl.offset.tolist()}"
                     if sl.q.numel() <= 8 else f"seqlens (B={sl.q.numel()})")
    elif inp.offset != Nk - Nq:
        parts.append(f"offset={inp.offset}")
    if inp.softcap is not None:
        parts.append(f"softcap={inp.softcap}")
    if inp.sinks is not None:
        parts.append(f"sinks {tuple(inp.sinks.shape)}")
    if inp.alibi_slopes is not None:
        parts.append(f"alibi_slopes {tuple(inp.alibi_slopes.shape)}")
    if inp.dropout_p:
        parts.append(f"dropout_p={inp.dropout_p}")
    if inp.lens is not None:
        parts.append(f"lens={inp.lens}")
    if inp.requires_grad:
        parts.append("needs gradients")
    return ", ".join(parts)


def select(inp: AttnInputs, backend="auto", *, primitives: bool = False) -> Backend:
    """The backend that serves ``inp`` (see the module docstring). ``primitives``: the caller needs the block
    primitives (backward into buffers, column sums), so a backend without them (``sdpa``) cannot serve it."""
    if isinstance(backend, str) and backend == "auto":
        backend = _FORCED.get() or "auto"
    if not (isinstance(backend, str) and backend == "auto"):
        b = get(backend)
        reasons = _reasons(b, inp, primitives)
        if reasons:
            raise ValueError(f"backend {b.name!r} cannot serve this call ({describe(inp)}): " + "; ".join(reasons))
        return b
    serving, all_reasons = [], {}
    for b in PRIORITY:
        reasons = _reasons(b, inp, primitives) or b.auto_reasons(inp)
        if reasons:
            all_reasons[b.name] = reasons
        else:
            serving.append(b)
    if not serving:
        detail = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in all_reasons.items())
        raise ValueError(f"no backend can serve this call ({describe(inp)}):\n{detail}")
    linear = [b for b in serving if b.memory(inp) is not Memory.DENSE]
    return (linear or serving)[0]


def _reasons(b: Backend, inp: AttnInputs, primitives: bool) -> list[str]:
    if primitives and not b.capabilities.block:
        return [NO_PRIMITIVES]
    return b.not_supported_reasons(inp)


@dataclass(frozen=True)
class BackendInfo:
    """One row of ``attnlens.backends()``: a backend's ``name``, ``description`` and typed ``capabilities``."""

    name: str
    description: str
    capabilities: Capabilities

    def describe(self) -> dict:
        """Display strings: name, description and `Capabilities.describe`."""
        return {"name": self.name, "description": self.description, **self.capabilities.describe(),
                "notes": self.capabilities.notes}


def table() -> list[BackendInfo]:
    """One `BackendInfo` per backend, in priority order."""
    return [BackendInfo(b.name, b.description, b.capabilities) for b in PRIORITY]


#: the columns of `info`'s table
INFO_COLUMNS = ("name", "lens", "grad", "dropout", "dtypes", "devices", "masks", "score mods", "memory")


def info() -> str:
    """A text table of versions and backends (what ``attnlens info`` prints)."""
    lines = [f"attnlens {__version__}  python {platform.python_version()}  numpy {numpy.__version__}  "
             f"torch {torch.__version__}  cuda {'yes' if torch.cuda.is_available() else 'no'}", ""]
    rows = [b.describe() for b in table()]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in INFO_COLUMNS}
    lines.append("  ".join(c.ljust(widths[c]) for c in INFO_COLUMNS))
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in INFO_COLUMNS))
    states = [f"{b.name}: {st}" for b in PRIORITY for st in [b.status()] if st]
    lines += [""] + states if states else []
    lines += ["", "backend='auto' takes the first row that can serve the call (never a dense O(Nq·Nk) path when "
              "a linear-memory one serves it)."]
    return "\n".join(lines)
