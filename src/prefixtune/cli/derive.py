"""Typer options derived from a config dataclass: one flag per field, its help the field's doc comment.

The project documents a config field with a trailing one-line comment (`lr: float = 3e-4  # peak learning
rate`), so the help text is read from the class's source with `tokenize` rather than moved into
`field(metadata=...)`: the configs stay in the one style they share with every other dataclass here. The
source is read WITHOUT importing the module: the eval and server configs live in modules that import torch
(4 s), and `prefixtune --help` must stay fast. tests/cli/test_derive.py checks the read fields against the
imported classes.

A derived option defaults to None, meaning "not given", so a config file, a recipe or the dataclass's own
default fills the rest; the help says the dataclass default.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import io
import tokenize
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import typer

from prefixtune.cli.common import parse_csv, parse_floats

# What an annotation may name; anything else (dicts, engine types) has no flag and must be excluded.
TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path, "list": list,
                         "Optional": Optional}
_NO_DEFAULT = object()


class FieldDocError(TypeError):
    """A config field cannot become a flag: no doc comment, or a type the CLI cannot parse."""


@dataclass(frozen=True)
class FieldInfo:
    """One dataclass field as read from source."""

    name: str  # the field's name
    type: Any  # the annotation, evaluated over TYPES (None when it names something else)
    annotation: str  # the annotation as written
    doc: str  # the trailing comment, without "# " ("" when there is none)
    default: Any  # the default when it is a constant expression, else _NO_DEFAULT


def _source_file(module: str) -> Path:
    """The module's file, found without running anything: find_spec of a dotted name imports the parent
    packages, and prefixtune.server's imports the whole server."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise FieldDocError(f"no module {module}")
    if not rest:
        return Path(spec.origin)
    path = Path(spec.origin).parent.joinpath(*rest.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


@functools.lru_cache(maxsize=None)
def _module_ast(module: str) -> tuple[ast.Module, list[str]]:
    source = _source_file(module).read_text()
    return ast.parse(source), source.splitlines(keepends=True)


def _doc_comment(lines: list[str], node: ast.stmt) -> str:
    """The comment ending the statement's last line (tokenized, so a "#" inside a string is no comment)."""
    statement = "".join(lines[node.lineno - 1:node.end_lineno])
    last = node.end_lineno - node.lineno + 1
    return next((tok.string.lstrip("#").strip() for tok in tokenize.generate_tokens(io.StringIO(statement).readline)
                 if tok.type == tokenize.COMMENT and tok.start[0] == last), "")


def _constant(node: ast.expr | None) -> Any:
    """The value of a constant expression (`1 << 20`, `-1.0`, `"text"`), else _NO_DEFAULT."""
    if node is None or not all(isinstance(n, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop))
                               for n in ast.walk(node)):
        return _NO_DEFAULT
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})


def _annotation(node: ast.expr) -> Any:
    try:
        return eval(compile(ast.Expression(node), "<annotation>", "eval"), {"__builtins__": {}, **TYPES})
    except NameError:
        return None


def _find_class(module: str, name: str) -> tuple[str, ast.ClassDef]:
    """The class `name` as defined in `module` or imported into it (`from M import name`)."""
    tree, _ = _module_ast(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
            return _find_class(node.module, name)
    raise FieldDocError(f"no class {name} in {module}")


@functools.lru_cache(maxsize=None)
def read_fields(target: str) -> tuple[FieldInfo, ...]:
    """The fields of the dataclass `module:Class`, base classes' first (as `dataclasses.fields` orders them)."""
    module, _, name = target.partition(":")
    module, cls = _find_class(module, name)
    found: dict[str, FieldInfo] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name):
            found.update((f.name, f) for f in read_fields(f"{module}:{base.id}"))
    _, lines = _module_ast(module)
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = _doc_comment(lines, node)
            found[node.target.id] = FieldInfo(node.target.id, _annotation(node.annotation),
                                              ast.unparse(node.annotation), doc, _constant(node.value))
    return tuple(found.values())


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def _csv_parser(item: type, flag: str) -> Callable[[Optional[str]], Any]:
    """Parses `a,b,c` into a list (of numbers for list[float]); a bad number names the flag."""

    def parse(value: Optional[str]) -> Any:
        items = parse_csv(value)
        if items is None or item is float:
            return parse_floats(items, flag)
        return [item(v) for v in items]

    return parse


