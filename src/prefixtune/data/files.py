"""Local files -> rows: a folder of split files or one file, in .jsonl, .json, .csv, .parquet or .txt."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

from prefixtune.data.records import MAX_TEXT_CHARS, MISSING, SPLIT_ALIASES, SPLIT_ORDER, DataError, Loc, Row

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# Hub snapshots shard files as "train-00000-of-00002.parquet"; accepting that lets a downloaded folder work as-is.
_SHARD = re.compile(r"^(?P<split>[a-z]+)-\d+-of-\d+$")
_KAGGLE_HEADERS = ("text;label", "text;label_name")


def split_files(folder: Path) -> dict[str, list[Path]]:
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
            if p.suffix.lower() not in SUFFIXES:
                raise _unsupported(p)
            found.setdefault(split, []).append(p)
        for split, files in found.items():
            # Shards of one split concatenate; two differently named files (val.txt + dev.jsonl) are ambiguous.
            if len(files) > 1 and not all(_SHARD.match(f.stem.lower()) for f in files):
                raise DataError(f"{folder}: {' and '.join(f.name for f in files)} are all '{split}' data. "
                                f"Fix: keep only one of them", path=str(folder))
        if found:
            return {s: found[s] for s in SPLIT_ORDER if s in found}
    present = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    raise DataError(f"{folder}: no split files found (data files here: {', '.join(present) or 'none'}). Fix: name "
                    f"them train/validation/test (or val/dev/valid) with a {'/'.join(SUFFIXES)} extension",
                    path=str(folder))


def _unsupported(path: Path) -> DataError:
    return DataError(f"{path}: unsupported file type '{path.suffix or '(none)'}'. Fix: convert it to one of "
                     f"{', '.join(SUFFIXES)}", path=str(path))


def read_rows(path: Path, text_field: str, label_field: str | None, fields: tuple[str, ...] = (),
               bad: list[str] | None = None) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
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
            rows.append(extract_row(loc, rec, text_field, label_field, fields))
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


def _json_lines(path: Path, text: str) -> Iterator[tuple[Loc, Any]]:
    # split("\n") rather than splitlines(): U+2028 may legally appear unescaped inside a JSON string.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = DataError(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno}). Fix: each line must "
                               f"be one complete JSON object", path=str(path), row=n)
        yield Loc(str(path), n, "line"), record


def _json(path: Path, text: str) -> Iterator[tuple[Loc, Any]]:
    if not text.lstrip().startswith("["):
        yield from _json_lines(path, text)  # .json is often JSON lines in practice
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}). Fix: the file must "
                        f"be a JSON list of objects or one object per line", path=str(path), row=e.lineno) from None
    for i, record in enumerate(items, 1):
        yield Loc(str(path), i, "item"), record


def _csv(path: Path, text: str) -> Iterator[tuple[Loc, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for record in reader:
            # line_num is the physical line the record ends on (header = line 1), which is what editors show.
            yield Loc(str(path), reader.line_num, "line"), {k: v for k, v in record.items() if k is not None}
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({e}). Fix: check the quoting on that line",
                        path=str(path), row=reader.line_num) from None


def _parquet(path: Path) -> Iterator[tuple[Loc, Any]]:
    try:
        import pyarrow.parquet as pq  # lazy: pyarrow is heavy and only parquet needs it
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({e}). Fix: re-export the file", path=str(path)) from None
    for i, record in enumerate(records, 1):
        yield Loc(str(path), i, "row"), record


def _txt(path: Path, text: str, text_field: str, label_field: str | None) -> Iterator[tuple[Loc, Any]]:
    lines = [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    # Kaggle emotion-style "text;label" if any line has a ';'; otherwise it is plain text, one example per line.
    kaggle = any(";" in line for _, line in lines)
    for i, (n, line) in enumerate(lines):
        loc = Loc(str(path), n, "line")
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


def extract_row(loc: Loc, record: Any, text_field: str, label_field: str | None, fields: tuple[str, ...] = ()) -> Row:
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
    label = record.get(label_field, MISSING) if label_field else MISSING
    # null, NaN and blank cells are how csv/parquet/pandas write "no label"; treat them like an absent field.
    blank = label is None or (isinstance(label, float) and math.isnan(label)) or str(label).strip() == ""
    return loc, text, MISSING if blank else label, _inputs(loc, record, fields)


def _inputs(loc: Loc, record: dict, fields: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
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
