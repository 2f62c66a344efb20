"""Dataset loader behind every ``--data`` flag: a local folder, a single file, or a Hub dataset id.

Every format is reduced to the same rows (location, text, raw label) first, so validation and label
handling live in one place and every error can point at a file and a 1-based row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["DataBundle", "DataError", "Example", "load_data", "SPLIT_ALIASES"]

SPLIT_ALIASES: dict[str, str] = {"train": "train", "validation": "validation", "val": "validation",
                                 "valid": "validation", "dev": "validation", "test": "test"}
_SPLIT_ORDER = ("train", "validation", "test")
_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# Hub snapshots shard files as "train-00000-of-00002.parquet"; accepting that lets a downloaded folder work as-is.
_SHARD = re.compile(r"^(?P<split>[a-z]+)-\d+-of-\d+$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_INT = re.compile(r"^[+-]?\d+$")
_KAGGLE_HEADERS = ("text;label", "text;label_name")
_MISSING: Any = object()  # sentinel: a row without a label (distinct from any real label value)
_LOCAL_HELP = ("to work offline, download it on a machine with internet access (e.g. `datasets.load_dataset("
               "'{id}')[split].to_json(f'{{split}}.jsonl')` for each split), copy that folder here and pass it to "
               "--data; a folder of train/validation/test .jsonl, .csv or .parquet files works")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
MAX_TEXT_CHARS = 1_000_000  # one example this long is a runaway line (a missing newline), not a text


class DataError(ValueError):
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
class _Loc:
    file: str
    row: int
    unit: str  # "line" for line-based files, "item"/"row" otherwise, so the user knows what to count

    def error(self, problem: str, fix: str) -> DataError:
        return DataError(f"{self.file}, {self.unit} {self.row}: {problem}. Fix: {fix}", path=self.file, row=self.row)


_Row = tuple[_Loc, str, Any, tuple]  # (where, stripped text, raw label or _MISSING, input (field, value) pairs)


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
        raw = {split: [r for f in files for r in _read_rows(f, text_field, label_field, fields, bad)]
               for split, files in _split_files(path).items()}
    elif path.is_file():
        raw = {"train": _read_rows(path, text_field, label_field, fields, bad)}
    elif not _HUB_ID.match(source) or path.suffix.lower() in _SUFFIXES:
        # Clearly meant as a path: asking the Hub about it would only hide the real problem (a typo).
        raise DataError(f"{source}: no such file or folder. Fix: check the path (relative paths start at "
                        f"{Path.cwd()})", path=source)
    else:
        raw, hub_names = _load_hub(source, text_field, label_field, fields)
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


def _split_files(folder: Path) -> dict[str, list[Path]]:
    # Hub snapshots keep their files under data/, so look there when the folder itself has none.
    for base in (folder, folder / "data"):
        if not base.is_dir():
            continue
        found: dict[str, list[Path]] = {}
        for p in sorted(base.iterdir()):
            stem = p.stem.lower()
            shard = _SHARD.match(stem)
            split = SPLIT_ALIASES.get(shard["split"] if shard else stem)
            if not p.is_file() or split is None:
                continue
            if p.suffix.lower() not in _SUFFIXES:
                raise _unsupported(p)
            found.setdefault(split, []).append(p)
        for split, files in found.items():
            # Shards of one split concatenate; two differently named files (val.txt + dev.jsonl) are ambiguous.
            if len(files) > 1 and not all(_SHARD.match(f.stem.lower()) for f in files):
                raise DataError(f"{folder}: {' and '.join(f.name for f in files)} are all '{split}' data. "
                                f"Fix: keep only one of them", path=str(folder))
        if found:
            return {s: found[s] for s in _SPLIT_ORDER if s in found}
    present = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)
    raise DataError(f"{folder}: no split files found (data files here: {', '.join(present) or 'none'}). Fix: name "
                    f"them train/validation/test (or val/dev/valid) with a {'/'.join(_SUFFIXES)} extension",
                    path=str(folder))


def _unsupported(path: Path) -> DataError:
    return DataError(f"{path}: unsupported file type '{path.suffix or '(none)'}'. Fix: convert it to one of "
                     f"{', '.join(_SUFFIXES)}", path=str(path))


def _read_rows(path: Path, text_field: str, label_field: str | None, fields: tuple[str, ...] = (),
               bad: list[str] | None = None) -> list[_Row]:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise _unsupported(path)
    if suffix == ".parquet":
        records = _parquet(path)
    elif suffix == ".txt":  # the only format whose field names come from the caller, not the file
        records = _txt(path, _read_text(path, bad), text_field, label_field)
    else:
        records = {".jsonl": _json_lines, ".json": _json, ".csv": _csv}[suffix](path, _read_text(path, bad))
    rows = []
    for loc, rec in records:
        try:
            if isinstance(rec, DataError):  # a line that is not JSON: reported here so it can be skipped
                raise rec
            rows.append(_extract(loc, rec, text_field, label_field, fields))
        except DataError as err:
            if bad is None:
                raise
            bad.append(str(err))
    if not rows:
        raise DataError(f"{path}: contains no examples. Fix: add rows or remove the file", path=str(path))
    return rows


def _read_text(path: Path, bad: list[str] | None = None) -> str:
    try:
        # Decode ourselves (no newline translation) so csv sees the real line endings; -sig drops Excel's BOM.
        data = path.read_bytes()
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        if bad is None:
            raise DataError(f"{path}, line {line}: not valid UTF-8 text ({e.reason} at byte {e.start}). Fix: re-save "
                            f"it as UTF-8, or pass --skip-bad-rows", path=str(path), row=line) from None
        lines = data.split(b"\n")
        for n, raw in enumerate(lines):  # blank the undecodable lines (keeps the numbering) and record them
            try:
                raw.decode("utf-8-sig" if n == 0 else "utf-8")
            except UnicodeDecodeError:
                bad.append(f"{path}, line {n + 1}: not valid UTF-8 text")
                lines[n] = b""
        return b"\n".join(lines).decode("utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror}). Fix: check the path and its permissions",
                        path=str(path)) from None


def _json_lines(path: Path, text: str) -> Iterator[tuple[_Loc, Any]]:
    # split("\n") rather than splitlines(): U+2028 may legally appear unescaped inside a JSON string.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = DataError(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno}). Fix: each line must "
                               f"be one complete JSON object", path=str(path), row=n)
        yield _Loc(str(path), n, "line"), record


def _json(path: Path, text: str) -> Iterator[tuple[_Loc, Any]]:
    if not text.lstrip().startswith("["):
        yield from _json_lines(path, text)  # .json is often JSON lines in practice
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}). Fix: the file must "
                        f"be a JSON list of objects or one object per line", path=str(path), row=e.lineno) from None
    for i, record in enumerate(items, 1):
        yield _Loc(str(path), i, "item"), record


def _csv(path: Path, text: str) -> Iterator[tuple[_Loc, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for record in reader:
            # line_num is the physical line the record ends on (header = line 1), which is what editors show.
            yield _Loc(str(path), reader.line_num, "line"), {k: v for k, v in record.items() if k is not None}
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e}). Fix: check the quoting on that line",
                        path=str(path), row=reader.line_num) from None


def _parquet(path: Path) -> Iterator[tuple[_Loc, Any]]:
    try:
        import pyarrow.parquet as pq  # lazy: pyarrow is heavy and only parquet needs it
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({e}). Fix: re-export the file", path=str(path)) from None
    for i, record in enumerate(records, 1):
        yield _Loc(str(path), i, "row"), record


def _txt(path: Path, text: str, text_field: str, label_field: str | None) -> Iterator[tuple[_Loc, Any]]:
    lines = [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    # Kaggle emotion-style "text;label" if any line has a ';'; otherwise it is plain text, one example per line.
    kaggle = any(";" in line for _, line in lines)
    for i, (n, line) in enumerate(lines):
        loc = _Loc(str(path), n, "line")
        if not kaggle:
            yield loc, {text_field: line}
            continue
        if i == 0 and line.replace(" ", "").lower() in _KAGGLE_HEADERS:
            continue
        body, sep, label = line.rpartition(";")  # the last ';' so texts may contain ';' themselves
        if not sep:
            raise loc.error("no ';label' at the end, but other lines have one",
                            "end every line with ';<label>' (the file is read as 'text;label' lines)")
        yield loc, {text_field: body, **({label_field: label} if label_field else {})}


def _extract(loc: _Loc, record: Any, text_field: str, label_field: str | None, fields: tuple[str, ...] = ()) -> _Row:
    if not isinstance(record, dict):
        raise loc.error(f"expected an object with a '{text_field}' field, got {type(record).__name__}",
                        "make every row an object like {\"" + text_field + "\": ...}")
    if text_field not in record:
        fields = ", ".join(repr(str(k)) for k in record) or "none"
        raise loc.error(f"no '{text_field}' field (fields present: {fields})",
                        "pass --text-field with the name of the field that holds the text")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise loc.error(f"'{text_field}' must be a string, got {type(text).__name__}",
                        "store the text as a string, or pass --text-field for the right field")
    text = (text or "").strip()
    if not text:
        raise loc.error(f"'{text_field}' is empty", "fill in the text or delete the row")
    if len(text) > MAX_TEXT_CHARS:
        raise loc.error(f"'{text_field}' is {len(text):,} characters long (limit {MAX_TEXT_CHARS:,}): a runaway "
                        "line?", "split or shorten it, or pass --skip-bad-rows")
    label = record.get(label_field, _MISSING) if label_field else _MISSING
    # null, NaN and blank cells are how csv/parquet/pandas write "no label"; treat them like an absent field.
    blank = label is None or (isinstance(label, float) and math.isnan(label)) or str(label).strip() == ""
    return loc, text, _MISSING if blank else label, _inputs(loc, record, fields)


def _inputs(loc: _Loc, record: dict, fields: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The (field, value) pairs a task template fills in; a missing or null field names the row's fields."""
    pairs = []
    for name in fields:
        value = record.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            present = ", ".join(repr(str(k)) for k in record) or "none"
            what = "no value for it" if name in record else "no such field"
            raise loc.error(f"the template names field '{name}' but this row has {what} (fields present: {present})",
                            "fix the field name in --template, or give every row that field")
        pairs.append((name, value.strip() if isinstance(value, str) else str(value)))
    return tuple(pairs)


