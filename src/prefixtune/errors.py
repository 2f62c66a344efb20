"""The errors a user can cause and fix; the CLI prints them as one line instead of a stack trace."""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    # Imported lazily: the CLI must start fast, before torch/transformers are needed.
    from prefixtune.data import DataError
    from prefixtune.models import ModelLoadError
    from prefixtune.prefix.peft_io import AdapterFormatError
    from prefixtune.prefix.shapes import ShapeMismatchError, UnsupportedModelError
    from prefixtune.store import StoreError
    from prefixtune.train.checkpoint import CheckpointError
    from prefixtune.train.config import ConfigError

    return (DataError, ModelLoadError, AdapterFormatError, ShapeMismatchError, UnsupportedModelError, StoreError,
            ConfigError, CheckpointError)
