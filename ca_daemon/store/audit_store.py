"""Queries of the audit chain, its checkpoints, and the internal mTLS CA's client certificates.

Kept beside sql.py (it uses the same engine and transactions) so the hot issuance path in
sql.py and the auditors' read path can change independently. Events are appended only by
`SqlStore._insert_audit`, which assigns the chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Subquery, exists, func, insert, select, update

from ca_daemon.errors import FailedPrecondition, NotFound
from ca_daemon.model import AuditEvent, RevocationReason
from ca_daemon.store.locks import LockSpace, xact_lock
from ca_daemon.store.schema import audit_checkpoints, audit_events, ca_keys, certificates, mtls_certificates, revocations
from ca_daemon.store.sql import SqlStore, _driver_errors

MAX_PAGE = 5000


@dataclass(frozen=True)
class ChainHead:
    seq: int
    hash: bytes
    count: int


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    count: int
    head_hash: bytes
    time: datetime
    key_id: str
    signature: bytes


@dataclass(frozen=True)
class EventFilter:
    """Server-side filters of StreamAuditEvents; empty fields match everything."""

    after_seq: int = 0
    from_time: datetime | None = None
    actions: tuple[str, ...] = ()
    device_id: str = ""
    serial: str = ""


@dataclass(frozen=True)
class RevocationDisagreement:
    """A serial whose last revocation event and revocations row disagree."""

    seq: int  # the event's
    serial: str
    action: str  # certificate.revoke or certificate.unrevoke
    reason: str  # as the event names it (key_compromise)
    row: tuple[str, bool] | None  # the row's reason, named alike, and whether it is lifted; None: no row


@dataclass(frozen=True)
class RecordsAndEvents:
    """For audit.reconcile: where the certificates and revocations tables and the events disagree."""

    unrecorded_issuances: list[tuple[int, str]]  # (seq, serial) of certificate.issue events with no certificates row
    revocations: list[RevocationDisagreement]  # in seq order
    unlogged_revocations: list[tuple[str, str]]  # (serial, reason) of unlifted rows no revocation event names
    # (serial, device ID, issuer key) of certificates rows no certificate.issue or key.link event issued
    unlogged_certificates: list[tuple[str, str, str]]


@dataclass(frozen=True)
class RevocationInForce:
    """A revocation as its serial's last event records it, beside the row the CRLs are built from (audit.reconcile)."""

    seq: int  # the event's
    serial: str
    reason: str  # as the event names it (key_compromise)
    revoked_at: datetime  # the event's time, which is the revocation's
    key_id: str  # the CA key the event names
    details: str  # the event's details (JSON text): the invalidity date, if any
    row_revoked_at: datetime
    row_invalidity_date: datetime | None
    row_issuer_key_id: str
    row_not_after: datetime
    entry_der: bytes  # what every CRL of row_issuer_key_id copies
    certificate_der: bytes | None  # the certificate's, None when its row is gone


def _last_revocation_events() -> Subquery:
    """(serial, seq) of each serial's last revocation or lifted hold: what its revocations row should agree with."""
    e = audit_events.c
    return (
        select(e.serial, func.max(e.seq).label("seq"))
        .where(e.outcome.in_(("revoked", "hold-lifted")), e.action.in_(("certificate.revoke", "certificate.unrevoke")))
        .group_by(e.serial)
        .subquery()
    )


def _reason_name(code: object) -> str:
    """A revocation reason as revocation events name it (key_compromise), or what the row holds if it is none.

    SQLite keeps whatever is written into the reason column, text too: that is a disagreement to report.
    """
    try:
        return RevocationReason(int(code)).name.lower()  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return f"reason code {code!r}" if not isinstance(code, int) else f"reason code {code}"


@dataclass(frozen=True)
class MtlsCertificate:
    serial: str
    name: str
    role: str
    kind: str
    not_after: datetime
    der: bytes
    issued_at: datetime
    revoked_at: datetime | None
    revocation_reason: int | None


