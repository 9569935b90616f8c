"""Writing the report's files safely: never through a symbolic link or over a file unless asked,
and atomically (a temporary file in the same folder, then ``os.replace``): a reader sees the old
file or the new one, never half of one, and a failed write leaves no temporary file behind.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["TargetError", "check_target", "write_atomic"]


class TargetError(ValueError):
    """A path that may not be written as asked. ``kind``: ``"symlink"``, ``"exists"``, ``"folder"``
    (it is a folder), ``"special"`` (not a regular file) or ``"no-folder"`` (its folder is missing)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def check_target(path, *, overwrite: bool = False, follow_symlinks: bool = False) -> Path:
    """The file that writing ``path`` would replace, or `TargetError`.

    A symbolic link is refused unless ``follow_symlinks`` (then its target is the file written);
    an existing regular file is refused unless ``overwrite``; a folder or any other kind of file
    always is.
    """
    p = Path(path)
    if p.is_symlink():
        if not follow_symlinks:
            raise TargetError(f"{str(p)!r} is a symbolic link (to {os.readlink(p)!r})", "symlink")
        p = Path(os.path.realpath(p))
    if p.is_dir():
        raise TargetError(f"{str(p)!r} is a folder", "folder")
    if p.exists():
        if not p.is_file():
            raise TargetError(f"{str(p)!r} exists and is not a regular file", "special")
        if not overwrite:
            raise TargetError(f"{str(p)!r} already exists", "exists")
    if not p.parent.is_dir():
        raise TargetError(f"the folder {str(p.parent)!r} does not exist", "no-folder")
    return p


def write_atomic(path, data: bytes, *, overwrite: bool = False, follow_symlinks: bool = False) -> Path:
    """Write ``data`` to ``path`` (checked by `check_target`) through a temporary file in the same
    folder and ``os.replace``; returns the file written. ``OSError`` from the write propagates,
    with the temporary file removed."""
    target = check_target(path, overwrite=overwrite, follow_symlinks=follow_symlinks)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as open() gives, after umask
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)  # replaces a symlink that appeared meanwhile, never writes through it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
