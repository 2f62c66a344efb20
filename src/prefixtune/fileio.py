"""Crash-safe file writes: a reader sees the old file or the new one, never half of either.

A leaf module (nothing of prefixtune imported): adapters, manifests, fingerprints, run logs and reports all
write through it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the final file gets normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int | None:
    """The process umask without changing it (Linux: /proc/self/status), or None where that is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _probe_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before a server or trainer starts its
    # threads, so no other thread can create a file while the mask is briefly 0.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _read_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _probe_umask()


def current_umask() -> int:
    """Never sets the umask at runtime: another thread may be creating files at that moment."""
    mask = _read_umask()
    return _IMPORT_UMASK if mask is None else mask


def swap_in(tmp: Path, target: Path, overwrite: bool = True) -> Path:
    """Rename the finished folder `tmp` to `target`; an old `target` is moved aside first and put back if the
    rename fails. Between the two renames the name is briefly absent, never half-written."""
    old = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} appeared while writing; choose another name or pass --overwrite")
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `target`; when the block succeeds it becomes `target`, whole (swap_in).

    On failure the temp folder goes and `target` stays.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp is owner-only; the result should read like any other folder
    try:
        yield tmp
        swap_in(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write for a text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# What to do when a write fails for a reason outside the program: the disk, not the data, must change.
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that disk (or point the command at another disk)",
    errno.EDQUOT: "free space within your disk quota (or point the command at another disk)",
    errno.EROFS: "the file system is mounted read-only: point the command at a writable folder",
    errno.EACCES: "make the folder writable for this user, or point the command at another folder",
    errno.EPERM: "make the folder writable for this user, or point the command at another folder",
}


def write_failure(err: OSError, what: str) -> str:
    """'cannot WHAT: No space left on device (ENOSPC); free space ...': a failed write as one clear sentence."""
    code = errno.errorcode.get(err.errno or 0)
    reason = f"{err.strerror or err}" + (f" ({code})" if code else "")
    fix = _WRITE_FIXES.get(err.errno or 0, "check the disk and the folder's permissions")
    return f"cannot {what}: {reason}; {fix}"


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """Copy the folder src into dst (created if absent), stopping at the first failure and raising it as is:
    shutil.copytree folds every failure into one shutil.Error of strings, so a full disk loses its errno."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.is_dir() and not item.is_symlink():
            copy_tree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name, follow_symlinks=False)
