"""Hugging Face Hub datasets -> rows (lazy `datasets` import), with an offline-aware error."""

from __future__ import annotations

import os
import re

from prefixtune.data.files import extract_row
from prefixtune.data.records import SPLIT_ALIASES, SPLIT_ORDER, DataError, Loc, Row

_LOCAL_HELP = ("to work offline, download it on a machine with internet access (e.g. `datasets.load_dataset("
               "'{id}')[split].to_json(f'{{split}}.jsonl')` for each split), copy that folder here and pass it to "
               "--data; a folder of train/validation/test .jsonl, .csv or .parquet files works")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def load_hub(source: str, text_field: str, label_field: str | None, fields: tuple[str, ...] = ()
              ) -> tuple[dict[str, list[Row]], list[str] | None]:
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
    raw: dict[str, list[Row]] = {}
    hub_names: list[str] | None = None
    for split_name, ds in loaded.items():
        canonical = SPLIT_ALIASES.get(split_name.lower())
        if canonical is None or canonical in raw:
            continue  # extra splits (e.g. imdb's "unsupervised") are not train/validation/test data
        feature = ds.features.get(label_field) if label_field else None
        class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        hub_names = hub_names or class_names
        rows: list[Row] = []
        for i, record in enumerate(ds, 1):
            if class_names is not None and record.get(label_field) == -1:
                record = {k: v for k, v in record.items() if k != label_field}  # ClassLabel -1 = unlabelled
            rows.append(extract_row(Loc(f"hub dataset '{source}' split '{split_name}'", i, "row"), record,
                                 text_field, label_field, fields))
        raw[canonical] = rows
    if not raw:
        raise DataError(f"hub dataset '{source}' has no train/validation/test split (it has: {', '.join(loaded)}). "
                        f"Fix: {help_text}, naming the files train/validation/test", path=source)
    return {s: raw[s] for s in SPLIT_ORDER if s in raw}, hub_names


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
