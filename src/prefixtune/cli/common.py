"""Shared CLI plumbing: clear one-line errors instead of stack traces for the failures users cause."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's user-facing errors into `error: ...` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefixtune.errors import user_error_types

        try:
            return fn(*args, **kwargs)
        except user_error_types() as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_csv(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def die(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def parse_floats(values: list[str] | None, flag: str) -> list[float] | None:
    """Comma-separated numbers (already split by parse_csv); a bad one is a usage error naming the flag."""
    if values is None:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise typer.BadParameter(f"{flag} takes comma-separated numbers, got {','.join(values)!r}") from None
