"""Files that readers see whole or not at all: written beside their target, then renamed over it.

A crash, a full disk or a failed download leaves the old file as it was (an auditor's earlier
export, the last CRL), never an empty or half-written one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TextIO, cast

NEW_FILE_MODE = 0o644


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a part; after return it survives a power loss."""
    with _replaced_on_success(path, "wb") as f:
        f.write(data)


def replaced_on_success(path: Path) -> contextlib.AbstractContextManager[TextIO]:
    """A text file (UTF-8) to write path's new content to; it replaces path only if the block ends without an exception."""
    return cast(contextlib.AbstractContextManager[TextIO], _replaced_on_success(path, "w"))


@contextlib.contextmanager
def _replaced_on_success(path: Path, open_mode: str) -> Iterator[IO[Any]]:
    """An existing path keeps its mode, and its owner and group where this process may set them (root); a new one
    gets NEW_FILE_MODE. A broker that reads its crlfile as another user (mode 0640, group mosquitto) could not
    read a replacement that took root's group, and would fail at its next reload."""
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # name the file asked for (a missing directory, no permission), not the temporary one
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, open_mode, encoding=None if "b" in open_mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            existing: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            existing = None
        created = os.stat(temp)
        if existing is not None and (existing.st_uid, existing.st_gid) != (created.st_uid, created.st_gid):
            with contextlib.suppress(PermissionError):  # not root: the file becomes ours, as it always did
                os.chown(temp, existing.st_uid, existing.st_gid)
        os.chmod(temp, NEW_FILE_MODE if existing is None else existing.st_mode & 0o7777)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename or unlink in it), so that they survive a power loss."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
