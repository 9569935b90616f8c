"""attnlens: exact scaled dot-product attention that shows what attention does.

>>> import attnlens as al
>>> out, res = al.attention(q, k, v, causal=True, lens=al.Lens(entropy=True, received=True, topk=8))
"""
from . import masks, nn
from .api import attention
from .dispatch import use_backend
from .lens import Lens, LensResult

__version__ = "0.1.0"
__all__ = ["attention", "Lens", "LensResult", "backends", "info", "use_backend", "masks", "nn", "__version__"]


def backends() -> list[dict]:
    """The backends in ``backend="auto"`` priority order, with what each supports."""
    from .dispatch import table

    return table()


def info() -> str:
    """A text table of versions and backends (what ``attnlens info`` prints)."""
    import platform

    import numpy
    import torch

    lines = [f"attnlens {__version__}  python {platform.python_version()}  numpy {numpy.__version__}  "
             f"torch {torch.__version__}  cuda {'yes' if torch.cuda.is_available() else 'no'}", ""]
    rows = backends()
    cols = ["name", "lens", "grad", "dropout", "dtypes", "devices", "memory"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines.append("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    lines += ["", "backend='auto' takes the first row that can serve the call."]
    return "\n".join(lines)
