"""Persistence behind one interface: SQLite (embedded default) and PostgreSQL (replicas)."""

from __future__ import annotations

import contextlib
import os
import shlex
import stat

from ca_daemon.store.sql import IssuanceItem, IssuanceOutcome, SignReads, SqlStore, serial_hex, sqlite_file

Store = SqlStore


def private_sqlite_file(url: str) -> None:
    """Create a SQLite database that does not exist yet as an empty file of mode 0600, whatever the umask.

    It holds every certificate and the audit log; SQLite gives its -wal and -shm files the
    database file's mode. An existing file keeps its mode (see sqlite_mode_warning). PostgreSQL URLs are left alone.
    """
    database = sqlite_file(url)
    if database is not None:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def sqlite_mode_warning(url: str) -> str | None:
    """One line for the operator if the SQLite database file, or its -wal or -shm, is accessible to group or others.

    A database created by an older version (0644 under umask 022) keeps its mode: every local
    user can read every certificate and the audit log. Its mode is the operator's to change,
    not changed behind their back; this says which files, their modes and the command.
    """
    path = sqlite_file(url)
    if path is None:
        return None
    modes: dict[str, int] = {}
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            modes[name] = stat.S_IMODE(os.stat(name).st_mode)
    loose = {name: mode for name, mode in modes.items() if mode & 0o077}
    if not loose:
        return None
    found = ", ".join(f"{name} is mode {mode:04o}" for name, mode in loose.items())
    files = " ".join(shlex.quote(name) for name in modes)
    return (
        f"the SQLite database is open to other local users ({found}): it holds every certificate and the audit "
        f"log; ca-daemon leaves existing modes alone, so run: chmod 600 {files}"
    )


def open_store(url: str, *, sqlite_synchronous: str = "FULL", migrate: bool = True) -> SqlStore:
    """Open the store named by url and bring its schema up to date."""
    private_sqlite_file(url)
    store = SqlStore(url, sqlite_synchronous=sqlite_synchronous)
    if migrate:
        store.migrate()
    return store


__all__ = [
    "IssuanceItem",
    "IssuanceOutcome",
    "SignReads",
    "SqlStore",
    "Store",
    "open_store",
    "private_sqlite_file",
    "serial_hex",
    "sqlite_mode_warning",
]
