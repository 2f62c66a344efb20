"""templates.py: label templates fill exactly as before; task templates name any row field."""

from __future__ import annotations

import pytest

from prefixtune.templates import (TemplateError, fill_fields, fill_template, input_fields, is_task_template,
                                  template_fields)


def test_label_templates_are_unchanged():
    assert fill_template("Emotion: {label}\nText:", "joy") == "Emotion: joy\nText:"
    assert not is_task_template("Emotion: {label}\nText:") and input_fields("Text:") == []
    # Braces that are not identifiers (JSON, code) stay as written.
    assert template_fields('{"a": 1} {label}') == ["label"]
    assert fill_fields('{"a": 1} {label}', {}, "joy") == '{"a": 1} joy'


def test_task_templates_name_fields_and_fill_in_one_pass():
    template = "Summarize: {document}\nTitle: {title}\nLabel {label}\nSummary:"
    assert template_fields(template) == ["document", "title", "label"]
    assert input_fields(template) == ["document", "title"] and is_task_template(template)
    filled = fill_fields(template, {"document": "a {title} b", "title": "T"}, "x")
    assert filled == "Summarize: a {title} b\nTitle: T\nLabel x\nSummary:"  # a value is never expanded again
    with pytest.raises(TemplateError, match="needs field.*title"):
        fill_fields(template, {"document": "d"})
