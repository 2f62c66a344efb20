"""Faults of the disk for tests: a full disk (ENOSPC) part-way through a copy, and a read-only store.

A uniquely named module (test files import it directly). A read-only store is a real read-only bind mount when
this process may mount (root, as the tests run here), else every write under the folder fails with EROFS by
injection; either way the code under test sees OSError(EROFS) from the operating system's calls.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def enospc(path: object = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, module, name: str, calls_ok: int) -> list[str]:
    """`module.name(src, dst, ...)` (a file copy or save) succeeds `calls_ok` times, then writes half of its
    file and raises ENOSPC, as a disk that fills mid-write does. Returns the destinations it was called with."""
    real = getattr(module, name)
    seen: list[str] = []

    def copy_until_full(*args, **kwargs):
        seen.append(str(args[1]))
        if len(seen) <= calls_ok:
            return real(*args, **kwargs)
        real(*args, **kwargs)
        dst = Path(args[1])
        if dst.is_file():
            dst.write_bytes(dst.read_bytes()[: dst.stat().st_size // 2])
        raise enospc(dst)

    monkeypatch.setattr(module, name, copy_until_full)
    return seen


def _under(path, root: Path) -> bool:
    if isinstance(path, int):
        return False
    try:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root)
    except (TypeError, ValueError):
        return False


def _erofs(path) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


def _inject_read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    def guard(real, *path_args):
        def call(*args, **kwargs):
            for i in path_args:
                if len(args) > i and _under(args[i], root):
                    raise _erofs(args[i])
            return real(*args, **kwargs)
        return call

    def guard_open(real):
        def call(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and _under(file, root):
                raise _erofs(file)
            return real(file, mode, *args, **kwargs)
        return call

    def guard_os_open(real):
        def call(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, root):
                raise _erofs(path)
            return real(path, flags, *args, **kwargs)
        return call

    for name in ("mkdir", "rmdir", "unlink", "remove"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0))
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0, 1))
    monkeypatch.setattr(os, "open", guard_os_open(os.open))
    monkeypatch.setattr(builtins, "open", guard_open(builtins.open))
    monkeypatch.setattr(io, "open", guard_open(io.open))


@contextlib.contextmanager
def read_only(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Make `root` read-only for the block; yields how ("bind mount" or "injected EROFS")."""
    root = Path(root).resolve()
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "--bind", "-o", "ro", str(root), str(root)], capture_output=True).returncode == 0
    if not mounted:
        with monkeypatch.context() as patch:
            _inject_read_only(patch, root)
            yield "injected EROFS"
        return
    try:
        yield "bind mount"
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)
