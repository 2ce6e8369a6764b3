"""The statements Sign runs, on both backends, reach their rows through an index.

A factory's store holds millions of certificates and a hundred thousand or more revocations;
a statement that scans a whole table on the Sign path costs tens of milliseconds per group
commit there, inside the write transaction, while an empty test database hides it. These
tests read the plan the database chooses (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on
PostgreSQL, with sequential scans priced out so that the plan shows whether an index path
exists at all) rather than timing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event

from ca_daemon.store import SqlStore, open_store
from ca_daemon.store import sql as store_sql

NOW = datetime.now(UTC)


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    s = open_store(store_url)
    yield s
    s.close()


def _plan(store: SqlStore, run: Callable[[Any], object]) -> str:
    """The plan of every SELECT that run(connection) executes, as one text."""
    postgres = store.dialect == "postgresql"
    lines: list[str] = []

    with store.engine.connect() as conn:
        if postgres:
            conn.exec_driver_sql("SET enable_seqscan = off")

        def explain(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> tuple[str, Any]:
            if statement.lstrip().upper().startswith("SELECT"):
                return ("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + statement, parameters
            return statement, parameters

        event.listen(store.engine, "before_cursor_execute", explain, retval=True)
        try:
            result = run(conn)
            rows = result if isinstance(result, list) else [tuple(r) for r in result]  # type: ignore[attr-defined]
            lines += [str(row[-1] if not postgres else row[0]) for row in rows]
        finally:
            event.remove(store.engine, "before_cursor_execute", explain)
            if postgres:
                conn.exec_driver_sql("RESET enable_seqscan")
    return "\n".join(lines)


def _full_scans(store: SqlStore, plan: str) -> list[str]:
    """The plan's lines that read a whole table of certificates, revocations or audit events."""
    tables = ("certificates", "revocations", "audit_events")
    if store.dialect == "postgresql":
        return [line for line in plan.splitlines() if "Seq Scan on" in line and any(t in line for t in tables)]
    # SQLite: SCAN t (a full pass) as opposed to SEARCH t USING INDEX.
    return [line for line in plan.splitlines() if line.strip().startswith("SCAN") and any(t in line for t in tables)]


def _raw(store: SqlStore, statement: str, params: tuple[Any, ...]) -> Callable[[Any], object]:
    marker = "?" if store.dialect == "sqlite" else "%s"
    return lambda conn: list(conn.exec_driver_sql(statement.replace("?", marker), params))


def test_sign_prechecks_use_indexes(store: SqlStore) -> None:
    """The look-ups Sign makes before it signs: request_id, the device's active certificates, the key's devices."""
    for statement, params in (
        (SqlStore._PRECHECK_REQUEST, ("line1-1",)),
        (SqlStore._PRECHECK_ACTIVE, ("sensor-1", store._bind_time(NOW))),
        (SqlStore._PRECHECK_KEY, (b"\x01" * 32, "sensor-1")),
    ):
        plan = _plan(store, _raw(store, statement, params))
        assert _full_scans(store, plan) == [], f"{statement}\n{plan}"


def test_group_commit_checks_use_indexes(store: SqlStore) -> None:
    """The set-based checks of every group commit: answered request_ids, active certificates of the batch's
    devices (with revocations, which a factory accumulates by the hundred thousand), devices of its keys,
    the quota count, the audit chain's head."""
    statements = {
        "answered": (store_sql._ANSWERED, {"request_ids": ["line1-1", "line1-2"]}),
        "active of devices": (store_sql._ACTIVE_OF_DEVICES, {"devices": ["sensor-1", "sensor-2"], "now": NOW}),
        "devices of keys": (store_sql._DEVICES_OF_KEYS, {"keys": [b"\x01" * 32, b"\x02" * 32]}),
        "issued since": (store_sql._ISSUED_SINCE, {"caller": "line1", "minute": 1}),
    }
    for name, (statement, params) in statements.items():

        def run(conn: Any, statement: Any = statement, params: Any = params) -> object:
            return conn.execute(statement, params)

        plan = _plan(store, run)
        assert _full_scans(store, plan) == [], f"{name}\n{plan}"
    head = _plan(store, lambda conn: conn.execute(store_sql._AUDIT_HEAD))
    # SQLite reads the rowid table backwards for ORDER BY seq DESC LIMIT 1 (one row, no sort); PostgreSQL its key.
    assert "TEMP B-TREE" not in head and "Seq Scan" not in head, head


def test_revocation_and_certificate_reads_use_indexes(store: SqlStore) -> None:
    """GetCertificate by serial, a device's certificates for Revoke, the issuer's change counter."""
    for statement, params in (
        ("SELECT * FROM certificates WHERE serial = ?", ("4f1c",)),
        ("SELECT serial FROM certificates WHERE device_id = ?", ("sensor-1",)),
        ("SELECT * FROM revocations WHERE serial = ?", ("4f1c",)),
        ("SELECT max(change_seq) FROM revocations WHERE issuer_key_id = ?", ("ca-1",)),
    ):
        plan = _plan(store, _raw(store, statement, params))
        assert _full_scans(store, plan) == [], f"{statement}\n{plan}"