class AuditStore:
    """The audit log's reads and checkpoint writes over a SqlStore."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store

    def head(self, *, counted: bool = True) -> ChainHead | None:
        """The last chained event, and how many events there are up to it.

        counted=False skips the count, which reads every event (about 0.3 s at two million) and
        gives the head's seq instead: the same on a log nothing was deleted from. A checkpoint
        signs the real count, which verification compares with the seq; a metrics scrape
        needs only the length.
        """
        with self._store._connect() as conn:
            row = conn.execute(
                select(audit_events.c.seq, audit_events.c.hash)
                .where(audit_events.c.hash.is_not(None))
                .order_by(audit_events.c.seq.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            if not counted:
                return ChainHead(int(row.seq), bytes(row.hash), int(row.seq))
            count = conn.execute(select(func.count()).select_from(audit_events).where(audit_events.c.seq <= row.seq)).scalar()
        return ChainHead(int(row.seq), bytes(row.hash), int(count or 0))

    def last_seq(self) -> int:
        """The seq of the newest event, chained or not (0 for an empty log): later events have higher ones."""
        with self._store._connect() as conn:
            return int(conn.execute(select(func.max(audit_events.c.seq))).scalar() or 0)

    def events(self, query: EventFilter, limit: int) -> list[dict[str, Any]]:
        """Up to limit events after query.after_seq that match, in chain order."""
        stmt = select(audit_events).where(audit_events.c.seq > query.after_seq)
        if query.from_time is not None:
            stmt = stmt.where(audit_events.c.time >= query.from_time.astimezone(UTC))
        if query.actions:
            stmt = stmt.where(audit_events.c.action.in_(query.actions))
        if query.device_id:
            stmt = stmt.where(audit_events.c.device_id == query.device_id)
        if query.serial:
            stmt = stmt.where(audit_events.c.serial == query.serial)
        stmt = stmt.order_by(audit_events.c.seq).limit(max(1, min(limit, MAX_PAGE)))
        with self._store._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    # The reads of the whole log (`audit verify --live`, `audit export`) go to the DB-API cursor: SQLAlchemy's result
    # rows (a Row, then a dict of its mapping) cost about 25 us an event of the 40 us it took to read one into an
    # export record (50,000 events, SQLite, measured here). Plain SQL that both dialects run.
    _EVENT_PAGE = f"SELECT {', '.join(c.name for c in audit_events.c)} FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?"  # noqa: S608 - the schema's own column names

    def event_page(self, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """events(EventFilter(after_seq=after_seq), limit), the same rows with the same values, read without SQLAlchemy's rows.

        A time is converted as SQLAlchemy converts it (SQLite keeps text): a row whose time does not
        convert raises ValueError for the page, as events() does, and so does text that is not UTF-8
        (StoreUnavailable); the caller reads that page one event at a time with events() to name it.
        """
        columns = [c.name for c in audit_events.c]
        dialect = self._store.engine.dialect
        convert = audit_events.c.time.type.dialect_impl(dialect).result_processor(dialect, None)
        with _driver_errors(), self._store._connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(self._EVENT_PAGE.replace("?", self._store._placeholder), (after_seq, max(1, min(limit, MAX_PAGE))))
                rows = cursor.fetchall()
            finally:
                cursor.close()
        page = [dict(zip(columns, row, strict=True)) for row in rows]
        if convert is not None:
            for event in page:
                event["time"] = convert(event["time"])
        return page

    def iter_events(self, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every event in chain order, read in batches (an export of any size in constant memory)."""
        after = 0
        while True:
            rows = self.events(EventFilter(after_seq=after), batch)
            if not rows:
                return
            yield from rows
            after = int(rows[-1]["seq"])

    def next_seq(self, after_seq: int) -> int | None:
        """The seq of the first event after after_seq, reading no other column (None if there is none).

        For a reader whose page of rows failed to convert (text in a SQLite time or BLOB column):
        it names the rows one by one to find the one that does not read.
        """
        with self._store._connect() as conn:
            value = conn.execute(select(func.min(audit_events.c.seq)).where(audit_events.c.seq > after_seq)).scalar()
        return None if value is None else int(value)

    def records_and_their_events(self) -> RecordsAndEvents:
        """Where the certificates and revocations tables disagree with the events that recorded them, in one snapshot.

        Both are read in one read transaction (SQLite's is one snapshot; PostgreSQL's at REPEATABLE
        READ), so a revocation committing meanwhile is in both or in neither. The database joins
        each serial's last revocation event with its row, and only the disagreements are kept: a
        CA with a million revocations is compared without holding them (the rows stream).
        """
        options: dict[str, Any] = {"stream_results": True, "yield_per": 10000}
        if self._store.dialect == "postgresql":
            options["isolation_level"] = "REPEATABLE READ"
        e, c, r = audit_events.c, certificates.c, revocations.c
        last = _last_revocation_events()
        with self._store._connect(**options) as conn:
            unrecorded = [
                (int(row.seq), str(row.serial))
                for row in conn.execute(
                    select(e.seq, e.serial)
                    .where(e.action == "certificate.issue", e.outcome == "issued", e.serial.is_not(None))
                    .where(~exists().where(c.serial == e.serial))
                    .order_by(e.seq)
                )
            ]
            disagreeing = []
            logged = select(e.seq, e.serial, e.action, e.reason, r.reason.label("row_reason"), r.lifted_at).select_from(
                last.join(audit_events, e.seq == last.c.seq).outerjoin(revocations, r.serial == e.serial)
            )
            for row in conn.execute(logged):
                held = None if row.row_reason is None else (_reason_name(row.row_reason), row.lifted_at is not None)
                revoked = row.action == "certificate.revoke"
                agrees = held is not None and not held[1] and held[0] == row.reason if revoked else held is None or held[1]
                if not agrees:
                    disagreeing.append(RevocationDisagreement(int(row.seq), str(row.serial), str(row.action), str(row.reason), held))
            unlogged = [
                (str(row.serial), _reason_name(row.reason))
                for row in conn.execute(
                    select(r.serial, r.reason)
                    .select_from(revocations.outerjoin(last, last.c.serial == r.serial))
                    .where(last.c.serial.is_(None), r.lifted_at.is_(None))
                    .order_by(r.serial)
                )
            ]
            # Every certificates row is written with the event that issued it (a certificate or a link certificate): a row
            # without one is an event cut from the log (after the last checkpoint, which nothing signed) or a row added.
            issuing = (
                select(e.serial)
                .where(e.action.in_(("certificate.issue", "key.link")), e.outcome == "issued", e.serial.is_not(None))
                .group_by(e.serial)
                .subquery()
            )
            unissued = [
                (str(row.serial), str(row.device_id), str(row.issuer_key_id))
                for row in conn.execute(
                    select(c.serial, c.device_id, c.issuer_key_id)
                    .select_from(certificates.outerjoin(issuing, issuing.c.serial == c.serial))
                    .where(issuing.c.serial.is_(None))
                    .order_by(c.serial)
                )
            ]
        disagreeing.sort(key=lambda d: d.seq)
        return RecordsAndEvents(unrecorded, disagreeing, unlogged, unissued)

    def revocations_in_force(self) -> Iterator[RevocationInForce]:
        """Each serial whose last revocation event revokes it and whose row is not lifted, with both sides' facts.

        One statement (one snapshot on either database), streamed: a million revocations are
        compared without being held. records_and_their_events reports a missing, lifted or
        differently reasoned row; this gives audit.reconcile what it needs to check the rest
        of the row, which the full CRL is built from (entry_der, issuer, not_after).
        """
        options: dict[str, Any] = {"stream_results": True, "yield_per": 10000}
        e, r, c = audit_events.c, revocations.c, certificates.c
        last = _last_revocation_events()
        statement = (
            select(
                e.seq,
                e.serial,
                e.reason,
                e.time,
                e.key_id,
                e.details,
                r.revoked_at,
                r.invalidity_date,
                r.issuer_key_id,
                r.not_after,
                r.entry_der,
                c.der,
            )
            .select_from(
                last.join(audit_events, e.seq == last.c.seq)
                .join(revocations, r.serial == e.serial)
                .outerjoin(certificates, c.serial == e.serial)
            )
            .where(e.action == "certificate.revoke", r.lifted_at.is_(None))
            .order_by(e.seq)
        )
        with self._store._connect(**options) as conn:
            for row in conn.execute(statement):
                yield RevocationInForce(
                    seq=int(row.seq),
                    serial=str(row.serial),
                    reason=str(row.reason),
                    revoked_at=_utc(row.time),
                    key_id=str(row.key_id),
                    details=str(row.details),
                    row_revoked_at=_utc(row.revoked_at),
                    row_invalidity_date=None if row.invalidity_date is None else _utc(row.invalidity_date),
                    row_issuer_key_id=str(row.issuer_key_id),
                    row_not_after=_utc(row.not_after),
                    entry_der=bytes(row.entry_der),
                    certificate_der=None if row.der is None else bytes(row.der),
                )

    def issued_certificates(self) -> Iterator[tuple[int, str, str, bytes]]:
        """(seq, serial, details, the certificates row's DER) of each certificate.issue event whose certificate row is there.

        One statement, streamed, in seq order: audit.reconcile compares the row's DER with the
        SHA-256 the event recorded (events written before it was recorded carry none).
        """
        e, c = audit_events.c, certificates.c
        statement = (
            select(e.seq, e.serial, e.details, c.der)
            .select_from(audit_events.join(certificates, c.serial == e.serial))
            .where(e.action == "certificate.issue", e.outcome == "issued")
            .order_by(e.seq)
        )
        with self._store._connect(stream_results=True, yield_per=10000) as conn:
            for row in conn.execute(statement):
                yield int(row.seq), str(row.serial), str(row.details), bytes(row.der)

    def key_generations(self) -> list[tuple[int, str, str, bytes | None]]:
        """(seq, key_id, details, the ca_keys row's public key or None if the row is gone) of each key.generate event.

        audit.reconcile compares the row's public key with the SHA-256 the event recorded (events written
        before it was recorded carry none). Few rows: one per CA key ever generated.
        """
        e, k = audit_events.c, ca_keys.c
        statement = (
            select(e.seq, e.key_id, e.details, k.public_key_der)
            .select_from(audit_events.outerjoin(ca_keys, k.key_id == e.key_id))
            .where(e.action == "key.generate", e.outcome == "generated")
            .order_by(e.seq)
        )
        with self._store._connect() as conn:
            return [
                (int(row.seq), str(row.key_id), str(row.details), None if row.public_key_der is None else bytes(row.public_key_der))
                for row in conn.execute(statement)
            ]

    def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Store a checkpoint unless one of this head (or a later one) is already stored; whether it was stored.

        Every worker signs the head it leaves behind when it stops, and they stop together:
        without the check, the log held one checkpoint per worker of the same head.
        """
        with self._store._begin() as conn:
            xact_lock(conn, LockSpace.AUDIT_CHECKPOINTS)  # replicas on PostgreSQL; SQLite's write lock already serialises
            latest = conn.execute(select(func.max(audit_checkpoints.c.seq))).scalar()
            if latest is not None and int(latest) >= checkpoint.seq:
                return False
            conn.execute(
                insert(audit_checkpoints).values(
                    seq=checkpoint.seq,
                    count=checkpoint.count,
                    head_hash=checkpoint.head_hash,
                    time=checkpoint.time,
                    key_id=checkpoint.key_id,
                    signature=checkpoint.signature,
                )
            )
        return True

    def checkpoints(self, after_seq: int = 0, limit: int = 0) -> list[Checkpoint]:
        """Checkpoints of events after after_seq, oldest first; at most about limit (0: all).

        A page never splits the checkpoints of one seq (a log written before add_checkpoint
        refused a second checkpoint of a head may hold several), so the next page starts
        strictly after the last seq.
        """
        columns = audit_checkpoints.c
        stmt = select(audit_checkpoints).where(columns.seq > after_seq).order_by(columns.seq, columns.id)
        with self._store._connect() as conn:
            rows = conn.execute(stmt.limit(limit) if limit else stmt).all()
            if limit and len(rows) == limit:
                last = rows[-1]._mapping
                rows += conn.execute(
                    select(audit_checkpoints).where(columns.seq == last["seq"], columns.id > last["id"]).order_by(columns.id)
                ).all()
        return [_checkpoint(r._mapping) for r in rows]

    def first_event_time(self) -> datetime | None:
        """When the log's first event was written (None for an empty log)."""
        with self._store._connect() as conn:
            value = conn.execute(select(audit_events.c.time).order_by(audit_events.c.seq).limit(1)).scalar()
        return _utc(value) if value is not None else None

    def last_checkpoint(self) -> Checkpoint | None:
        with self._store._connect() as conn:
            row = conn.execute(
                select(audit_checkpoints).order_by(audit_checkpoints.c.seq.desc(), audit_checkpoints.c.id.desc()).limit(1)
            ).first()
        return _checkpoint(row._mapping) if row is not None else None

    # -- the internal mTLS CA's certificates -----------------------------------

    def record_mtls_certificate(self, cert: MtlsCertificate, audit: AuditEvent) -> None:
        with self._store._begin() as conn:
            conn.execute(
                insert(mtls_certificates).values(
                    serial=cert.serial,
                    name=cert.name,
                    role=cert.role,
                    kind=cert.kind,
                    not_after=cert.not_after,
                    der=cert.der,
                    issued_at=cert.issued_at,
                )
            )
            self._store._insert_audit(conn, [audit])

    def revoke_mtls_certificate(self, serial: str, reason: int, at: datetime, audit: AuditEvent) -> None:
        with self._store._begin() as conn:
            row = conn.execute(select(mtls_certificates).where(mtls_certificates.c.serial == serial)).first()
            if row is None:
                raise NotFound(f"no client or server certificate with serial {serial} was issued by the mTLS CA", field="serial")
            if row.revoked_at is not None:
                raise FailedPrecondition(f"certificate {serial} ({row.name}) is already revoked", field="serial")
            conn.execute(
                update(mtls_certificates).where(mtls_certificates.c.serial == serial).values(revoked_at=at, revocation_reason=reason)
            )
            self._store._insert_audit(conn, [audit])

    def mtls_certificates(self) -> list[MtlsCertificate]:
        with self._store._connect() as conn:
            rows = conn.execute(select(mtls_certificates).order_by(mtls_certificates.c.issued_at)).all()
        return [_mtls(r._mapping) for r in rows]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _checkpoint(m: Any) -> Checkpoint:
    return Checkpoint(
        seq=int(m["seq"]),
        count=int(m["count"]),
        head_hash=bytes(m["head_hash"]),
        time=_utc(m["time"]),
        key_id=m["key_id"],
        signature=bytes(m["signature"]),
    )


def _mtls(m: Any) -> MtlsCertificate:
    return MtlsCertificate(
        serial=m["serial"],
        name=m["name"],
        role=m["role"],
        kind=m["kind"],
        not_after=_utc(m["not_after"]),
        der=bytes(m["der"]),
        issued_at=_utc(m["issued_at"]),
        revoked_at=_utc(m["revoked_at"]) if m["revoked_at"] is not None else None,
        revocation_reason=m["revocation_reason"],
    )


__all__ = ["AuditStore", "ChainHead", "Checkpoint", "EventFilter", "MtlsCertificate", "RecordsAndEvents", "RevocationDisagreement"]
