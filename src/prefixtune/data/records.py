"""The loader's data types: what every format is reduced to, and the error that names a file and a row."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefixtune.errors import UserError

SPLIT_ALIASES: dict[str, str] = {"train": "train", "validation": "validation", "val": "validation",
                                 "valid": "validation", "dev": "validation", "test": "test"}
SPLIT_ORDER = ("train", "validation", "test")
MISSING: Any = object()  # sentinel: a row without a label (distinct from any real label value)
MAX_TEXT_CHARS = 1_000_000  # one example this long is a runaway line (a missing newline), not a text


class DataError(UserError, ValueError):
    """A problem with the user's data; the message names the file, the row and the fix."""

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.row = row


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None = None  # always the label *name* after loading; None for unlabelled data
    inputs: tuple[tuple[str, str], ...] = ()  # (field, value) of each input field a task template names

    @property
    def values(self) -> dict[str, str]:
        """The input fields as a dict (for filling a task template)."""
        return dict(self.inputs)


@dataclass
class DataBundle:
    source: str
    splits: dict[str, list[Example]]
    labels: list[str] | None
    fingerprint: str
    skipped: list[str] = field(default_factory=list)  # why each bad row was skipped (skip_bad_rows=True)

    def split(self, name: str) -> list[Example]:
        canonical = SPLIT_ALIASES.get(name.strip().lower(), name)
        if canonical in self.splits:
            return self.splits[canonical]
        raise DataError(f"{self.source}: no '{name}' split (available: {', '.join(self.splits) or 'none'}). Fix: "
                        f"use one of those, or add a '{canonical}' file (e.g. {canonical}.jsonl) to the data folder")

    def label_counts(self, split: str = "train") -> dict[str, int]:
        """Counts per label name in label order, zeros included; {} for unlabelled data."""
        seen = Counter(ex.label for ex in self.split(split) if ex.label is not None)
        return {} if self.labels is None else {name: seen[name] for name in self.labels}


@dataclass(frozen=True)
class Loc:
    file: str
    row: int
    unit: str  # "line" for line-based files, "item"/"row" otherwise, so the user knows what to count

    def error(self, problem: str, fix: str) -> DataError:
        return DataError(f"{self.file}, {self.unit} {self.row}: {problem}. Fix: {fix}", path=self.file, row=self.row)


Row = tuple[Loc, str, Any, tuple]  # (where, stripped text, raw label or MISSING, input (field, value) pairs)
