"""Where miniplm keeps what it builds once per machine (the default corpus, packaged tokenizers, task files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MINIPLM_CACHE, else $XDG_CACHE_HOME/miniplm, else ~/.cache/miniplm."""
    root = os.environ.get("MINIPLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "miniplm"
    return Path(root).expanduser()
