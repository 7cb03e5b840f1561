"""Where eqlin keeps its per-user cache (converted checkpoints, JAX compilation cache).

`$EQLIN_CACHE_DIR` wins, then `$XDG_CACHE_HOME/eqlin`, then `~/.cache/eqlin`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The eqlin cache folder (not created here)."""
    if os.environ.get("EQLIN_CACHE_DIR"):
        return Path(os.environ["EQLIN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "eqlin"
