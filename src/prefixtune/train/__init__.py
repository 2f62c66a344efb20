"""Training: data -> tokenized examples -> length-grouped batches -> the prefix core -> adapter folders."""

from prefixtune.train.config import TrainConfig

__all__ = ["TrainConfig"]
