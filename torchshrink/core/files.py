"""Writing files and folders so that a crash never leaves a half-written result under its final name:
everything is written beside it under a temp name, flushed to disk, then renamed (the rename is the
commit). Used by ``ts.save``, the ``compress`` run folder and every report / cache file.

``kill_point(name)`` is a test hook: the process SIGKILLs itself there when the environment variable
``TORCHSHRINK_KILL_AT`` equals ``name`` (benchmarks/kill_resume.py walks every point).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

KILL_ENV = "TORCHSHRINK_KILL_AT"


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process here when the environment variable TORCHSHRINK_KILL_AT is ``name``."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / file system can fsync a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, so a renamed folder never holds empty files after a crash."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_atomic(path: Path, text: str, point: str | None = None) -> None:
    """Write ``text`` to a temp file beside ``path``, flush it to disk, then rename it over ``path``.
    ``point`` names the kill point ``<point>:half``, reached with half of the bytes written."""
    data = text.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data[: len(data) // 2])
            if point is not None:
                f.flush()
                kill_point(f"{point}:half")
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes a private file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def temp_dir(final: Path) -> Path:
    """An empty temp folder beside ``final`` (``.NAME.tmp-*``), to be filled and then :func:`commit`-ed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name.lstrip('.')}.tmp-", dir=final.parent))


def commit(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` and rename it to ``final``. An existing ``final`` other than an empty folder (which the
    caller decided may go) is swapped out first and removed only once ``tmp`` is in place."""
    fsync_tree(tmp)
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes a private folder
    if final.is_symlink() or final.is_file() or (final.is_dir() and any(final.iterdir())):
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)  # absent, or an empty folder
    fsync_dir(final.parent)