@dataclass(frozen=True)
class Spec:
    """Which fields of one config dataclass become a command's flags, and how the odd ones are spelled."""

    config: str  # the dataclass as "module:Class", read from source without importing the module
    exclude: Mapping[str, str] = field(default_factory=dict)  # field -> why the command has no flag for it
    only: tuple[str, ...] | None = None  # just these fields (the others come from another spec or nowhere)
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # field -> option names replacing --field
    params: Mapping[str, str] = field(default_factory=dict)  # field -> parameter name when not the field's own
    help_prefix: str = ""  # put before every help line, e.g. "--compose: "
    default_notes: Mapping[str, str] = field(default_factory=dict)  # field -> what not giving it means here
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # field -> more typer.Option arguments

    def fields(self) -> list[FieldInfo]:
        known = {f.name: f for f in read_fields(self.config)}
        wanted = [*(self.only or ()), *self.exclude, *self.names, *self.params, *self.default_notes,
                  *self.options]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise FieldDocError(f"{self.config} has no field {', '.join(unknown)}")
        chosen = [known[n] for n in self.only] if self.only is not None else list(known.values())
        return [f for f in chosen if f.name not in self.exclude]

    def parameters(self) -> list[tuple[inspect.Parameter, Callable[[Any], Any] | None]]:
        """One keyword parameter per field, each with the parser of its value (comma lists) or None."""
        return [self._parameter(f) for f in self.fields()]

    def param_name(self, name: str) -> str:
        return self.params.get(name, name)

    def flag(self, name: str) -> str:
        """The field's first option name: what an error message calls it."""
        return (self.names.get(name) or ("--" + self.param_name(name).replace("_", "-"),))[0].split("/")[0]

    def take(self, given: dict[str, Any]) -> dict[str, Any]:
        """This spec's values out of a command's `given`, keyed by field name."""
        return {f.name: given.pop(self.param_name(f.name)) for f in self.fields() if self.param_name(f.name) in given}

    def _default_note(self, info: FieldInfo, tp: Any, names: tuple[str, ...]) -> str:
        """The dataclass default, said in the help when the option's own default is None (= not given)."""
        if info.name in self.default_notes:
            return f" (default: {self.default_notes[info.name]})"
        if info.default in (_NO_DEFAULT, None, ""):
            return ""
        if tp is bool:  # name the default's side, unless it is the plain "off" of an automatic --x/--no-x
            pair = names[0].split("/")
            automatic = not info.default and len(pair) == 2 and pair[1] == "--no-" + pair[0][2:]
            return f" (default {pair[0] if info.default else pair[1]})" if len(pair) == 2 and not automatic else ""
        return f" (default {info.default})"

    def _parameter(self, info: FieldInfo) -> tuple[inspect.Parameter, Callable[[Any], Any] | None]:
        where = f"{self.config} field {info.name!r}"
        if not info.doc:
            raise FieldDocError(f"{where} has no doc comment: add `# what it is` after it (it is the --help text)")
        tp = _unwrap_optional(info.type)
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if tp not in (str, int, float, bool, Path) and item not in (str, float, Path):
            raise FieldDocError(f"{where}: a {info.annotation} has no flag; exclude it from the command's spec")
        flag = "--" + self.param_name(info.name).replace("_", "-")
        names = self.names.get(info.name) or ((f"{flag}/--no-{flag[2:]}",) if tp is bool else (flag,))
        listed = " (comma-separated)" if item is not None else ""
        help_text = self.help_prefix + info.doc + listed + self._default_note(info, tp, names)
        option = typer.Option(None, *names, help=help_text, show_default=False, **self.options.get(info.name, {}))
        # A list is one comma-separated flag ("--labels joy,anger"), split in the command (a bad number then
        # reads "Invalid value: --flag takes ...", as the commands' own checks do).
        parse = _csv_parser(item, names[0]) if item is not None else None
        return inspect.Parameter(self.param_name(info.name), inspect.Parameter.KEYWORD_ONLY, default=option,
                                 annotation=Optional[str] if item is not None else Optional[tp]), parse


def config_flags(*specs: Spec) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of each spec. The command takes its own options explicitly and the
    derived ones through `**given`: only those the user gave (not None), lists already split."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn)  # the command module's string annotations, resolved there
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parsers = [pair for spec in specs for pair in spec.parameters()]
        derived = [p for p, _ in parsers]
        names = [p.name for p in own + derived]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise FieldDocError(f"{fn.__name__}: parameters derived twice or also explicit: {', '.join(clash)}")
        parse = {p.name: parser for p, parser in parsers}

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) for k in parse}
            given = {k: parse[k](v) if parse[k] else v for k, v in given.items() if v is not None}
            return fn(**kwargs, **{k: v for k, v in given.items() if v is not None})  # "--labels ''" = not given

        del command.__wrapped__  # typer must see the built signature, not fn's
        command.__signature__ = inspect.Signature(own + derived)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + derived}
        return command

    return decorate
