"""The gauges the metrics endpoint reads from the store at scrape time, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from ca_daemon.metrics import StoreCollector
from ca_daemon.model import AuditEvent
from ca_daemon.store import SqlStore, open_store
from ca_daemon.store.audit_store import AuditStore, Checkpoint


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    s = open_store(store_url)
    yield s
    s.close()


def _gauge(store: SqlStore, name: str) -> list[float]:
    return [sample.value for family in StoreCollector(store).collect() if family.name == name for sample in family.samples]


def test_the_checkpoint_age_is_there_before_the_first_checkpoint(store: SqlStore) -> None:
    """A log that was never signed (the audit key unusable since the first start) is what
    CaDaemonAuditCheckpointStale (deploy/prometheus-alerts.yml: age > 900) is for. The gauge was left
    out until a first checkpoint existed, so the alert could never fire for it: on a fresh production
    walk the first scrape had ca_daemon_audit_chain_length 19 and no ca_daemon_audit_checkpoint_age_seconds."""
    assert _gauge(store, "ca_daemon_audit_checkpoint_age_seconds") == []  # an empty log: nothing waits for a signature

    first = datetime.now(UTC) - timedelta(minutes=20)
    store.append_audit([AuditEvent(time=first, actor="test", action="key.generate", outcome="generated", key_id="audit-1")])
    store.append_audit([AuditEvent(time=datetime.now(UTC), actor="test", action="key.generate", outcome="generated", key_id="ca-1")])
    (age,) = _gauge(store, "ca_daemon_audit_checkpoint_age_seconds")
    assert 20 * 60 <= age < 25 * 60  # since the first unsigned event, so the alert's 900 s threshold fires

    audit = AuditStore(store)
    head = audit.head()
    assert head is not None
    signed = datetime.now(UTC) - timedelta(seconds=30)
    assert audit.add_checkpoint(Checkpoint(head.seq, head.count, head.hash, signed, "audit-1", b"signature"))
    (age,) = _gauge(store, "ca_daemon_audit_checkpoint_age_seconds")
    assert 30 <= age < 300  # from then on: since the last checkpoint, as before


def test_a_store_the_scrape_cannot_read_is_a_gauge_of_its_own(store: SqlStore) -> None:
    """The collector swallowed every error of the store (a hostile review of the metrics): the CRL age, audit checkpoint
    and CA expiry series then went missing, and the alerts on them (CaDaemonFullCrlStale and the rest) cannot fire on
    a series that is absent, so a parent that could not read its database looked fine."""
    assert _gauge(store, "ca_daemon_store_readable") == [1.0]
    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE ca_keys RENAME TO ca_keys_away"))  # a damaged database: the scrape's reads fail
    assert _gauge(store, "ca_daemon_store_readable") == [0.0]
    assert _gauge(store, "ca_daemon_audit_chain_length") == []  # one of the series it stands in for
    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE ca_keys_away RENAME TO ca_keys"))
    assert _gauge(store, "ca_daemon_store_readable") == [1.0]
