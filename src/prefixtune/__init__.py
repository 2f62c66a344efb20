"""prefixtune: prefix tuning for causal language models.

`from prefixtune import PrefixLM` works, but `import prefixtune` alone stays light (no torch, no
transformers): the public classes are imported on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefixtune.version import __version__

# public name -> module that defines it
_LAZY = {
    "PrefixLM": "prefixtune.engine.lm",
    "Generation": "prefixtune.engine.generation",
    "AdapterStore": "prefixtune.store",
    "StoreError": "prefixtune.adapter_folder",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from prefixtune.adapter_folder import StoreError
    from prefixtune.engine.generation import Generation
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.store import AdapterStore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prefixtune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
