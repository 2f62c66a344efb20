"""Dataset loader behind every ``--data`` flag: a local folder, a single file, or a Hub dataset id.

Every format is reduced to the same rows (location, text, raw label) first (`files`, `hub`), so validation and
label handling live in one place (`load_data` here) and every error can point at a file and a 1-based row.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

from prefixtune.data.files import SUFFIXES, read_rows, split_files
from prefixtune.data.hub import load_hub
from prefixtune.data.records import (MAX_TEXT_CHARS, MISSING, SPLIT_ALIASES, DataBundle, DataError, Example, Loc,
                                     Row)

__all__ = ["DataBundle", "DataError", "Example", "load_data", "MAX_TEXT_CHARS", "SPLIT_ALIASES"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_INT = re.compile(r"^[+-]?\d+$")


def load_data(source: str, text_field: str = "text", label_field: str | None = "label",
              label_names: list[str] | None = None, max_examples: int | None = None,
              input_fields: Sequence[str] = (), skip_bad_rows: bool = False) -> DataBundle:
    """Load `source` (folder of split files, single file = train, or Hub id) into a validated DataBundle.

    `input_fields` (the fields a task template names) must be present in every row; they are kept on
    each Example as `inputs`. A bad row is an error naming its file and row; with `skip_bad_rows` it is
    skipped and recorded in `DataBundle.skipped` instead (a file that is unreadable as a whole still fails).
    """
    bad: list[str] | None = [] if skip_bad_rows else None
    if not source.strip():  # Path("") is the current directory, which would load whatever happens to be there
        raise DataError("no data source given. Fix: pass --data with a folder, a file or a Hub dataset id")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be a positive number, got {max_examples}. Fix: pass 1 or more")
    names = _check_label_names(label_names)
    label_field = label_field or None  # an empty --label-field means "ignore labels"
    fields = tuple(input_fields)
    path = Path(source).expanduser()
    if path.is_dir():
        raw = {split: [r for f in files for r in read_rows(f, text_field, label_field, fields, bad)]
               for split, files in split_files(path).items()}
    elif path.is_file():
        raw = {"train": read_rows(path, text_field, label_field, fields, bad)}
    elif not _HUB_ID.match(source) or path.suffix.lower() in SUFFIXES:
        # Clearly meant as a path: asking the Hub about it would only hide the real problem (a typo).
        raise DataError(f"{source}: no such file or folder. Fix: check the path (relative paths start at "
                        f"{Path.cwd()})", path=source)
    else:
        raw, hub_names = load_hub(source, text_field, label_field, fields)
        names = names or hub_names
    bundle = _build(source, raw, names, label_field, max_examples, bad)
    bundle.skipped = bad or []
    return bundle


def _check_label_names(label_names: list[str] | None) -> list[str] | None:
    if label_names is None:
        return None
    names = [str(n).strip() for n in label_names]
    if not names or not all(names):
        raise DataError(f"label names {label_names!r} are empty or contain an empty name. Fix: pass --label-names "
                        f"a,b,c")
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"label names repeat {', '.join(dupes)}. Fix: list each label once in --label-names")
    return names


def _label_name(loc: Loc, value: Any, names: list[str] | None) -> str:
    if isinstance(value, str):
        value = value.strip()
        if names is not None and value in names:
            return value
        if not _INT.match(value):
            if names is None:
                return value
            raise loc.error(f"label '{value}' is not one of the label names ({', '.join(names)})",
                            "correct the label, or include it in --label-names")
        # csv/txt cannot tell the index 0 from the name "0"; digits that are not a given name are indices.
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas turns int columns with gaps into floats
    if isinstance(value, bool) or not isinstance(value, int):
        raise loc.error(f"label must be a name or an integer index, got {value!r}", "store labels as names")
    if names is None:
        raise loc.error(f"label {value} is an integer index but no label names are known",
                        "pass --label-names a,b,c (the names in index order)")
    if not 0 <= value < len(names):
        raise loc.error(f"label {value} is out of range for {len(names)} label names (0..{len(names) - 1})",
                        "correct the label, or pass the full list with --label-names")
    return names[value]


def _build(source: str, raw: dict[str, list[Row]], names: list[str] | None, label_field: str | None,
           max_examples: int | None, bad: list[str] | None = None) -> DataBundle:
    splits: dict[str, list[Example]] = {}
    for split, rows in raw.items():
        # A whole split may be unlabelled (Kaggle/GLUE test sets), but a split with gaps is a data bug.
        labelled = [r for r in rows if r[2] is not MISSING]
        if bad is not None and labelled and len(labelled) < len(rows):
            bad.extend(f"{loc.file}, {loc.unit} {loc.row}: no '{label_field}' value" for loc, _, lab, _ in rows
                       if lab is MISSING)
            rows = labelled
        if bad is not None:
            rows = [r for r in rows if _label_ok(r, names, bad)]
        if labelled and len(labelled) < len(rows):
            loc = next(r[0] for r in rows if r[2] is MISSING)
            first = labelled[0][0]
            raise loc.error(f"no '{label_field}' value, but other rows of the {split} split have one "
                            f"(e.g. {first.file}, {first.unit} {first.row})",
                            "give every row a label, or remove the labels from the whole split")
        splits[split] = [Example(text, None if lab is MISSING else _label_name(loc, lab, names), inputs)
                         for loc, text, lab, inputs in rows]
    seen = {ex.label for examples in splits.values() for ex in examples if ex.label is not None}
    # Computed before capping so max_examples never changes the label order (and hence label ids).
    labels = (list(names) if names else sorted(seen)) if seen else None
    if max_examples is not None:
        splits = {s: examples[:max_examples] for s, examples in splits.items()}
    return DataBundle(source=source, splits=splits, labels=labels, fingerprint=_fingerprint(splits, labels))


def _label_ok(row: Row, names: list[str] | None, bad: list[str]) -> bool:
    loc, _, label, _ = row
    if label is MISSING:
        return True
    try:
        _label_name(loc, label, names)
        return True
    except DataError as err:
        bad.append(str(err))
        return False


def _fingerprint(splits: dict[str, list[Example]], labels: list[str] | None) -> str:
    # Hash the loaded content (not file bytes), so reformatting a file without changing the data keeps the id.
    digest = hashlib.sha256(json.dumps(labels, ensure_ascii=False).encode())
    for split, examples in splits.items():
        for ex in examples:
            # Inputs only when a task template names some, so label data keeps its fingerprint.
            item = [split, ex.text, ex.label] + ([list(map(list, ex.inputs))] if ex.inputs else [])
            digest.update(json.dumps(item, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]
