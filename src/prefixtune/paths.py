"""Where prefixtune keeps its caches (a leaf module: nothing of prefixtune imported)."""

from __future__ import annotations

import os
from pathlib import Path


def prefixtune_home() -> Path:
    """Root of prefixtune's caches: ``$PREFIXTUNE_HOME`` or ``~/.cache/prefixtune``."""
    env = os.environ.get("PREFIXTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prefixtune"