def _label_name(loc: _Loc, value: Any, names: list[str] | None) -> str:
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


def _load_hub(source: str, text_field: str, label_field: str | None, fields: tuple[str, ...] = ()
              ) -> tuple[dict[str, list[_Row]], list[str] | None]:
    help_text = _LOCAL_HELP.format(id=source)
    try:
        import datasets  # lazy: importing datasets costs about a second and most runs use local files
    except ImportError:
        raise DataError(f"'{source}' is not a local file or folder, and the 'datasets' package needed to load it from "
                        f"the Hugging Face Hub is not installed. Fix: pip install datasets, or {help_text}") from None
    try:
        loaded = datasets.load_dataset(source)
    except Exception as e:  # the Hub client raises many types; the user needs one clear message, not a trace
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if _is_offline(e):
            raise DataError(f"'{source}' is not a local file or folder, and the Hugging Face Hub is unreachable "
                            f"(offline: {reason}). Fix: {help_text}", path=source) from None
        raise DataError(f"'{source}' is not a local file or folder, and loading it from the Hugging Face Hub "
                        f"failed ({reason}). Fix: check the dataset id, or {help_text}", path=source) from None
    raw: dict[str, list[_Row]] = {}
    hub_names: list[str] | None = None
    for split_name, ds in loaded.items():
        canonical = SPLIT_ALIASES.get(split_name.lower())
        if canonical is None or canonical in raw:
            continue  # extra splits (e.g. imdb's "unsupervised") are not train/validation/test data
        feature = ds.features.get(label_field) if label_field else None
        class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        hub_names = hub_names or class_names
        rows: list[_Row] = []
        for i, record in enumerate(ds, 1):
            if class_names is not None and record.get(label_field) == -1:
                record = {k: v for k, v in record.items() if k != label_field}  # ClassLabel -1 = unlabelled
            rows.append(_extract(_Loc(f"hub dataset '{source}' split '{split_name}'", i, "row"), record,
                                 text_field, label_field, fields))
        raw[canonical] = rows
    if not raw:
        raise DataError(f"hub dataset '{source}' has no train/validation/test split (it has: {', '.join(loaded)}). "
                        f"Fix: {help_text}, naming the files train/validation/test", path=source)
    return {s: raw[s] for s in _SPLIT_ORDER if s in raw}, hub_names


