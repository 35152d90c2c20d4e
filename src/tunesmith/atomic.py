"""Outputs appear whole or not at all: write into a temp sibling, fsync, then rename into place.

Replacing an existing folder swaps the two in one step where the OS can (Linux: renameat2 with RENAME_EXCHANGE),
so at every instant `dest` is either the old folder or the new one. Where it cannot, the old folder is first moved
aside to `.NAME-old` and the new one renamed in; a crash between those two renames leaves `dest` missing and
`.NAME-old` whole, and `recover_folder` (run by every later `atomic_folder` on the same `dest`) moves it back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def umasked(mode: int) -> int:
    """`mode` as a plain open() or mkdir() would create it under the process's umask (mkstemp and mkdtemp make
    0600 and 0700, which an output must not keep)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # no libc by that name, or a glibc older than 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot (nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # this kernel or file system does not do exchanges
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def old_copy(dest: Path) -> Path:
    """Where the two-rename fallback keeps the previous `dest` while the new one is renamed in."""
    return dest.with_name(f".{dest.name}-old")


def recover_folder(dest: str | Path) -> bool:
    """Undo a crash between the fallback's two renames: `dest` missing, its old copy whole → move it back."""
    dest = Path(dest)
    old = old_copy(dest)
    if not dest.exists() and old.is_dir():
        os.replace(old, dest)
        fsync_dir(dest.parent)
        return True
    return False


def _replace_folder(tmp: Path, dest: Path) -> None:
    if exchange(tmp, dest):
        fsync_dir(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = old_copy(dest)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(dest: str | Path):
    """Yield a temp folder beside `dest`; on success it replaces `dest`, on any error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        tmp.chmod(umasked(0o777))
        if dest.exists():
            _replace_folder(tmp, dest)
        else:
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_folder(dest)
        raise


@contextmanager
def atomic_file(dest: str | Path):
    """Yield a temp file's path beside `dest` (the file exists, empty); on success it is fsynced and renamed to
    `dest`, on any error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    os.fchmod(fd, umasked(0o666))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` into `path` through a temp sibling, fsync and rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """`text` into `path` through a temp sibling, fsync and rename."""
    atomic_write_bytes(path, text.encode("utf-8"))
