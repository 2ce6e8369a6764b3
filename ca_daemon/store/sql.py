"""The Store on SQLAlchemy Core: one code path for SQLite (embedded) and PostgreSQL.

Every method is synchronous and short; the authority calls them off the event loop.
Issuance records arrive in batches (group commit): one transaction, one fsync, many
certificates, each with its audit event.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, event, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from ca_daemon.errors import AlreadyExists, StoreUnavailable
from ca_daemon.model import AuditEvent, CaKey, IssuedCertificate, KeySpec, KeyStatus
from ca_daemon.store import schema
from ca_daemon.store.schema import audit_events, ca_keys, certificates, schema_migrations


def serial_hex(serial: int) -> str:
    """The canonical text form of a serial number: lowercase hex, no leading zeros."""
    return format(serial, "x")


@dataclass(frozen=True)
class IssuanceOutcome:
    """What recording one issuance did: stored it, or found the request_id already used."""

    certificate: IssuedCertificate
    created: bool


class SqlStore:
    """The daemon's database. Thread-safe: each thread gets its own pooled connection."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL") -> None:
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.dialect == "sqlite":
            engine = create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False, "isolation_level": None},
                pool_size=8,
                max_overflow=8,
            )

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                # Writers take the write lock at BEGIN so two of them queue instead of
                # failing with SQLITE_BUSY on upgrade; readers start a plain snapshot.
                read_only = conn.get_execution_options().get("ca_read_only", False)
                conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
        else:
            url = url.replace("postgresql://", "postgresql+psycopg://", 1)
            engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
        self.engine: Engine = engine
        self._insert = sqlite.insert if self.dialect == "sqlite" else postgresql.insert

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply every migration not yet applied; return the versions applied now."""
        applied_now: list[int] = []
        with self._begin() as conn:
            schema_migrations.create(conn, checkfirst=True)
        for version, description, step in schema.MIGRATIONS:
            with self._begin() as conn:
                done = conn.execute(
                    select(schema_migrations.c.version).where(schema_migrations.c.version == version)
                ).first()
                if done:
                    continue
                step(conn)
                conn.execute(
                    insert(schema_migrations).values(version=version, description=description, applied_at=_now())
                )
                applied_now.append(version)
        return applied_now

    def schema_version(self) -> int:
        with self._connect() as conn:
            value = conn.execute(select(func.max(schema_migrations.c.version))).scalar()
            return int(value or 0)

    # -- CA keys -----------------------------------------------------------

    def save_ca_key(self, key: CaKey) -> None:
        """Insert a CA key or update its status and certificate."""
        values = {
            "pkcs11_uri": key.pkcs11_uri,
            "spec": key.spec.value,
            "public_key_der": key.public_key_der,
            "status": key.status.value,
            "created_at": key.created_at,
            "certificate_der": key.certificate_der,
            "chain_der": _join_chain(key.chain_der),
        }
        with self._begin() as conn:
            exists = conn.execute(select(ca_keys.c.key_id).where(ca_keys.c.key_id == key.key_id)).first()
            if exists:
                conn.execute(update(ca_keys).where(ca_keys.c.key_id == key.key_id).values(**values))
            else:
                conn.execute(insert(ca_keys).values(key_id=key.key_id, **values))

    def get_ca_key(self, key_id: str) -> CaKey | None:
        with self._connect() as conn:
            row = conn.execute(select(ca_keys).where(ca_keys.c.key_id == key_id)).first()
        return _ca_key(row) if row else None

    def list_ca_keys(self) -> list[CaKey]:
        with self._connect() as conn:
            rows = conn.execute(select(ca_keys).order_by(ca_keys.c.created_at.desc())).all()
        return [_ca_key(row) for row in rows]

    # -- certificates ------------------------------------------------------

    def find_by_request_id(self, request_id: str) -> IssuedCertificate | None:
        with self._connect() as conn:
            row = conn.execute(select(certificates).where(certificates.c.request_id == request_id)).first()
        return _certificate(row) if row else None

    def get_certificate(self, serial: int) -> IssuedCertificate | None:
        with self._connect() as conn:
            row = conn.execute(select(certificates).where(certificates.c.serial == serial_hex(serial))).first()
        return _certificate(row) if row else None

    def count_certificates(self) -> int:
        with self._connect() as conn:
            return int(conn.execute(select(func.count()).select_from(certificates)).scalar() or 0)

    def all_serials(self) -> list[int]:
        with self._connect() as conn:
            return [int(s, 16) for s in conn.execute(select(certificates.c.serial)).scalars()]

    def record_issuances(
        self, batch: Sequence[tuple[IssuedCertificate, AuditEvent]]
    ) -> list[IssuanceOutcome | AlreadyExists]:
        """Store a batch of issued certificates and their audit events in one transaction.

        A request_id seen before (in an earlier commit or earlier in this batch) stores
        nothing: the outcome is the certificate already recorded under it, or AlreadyExists
        when that certificate was made from another CSR.
        """
        outcomes: list[IssuanceOutcome | AlreadyExists] = []
        with self._begin() as conn:
            for cert, audit in batch:
                stmt = (
                    self._insert(certificates)
                    .values(**_certificate_values(cert))
                    .on_conflict_do_nothing(index_elements=["request_id"])
                )
                if conn.execute(stmt).rowcount == 1:
                    conn.execute(insert(audit_events).values(**_audit_values(audit)))
                    outcomes.append(IssuanceOutcome(cert, created=True))
                    continue
                row = conn.execute(select(certificates).where(certificates.c.request_id == cert.request_id)).one()
                existing = _certificate(row)
                outcomes.append(_replay(existing, cert.csr_sha256))
        return outcomes

    def append_audit(self, events: Iterable[AuditEvent]) -> None:
        rows = [_audit_values(e) for e in events]
        if rows:
            with self._begin() as conn:
                conn.execute(insert(audit_events), rows)

    def audit_events(self) -> list[dict[str, Any]]:
        with self._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(audit_events).order_by(audit_events.c.seq))]

    # -- plumbing ----------------------------------------------------------

    def _connect(self) -> Any:
        try:
            return self.engine.connect().execution_options(ca_read_only=True)
        except (OperationalError, DBAPIError) as exc:
            raise StoreUnavailable(f"the database is unavailable: {_brief(exc)}") from None

    def _begin(self) -> Any:
        try:
            return self.engine.begin()
        except (OperationalError, DBAPIError) as exc:
            raise StoreUnavailable(f"the database is unavailable: {_brief(exc)}") from None


def replay_or_conflict(existing: IssuedCertificate, csr_sha256: bytes) -> IssuanceOutcome | AlreadyExists:
    """The answer to a request_id used before: the same certificate, or a conflict."""
    return _replay(existing, csr_sha256)


def _replay(existing: IssuedCertificate, csr_sha256: bytes) -> IssuanceOutcome | AlreadyExists:
    if existing.csr_sha256 == csr_sha256:
        return IssuanceOutcome(existing, created=False)
    return AlreadyExists(
        f"request_id {existing.request_id!r} was already used for another CSR (certificate "
        f"{serial_hex(existing.serial)}); use a new request_id for a new request",
        rule="idempotency",
        field="request_id",
        expected="a request_id not used before, or the same CSR as its first use",
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _brief(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).splitlines()[0][:200]


def _utc(value: datetime) -> datetime:
    # SQLite gives naive datetimes back; every stored time is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _join_chain(chain: tuple[bytes, ...]) -> bytes:
    return b"".join(chain)


def _split_chain(blob: bytes) -> tuple[bytes, ...]:
    """Split concatenated DER certificates using their outer SEQUENCE lengths."""
    parts: list[bytes] = []
    offset = 0
    while offset < len(blob):
        if blob[offset] != 0x30:
            raise ValueError("corrupt CA chain in the store")
        first = blob[offset + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            header = 2 + count
            length = int.from_bytes(blob[offset + 2 : offset + 2 + count], "big")
        parts.append(blob[offset : offset + header + length])
        offset += header + length
    return tuple(parts)


def _ca_key(row: Row[Any]) -> CaKey:
    m = row._mapping
    return CaKey(
        key_id=m["key_id"],
        pkcs11_uri=m["pkcs11_uri"],
        spec=KeySpec(m["spec"]),
        public_key_der=bytes(m["public_key_der"]),
        status=KeyStatus(m["status"]),
        created_at=_utc(m["created_at"]),
        certificate_der=bytes(m["certificate_der"]) if m["certificate_der"] is not None else None,
        chain_der=_split_chain(bytes(m["chain_der"] or b"")),
    )


def _certificate_values(cert: IssuedCertificate) -> dict[str, Any]:
    return {
        "serial": serial_hex(cert.serial),
        "issuer_key_id": cert.issuer_key_id,
        "device_id": cert.device_id,
        "profile": cert.profile,
        "subject": cert.subject,
        "not_before": cert.not_before,
        "not_after": cert.not_after,
        "der": cert.der,
        "csr_sha256": cert.csr_sha256,
        "public_key_sha256": cert.public_key_sha256,
        "request_id": cert.request_id,
        "created_at": cert.created_at,
    }


def _certificate(row: Row[Any]) -> IssuedCertificate:
    m = row._mapping
    return IssuedCertificate(
        serial=int(m["serial"], 16),
        issuer_key_id=m["issuer_key_id"],
        device_id=m["device_id"],
        profile=m["profile"],
        subject=m["subject"],
        not_before=_utc(m["not_before"]),
        not_after=_utc(m["not_after"]),
        der=bytes(m["der"]),
        csr_sha256=bytes(m["csr_sha256"]),
        public_key_sha256=bytes(m["public_key_sha256"]),
        request_id=m["request_id"],
        created_at=_utc(m["created_at"]),
    )


def _audit_values(event_: AuditEvent) -> dict[str, Any]:
    return {
        "time": event_.time,
        "actor": event_.actor,
        "action": event_.action,
        "outcome": event_.outcome,
        "serial": serial_hex(event_.serial) if event_.serial is not None else None,
        "device_id": event_.device_id,
        "key_id": event_.key_id,
        "request_digest": event_.request_digest,
        "reason": event_.reason,
        "details": json.dumps(event_.details, sort_keys=True),
    }


__all__ = ["SqlStore", "IssuanceOutcome", "serial_hex", "IntegrityError"]
