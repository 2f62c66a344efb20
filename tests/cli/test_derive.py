"""cli/derive.py: flags from a config dataclass's fields, help from their doc comments."""

from __future__ import annotations

import importlib
import subprocess
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from prefixtune.cli import app, eval_cmd, generate_cmd, serve_cmd, train_cmd
from prefixtune.cli.derive import _NO_DEFAULT, FieldDocError, Spec, config_flags, read_fields

CONFIG_SOURCE = '''
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Base:
    seed: int = 0  # seeds everything


@dataclass
class Settings(Base):
    max_steps: int | None = None  # optimizer steps (overrides epochs)
    lr: Optional[float] = 3e-4  # peak learning rate
    per_label: bool = False  # one adapter per label
    balance: bool = True  # equal rows per label
    labels: list[str] | None = None  # only these labels
    scales: list[float] = field(default_factory=list)  # guidance scales
    roots: list[Path] = field(default_factory=list)  # folders adapters may come from
    text_field: str = "text"  # field holding the text
    big: int = 1 << 20  # a constant expression
    table: dict[str, int] = field(default_factory=dict)  # a mapping has no flag
    undocumented: int = 3
'''


@pytest.fixture()
def settings_module(tmp_path, monkeypatch):
    (tmp_path / "derive_sample.py").write_text(CONFIG_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "derive_sample:Settings"
    sys.modules.pop("derive_sample", None)


def _app(spec: Spec) -> tuple[typer.Typer, dict]:
    seen: dict = {}
    cli = typer.Typer()

    @cli.command()
    @config_flags(spec)
    def run(name: str = typer.Option("x", "--name", "-N", help="An explicit option."), **given) -> None:
        seen.clear()
        seen.update(given, name=name)

    @cli.command()
    def other() -> None:  # a second command keeps `run` a subcommand, as in the real app
        pass

    return cli, seen


def _invoke(cli: typer.Typer, *args: str):
    return CliRunner().invoke(cli, ["run", *args])


EXCLUDE = {"table": "a mapping", "undocumented": "tested on its own"}


def test_flags_types_and_not_given(settings_module):
    cli, seen = _app(Spec(settings_module, exclude=EXCLUDE, names={"per_label": ("--per-label/--single",),
                                                                  "text_field": ("--text-field", "--target-field")}))
    result = _invoke(cli, "--max-steps", "5", "--lr", "0.01", "--per-label", "--no-balance", "--labels", "joy, anger",
                     "--scales", "1,2.5", "--roots", "a,b/c", "--target-field", "mr", "-N", "y", "--big", "7")
    assert result.exit_code == 0, result.output
    assert seen == {"max_steps": 5, "lr": 0.01, "per_label": True, "balance": False, "labels": ["joy", "anger"],
                    "scales": [1.0, 2.5], "roots": [Path("a"), Path("b/c")], "text_field": "mr", "name": "y",
                    "big": 7}
    assert type(seen["max_steps"]) is int and type(seen["lr"]) is float
    assert _invoke(cli, "--single", "--seed", "3").exit_code == 0
    assert seen == {"per_label": False, "seed": 3, "name": "x"}  # what was not given is absent (None = not given)
    assert _invoke(cli).exit_code == 0 and seen == {"name": "x"}


def test_bad_values_name_the_flag(settings_module):
    cli, _ = _app(Spec(settings_module, exclude=EXCLUDE))
    bad_number = _invoke(cli, "--scales", "1,x")
    assert bad_number.exit_code == 2 and "--scales takes comma-separated numbers" in bad_number.output
    bad_int = _invoke(cli, "--max-steps", "many")
    assert bad_int.exit_code == 2 and "max-steps" in bad_int.output
    assert _invoke(cli, "--no-such", "1").exit_code == 2


def test_help_is_the_doc_comment_with_the_default(settings_module):
    cli, _ = _app(Spec(settings_module, exclude=EXCLUDE, names={"per_label": ("--per-label/--single",)}))
    params = {p.name: p for p in get_command(cli).commands["run"].params}
    assert params["max_steps"].help == "optimizer steps (overrides epochs)"
    assert params["lr"].help == "peak learning rate (default 0.0003)"
    assert params["labels"].help == "only these labels (comma-separated)"
    assert params["per_label"].help == "one adapter per label (default --single)"
    assert params["balance"].help == "equal rows per label (default --balance)"
    assert params["seed"].help == "seeds everything (default 0)"  # a base class's field, from the base's source
    assert params["big"].help == "a constant expression (default 1048576)"
    assert all(p.default is None for name, p in params.items() if name != "name")


def test_notes_options_and_take(settings_module):
    spec = Spec(settings_module, only=("lr", "balance", "max_steps"), default_notes={"lr": "the recipe's"},
                options={"max_steps": {"min": 1}}, params={"balance": "even"})
    cli, seen = _app(spec)
    params = {p.name: p for p in get_command(cli).commands["run"].params}
    assert params["lr"].help == "peak learning rate (default: the recipe's)"
    low = _invoke(cli, "--max-steps", "0")
    assert low.exit_code == 2 and "max-steps" in low.output
    assert _invoke(cli, "--even", "--max-steps", "2").exit_code == 0
    assert spec.flag("balance") == "--even"
    assert spec.take(seen) == {"balance": True, "max_steps": 2} and seen == {"name": "x"}


def test_a_field_without_a_doc_comment_fails_at_registration(settings_module):
    with pytest.raises(FieldDocError, match=r"'undocumented' has no doc comment: add `# what it is`"):
        _app(Spec(settings_module, exclude={"table": "a mapping"}))


def test_unusable_specs_fail_at_registration(settings_module):
    with pytest.raises(FieldDocError, match=r"'table': .*dict.* has no flag; exclude it"):
        _app(Spec(settings_module, exclude={"undocumented": ""}))
    with pytest.raises(FieldDocError, match="has no field nope"):
        _app(Spec(settings_module, exclude={**EXCLUDE, "nope": ""}))
    with pytest.raises(FieldDocError, match="derived twice or also explicit: name"):
        _app(Spec(settings_module, exclude=EXCLUDE, params={"seed": "name"}))


SPECS = [train_cmd.TRAIN, eval_cmd.EVAL, *eval_cmd.COMPOSE, eval_cmd.COMPARE, generate_cmd.SAMPLING, generate_cmd.LOAD,
         serve_cmd.SERVER, serve_cmd.ENGINE, serve_cmd.RAY, serve_cmd.REPLICA]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.config)
