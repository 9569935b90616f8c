"""The fused row kernel (``rowsoftmax.c``), compiled on first use and loaded with ctypes.

CPU float32 only. Built with the machine's C compiler (``$CC`` or ``cc``) into a cache
directory (``$ATTNLENS_CACHE``, default ``~/.cache/attnlens``), keyed by the source, the flags
and the CPU, so it is compiled once per machine. ``ATTNLENS_NATIVE=0`` turns it off; when it
cannot be built, attnlens warns once and uses the eager PyTorch path (same results, slower lens).
It links the OpenMP runtime that PyTorch already loaded, so it shares PyTorch's threads.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("rowsoftmax.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
#: largest top-k the kernel keeps (insertion into a sorted list); larger k uses torch.topk
MAX_TOPK = 64


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


@functools.lru_cache(maxsize=None)
def load():
    """The loaded kernel library, or None (disabled, or no compiler)."""
    if os.environ.get("ATTNLENS_NATIVE", "1") == "0":
        return None
    try:
        src = SOURCE.read_bytes()
        cc = os.environ.get("CC", "cc")
        key = hashlib.sha256(src + " ".join([cc, *FLAGS, platform.machine(), _cpu_id()]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("ATTNLENS_CACHE", Path.home() / ".cache" / "attnlens"))
        lib_path = cache / f"rowsoftmax-{key}.so"
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / lib_path.name
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(out, lib_path)  # atomic: concurrent builders never see a partial file
        lib = ctypes.CDLL(str(lib_path))
        fn = lib.attnlens_rowsoftmax_f32
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [P, I64, I64, I64, ctypes.c_float, P, P, P, P, P, ctypes.c_int32]
        fn.restype = None
        return fn
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        warnings.warn(f"attnlens: the native row kernel could not be built ({str(detail).strip()[:200]}); "
                      "using the eager PyTorch path (same results, slower lens). Set ATTNLENS_NATIVE=0 to "
                      "silence this.", RuntimeWarning, stacklevel=3)
        return None


def rowsoftmax(s: torch.Tensor, topk: int, dead_below: float):
    """Fused row pass over contiguous float32 CPU scores ``s (..., n)``, in place (s becomes e).

    Returns ``m, l, t`` of shape ``(..., 1)`` and, if ``topk``, ``(values, indices)`` ``(..., topk)``
    of the raw scores, largest first (see rowsoftmax.c).
    """
    fn = load()
    n = s.shape[-1]
    R = s.numel() // n
    lead = s.shape[:-1]
    m = torch.empty(*lead, 1, dtype=torch.float32)
    l = torch.empty_like(m)
    t = torch.empty_like(m)
    tv = torch.empty(*lead, max(topk, 1), dtype=torch.float32)
    ti = torch.empty(*lead, max(topk, 1), dtype=torch.int64)
    fn(s.data_ptr(), R, n, topk, dead_below, m.data_ptr(), l.data_ptr(), t.data_ptr(), tv.data_ptr(),
       ti.data_ptr(), torch.get_num_threads())
    return m, l, t, ((tv, ti) if topk else None)
