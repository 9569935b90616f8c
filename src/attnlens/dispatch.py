"""Backend priority, selection and forcing.

``backend="auto"`` takes the first backend, in priority order, that gives no reason it cannot
serve the call (`Backend.not_supported_reasons`) nor a reason to be passed over by auto
(`Backend.auto_reasons`). Naming a backend that cannot serve the call raises an error listing its
reasons; when none can, the error lists every backend's reasons.
"""
from __future__ import annotations

import contextlib
import contextvars

from ._inputs import AttnInputs
from ._backends import Backend
from ._backends.reference import ReferenceBackend
from ._backends.torch_chunked import TorchChunkedBackend
from ._backends.torch_sdpa import SdpaBackend
from ._backends.triton import TritonBackend

#: priority order for backend="auto"
PRIORITY: list[Backend] = [TritonBackend(), SdpaBackend(), TorchChunkedBackend(), ReferenceBackend()]
_BY_NAME = {b.name: b for b in PRIORITY}
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnlens_backend", default=None)


def names() -> list[str]:
    return [b.name for b in PRIORITY]


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {['auto'] + names()}; got {type(name).__name__}")
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}; expected one of {['auto'] + names()}")
    return _BY_NAME[name]


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ``attention(..., backend="auto")`` uses backend ``name``.

    >>> with attnlens.use_backend("torch"):
    ...     out = attnlens.attention(q, k, v)
    """
    if name != "auto":
        get(name)
    token = _FORCED.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def select(inp: AttnInputs, backend: str = "auto") -> Backend:
    if backend == "auto":
        backend = _FORCED.get() or "auto"
    if backend != "auto":
        b = get(backend)
        reasons = b.not_supported_reasons(inp)
        if reasons:
            raise ValueError(f"backend {b.name!r} cannot serve this call: " + "; ".join(reasons))
        return b
    all_reasons = {}
    for b in PRIORITY:
        reasons = b.not_supported_reasons(inp) or b.auto_reasons(inp)
        if not reasons:
            return b
        all_reasons[b.name] = reasons
    detail = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in all_reasons.items())
    raise ValueError(f"no backend can serve this call:\n{detail}")


def table() -> list[dict]:
    """One row per backend in priority order: name, description and capabilities."""
    return [{"name": b.name, "description": b.description, **b.capabilities} for b in PRIORITY]