def _is_offline(error: BaseException) -> bool:
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS):
        return True
    seen: BaseException | None = error
    while seen is not None:  # the network error is usually wrapped a few causes deep, under varied class names
        if isinstance(seen, (ConnectionError, TimeoutError)) or re.search("Connect|Timeout|Offline",
                                                                          type(seen).__name__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _build(source: str, raw: dict[str, list[_Row]], names: list[str] | None, label_field: str | None,
           max_examples: int | None, bad: list[str] | None = None) -> DataBundle:
    splits: dict[str, list[Example]] = {}
    for split, rows in raw.items():
        # A whole split may be unlabelled (Kaggle/GLUE test sets), but a split with gaps is a data bug.
        labelled = [r for r in rows if r[2] is not _MISSING]
        if bad is not None and labelled and len(labelled) < len(rows):
            bad.extend(f"{loc.file}, {loc.unit} {loc.row}: no '{label_field}' value" for loc, _, lab, _ in rows
                       if lab is _MISSING)
            rows = labelled
        if bad is not None:
            rows = [r for r in rows if _label_ok(r, names, bad)]
        if labelled and len(labelled) < len(rows):
            loc = next(r[0] for r in rows if r[2] is _MISSING)
            first = labelled[0][0]
            raise loc.error(f"no '{label_field}' value, but other rows of the {split} split have one "
                            f"(e.g. {first.file}, {first.unit} {first.row})",
                            "give every row a label, or remove the labels from the whole split")
        splits[split] = [Example(text, None if lab is _MISSING else _label_name(loc, lab, names), inputs)
                         for loc, text, lab, inputs in rows]
    seen = {ex.label for examples in splits.values() for ex in examples if ex.label is not None}
    # Computed before capping so max_examples never changes the label order (and hence label ids).
    labels = (list(names) if names else sorted(seen)) if seen else None
    if max_examples is not None:
        splits = {s: examples[:max_examples] for s, examples in splits.items()}
    return DataBundle(source=source, splits=splits, labels=labels, fingerprint=_fingerprint(splits, labels))


def _label_ok(row: _Row, names: list[str] | None, bad: list[str]) -> bool:
    loc, _, label, _ = row
    if label is _MISSING:
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
