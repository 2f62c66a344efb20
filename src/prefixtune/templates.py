"""Prompt templates: one filling rule for training, generation, evaluation and serving.

`{label}` is replaced literally (not str.format), so a template may hold other braces (JSON, code).
"""

from __future__ import annotations


def fill_template(template: str, label: str | None) -> str:
    return template.replace("{label}", label or "")
