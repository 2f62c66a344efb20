"""The docs name only flags that exist, and every setting of the config dataclasses is reachable.

The flags come from the typer app itself (what `prefixtune COMMAND --help` prints); the docs' commands from
the fenced code blocks of README.md and docs/*.md.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from prefixtune.cli import app
from prefixtune.cli.eval_cmd import COMPARE_CONFIG_FILE_ONLY, EVAL_CONFIG_ONLY
from prefixtune.cli.train_cmd import CONFIG_FILE_ONLY as TRAIN_CONFIG_FILE_ONLY
from prefixtune.eval.compare_setup import CompareConfig
from prefixtune.eval.evaluate import EvalSettings
from prefixtune.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = get_command(app)


def _is_group(cmd: Any) -> bool:
    return hasattr(cmd, "commands")  # typer ships its own copy of click, so no isinstance


def _command(path: list[str]) -> Any:
    cmd = CLI
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _flags(cmd: Any) -> set[str]:
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")} | {"--help"}


def _param_names(path: list[str]) -> set[str]:
    return {p.name for p in _command(path).params}


@pytest.mark.parametrize(("path", "config", "config_only"), [
    (["train"], TrainConfig, set(TRAIN_CONFIG_FILE_ONLY)),
    (["eval"], EvalSettings, set(EVAL_CONFIG_ONLY)),
    (["compare"], CompareConfig, set(COMPARE_CONFIG_FILE_ONLY)),
])
def test_every_config_field_is_a_flag_or_listed_as_config_only(path, config, config_only):
    names = {f.name for f in fields(config)}
    params = _param_names(path) | {"eval_batch_size"} if path == ["eval"] else _param_names(path)
    missing = sorted(names - params - config_only)
    assert not missing, f"prefixtune {' '.join(path)}: fields without a flag: {missing}"
    stale = sorted(config_only & params)
    assert not stale, f"listed as config-only but a flag of prefixtune {' '.join(path)}: {stale}"
    assert config_only <= names, f"config-only names that are not fields: {sorted(config_only - names)}"


def _code_lines(text: str) -> list[str]:
    """Lines of the fenced shell code blocks (not Python), continuation backslashes joined."""
    blocks = [body for lang, body in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S) if lang != "python"]
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def _invocations(line: str) -> list[list[str]]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a code sample (JSON in curl) is no command line of ours
        return []
    return [words[i + 1:] for i, w in enumerate(words) if w == "prefixtune" or w.endswith("/bin/prefixtune")]


def _doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for line in _code_lines(doc.read_text()):
            found += [(f"{doc.name}: {line.strip()}", args) for args in _invocations(line)]
    return found


def _check(args: list[str]) -> list[str]:
    cmd: Any = CLI
    rest = list(args)
    while _is_group(cmd) and rest and not rest[0].startswith("-"):
        if rest[0] not in cmd.commands:
            return [f"no command {rest[0]!r}"]
        cmd = cmd.commands[rest.pop(0)]
    known = _flags(cmd)
    return [f"{cmd.name}: no flag {w.split('=')[0]}" for w in rest
            if w.startswith("--") and w.split("=")[0] not in known]


def test_the_docs_show_prefixtune_commands():
    commands = _doc_commands()
    assert len(commands) >= 40  # the parser still finds the docs' command lines
    assert {args[0] for _, args in commands if args} >= {"train", "generate", "serve", "eval", "compare",
                                                          "adapters", "bench"}


def test_every_flag_in_the_docs_code_blocks_exists():
    bad = [f"{where}\n    {problem}" for where, args in _doc_commands() for problem in _check(args)]
    assert not bad, "\n".join(bad)


def test_every_flag_named_in_the_readme_exists_somewhere():
    every = set().union(*(_flags(c) for c in _all_commands(CLI)))
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", (ROOT / "README.md").read_text()))
    assert not sorted(named - every)


def _all_commands(cmd: Any) -> list[Any]:
    if _is_group(cmd):
        return [c for sub in cmd.commands.values() for c in _all_commands(sub)]
    return [cmd]


def test_the_checker_catches_a_missing_flag():
    assert _check(["train", "--no-such-flag", "1"]) == ["train: no flag --no-such-flag"]
    assert _check(["adapters", "lisst"]) == ["no command 'lisst'"]
    assert _check(["serve", "--max-queue", "5"]) == []
