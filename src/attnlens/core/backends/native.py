"""Native code, compiled on first use and loaded with ctypes: the one way attnlens builds C.

Two libraries are built this way: the torch backend's row kernel (``rowsoftmax.c``, `load`) and the fused
CPU backend's kernel (``fused.c``, loaded by ``fused.py`` through `open_library`). CPU float32 only.
``ATTNLENS_NATIVE=0`` turns both off. Whenever one cannot be used (disabled, no compiler, a refused cache,
a library that does not load), attnlens warns once per process per library and uses a path without it
(the eager PyTorch row pass; another backend than the fused one): same results, slower; never an
exception at a call site. ``ATTNLENS_MARCH`` (default ``native``) is the ``-march`` the libraries are
built for (``x86-64-v3`` builds the fused kernel's portable SIMD path on an AVX-512 machine, as tests do).

The cache. The library is built with the machine's C compiler (``$CC`` or ``cc``) into
``$ATTNLENS_CACHE`` (default ``~/.cache/attnlens``), named by a hash of the source, the compiler,
the flags and the CPU, so it is compiled once per machine; delete the directory to drop it. Loading
a shared library runs its code, so the cache is trusted only when it is private:

- the directory is created with mode 0700; it, the library and the library's hash file must be
  owned by the current user and not group/world-writable (the files also regular, not links),
  else the cache is refused: nobody else can then plant or swap a library between our check and
  ``dlopen``. Parents of the directory are not checked;
- every library ``rowsoftmax-<key>.so`` has a side file ``rowsoftmax-<key>.sha256`` holding the
  SHA-256 of its bytes, written at build time. Before ``dlopen`` the library is read and hashed; a
  missing or different hash (a truncated file, an older attnlens's build) means a rebuild, so a
  damaged file is never mapped (mapping one can kill the process with SIGBUS);
- a build runs in a fresh private temporary directory inside the cache and is moved into place by
  ``os.replace`` (atomic; the library first, then its hash, so a reader never pairs a hash with a
  partial file); an interrupted build leaves at most a ``.build-*`` directory, removed on exit or,
  if the process was killed, by the next build once it is an hour old;
- the compiler gets ``COMPILE_TIMEOUT_S`` (60 s); then it and its children are killed and the
  warning says so;
- verifying, building and loading hold an exclusive ``flock`` on the cache directory, so processes that
  start at once build a library once and the others wait for it and load the finished file.

It links the OpenMP runtime that PyTorch already loaded, so it shares PyTorch's threads.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked (the atomic moves and the hash check still hold)
    fcntl = None

SOURCE = Path(__file__).with_name("rowsoftmax.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
SYMBOL = "attnlens_rowsoftmax_f32"
#: seconds the C compiler may take before the build is abandoned (it takes about 1 s)
COMPILE_TIMEOUT_S = 60
#: largest top-k the kernel keeps (insertion into a sorted list); larger k uses torch.topk
MAX_TOPK = 64


class _Refused(Exception):
    """The cache or a file in it is not private to this user."""


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _uid():
    """The current user's id (None where there are no POSIX owners)."""
    return os.getuid() if hasattr(os, "getuid") else None


def _check_private(path: Path, st: os.stat_result) -> None:
    """Raise `_Refused` unless ``path`` is owned by this user and not writable by group or others."""
    if _uid() is not None and st.st_uid != _uid():
        raise _Refused(f"{path} is owned by uid {st.st_uid}, not by this user (uid {_uid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _Refused(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _cache_dir() -> Path:
    """The cache directory, created private (0700) if missing, and checked."""
    cache = Path(os.environ.get("ATTNLENS_CACHE") or Path.home() / ".cache" / "attnlens")
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(cache)
    if not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"{cache} is not a directory")
    _check_private(cache, st)
    return cache


