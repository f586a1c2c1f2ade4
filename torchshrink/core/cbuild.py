"""Compile a small C kernel that ships with the package into the user's cache, once per source,
compiler flags and CPU, and hand back the shared library's path (None when no compiler works, so
callers fall back to a numpy / torch path)."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def build_shared(src: Path, folder: str, flags: list[str], *, force: bool = False, what: str = "kernel") -> Path | None:
    """``cc -O3 -march=native -shared -fPIC FLAGS src`` into ``<cache>/<folder>/``, written atomically."""
    from torchshrink.zoo.digits import cache_dir

    if not src.is_file():
        log.warning("%s is missing from this install; the %s falls back to a slower path", src.name, what)
        return None
    key = hashlib.sha256(src.read_bytes() + " ".join(flags).encode() + cpu_flags().encode()).hexdigest()[:16]
    path = cache_dir() / folder / f"{src.stem.lstrip('_')}-{key}.so"
    if path.is_file() and not force:
        return path
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        log.warning("no C compiler found; the %s falls back to a slower path", what)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so")
    os.close(fd)
    cmd = [cc, "-O3", "-march=native", "-shared", "-fPIC", *flags, str(src), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log.warning("building the %s failed (%s): %s", what, " ".join(cmd), res.stderr[-500:])
            return None
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        return path
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("building the %s failed (%s)", what, e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
