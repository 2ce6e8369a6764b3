"""Persistence behind one interface: SQLite (embedded default) and PostgreSQL (replicas)."""

from __future__ import annotations

import contextlib
import os

from ca_daemon.store.sql import IssuanceItem, IssuanceOutcome, SignReads, SqlStore, serial_hex

Store = SqlStore


def private_sqlite_file(url: str) -> None:
    """Create a SQLite database that does not exist yet as an empty file of mode 0600, whatever the umask.

    It holds every certificate and the audit log; SQLite gives its -wal and -shm files the
    database file's mode. An existing file keeps its mode. PostgreSQL URLs are left alone.
    """
    database = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    if database and ":memory:" not in database:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def open_store(url: str, *, sqlite_synchronous: str = "FULL", migrate: bool = True) -> SqlStore:
    """Open the store named by url and bring its schema up to date."""
    private_sqlite_file(url)
    store = SqlStore(url, sqlite_synchronous=sqlite_synchronous)
    if migrate:
        store.migrate()
    return store


__all__ = ["IssuanceItem", "IssuanceOutcome", "SignReads", "SqlStore", "Store", "open_store", "private_sqlite_file", "serial_hex"]
