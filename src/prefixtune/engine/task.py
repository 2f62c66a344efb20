"""Filling a task adapter's template from a row of inputs (generate --input, the server's `inputs`, eval)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefixtune.templates import fill_fields, input_fields


def task_fields(manifest) -> list[str]:
    """The input fields an adapter's template names ([] for label templates, imported or plain adapters)."""
    return input_fields(manifest.template if manifest is not None else None)


def check_inputs(inputs: Any, fields: list[str], who: str) -> dict[str, str]:
    """`inputs` as {field: text} for the fields the template names, or a ValueError that lists them."""
    if not isinstance(inputs, Mapping):
        raise ValueError(f"{who}: inputs must be an object like {json.dumps({f: '...' for f in fields})}, got "
                         f"{type(inputs).__name__}")
    missing = [f for f in fields if f not in inputs]
    if missing:  # other keys are ignored: a data row with its reference beside the inputs is fine
        raise ValueError(f"{who} fills fields {', '.join(fields)}; missing {', '.join(missing)} (got "
                         f"{', '.join(map(str, inputs)) or 'none'}). Fix: give a value for each of those fields")
    bad = [f for f in fields if not isinstance(inputs[f], (str, int, float)) or isinstance(inputs[f], bool)]
    if bad:
        raise ValueError(f"{who}: field(s) {', '.join(bad)} must be text (or a number)")
    return {f: str(inputs[f]).strip() for f in fields}


def render_task(manifest, adapter: str | None, inputs: Any, label: str | None = None, prompt: str = "") -> str:
    """The adapter's training template filled from `inputs` (+ `prompt` after it, as training joined the target)."""
    who = f"adapter {adapter!r}" if adapter is not None else "the base model"
    template = manifest.template if manifest is not None else None
    fields = input_fields(template)
    if not fields:
        raise ValueError(f"{who} was not trained with a task template (its template: {template!r}), so there are "
                         f"no fields to fill. Fix: drop --input / inputs and pass --prompt or --label")
    values = check_inputs(inputs, fields, who)
    if "{label}" in template and label is None:
        raise ValueError(f"{who}'s template {template!r} also needs a label. Fix: pass --label")
    filled = fill_fields(template, values, label)
    return filled + (" " + prompt if prompt else "")


def read_input_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl file (one JSON object per line) for generate --input-file."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as err:
        raise ValueError(f"--input-file {path}: cannot read it ({err.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--input-file {path}, line {n}: invalid JSON ({err.msg}). Fix: one JSON object per "
                             f"line") from None
        if not isinstance(row, dict):
            raise ValueError(f"--input-file {path}, line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"--input-file {path} has no rows")
    return rows
