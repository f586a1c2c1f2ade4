"""torchshrink's cache folder: ``$TORCHSHRINK_CACHE``, else ``$XDG_CACHE_HOME/torchshrink`` (``~/.cache``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("TORCHSHRINK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torchshrink"
    )
    return Path(base)