def test_reading_the_source_matches_the_imported_dataclass(spec):
    module, _, name = spec.config.partition(":")
    cls = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(cls)
    read = read_fields(spec.config)
    assert [f.name for f in read] == [f.name for f in fields(cls)]
    for info, real in zip(read, fields(cls)):
        if info.type is not None:
            assert info.type == hints[real.name], real.name
        if real.default is not MISSING and info.default is not _NO_DEFAULT:
            assert info.default == real.default, real.name


def _all_params():
    cli = get_command(app)
    return [(f"{name} {p.opts[0]}", p) for name, cmd in cli.commands.items() if not hasattr(cmd, "commands")
            for p in cmd.params]


def test_every_flag_of_every_command_has_a_help_line():
    missing = [where for where, p in _all_params() if not (getattr(p, "help", None) or "").strip()]
    assert not missing


def test_help_prints_every_derived_flag():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--max-steps", "--per-label", "--single", "--target-field", "--label-word-weight", "--no-progress"):
        assert flag in result.output
    assert "peak learning rate (AdamW) (default 0.0003)" in result.output


def test_building_the_cli_reads_the_configs_without_importing_torch():
    code = ("import sys; from typer.main import get_command; from prefixtune.cli import app; get_command(app); "
            "print(sorted(m for m in ('torch', 'fastapi', 'prefixtune.server', 'prefixtune.eval.run_eval') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


KEPT = {  # spellings scripts and docs rely on that are not just --field-name
    "train": {"--per-label", "--single", "--text-field", "--target-field", "--no-progress", "--resume",
              "--no-balance", "--no-prefix-projection"},
    "compare": {"--per-label", "--single", "--no-progress", "--no-isolate", "--config"},
    "eval": {"--batch-size", "--compose", "--compose-data", "--compose-methods", "--compose-weights",
             "--instruction", "--no-progress", "--sweep", "--save-guidance"},
    "generate": {"-p", "-a", "-m", "-n", "-t", "-g", "-i", "--max-new-tokens", "--temperature", "--guidance-scale",
                 "--early-stopping", "--force", "--compile", "--no-compile", "--quantize"},
    "serve": {"-m", "--batching", "--max-adapters-per-replica", "--no-admin", "--no-docs", "--api-key", "--replicas",
              "--store", "--max-model-len", "--no-engine-process"},
}


@pytest.mark.parametrize("command", sorted(KEPT))
def test_the_spelled_flags_keep_their_names(command):
    params = get_command(app).commands[command].params
    flags = {opt for p in params for opt in (*p.opts, *p.secondary_opts)}
    assert KEPT[command] <= flags, sorted(KEPT[command] - flags)
    api_key = next(p for p in params if p.name == "api_key") if command == "serve" else None
    assert api_key is None or api_key.envvar == "PREFIXTUNE_API_KEY"