def _verified(lib: Path) -> bool:
    """True if ``lib`` and its hash file exist, are private regular files, and the hash matches."""
    side = lib.with_suffix(".sha256")
    try:
        sts = [os.lstat(lib), os.lstat(side)]
    except FileNotFoundError:
        return False
    for path, st in zip((lib, side), sts):
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{path} is not a regular file")
        _check_private(path, st)
    return hashlib.sha256(lib.read_bytes()).hexdigest() == side.read_text().strip()


def flags() -> list[str]:
    """The compiler flags: `FLAGS` with ``-march`` from ``ATTNLENS_MARCH`` (default ``native``)."""
    march = os.environ.get("ATTNLENS_MARCH") or "native"
    return [f"-march={march}" if f == "-march=native" else f for f in FLAGS]


@contextlib.contextmanager
def _locked(cache: Path):
    """An exclusive ``flock`` on the cache directory (none where ``fcntl`` is missing)."""
    if fcntl is None:
        yield
        return
    fd = os.open(cache, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build(cc: str, lib: Path, source: Path = SOURCE) -> None:
    """Compile into a private temporary directory in the cache, then move library and hash into place."""
    for old in lib.parent.glob(".build-*"):  # left by a killed build
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
        out = Path(tmp) / lib.name
        proc = subprocess.Popen([cc, *flags(), str(source), "-o", str(out), "-lm"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except BaseException as exc:  # timeout or Ctrl-C: stop the compiler and everything it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise RuntimeError(f"the C compiler {cc!r} did not finish within {COMPILE_TIMEOUT_S} s "
                                   "(killed)") from None
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} exited with status {proc.returncode}: {err.strip()}")
        side = out.with_suffix(".sha256")
        side.write_text(hashlib.sha256(out.read_bytes()).hexdigest() + "\n")
        os.replace(out, lib)
        os.replace(side, lib.with_suffix(".sha256"))


def compile_library(source: Path) -> ctypes.CDLL:
    """The library of ``source`` from the private cache, built there first when it is missing or does not match
    its hash (see the module docstring); raises `_Refused` or the build's error."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(source.read_bytes() + " ".join([cc, *flags(), platform.machine(), _cpu_id()]).encode())
    cache = _cache_dir()
    lib = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    with _locked(cache):
        if not _verified(lib):
            _build(cc, lib, source)
            if not _verified(lib):
                raise RuntimeError(f"{lib} changed while it was being built")
        return ctypes.CDLL(str(lib))


def open_library(source: Path, what: str, symbols: tuple = (), fallback: str = "", stacklevel: int = 3):
    """``(library, None)``, or ``(None, reason)`` after one warning naming ``what`` and the ``fallback`` (disabled by
    ``ATTNLENS_NATIVE=0``: no warning). ``symbols`` must all be in the library. Callers cache the answer."""
    if os.environ.get("ATTNLENS_NATIVE", "1") == "0":
        return None, "disabled by ATTNLENS_NATIVE=0"
    state = "could not be built"
    try:
        lib = compile_library(source)
        state = "could not be loaded"
        for name in symbols:
            getattr(lib, name)
        return lib, None
    except _Refused as exc:
        detail, state = str(exc), "cache was refused"
    except Exception as exc:  # any failure falls back; the warning says what happened
        detail = str(getattr(exc, "stderr", None) or exc)
    reason = f"the {what} {state} ({detail.strip()[:300]})"
    warnings.warn(f"attnlens: {reason}; {fallback}. Set ATTNLENS_NATIVE=0 to silence this.", RuntimeWarning,
                  stacklevel=stacklevel)
    return None, reason


@functools.lru_cache(maxsize=None)
def load():
    """The kernel function, or None (disabled, or it cannot be built or loaded: warned once)."""
    lib, _ = open_library(SOURCE, "native row kernel", (SYMBOL,), "using the eager PyTorch path (same results, "
                          "slower lens)", stacklevel=4)
    if lib is None:
        return None
    fn = getattr(lib, SYMBOL)
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [P, I64, I64, I64, ctypes.c_float, P, P, P, P, P, ctypes.c_int32]
    fn.restype = None
    return fn


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
