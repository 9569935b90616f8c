"""attnlens: exact scaled dot-product attention that shows what attention does.

>>> import attnlens as al
>>> out, res = al.attention(q, k, v, causal=True, lens=al.Lens(entropy=True, received=True, topk=8))
"""
from . import masks, nn
from ._backends.reference import ReferenceBackend
from ._backends.torch_chunked import TorchChunkedBackend
from ._backends.torch_sdpa import SdpaBackend
from ._backends.triton import TritonBackend
from .api import attention, merge
from .dispatch import BackendInfo, use_backend
from .lens import Lens, LensResult
from .notebook import Report, explain, explain_capture

__version__ = "0.1.0"
__all__ = ["attention", "merge", "Lens", "LensResult", "backends", "info", "use_backend", "BackendInfo",
           "TorchChunkedBackend", "TritonBackend", "SdpaBackend", "ReferenceBackend", "masks", "nn", "__version__",
           "explain", "explain_capture", "Report"]


def backends() -> list[BackendInfo]:
    """The backends in ``backend="auto"`` priority order: each a `BackendInfo` (``name``, ``description``,
    typed ``capabilities``; ``describe()`` gives display strings)."""
    from .dispatch import table

    return table()


#: the columns of `info`'s table
INFO_COLUMNS = ("name", "lens", "grad", "dropout", "dtypes", "devices", "masks", "score mods", "memory")


def info() -> str:
    """A text table of versions and backends (what ``attnlens info`` prints)."""
    import platform

    import numpy
    import torch

    lines = [f"attnlens {__version__}  python {platform.python_version()}  numpy {numpy.__version__}  "
             f"torch {torch.__version__}  cuda {'yes' if torch.cuda.is_available() else 'no'}", ""]
    rows = [b.describe() for b in backends()]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in INFO_COLUMNS}
    lines.append("  ".join(c.ljust(widths[c]) for c in INFO_COLUMNS))
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in INFO_COLUMNS))
    lines += ["", "backend='auto' takes the first row that can serve the call (never a dense O(Nq·Nk) path when "
              "a linear-memory one serves it)."]
    return "\n".join(lines)
