"""Access control as plain ASGI middleware: API key, request body size, and where adapters may be loaded from.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses and client-disconnect detection pass through
untouched.
"""

from __future__ import annotations

import errno
import hmac
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from prefixtune.server.protocol import APIError, error_body

# Reachable without the API key: probes, and the API's description (the same for every prefixtune server: no
# adapter names, no data), so /docs works in a browser that holds no key.
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"})


async def send_error(send, status: int, message: str, type: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Every path but OPEN_PATHS needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return await send_error(send, 401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                    "invalid_request_error", "invalid_api_key",
                                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answer 413 for bodies over `limit` bytes, whether or not Content-Length is sent.

    The body (at most `limit` bytes) is read here and replayed to the app; later receive() calls pass
    through, so the app still sees the client's disconnect.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await send_error(send, 413, f"request body larger than {self.limit} bytes", "invalid_request_error",
                         "request_too_large")


def check_adapter_path(path: str, roots: list[Path]) -> Path:
    """Resolve `path` (symlinks too) and require it to lie under one of `roots`; 403 otherwise."""
    if not roots:
        raise APIError(403, "loading adapters by path is disabled; start the server with --adapter-root DIR",
                       "permission_error", "path", "path_not_allowed")
    folder = Path(path).expanduser().resolve()
    if not any(folder.is_relative_to(root.expanduser().resolve()) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise APIError(403, f"{path} is outside the allowed adapter roots ({allowed})", "permission_error", "path",
                       "path_not_allowed")
    if not folder.is_dir():
        raise APIError(400, f"{path} is not a folder", param="path", code="adapter_not_found")
    return folder


MAX_ADAPTER_FILE_BYTES = 4 << 30  # a prefix adapter is megabytes; refuse to copy anything absurd


def snapshot_adapter(path: str, roots: list[Path]) -> tuple[Path, Path]:
    """Copy the adapter folder at `path` (checked to lie under a root) into a private temp folder.

    Returns (the checked folder, the private copy). Checking a path and then reading it by name are two
    steps: a symlink swapped in between would make the server read a folder outside the roots. So the
    folder is opened once (O_NOFOLLOW), that open directory is verified to be the one the path resolves
    to *after* the open (same device and inode, still under a root), and every file is read through that
    directory handle with O_NOFOLLOW (a symlinked file is refused). The engine then only ever reads the copy.
    """
    folder = check_adapter_path(path, roots)
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        raise APIError(400, f"cannot open adapter folder {path}: {err.strerror}", param="path",
                       code="adapter_not_found") from err
    copy = Path(tempfile.mkdtemp(prefix="prefixtune-adapter-"))
    try:
        again = check_adapter_path(path, roots)  # re-resolve: a component swapped since the check shows here
        opened, now = os.fstat(fd), os.stat(again)
        if (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
            raise APIError(409, f"{path} changed while it was being loaded; retry", param="path",
                           code="adapter_changed")
        for name in os.listdir(fd):
            _copy_file(fd, name, copy / name, path)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    return folder, copy


def _copy_file(dir_fd: int, name: str, target: Path, shown: str) -> None:
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise APIError(403, f"{shown}/{name} is a symbolic link; adapter files must be plain files",
                           "permission_error", "path", "path_not_allowed") from err
        if err.errno == errno.EISDIR:
            return  # a sub-folder (e.g. a checkpoint) is not part of the adapter
        raise APIError(400, f"cannot read {shown}/{name}: {err.strerror}", param="path") from err
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            return  # sockets, fifos, folders: not adapter files, and reading a fifo could block forever
        if info.st_size > MAX_ADAPTER_FILE_BYTES:
            raise APIError(400, f"{shown}/{name} is {info.st_size} bytes; adapter files are at most "
                           f"{MAX_ADAPTER_FILE_BYTES} bytes", param="path")
        with os.fdopen(os.dup(src), "rb") as reader, open(target, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
    finally:
        os.close(src)
