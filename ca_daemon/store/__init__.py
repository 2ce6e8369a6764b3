"""Persistence behind one interface: SQLite (embedded default) and PostgreSQL (replicas)."""

from __future__ import annotations

from ca_daemon.store.sql import IssuanceItem, IssuanceOutcome, SignReads, SqlStore, serial_hex

Store = SqlStore


def open_store(url: str, *, sqlite_synchronous: str = "FULL", migrate: bool = True) -> SqlStore:
    """Open the store named by url and bring its schema up to date."""
    store = SqlStore(url, sqlite_synchronous=sqlite_synchronous)
    if migrate:
        store.migrate()
    return store


__all__ = ["IssuanceItem", "IssuanceOutcome", "SignReads", "SqlStore", "Store", "open_store", "serial_hex"]
