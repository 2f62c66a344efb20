"""Prompt templates: one filling rule for training, generation, evaluation and serving.

`{label}` is replaced literally (not str.format), so a template may hold other braces (JSON, code).
A task template also names input fields of the row: `"{meaning_representation}\\n"`,
`"Summarize: {document}\\nSummary:"`. A placeholder is `{name}` with `name` an identifier
(letters, digits, `_`, `.`, `-`, not starting with a digit); anything else in braces is kept as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from prefixtune.errors import UserError

LABEL = "label"
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


class TemplateError(UserError, ValueError):
    """A template that cannot be filled (a field it names is missing); the message names it and the fix."""


def fill_template(template: str, label: str | None) -> str:
    return template.replace("{label}", label or "")


def template_fields(template: str | None) -> list[str]:
    """Every `{name}` the template names, in order of first use (`label` included)."""
    return list(dict.fromkeys(_FIELD.findall(template or "")))


def input_fields(template: str | None) -> list[str]:
    """The row fields a task template fills in (every placeholder but `{label}`); [] for label templates."""
    return [name for name in template_fields(template) if name != LABEL]


def is_task_template(template: str | None) -> bool:
    return bool(input_fields(template))


def fill_fields(template: str, values: Mapping[str, str], label: str | None = None) -> str:
    """Fill every placeholder in one pass (a value that itself contains `{x}` is not expanded again).

    Templates without input fields go through `fill_template`, so label templates fill exactly as before.
    """
    if not is_task_template(template):
        return fill_template(template, label)
    missing = [name for name in input_fields(template) if name not in values]
    if missing:
        raise TemplateError(f"template {template!r} needs field(s) {', '.join(missing)} but got "
                            f"{', '.join(sorted(values)) or 'none'}. Fix: give a value for every field it names")

    def one(match: re.Match) -> str:
        name = match.group(1)
        return (label or "") if name == LABEL else str(values[name])

    return _FIELD.sub(one, template)
