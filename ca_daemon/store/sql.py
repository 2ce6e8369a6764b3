"""The Store on SQLAlchemy Core: one code path for SQLite (embedded) and PostgreSQL.

Every method is synchronous and short; the authority calls them off the event loop.
Issuance records arrive in batches (group commit): one transaction, one fsync, many
certificates, each with its audit event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import Table, bindparam, create_engine, delete, event, exists, func, insert, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql

from ca_daemon.audit_hash import CHAIN_LOCK_KEY, GENESIS, details_text, event_hash
from ca_daemon.errors import AlreadyExists, CaKeyChanged, FailedPrecondition, NotFound, QuotaExceeded, StoreUnavailable, echo
from ca_daemon.model import AuditEvent, CaKey, IssuedCertificate, KeySpec, KeyStatus, PublishedCrl, Revocation, RevocationReason
from ca_daemon.store import schema
from ca_daemon.store.locks import Leadership, LockSpace, xact_lock, xact_locks
from ca_daemon.store.schema import (
    audit_events,
    ca_key_lifecycle,
    ca_keys,
    caller_issuance_by_minute,
    certificates,
    crl_number_floors,
    crl_publish_status,
    crls,
    key_urls,
    schema_migrations,
)
from ca_daemon.store.schema import revocations as revocations_table
from ca_daemon.store.write_lock import FileWriteLock

# store_crl's refusals: another publisher stored that CRL number first (build the next one again);
# the issuer's final CRL is stored (nothing may follow it: not a failure of the publisher's).
CRL_NUMBER_TAKEN = "crl-number-monotonic"
# Another publisher stored a CRL dated after this one (build it again, dated after that one).
CRL_THIS_UPDATE_BEHIND = "crl-this-update-monotonic"
ISSUER_FINAL_CRL = "issuer-final-crl"

# removeFromCRL (RFC 5280 5.3.1): how a delta CRL says a lifted hold is no longer revoked.
REMOVE_FROM_CRL = 8


def void_open_approvals(conn: Connection, key_id: str, at: datetime) -> None:
    """Consume (executed_at = at) every open approval of or naming the key, in the caller's transaction.

    Called wherever a key's status changes: an approval is given for the key as it was, and must
    not count toward an action on it (or a switch to it) in another state.
    """
    conn.execute(
        update(schema.key_approvals)
        .where(schema.key_approvals.c.executed_at.is_(None))
        .where((schema.key_approvals.c.key_id == key_id) | (schema.key_approvals.c.successor_key_id == key_id))
        .values(executed_at=at)
    )


def _issuer_retired(serial_text: str, issuer_key_id: str, status: str) -> FailedPrecondition:
    """A retired key's final CRL is its last word: a change no CRL would ever carry is refused."""
    return FailedPrecondition(
        f"certificate {serial_text} was issued by CA key {issuer_key_id}, which is {status}: its final CRL is published "
        "and it signs no more, so the revocation status of its certificates can no longer change",
        rule="issuer-retired",
        field="serial",
    )


def serial_hex(serial: int) -> str:
    """The canonical text form of a serial number: lowercase hex, no leading zeros."""
    return format(serial, "x")


# One issuance for the group commit: certificate, its audit event (the actor is the caller),
# allow_reissue, and the caller's hourly quota (0: none).
IssuanceItem = tuple[IssuedCertificate, AuditEvent, bool, int]
# (request_id, device_id, public key SHA-256, now) -> the request_id's earlier answer, the device's active serials,
# the other devices certified with that key: what Sign reads before it signs.
PrecheckResult = tuple[IssuedCertificate | None, tuple[int, ...], tuple[str, ...]]
Precheck = Callable[[str, str, bytes, datetime], PrecheckResult]


@dataclass(frozen=True)
class SignReads:
    """What Sign reads before it signs, over one connection for a batch (SqlStore.sign_reads)."""

    precheck: Precheck
    # (caller, now) -> the caller's certificates in the last 60 minutes, as the quota counts them.
    issued_last_hour: Callable[[str, datetime], int]


@dataclass(frozen=True)
class IssuanceOutcome:
    """What recording one issuance did: stored it, or found the request_id already used."""

    certificate: IssuedCertificate
    created: bool


# How long a caller's per-minute issuance counts are kept: the quota's 60 minutes and a day more, so that a replica
# whose clock is up to a day ahead of the others removes none they still count (see _count_issued).
QUOTA_COUNTS_KEPT_MINUTES = 60 + 24 * 60

# How long a statement waits for a lock another transaction holds before the call is UNAVAILABLE
# (SQLite's busy_timeout, PostgreSQL's lock_timeout): far above any transaction the daemon runs.
LOCK_WAIT_MS = 30_000
# Each process's connection pool: _POOL_SIZE kept open, up to _POOL_OVERFLOW more while busy (deploy/README counts them
# for PostgreSQL's max_connections). A call that finds all in use waits lock_wait_ms for one, then is UNAVAILABLE.
_POOL_SIZE = 8
_POOL_OVERFLOW = 8
# libpq settings: TCP keepalive probes on an idle session, and tcp_user_timeout (ms) for data sent and not acknowledged.
_PG_SILENCE_LIMITS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3, "tcp_user_timeout": 20_000}


def sqlite_file(url: str) -> str | None:
    """The absolute path of a SQLite URL's database file; None for PostgreSQL and in-memory databases."""
    database = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    return os.path.abspath(database) if database and ":memory:" not in database else None


log = logging.getLogger(__name__)


class SqlStore:
    """The daemon's database. Thread-safe: each thread gets its own pooled connection."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", lock_wait_ms: int = LOCK_WAIT_MS) -> None:
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        # The SQLite file this store's connections opened, and its (device, inode) once one has (see _check_same_file).
        self._sqlite_file = sqlite_file(url)
        self._sqlite_identity: tuple[int, int] | None = None
        self._wal_mode = False
        # Set once the write-ahead log was found deleted under this process: writes stay refused until a restart.
        self._wal_lost = False
        if self.dialect == "sqlite":
            engine = create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False, "isolation_level": None},
                pool_size=_POOL_SIZE,
                max_overflow=_POOL_OVERFLOW,
                pool_timeout=lock_wait_ms / 1000,
            )

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                self._wal_mode = str(cursor.fetchone()[0]).lower() == "wal"  # not on a file system without shared memory
                cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute(f"PRAGMA busy_timeout={int(lock_wait_ms)}")
                cursor.close()
                if self._sqlite_identity is None and self._sqlite_file is not None:
                    self._sqlite_identity = _file_identity(self._sqlite_file)

            @event.listens_for(engine, "do_connect")
            def _open_existing(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
                # Once the file is open, a new connection opens that file or fails: SQLite would otherwise
                # create an empty database in place of one deleted or moved away while the daemon runs.
                if self._sqlite_identity is not None and self._sqlite_file is not None:
                    cargs[0] = f"file:{urllib.parse.quote(self._sqlite_file)}?mode=rw"
                    cparams["uri"] = True

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                # Writers take the write lock at BEGIN so two of them queue instead of
                # failing with SQLITE_BUSY on upgrade; readers start a plain snapshot.
                read_only = conn.get_execution_options().get("ca_read_only", False)
                conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
        else:
            url = url.replace("postgresql://", "postgresql+psycopg://", 1)
            # lock_timeout: a statement waiting longer for a lock (a row, a table, a replica's advisory lock) fails,
            # and the call is UNAVAILABLE, instead of waiting as long as its caller does (for ever without a deadline).
            # TCP keepalives and tcp_user_timeout: a server or network that goes silent (a partition, a host gone
            # without a reset) fails the session in seconds, not after the kernel's retransmissions (about 15 minutes).
            options: dict[str, Any] = {"options": f"-c lock_timeout={int(lock_wait_ms)}"} | _PG_SILENCE_LIMITS
            engine = create_engine(
                url,
                pool_size=_POOL_SIZE,
                max_overflow=_POOL_OVERFLOW,
                pool_timeout=lock_wait_ms / 1000,
                pool_pre_ping=True,
                connect_args=options,
            )
        self.engine: Engine = engine
        self._time_processor = certificates.c.not_after.type.bind_processor(engine.dialect)
        # SQLite: every process's writers queue on this file lock, and give up after lock_wait_ms as UNAVAILABLE.
        self._write_lock: FileWriteLock | None = None
        if self._sqlite_file is not None:
            self._write_lock = FileWriteLock(self._sqlite_file + ".writelock", lock_wait_ms)
        self._insert: Callable[[Table], sqlite.Insert | postgresql.Insert]
        if self.dialect == "sqlite":
            self._insert = sqlite.insert
        else:  # imported here: it costs every process that uses SQLite (each CLI command, each worker) about 50 ms
            from sqlalchemy.dialects import postgresql

            self._insert = postgresql.insert
        counts = caller_issuance_by_minute
        counted = self._insert(counts).values(caller=bindparam("caller"), minute=bindparam("minute"), issued=bindparam("issued"))
        self._count_statement = counted.on_conflict_do_update(
            index_elements=[counts.c.caller, counts.c.minute],
            set_={"issued": counts.c.issued + counted.excluded.issued},
        )
        # caller -> the minute whose older counts this process last removed (see _count_issued).
        self._cleaned_minute: dict[str, int] = {}
        # Hash-chain audit events (issue 6); false only for benchmarks (config audit.chain).
        self.audit_chain = True
        # (seq, hash) of the last audit event this store committed: the next append checks the log still holds it.
        self._last_appended: tuple[int, bytes] | None = None
        # .last: the (seq, hash) the current thread's write transaction appended, kept by _begin once it commits.
        self._appended = threading.local()

    def reachable(self) -> bool:
        """Whether the database answers a statement now, and (SQLite) is still the file this store opened: for health."""
        try:
            with self._connect() as conn:
                conn.execute(select(1)).scalar_one()
            self._check_same_file()
            self._check_wal()
        except StoreUnavailable:
            return False
        return True

    def close(self) -> None:
        self.engine.dispose()
        if self._write_lock is not None:
            self._write_lock.close()
            self._write_lock = None

    # -- schema ------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply every migration not yet applied; return the versions applied now (FailedPrecondition: a newer release's schema).

        Safe to run from several replicas at once: each step runs in its own transaction
        under the MIGRATIONS lock (an advisory lock on PostgreSQL, whose DDL is
        transactional; BEGIN IMMEDIATE on SQLite), so one replica applies it and the
        others find it done.
        """
        applied_now: list[int] = []
        with self._begin() as conn:
            xact_lock(conn, LockSpace.MIGRATIONS)
            schema_migrations.create(conn, checkfirst=True)
            newest = conn.execute(select(func.max(schema_migrations.c.version))).scalar()
        if (reason := schema.unknown_version_reason(int(newest or 0))) is not None:
            raise FailedPrecondition(reason)
        for version, description, step in schema.MIGRATIONS:
            with self._begin() as conn:
                xact_lock(conn, LockSpace.MIGRATIONS)
                done = conn.execute(select(schema_migrations.c.version).where(schema_migrations.c.version == version)).first()
                if done:
                    continue
                step(conn)
                conn.execute(insert(schema_migrations).values(version=version, description=description, applied_at=_now()))
                applied_now.append(version)
        return applied_now

    def schema_version(self) -> int:
        with self._connect() as conn:
            value = conn.execute(select(func.max(schema_migrations.c.version))).scalar()
            return int(value or 0)

    # -- CA keys -----------------------------------------------------------

    def save_ca_key(self, key: CaKey, audit: AuditEvent | None = None, *, new: bool = False, install_once: bool = False) -> None:
        """Insert a CA key or update its status and certificate (with the key event's audit record).

        new: only insert; AlreadyExists (nothing written) if a key of that ID is recorded already.
        install_once: only give a recorded pending key without a certificate its certificate (the key ceremony);
        FailedPrecondition (nothing written) if it is no longer one, as another call changed it since it was read.
        """
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
            exists = conn.execute(select(ca_keys.c.status).where(ca_keys.c.key_id == key.key_id)).first()
            if exists and new:
                raise AlreadyExists(f"a CA key named {key.key_id!r} is recorded already", rule="label", field="label")
            if install_once:
                row = conn.execute(select(ca_keys.c.status, ca_keys.c.certificate_der).where(ca_keys.c.key_id == key.key_id)).first()
                if row is None or row.status != KeyStatus.PENDING.value or row.certificate_der is not None:
                    state = "unknown" if row is None else row.status + (" with a certificate" if row.certificate_der is not None else "")
                    raise FailedPrecondition(
                        f"CA key {key.key_id} became {state} meanwhile (another call); a certificate is installed once, on a "
                        "pending key: nothing was installed",
                        rule="key-status",
                    )
                values["status"] = row.status
            if exists:
                conn.execute(update(ca_keys).where(ca_keys.c.key_id == key.key_id).values(**values))
                # A status change (e.g. the first start activating the configured key), or a certificate installed: an
                # approval given for the key before (to retire a pending key, say) was not given for it as it is now.
                if exists.status != key.status.value or install_once:
                    void_open_approvals(conn, key.key_id, audit.time if audit is not None else datetime.now(UTC))
            else:
                try:
                    conn.execute(insert(ca_keys).values(key_id=key.key_id, **values))
                except IntegrityError:  # PostgreSQL: another transaction inserted it since the select
                    if not new:
                        raise
                    raise AlreadyExists(f"a CA key named {key.key_id!r} is recorded already", rule="label", field="label") from None
            if key.status == KeyStatus.ACTIVE and (exists is None or exists.status != KeyStatus.ACTIVE.value):
                # The first start activating the configured key (the key ceremony sets it in its own transaction):
                # `key status` and ListKeys showed that key active with no activation time.
                _record_activation(conn, key.key_id, audit.time if audit is not None else datetime.now(UTC))
            if audit is not None:
                self._insert_audit(conn, [audit])

    def get_ca_key(self, key_id: str) -> CaKey | None:
        with self._connect() as conn:
            row = conn.execute(select(ca_keys).where(ca_keys.c.key_id == key_id)).first()
        return _ca_key(row) if row else None

    def active_key_id(self) -> str | None:
        """The key that signs new certificates (polled by every worker: one small read)."""
        with self._connect() as conn:
            row = conn.execute(select(ca_keys.c.key_id).where(ca_keys.c.status == KeyStatus.ACTIVE.value).limit(1)).first()
        return str(row.key_id) if row else None

    def active_key_halted(self) -> tuple[str, datetime | None] | None:
        """The active key's id and when an emergency halted it (None: not halted), in the one read each worker polls."""
        with self._connect() as conn:
            row = conn.execute(
                select(ca_keys.c.key_id, ca_keys.c.halted_at).where(ca_keys.c.status == KeyStatus.ACTIVE.value).limit(1)
            ).first()
        if row is None:
            return None
        return str(row.key_id), _utc(row.halted_at) if row.halted_at is not None else None

    def list_ca_keys(self) -> list[CaKey]:
        with self._connect() as conn:
            rows = conn.execute(select(ca_keys).order_by(ca_keys.c.created_at.desc())).all()
        return [_ca_key(row) for row in rows]

    # -- the URLs each key's certificates carry (schema version 10) ----------

    def key_urls(self) -> list[tuple[str, str, str]]:
        """Every recorded (key_id, kind, url), in the order recorded: where the publisher serves each key's CRL and certificate."""
        with self._connect() as conn:
            rows = conn.execute(
                select(key_urls.c.key_id, key_urls.c.kind, key_urls.c.url).order_by(key_urls.c.recorded_at, key_urls.c.url)
            ).all()
        return [(str(row.key_id), str(row.kind), str(row.url)) for row in rows]

    def record_key_urls(self, key_id: str, urls: Sequence[tuple[str, str]], at: datetime) -> None:
        """Record that key_id's certificates carry these (kind, url) from now on, in one transaction.

        One recorded already (here, or by another process meanwhile) keeps its first date.
        """
        if not urls:
            return
        with self._begin() as conn:
            for kind, url in urls:
                conn.execute(
                    self._insert(key_urls)
                    .values(key_id=key_id, kind=kind, url=url, recorded_at=at)
                    .on_conflict_do_nothing(index_elements=["key_id", "kind", "url"])
                )

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

    def record_issuances(self, batch: Sequence[tuple[IssuedCertificate, AuditEvent]]) -> list[IssuanceOutcome | AlreadyExists]:
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
                    .returning(certificates.c.serial)
                )
                # RETURNING, not rowcount: SQLAlchemy with psycopg reports -1 for this statement, so every
                # certificate stored on PostgreSQL was answered as a replay (created=False).
                if conn.execute(stmt).first() is not None:
                    self._insert_audit(conn, [audit])
                    outcomes.append(IssuanceOutcome(cert, created=True))
                    continue
                row = conn.execute(select(certificates).where(certificates.c.request_id == cert.request_id)).one()
                existing = _certificate(row)
                outcomes.append(_replay(existing, cert.csr_sha256, cert.caller))
        return outcomes

    # -- uniqueness (issue 4) ------------------------------------------------
    #
    # The policy decides on facts the authority fetches with issuance_facts; the same
    # facts are checked again inside the issuing transaction (record_unique_issuances),
    # which SQLite serialises (BEGIN IMMEDIATE) and PostgreSQL serialises per device ID
    # and key with transaction-scoped advisory locks, so two concurrent Signs for one
    # device cannot both be stored.

    def issuance_facts(self, device_id: str, public_key_sha256: bytes, now: datetime) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(serials of active certificates for device_id, other device IDs certified for the key)."""
        with self._connect() as conn:
            return self._issuance_facts(conn, device_id, public_key_sha256, now)

    def _issuance_facts(
        self, conn: Connection, device_id: str, public_key_sha256: bytes, now: datetime
    ) -> tuple[tuple[int, ...], tuple[str, ...]]:
        active = conn.execute(
            select(certificates.c.serial).where(certificates.c.device_id == device_id, certificates.c.not_after > now, _NOT_REVOKED)
        ).scalars()
        others = conn.execute(
            select(certificates.c.device_id)
            .where(certificates.c.public_key_sha256 == public_key_sha256, certificates.c.device_id != device_id)
            .distinct()
            .limit(5)
        ).scalars()
        return tuple(int(s, 16) for s in active), tuple(others)

    # The three look-ups below run once per Sign, before signing. They go straight to the
    # DB-API cursor: measured here, a SQLAlchemy Core select costs about 60 us per statement
    # against 1 us for the cursor, and the statements are plain SQL that both dialects run.
    _PRECHECK_REQUEST = "SELECT serial FROM certificates WHERE request_id = ?"
    _PRECHECK_ACTIVE = (
        "SELECT c.serial FROM certificates c WHERE c.device_id = ? AND c.not_after > ? "
        "AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.serial = c.serial AND r.lifted_at IS NULL)"
    )
    _PRECHECK_KEY = "SELECT DISTINCT device_id FROM certificates WHERE public_key_sha256 = ? AND device_id <> ? LIMIT 5"

    @contextlib.contextmanager
    def sign_reads(self) -> Iterator[SignReads]:
        """precheck and the quota count for a batch of requests over one pooled connection.

        A pool check-out costs more than the look-ups themselves.
        """
        placeholder = self._placeholder
        by_request, active_of_device, devices_of_key = (
            statement.replace("?", placeholder) for statement in (self._PRECHECK_REQUEST, self._PRECHECK_ACTIVE, self._PRECHECK_KEY)
        )
        # A read connection (_connect): the quota count's statement begins a transaction, which on SQLite would
        # otherwise be BEGIN IMMEDIATE, holding the write lock over the whole batch's look-ups.
        with _driver_errors(), self._connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()

            def precheck(request_id: str, device_id: str, public_key_sha256: bytes, now: datetime) -> PrecheckResult:
                # The request_id is read last. Each statement sees what is committed when it runs (PostgreSQL's
                # READ COMMITTED, SQLite outside a transaction): read first, it could miss a retry's certificate
                # committed a moment later that the device's look-up then found, and the retry was refused
                # device-unique instead of answered (seen with one request_id sent to three replicas at once).
                with _driver_errors():
                    cursor.execute(active_of_device, (device_id, self._bind_time(now)))
                    active = tuple(int(row[0], 16) for row in cursor.fetchall())
                    cursor.execute(devices_of_key, (public_key_sha256, device_id))
                    others = tuple(row[0] for row in cursor.fetchall())
                    cursor.execute(by_request, (request_id,))
                    if cursor.fetchone() is not None:
                        existing = self.find_by_request_id(request_id)
                        if existing is not None:
                            return existing, (), ()
                    return None, active, others

            offsets: list[timedelta] = []  # the database clock's, read once a batch (on PostgreSQL a query)

            def issued_last_hour(caller: str, now: datetime) -> int:
                with _driver_errors():
                    if not offsets:
                        offsets.append(self._database_clock_offset(conn))
                    return self._issued_last_hour(conn, caller, _minute(now + offsets[0]))

            try:
                yield SignReads(precheck, issued_last_hour)
            finally:
                cursor.close()

    @property
    def _placeholder(self) -> str:
        """The DB-API parameter marker of this dialect (sqlite3: qmark, psycopg: format)."""
        return "?" if self.dialect == "sqlite" else "%s"

    def _bind_time(self, value: datetime) -> Any:
        """A datetime as this dialect's DateTime column stores it (SQLite keeps text)."""
        return self._time_processor(value) if self._time_processor else value

    def record_unique_issuances(
        self, batch: Sequence[IssuanceItem]
    ) -> list[IssuanceOutcome | AlreadyExists | QuotaExceeded | CaKeyChanged]:
        """Store a batch of issuances in one transaction, re-checking idempotency, uniqueness and quotas there.

        Each item is (certificate, audit event, allow_reissue, hourly quota of the caller,
        0 for none; the caller is the event's actor). The checks are set-based (a few
        statements per batch, not per certificate), and items earlier in the batch count as
        stored for the ones after them. A request_id answered before replays that answer. A
        certificate whose device ID gained an active certificate, or whose key was certified
        for another device, since the policy decided is not stored, nor one past its
        caller's quota (requests in flight together all passed the earlier check), nor one
        whose issuer key is no longer the active key (signed by a worker that had not yet
        followed a key switch: CaKeyChanged, and its retry is signed with the new key): its
        outcome is the refusal, and an audit event records that the signed certificate was
        discarded.
        """
        now = _now()
        outcomes: list[IssuanceOutcome | AlreadyExists | QuotaExceeded | CaKeyChanged] = []
        limited = sorted({audit.actor for _, audit, _, quota in batch if quota})
        with self._begin() as conn:
            # Serialise concurrent replicas per device ID, key, request_id and quota (a no-op on
            # SQLite); taken in one global order, so two batches cannot deadlock.
            xact_locks(
                conn,
                [(LockSpace.DEVICE, c.device_id) for c, _, _, _ in batch]
                + [(LockSpace.PUBLIC_KEY, c.public_key_sha256.hex()) for c, _, _, _ in batch]
                + [(LockSpace.REQUEST_ID, c.request_id) for c, _, _, _ in batch]
                + [(LockSpace.CALLER_QUOTA, caller) for caller in limited],
            )
            # The issuer keys' status, read FOR SHARE (PostgreSQL; SQLite's writers are serialised already): under READ
            # COMMITTED a key switch's UPDATE in flight makes this wait and then read the new status, and a switch that
            # comes after waits for this commit, whose certificates the emergency's revocation pass then finds.
            # An active key an emergency halted (halted_at, set before its revocation pass) signs nothing that is stored.
            issuer_keys = conn.execute(_ISSUER_KEYS, {"key_ids": sorted({c.issuer_key_id for c, _, _, _ in batch})}).all()
            in_force = {
                row.key_id: "halted" if row.halted_at is not None and row.status == KeyStatus.ACTIVE.value else row.status
                for row in issuer_keys
            }
            # The database's clock came with the keys (PostgreSQL: its transaction's start), not in a query of its own.
            database_now = issuer_keys[0].database_now if issuer_keys and self.dialect != "sqlite" else None
            offset = database_now - datetime.now(UTC) if database_now is not None else self._database_clock_offset(conn)
            minute = _minute(now + offset)
            issued_last_hour = {caller: self._issued_last_hour(conn, caller, minute) for caller in limited}
            counted: dict[str, int] = {}
            request_ids = [c.request_id for c, _, _, _ in batch]
            answered = {row.request_id: _certificate(row) for row in conn.execute(_ANSWERED, {"request_ids": request_ids})}
            devices = list({c.device_id for c, _, _, _ in batch})
            keys = list({c.public_key_sha256 for c, _, _, _ in batch})
            active: dict[str, list[int]] = {}
            for serial, device in conn.execute(_ACTIVE_OF_DEVICES, {"devices": devices, "now": now}):
                active.setdefault(device, []).append(int(serial, 16))
            key_devices: dict[bytes, set[str]] = {}
            for key, device in conn.execute(_DEVICES_OF_KEYS, {"keys": keys}):
                key_devices.setdefault(bytes(key), set()).add(device)
            new_certificates: list[dict[str, Any]] = []
            new_events: list[AuditEvent] = []
            for cert, audit, allow_reissue, quota in batch:
                earlier = answered.get(cert.request_id)
                if earlier is not None:
                    outcomes.append(_replay(earlier, cert.csr_sha256, cert.caller))
                    continue
                others = tuple(sorted(d for d in key_devices.get(cert.public_key_sha256, ()) if d != cert.device_id))
                conflict: AlreadyExists | QuotaExceeded | CaKeyChanged | None = _key_changed(cert, in_force.get(cert.issuer_key_id))
                if conflict is None:
                    conflict = _uniqueness_conflict(cert, () if allow_reissue else tuple(active.get(cert.device_id, ())), others)
                if conflict is None and quota and issued_last_hour[audit.actor] + 1 > quota:
                    conflict = QuotaExceeded.for_caller(audit.actor, quota, issued_last_hour[audit.actor])
                if conflict is not None:
                    new_events.append(_discarded(cert, audit, conflict))
                    outcomes.append(conflict)
                    continue
                if quota:
                    issued_last_hour[audit.actor] += 1
                # Every caller is counted, so a quota added later (by a reload) applies to the last hour at once.
                counted[audit.actor] = counted.get(audit.actor, 0) + 1
                new_certificates.append(_certificate_values(cert))
                new_events.append(audit)
                answered[cert.request_id] = cert
                active.setdefault(cert.device_id, []).append(cert.serial)
                key_devices.setdefault(cert.public_key_sha256, set()).add(cert.device_id)
                outcomes.append(IssuanceOutcome(cert, created=True))
            if new_certificates:
                conn.execute(_INSERT_CERTIFICATES, new_certificates)
            # Row locks on caller_issuance_by_minute in sorted caller order, as the advisory locks above: two
            # replicas whose batches hold the same callers in other orders (callers without a quota
            # have no CALLER_QUOTA lock) would otherwise each hold one row and wait for the other's.
            for caller in sorted(counted):
                self._count_issued(conn, caller, minute, counted[caller])
            self._insert_audit(conn, new_events)
        return outcomes

    def _database_clock_offset(self, conn: Connection) -> timedelta:
        """How far the database server's clock is ahead of this host's; zero with SQLite.

        The quota counts are stamped and windowed by the database's clock: replicas share the
        counts, so they must share the clock too. By each replica's own clock, one whose clock
        was two hours ahead counted only its own last hour and issued a caller's whole quota
        again. SQLite's writers all run on one host, under one clock.
        """
        if self.dialect == "sqlite":
            return timedelta(0)
        database_now: datetime = conn.execute(_DATABASE_NOW).scalar_one()
        return database_now - datetime.now(UTC)

    @staticmethod
    def _issued_last_hour(conn: Connection, caller: str, minute: int) -> int:
        """The caller's certificates in every minute that overlaps the 60 minutes up to this minute (see schema version 7)."""
        return int(conn.execute(_ISSUED_SINCE, {"caller": caller, "minute": minute - 60}).scalar_one())

    def _count_issued(self, conn: Connection, caller: str, minute: int, count: int) -> None:
        """Add count to the caller's current minute; drop its minutes outside every window, once a minute.

        Runs in every group commit for every caller in it: the upsert is built once
        (_count_statement), and the clean-up runs once per caller and minute, not per commit.
        The clean-up keeps QUOTA_COUNTS_KEPT_MINUTES, not only this clock's last hour: replicas
        share the counts, and a replica whose clock is ahead removed every count in the last hour
        of the replicas on time, which then issued the caller's quota again.
        """
        conn.execute(self._count_statement, {"caller": caller, "minute": minute, "issued": count})
        if self._cleaned_minute.get(caller) != minute:
            counts = caller_issuance_by_minute
            conn.execute(delete(counts).where(counts.c.caller == caller, counts.c.minute < minute - QUOTA_COUNTS_KEPT_MINUTES))
            self._cleaned_minute[caller] = minute

    def _insert_audit(self, conn: Connection, events: Sequence[AuditEvent]) -> None:
        """Append audit events inside the caller's transaction, in order: the only writer of audit_events.

        The chain is assigned here, under the transaction's write lock: SQLite's BEGIN
        IMMEDIATE (and the store's write flock) already serialise writers; on PostgreSQL a
        transaction-scoped advisory lock does, taken as the transaction's last lock (every
        writer appends its events at its end), so it cannot take part in a deadlock. The
        head is the last row itself (a primary-key lookup), so there is no second copy of
        it to drift.

        The events are then read back in the same transaction, which fails (FailedPrecondition,
        nothing committed) unless the store holds exactly the rows just hashed from the first
        new seq on: a trigger, rule or policy someone left on audit_events that drops or changes
        an event would otherwise let the change it records commit without it, and the chain would
        link on from the event before, for every later check to find whole. On PostgreSQL the
        deferred triggers are run first (SET CONSTRAINTS ALL IMMEDIATE), since they would
        otherwise run at COMMIT, after the read.

        The store remembers the last event it committed. If the log no longer holds it as written
        (events removed or replaced at the end of the log, before a checkpoint covered them), an
        `audit.gap` event saying so goes first, and an ERROR is logged: the chain would otherwise
        go on from the event before them and no later check could tell.
        """
        if not events and self._last_appended is None:
            return
        rows = [_audit_values(e) for e in events]
        if not self.audit_chain:
            if rows:
                conn.execute(_INSERT_AUDIT_EVENTS, rows)
            return
        if self.dialect == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK_KEY)))
        head = conn.execute(_AUDIT_HEAD).first()
        gap = self._gap_since_last_append(conn, head)
        if gap is not None:
            rows.insert(0, _audit_values(gap))
        if not rows:
            return
        seq, prev = (int(head.seq), bytes(head.hash)) if head is not None and head.hash is not None else (0, GENESIS)
        if head is not None and head.hash is None:
            seq = int(head.seq)  # an unchained row (written with audit.chain = false): chain on from it
        for row in rows:
            seq += 1
            digest = event_hash(row, seq, prev)
            row.update(seq=seq, prev_hash=prev, hash=digest)
            prev = digest
        conn.execute(_INSERT_AUDIT_EVENTS, rows)
        if self.dialect == "postgresql":
            conn.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))
        written = [(row["seq"], row["prev_hash"], row["hash"]) for row in rows]
        stored = [(int(r.seq), _bytes(r.prev_hash), _bytes(r.hash)) for r in conn.execute(_AUDIT_FROM, {"first": written[0][0]})]
        if stored != written:
            raise _audit_not_kept(written, stored)
        self._appended.last = (written[-1][0], written[-1][2])  # remembered once the transaction commits (_begin)

    def _missing_last_append(self, conn: Connection, head: Any) -> tuple[int, bytes, int] | None:
        """(seq, hash, the head's seq) of the last event this store committed, if the log no longer holds it as written."""
        mine = self._last_appended
        if mine is None or (head is not None and head.hash is None):
            return None
        seq, digest = mine
        if head is not None and int(head.seq) >= seq:
            found = bytes(head.hash) if int(head.seq) == seq else _bytes(conn.execute(_AUDIT_HASH_AT, {"seq": seq}).scalar())
            if found == digest:
                return None
        return seq, digest, int(head.seq) if head is not None else 0

    def _gap_since_last_append(self, conn: Connection, head: Any) -> AuditEvent | None:
        """An audit.gap event (and an ERROR logged) if the log no longer holds, as written, the last event this store committed."""
        missing = self._missing_last_append(conn, head)
        if missing is None:
            return None
        seq, digest, head_seq = missing
        what = "is gone" if head_seq < seq else "was replaced"
        log.error(
            "audit log: event %d, which this process wrote (hash %s...), %s: events were removed from the end of the log "
            "behind the daemon's back (the head is now seq %d); recording an audit.gap event",
            seq,
            digest.hex()[:16],
            what,
            head_seq,
        )
        return AuditEvent(
            time=datetime.now(UTC),
            actor="ca-daemon",
            action="audit.gap",
            outcome="detected",
            reason=f"event {seq}, which this process wrote, {what}: events were removed from the log behind its back",
            details={"written_seq": str(seq), "written_hash": digest.hex(), "head_seq": str(head_seq)},
        )

    def record_audit_gap(self) -> None:
        """Append an audit.gap event, nothing else, if the log no longer holds the last event this store committed.

        The checkpointer asks before it signs (at every interval and when the worker stops), so a
        gap is recorded even by a process that writes nothing more. A read comes first: the write
        transaction (SQLite's write lock, the chain lock on PostgreSQL), which checks again under
        the lock, is taken only when that finds a gap, not at every interval of an idle daemon.
        """
        if self._last_appended is None or not self.audit_chain:
            return
        with self._connect() as conn:
            if self._missing_last_append(conn, conn.execute(_AUDIT_HEAD).first()) is None:
                return
        with self._begin() as conn:
            self._insert_audit(conn, [])

    def append_audit(self, events: Iterable[AuditEvent]) -> None:
        batch = list(events)
        if batch:
            with self._begin() as conn:
                self._insert_audit(conn, batch)

    def audit_events(self) -> list[dict[str, Any]]:
        with self._connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(audit_events).order_by(audit_events.c.seq))]

    # -- revocations and CRLs (issue 5) --------------------------------------
    #
    # Each revocation row carries its revokedCertificate entry, DER-encoded once by the
    # caller (`encode_entry`), so a full CRL is a concatenation of stored bytes and a
    # revocation costs a few indexed statements no matter how many rows exist.

    def record_revocations(
        self,
        *,
        serials: Sequence[int],
        device_id: str,
        reason: int,
        revoked_at: datetime,
        invalidity_date: datetime | None,
        actor: str,
        encode_entry: Callable[[int, datetime, int, datetime | None], bytes],
        skip_revoked: bool = False,
    ) -> list[Revocation]:
        """Revoke the listed serials and every unrevoked certificate of device_id, in one transaction.

        A listed serial that is unknown is NotFound and one already revoked is
        FailedPrecondition naming the first revocation; either way nothing is revoked.
        With skip_revoked, a listed serial already revoked is skipped instead (the key
        ceremony's passes: another call may have revoked it since they listed it).
        A certificateHold may be turned into a final reason. Certificates of the device
        that are already revoked are skipped. The commit is durable when this returns.
        """
        revocations: list[Revocation] = []
        events: list[AuditEvent] = []
        with self._begin() as conn:
            # Looked up a page of serials a statement, with one prebuilt statement: one statement built and run per
            # serial cost an emergency's revocation pass about 0.35 ms a certificate on SQLite and 0.9 ms on PostgreSQL.
            wanted = [serial_hex(serial) for serial in serials]
            found: dict[str, Any] = {}
            for start in range(0, len(wanted), _SERIALS_PER_STATEMENT):
                page = wanted[start : start + _SERIALS_PER_STATEMENT]
                found.update((row.serial, row) for row in conn.execute(_REVOCATION_TARGETS, {"serials": page}))
            targets: dict[str, Any] = {}
            for serial_text in wanted:
                if serial_text not in found:
                    raise NotFound.no_certificate(serial_text)
                targets[serial_text] = found[serial_text]
            explicit = set(targets)
            if device_id:
                rows = conn.execute(
                    select(certificates.c.serial, certificates.c.issuer_key_id, certificates.c.not_after, certificates.c.device_id).where(
                        certificates.c.device_id == device_id
                    )
                ).all()
                if not rows and not serials:
                    raise NotFound(f"no certificate was issued for device {echo(device_id)}", rule="device_id", field="device_id")
                for row in rows:
                    targets.setdefault(row.serial, row)
            # change_seq is max + 1 per issuer: replicas take it one at a time, so the sequence
            # numbers are handed out in commit order and a CRL complete "up to N" cannot miss
            # a change numbered N that commits later. Also serialises revoking the same serial.
            xact_locks(conn, [(LockSpace.REVOCATIONS, cert.issuer_key_id) for cert in targets.values()])
            existing: dict[str, Any] = {}
            listed = list(targets)
            for start in range(0, len(listed), _SERIALS_PER_STATEMENT):
                page = listed[start : start + _SERIALS_PER_STATEMENT]
                existing.update((r.serial, r) for r in conn.execute(_REVOCATIONS_OF, {"serials": page}))
            new_rows: list[dict[str, Any]] = []
            next_seq: dict[str, int] = {}
            retired = self._retired_issuers(conn, {cert.issuer_key_id for cert in targets.values()})
            for serial_text, cert in targets.items():
                if cert.issuer_key_id in retired:
                    if serial_text in explicit:
                        raise _issuer_retired(serial_text, cert.issuer_key_id, retired[cert.issuer_key_id])
                    continue  # a device's old certificate: revoked or expired before its issuer retired
                previous = existing.get(serial_text)
                if previous is not None and previous.lifted_at is None:
                    upgrade = previous.reason == RevocationReason.CERTIFICATE_HOLD and reason != RevocationReason.CERTIFICATE_HOLD
                    if not upgrade:
                        if serial_text in explicit and not skip_revoked:
                            raise FailedPrecondition(
                                f"certificate {serial_text} is already revoked: {RevocationReason(previous.reason).name.lower()} "
                                f"at {_utc(previous.revoked_at).isoformat()}",
                                rule="already-revoked",
                                field="serial",
                                expected="a certificate that is not revoked (only certificateHold can be changed)",
                            )
                        continue
                issuer = cert.issuer_key_id
                if issuer not in next_seq:
                    next_seq[issuer] = self._max_change_seq(conn, issuer) + 1
                serial = int(serial_text, 16)
                values = {
                    "issuer_key_id": issuer,
                    "reason": int(reason),
                    "revoked_at": revoked_at,
                    "invalidity_date": invalidity_date,
                    "revoked_by": actor,
                    "lifted_at": None,
                    "change_seq": next_seq[issuer],
                    "not_after": _utc(cert.not_after),
                    "entry_der": encode_entry(serial, revoked_at, int(reason), invalidity_date),
                }
                if previous is None:
                    new_rows.append({"serial": serial_text, **values})  # inserted together, below
                else:
                    conn.execute(update(revocations_table).where(revocations_table.c.serial == serial_text).values(**values))
                events.append(
                    AuditEvent(
                        time=revoked_at,
                        actor=actor,
                        action="certificate.revoke",
                        outcome="revoked",
                        serial=serial,
                        device_id=cert.device_id,
                        key_id=issuer,
                        reason=RevocationReason(reason).name.lower(),
                        details={"invalidity_date": invalidity_date.isoformat()} if invalidity_date else {},
                    )
                )
                revocations.append(Revocation(serial, issuer, RevocationReason(reason), revoked_at, invalidity_date))
            if new_rows:
                conn.execute(_INSERT_REVOCATIONS, new_rows)
            self._insert_audit(conn, events)
        return revocations

    def lift_hold(
        self,
        serial: int,
        *,
        lifted_at: datetime,
        actor: str,
        encode_entry: Callable[[int, datetime, int, datetime | None], bytes],
        reissue_profiles: Collection[str],
    ) -> Revocation:
        """Lift a certificateHold: the row stays, as a removeFromCRL entry for the next delta.

        The certificate becomes active again, so it meets the rule a new one meets: unless its
        profile is one of reissue_profiles (the profiles in force that allow re-issue), the lift
        is refused while its device has another active certificate (one issued while this one
        was on hold). The check runs under the device's DEVICE lock, which the issuing
        transaction takes too, so a lift and an issuance for one device cannot both pass it.
        """
        serial_text = serial_hex(serial)
        with self._begin() as conn:
            cert = conn.execute(
                select(certificates.c.issuer_key_id, certificates.c.device_id, certificates.c.profile, certificates.c.not_after).where(
                    certificates.c.serial == serial_text
                )
            ).first()
            if cert is not None:
                # REVOCATIONS: see record_revocations; DEVICE: see record_unique_issuances. One call, one global order.
                xact_locks(conn, [(LockSpace.REVOCATIONS, cert.issuer_key_id), (LockSpace.DEVICE, cert.device_id)])
            row = conn.execute(select(revocations_table).where(revocations_table.c.serial == serial_text)).first()
            if row is None or row.lifted_at is not None:
                exists = conn.execute(select(certificates.c.serial).where(certificates.c.serial == serial_text)).first()
                if exists is None:
                    raise NotFound.no_certificate(serial_text)
                raise FailedPrecondition(
                    f"certificate {serial_text} is not on hold, so there is nothing to lift",
                    rule="not-on-hold",
                    field="serial",
                    expected="a certificate revoked with reason certificateHold",
                )
            if row.reason != RevocationReason.CERTIFICATE_HOLD:
                raise FailedPrecondition(
                    f"certificate {serial_text} was revoked for {RevocationReason(row.reason).name.lower()} at "
                    f"{_utc(row.revoked_at).isoformat()}; only certificateHold can be lifted",
                    rule="revocation-final",
                    field="serial",
                    expected="a certificate revoked with reason certificateHold",
                )
            retired = self._retired_issuers(conn, {row.issuer_key_id})
            if retired:
                raise _issuer_retired(serial_text, row.issuer_key_id, retired[row.issuer_key_id])
            assert cert is not None  # a revocation row references its certificate
            if cert.profile not in reissue_profiles and _utc(cert.not_after) > lifted_at:
                others = conn.execute(_ACTIVE_OF_DEVICES, {"devices": [cert.device_id], "now": lifted_at}).all()
                other = min((s for s, _ in others if s != serial_text), default=None)
                if other is not None:
                    raise FailedPrecondition(
                        f"device {echo(cert.device_id)} has another active certificate ({other}), and the profile "
                        f"{echo(cert.profile)} of certificate {serial_text} does not allow re-issue; revoke {other} first, "
                        "then lift the hold",
                        rule="device-unique",
                        field="serial",
                        expected="a held certificate whose device has no other active certificate",
                    )
            revoked_at = _utc(row.revoked_at)
            conn.execute(
                update(revocations_table)
                .where(revocations_table.c.serial == serial_text)
                .values(
                    lifted_at=lifted_at,
                    change_seq=self._max_change_seq(conn, row.issuer_key_id) + 1,
                    entry_der=encode_entry(serial, revoked_at, REMOVE_FROM_CRL, None),
                )
            )
            self._insert_audit(
                conn,
                [
                    AuditEvent(
                        time=lifted_at,
                        actor=actor,
                        action="certificate.unrevoke",
                        outcome="hold-lifted",
                        serial=serial,
                        key_id=row.issuer_key_id,
                    )
                ],
            )
        return Revocation(serial, row.issuer_key_id, RevocationReason(row.reason), revoked_at, None)

    def get_revocation(self, serial: int) -> Revocation | None:
        """The revocation in force for a serial (a lifted hold is none)."""
        with self._connect() as conn:
            row = conn.execute(
                select(revocations_table).where(revocations_table.c.serial == serial_hex(serial), revocations_table.c.lifted_at.is_(None))
            ).first()
        if row is None:
            return None
        return Revocation(
            serial,
            row.issuer_key_id,
            RevocationReason(row.reason),
            _utc(row.revoked_at),
            _utc(row.invalidity_date) if row.invalidity_date is not None else None,
        )

    @staticmethod
    def _retired_issuers(conn: Connection, key_ids: set[str]) -> dict[str, str]:
        """The retired or destroyed keys among key_ids, with their status.

        Read under the issuers' revocation locks, which a retirement takes too (it checks that
        nothing changed since its final CRL was built), so neither can slip past the other.
        """
        if not key_ids:
            return {}
        rows = conn.execute(
            select(ca_keys.c.key_id, ca_keys.c.status)
            .where(ca_keys.c.key_id.in_(sorted(key_ids)))
            .where(ca_keys.c.status.in_((KeyStatus.RETIRED.value, KeyStatus.DESTROYED.value)))
        )
        return {row.key_id: row.status for row in rows}

    def max_change_seq(self, issuer_key_id: str) -> int:
        with self._connect() as conn:
            return self._max_change_seq(conn, issuer_key_id)

    @staticmethod
    def _max_change_seq(conn: Connection, issuer_key_id: str) -> int:
        value = conn.execute(
            select(func.max(revocations_table.c.change_seq)).where(revocations_table.c.issuer_key_id == issuer_key_id)
        ).scalar()
        return int(value or 0)

    # The one statement that reads up to millions of rows. It goes to the DB-API cursor:
    # 1,000,000 entries took 2.4-2.8 s through SQLAlchemy's result rows, of which 1.4 s was
    # the driver's own fetch (measured here); on PostgreSQL the cursor is a server-side one,
    # so the rows stream instead of being loaded at once.
    _CRL_ENTRIES = "SELECT entry_der FROM revocations WHERE issuer_key_id = ? AND change_seq <= ?"

    def crl_entries(self, issuer_key_id: str, *, after_seq: int | None, drop_expired: tuple[datetime, int] | None) -> CrlEntries:
        """Concatenated revokedCertificate entries from one consistent snapshot.

        after_seq None: the entries of a full CRL (holds lifted are left out; with
        drop_expired=(time, seq), entries of certificates expired before `time` that were
        already complete at change `seq`, i.e. on the previous base, are left out too).
        after_seq set: the entries of a delta, every change after that sequence number,
        lifted holds included as their removeFromCRL entries.
        """
        body = bytearray()
        count = 0
        # One snapshot for the high-water mark and the rows (SQLite's read transaction is one already).
        options = {"isolation_level": "REPEATABLE READ"} if self.dialect == "postgresql" else {}
        with _driver_errors(), self._connect(**options) as conn:
            upto = self._max_change_seq(conn, issuer_key_id)
            sql, params = self._CRL_ENTRIES, [issuer_key_id, upto]
            if after_seq is not None:
                sql, params = sql + " AND change_seq > ?", [*params, after_seq]
            else:
                sql += " AND lifted_at IS NULL"
                if drop_expired is not None:
                    before, seq = drop_expired
                    sql, params = sql + " AND (not_after >= ? OR change_seq > ?)", [*params, self._bind_time(before), seq]
            dbapi = conn.connection.dbapi_connection
            cursor = dbapi.cursor(name="crl_entries") if self.dialect == "postgresql" else dbapi.cursor()
            try:
                cursor.execute(sql.replace("?", self._placeholder), params)
                while rows := cursor.fetchmany(20000):
                    body += b"".join(row[0] for row in rows)
                    count += len(rows)
            finally:
                cursor.close()
        return CrlEntries(body, count, upto)

    def latest_crl(self, issuer_key_id: str, *, delta: bool, with_der: bool = True) -> PublishedCrl | None:
        columns = [c for c in crls.c if with_der or c.name != "der"]
        with self._connect() as conn:
            row = conn.execute(
                select(*columns)
                .where(crls.c.issuer_key_id == issuer_key_id, crls.c.is_delta == delta)
                .order_by(crls.c.crl_number.desc())
                .limit(1)
            ).first()
        return _published_crl(row, with_der) if row else None

    def max_crl_number(self, issuer_key_id: str) -> int:
        with self._connect() as conn:
            return self._max_crl_number(conn, issuer_key_id)

    @staticmethod
    def _max_crl_number(conn: Connection, issuer_key_id: str) -> int:
        """The number the next CRL must exceed: the highest published, or the issuer's floor if higher."""
        published = conn.execute(select(func.max(crls.c.crl_number)).where(crls.c.issuer_key_id == issuer_key_id)).scalar()
        floor = conn.execute(select(crl_number_floors.c.floor).where(crl_number_floors.c.issuer_key_id == issuer_key_id)).scalar()
        return max(int(published or 0), int(floor or 0))

    def raise_crl_number_floor(self, issuer_key_id: str, above: int, audit: AuditEvent) -> int:
        """Make every later CRL of the issuer numbered above `above`; returns the floor now in force (never lowered)."""
        with self._begin() as conn:
            xact_lock(conn, LockSpace.CRL_NUMBER, issuer_key_id)
            current = self._max_crl_number(conn, issuer_key_id)
            if above > current:
                conn.execute(delete(crl_number_floors).where(crl_number_floors.c.issuer_key_id == issuer_key_id))
                conn.execute(insert(crl_number_floors).values(issuer_key_id=issuer_key_id, floor=above, set_at=_now(), set_by=audit.actor))
                self._insert_audit(conn, [audit])
            return max(current, above)

    def store_crl(
        self,
        crl: PublishedCrl,
        audit: AuditEvent | None = None,
        *,
        keep: int = 3,
        fence: Leadership | None = None,
        final: bool = False,
        clock_was_ahead: bool = False,
    ) -> None:
        """Record a CRL as published (with its audit event), refusing a number that is not above every earlier one.

        The check runs inside the write transaction (like Boulder's CRL storer), under the
        issuer's CRL_NUMBER lock, so a restarted or second publisher can never publish a
        number twice or go backwards. With a fence, the commit is also refused unless the
        caller still holds the CRL leadership. A final CRL (a retiring key's) is never followed
        by another one but a final one (rule issuer-final-crl). Only the newest `keep` CRLs of
        each kind are kept.

        Its thisUpdate may not be before that of the issuer's newest CRL of either kind (rule
        crl-this-update-monotonic), checked here under the same lock: the publisher dates a CRL
        before it builds it, and another publisher (`ca-daemon crl publish`, on a replica whose
        clock is a second ahead, while the leader waited for the next second) could store a later
        dated one in between. Unless clock_was_ahead: an operator replaces future-dated CRLs.
        """
        with self._begin() as conn:
            xact_lock(conn, LockSpace.CRL_NUMBER, crl.issuer_key_id)
            if fence is not None:
                fence.fence(conn)
            last = self._max_crl_number(conn, crl.issuer_key_id)
            if crl.crl_number <= last:
                raise FailedPrecondition(
                    f"CRL number {crl.crl_number} of issuer {crl.issuer_key_id} is not above the last published {last}; not published",
                    rule=CRL_NUMBER_TAKEN,
                )
            if not clock_was_ahead:
                for kind in (False, True):
                    dated = conn.execute(
                        select(crls.c.this_update, crls.c.crl_number)
                        .where(crls.c.issuer_key_id == crl.issuer_key_id, crls.c.is_delta == kind)
                        .order_by(crls.c.crl_number.desc())
                        .limit(1)
                    ).first()
                    if dated is not None and crl.this_update < _utc(dated.this_update):
                        raise FailedPrecondition(
                            f"CRL {crl.crl_number} of issuer {crl.issuer_key_id} is dated {crl.this_update.isoformat()}, before "
                            f"thisUpdate {_utc(dated.this_update).isoformat()} of {'delta' if kind else 'full'} CRL "
                            f"{dated.crl_number} stored meanwhile; not published",
                            rule=CRL_THIS_UPDATE_BEHIND,
                        )
            newest = conn.execute(
                select(crls.c.is_final).where(crls.c.issuer_key_id == crl.issuer_key_id).order_by(crls.c.crl_number.desc()).limit(1)
            ).scalar()
            if newest and not final:
                raise FailedPrecondition(
                    f"issuer {crl.issuer_key_id} published its final CRL (it is being retired); CRL {crl.crl_number} not published",
                    rule=ISSUER_FINAL_CRL,
                )
            conn.execute(
                insert(crls).values(
                    issuer_key_id=crl.issuer_key_id,
                    crl_number=crl.crl_number,
                    is_delta=crl.is_delta,
                    base_crl_number=crl.base_crl_number,
                    this_update=crl.this_update,
                    next_update=crl.next_update,
                    change_seq=crl.change_seq,
                    entries=crl.entries,
                    der=crl.der,
                    published_at=crl.published_at,
                    is_final=final,
                )
            )
            kept = (
                select(crls.c.crl_number)
                .where(crls.c.issuer_key_id == crl.issuer_key_id, crls.c.is_delta == crl.is_delta)
                .order_by(crls.c.crl_number.desc())
                .limit(keep)
            )
            conn.execute(
                delete(crls).where(
                    crls.c.issuer_key_id == crl.issuer_key_id, crls.c.is_delta == crl.is_delta, crls.c.crl_number.not_in(kept)
                )
            )
            self._set_crl_status(conn, crl.issuer_key_id, ok=True, message="", at=crl.published_at)
            if audit is not None:
                self._insert_audit(conn, [audit])

    def set_crl_status(
        self, issuer_key_id: str, *, ok: bool, message: str, fence: Leadership | None = None, unless_published_above: int | None = None
    ) -> bool:
        """Record the outcome of a publication attempt; with a fence, only while the caller still leads.

        The row is shared by every replica (crl_failures -> CRL health), so a process that lost
        the leadership must not overwrite what the new leader's publications say. Nor does an
        attempt that began at CRL number unless_published_above overwrite the success of a CRL
        stored above it meanwhile: False, nothing recorded.
        """
        with self._begin() as conn:
            if fence is not None:
                fence.fence(conn)
            if unless_published_above is not None:
                published = conn.execute(select(func.max(crls.c.crl_number)).where(crls.c.issuer_key_id == issuer_key_id)).scalar()
                if published is not None and int(published) > unless_published_above:
                    return False
            self._set_crl_status(conn, issuer_key_id, ok=ok, message=message, at=_now())
            return True

    def _set_crl_status(self, conn: Connection, issuer_key_id: str, *, ok: bool, message: str, at: datetime) -> None:
        stmt = self._insert(crl_publish_status).values(issuer_key_id=issuer_key_id, ok=ok, message=message[:2000], attempted_at=at)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["issuer_key_id"], set_={"ok": ok, "message": message[:2000], "attempted_at": at})
        )

    def crl_failures(self) -> list[tuple[str, str]]:
        """(issuer, message) of every issuer whose last CRL publication failed."""
        with self._connect() as conn:
            rows = conn.execute(
                select(crl_publish_status.c.issuer_key_id, crl_publish_status.c.message).where(crl_publish_status.c.ok.is_(False))
            ).all()
        return [(r.issuer_key_id, r.message) for r in rows]

    # -- plumbing ----------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self, **options: Any) -> Iterator[Any]:
        """A read connection. A session that fails while it is used (not only at check-out) is StoreUnavailable."""
        try:
            conn = self.engine.connect().execution_options(ca_read_only=True, **options)
        except (OperationalError, DBAPIError) as exc:
            raise _unavailable(_brief(exc)) from None
        except PoolTimeout:
            raise self._pool_exhausted() from None
        with _outage_is_unavailable(), conn:
            yield conn

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A write transaction. On SQLite, writers of all processes queue on a file lock first.

        SQLite's own busy handler polls with sleeps of up to 100 ms, which under several
        worker processes turned commits of a few milliseconds into p99 latencies of seconds;
        a blocking flock hands the lock to the next waiter as soon as it is released. The
        wait for it is bounded by lock_wait_ms, like SQLite's busy_timeout and PostgreSQL's
        lock_timeout (see write_lock.py): a holder that stops does not hang every writer.
        """
        with self._write_lock.held() if self._write_lock is not None else contextlib.nullcontext():
            self._check_wal()
            try:
                transaction = self.engine.begin()
                conn = transaction.__enter__()
            except (OperationalError, DBAPIError) as exc:
                raise _unavailable(_brief(exc)) from None
            except PoolTimeout:
                raise self._pool_exhausted() from None
            # A session that dies mid-transaction or at COMMIT (a server restart, a full disk) rolls the
            # transaction back: the caller is told to retry, and a retry finds whatever did commit.
            with _outage_is_unavailable():
                self._appended.last = None
                try:
                    self._check_same_file()
                    yield conn
                except BaseException:
                    # Not conn.info: a connection whose session died refuses every use until rolled back.
                    self._appended.last = None
                    transaction.__exit__(*sys.exc_info())
                    raise
                appended, self._appended.last = self._appended.last, None
                transaction.__exit__(None, None, None)
                if appended is not None:
                    self._last_appended = appended

    def _pool_exhausted(self) -> StoreUnavailable:
        wait = self.engine.pool.timeout()  # type: ignore[attr-defined]
        return _unavailable(
            f"all {_POOL_SIZE + _POOL_OVERFLOW} database connections of this process were in use for {wait:g} s "
            "(calls waiting on a slow database or a lock)"
        )

    def _check_same_file(self) -> None:
        """Refuse to write unless the file at the SQLite path is still the one this store's connections opened.

        A database file deleted, or moved away, while the daemon runs stays open in the pooled
        connections: what they committed would be lost with the process, or land in a file no
        one reads. Writes resume by themselves when that file is back at its path.
        """
        if self._sqlite_file is None or self._sqlite_identity is None:
            return
        found = _file_identity(self._sqlite_file)
        if found != self._sqlite_identity:
            raise StoreUnavailable(
                f"the database file {self._sqlite_file} is {'gone' if found is None else 'another file'}: it was deleted, moved "
                "or replaced while the daemon ran, so nothing is written; put back the file the daemon opened, or stop the "
                "daemon and restore the database (ca-daemon db restore)",
                caller_message="the database file was deleted, moved or replaced while the daemon ran, so nothing was written; "
                "retry later (the daemon's log says what its operator must do)",
            )

    def _check_wal(self) -> None:
        """Refuse to write once the write-ahead log is gone from its path (SQLite keeps it while a connection is open).

        Checked before a write transaction begins, so that an open connection of the pool, which
        still reaches the deleted log, is free to copy it into the database file.
        """
        if self._wal_lost:
            self._refuse_without_wal()
        if not self._wal_mode or self._sqlite_file is None or os.path.exists(self._sqlite_file + "-wal"):
            return
        pool = self.engine.pool
        if isinstance(pool, QueuePool) and pool.checkedin() + pool.checkedout() > 0:  # else the last close removed it
            self._refuse_without_wal()

    def _refuse_without_wal(self) -> NoReturn:
        """The write-ahead log was deleted while this process had it open: write nothing more into it.

        SQLite goes on committing into the deleted file, which only this daemon's processes still
        reach: a crash would lose all of it (certificates that were handed out, revocations that
        were acknowledged), and a CRL number could be used twice. A clean stop writes it back into
        the database file as the last connection closes; a checkpoint now does so at once.
        """
        if not self._wal_lost:
            self._wal_lost = True
            try:
                raw = self.engine.raw_connection()  # an open connection of the pool: it still reaches the deleted log
                try:
                    cursor = raw.cursor()
                    cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    _busy, frames, copied = cursor.fetchone() or (0, 0, 0)
                finally:
                    raw.close()
                saved = f"a checkpoint copied {copied} of its {frames} page(s) into {self._sqlite_file}"
            except Exception as exc:
                saved = f"a checkpoint failed ({_brief(exc)})"
            log.error(
                "the database's write-ahead log %s-wal was deleted while the daemon ran; %s. Nothing more is written: "
                "stop the daemon cleanly (SIGTERM, not kill -9: its connections write the log back into the database "
                "file as they close), then start it again",
                self._sqlite_file,
                saved,
            )
        raise StoreUnavailable(
            f"the database's write-ahead log {self._sqlite_file}-wal was deleted while the daemon ran, so nothing is written; "
            "stop the daemon cleanly (SIGTERM) and start it again",
            caller_message="the database's write-ahead log was deleted while the daemon ran, so nothing was written; "
            "retry later (the daemon's log says what its operator must do)",
        )


# The statements of every group commit, built once: constructing a Core statement and its
# cache key costs more than running it, and a commit runs several (measured: about a third
# of a small commit's CPU). Lists bind through expanding parameters.
_ISSUED_SINCE = select(func.coalesce(func.sum(caller_issuance_by_minute.c.issued), 0)).where(
    caller_issuance_by_minute.c.caller == bindparam("caller"), caller_issuance_by_minute.c.minute >= bindparam("minute")
)
_DATABASE_NOW = select(func.statement_timestamp())
_ANSWERED = select(certificates).where(certificates.c.request_id.in_(bindparam("request_ids", expanding=True)))
# A certificate without a revocation in force, looked up by its serial (the revocations' key). Not
# `serial NOT IN (SELECT serial FROM revocations ...)`: both SQLite (LIST SUBQUERY) and PostgreSQL
# (hashed SubPlan) read every revocation to answer that, once per statement: with 145,000
# revocations 45-86 ms per group commit, inside its write transaction, whenever a device in
# the batch had a certificate before (measured; see README, Performance).
_NOT_REVOKED = ~exists().where(revocations_table.c.serial == certificates.c.serial, revocations_table.c.lifted_at.is_(None))
_ACTIVE_OF_DEVICES = select(certificates.c.serial, certificates.c.device_id).where(
    certificates.c.device_id.in_(bindparam("devices", expanding=True)),
    certificates.c.not_after > bindparam("now", type_=certificates.c.not_after.type),
    _NOT_REVOKED,
)
_DEVICES_OF_KEYS = (
    select(certificates.c.public_key_sha256, certificates.c.device_id)
    .where(certificates.c.public_key_sha256.in_(bindparam("keys", expanding=True)))
    .distinct()
)
_INSERT_CERTIFICATES = insert(certificates)
# The issuer keys of a group commit, their status and whether an emergency halted them, locked FOR SHARE in key order
# (so two commits and a key switch or halt, which lock their keys FOR NO KEY UPDATE in the same order, cannot
# deadlock); SQLite's compiler leaves the clause out.
_ISSUER_KEYS = (
    select(ca_keys.c.key_id, ca_keys.c.status, ca_keys.c.halted_at, func.current_timestamp().label("database_now"))
    .where(ca_keys.c.key_id.in_(bindparam("key_ids", expanding=True)))
    .order_by(ca_keys.c.key_id)
    .with_for_update(read=True)
)
# record_revocations: its certificates and their revocations, a page of serials a statement.
_SERIALS_PER_STATEMENT = 1000
_REVOCATION_TARGETS = select(certificates.c.serial, certificates.c.issuer_key_id, certificates.c.not_after, certificates.c.device_id).where(
    certificates.c.serial.in_(bindparam("serials", expanding=True))
)
_REVOCATIONS_OF = select(revocations_table).where(revocations_table.c.serial.in_(bindparam("serials", expanding=True)))
_INSERT_REVOCATIONS = insert(revocations_table)
_INSERT_AUDIT_EVENTS = insert(audit_events)
_AUDIT_HEAD = select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)
_AUDIT_HASH_AT = select(audit_events.c.hash).where(audit_events.c.seq == bindparam("seq", type_=audit_events.c.seq.type))
_AUDIT_FROM = (
    select(audit_events.c.seq, audit_events.c.prev_hash, audit_events.c.hash)
    .where(audit_events.c.seq >= bindparam("first", type_=audit_events.c.seq.type))
    .order_by(audit_events.c.seq)
)


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


def _audit_not_kept(
    written: Sequence[tuple[int, bytes, bytes]], stored: Sequence[tuple[int, bytes | None, bytes | None]]
) -> FailedPrecondition:
    """The audit events just inserted do not read back as written: say which, and that nothing was committed."""
    kept = {seq: digest for seq, _, digest in stored}
    missing = [seq for seq, _, digest in written if seq not in kept]
    changed = [seq for seq, _, digest in written if seq in kept and kept[seq] != digest]
    extra = [seq for seq, _, _ in stored if seq > written[-1][0]]
    what = "; ".join(
        f"{label} {', '.join(map(str, seqs[:5]))}{' ...' if len(seqs) > 5 else ''}"
        for label, seqs in (("missing:", missing), ("changed:", changed), ("added after them:", extra))
        if seqs
    )
    return FailedPrecondition(
        f"the audit event(s) seq {written[0][0]}..{written[-1][0]} just written do not read back as written "
        f"({what or 'their prev_hash differs'}): "
        "something in the database (a trigger, rule or row-level security policy on audit_events) drops or changes "
        "the daemon's events, so nothing was committed. Remove what the daemon did not create, and compare the log "
        "with an earlier export (`ca-daemon audit verify --file`)",
        rule="audit-not-kept",
        caller_message="the audit log did not keep the event of this change, so nothing was committed; retry later "
        "(the daemon's log says what its operator must do)",
    )


@contextlib.contextmanager
def _outage_is_unavailable() -> Iterator[None]:
    """StoreUnavailable, with the database's reason, for what an outage raises mid-use.

    OperationalError: a session cut or terminated, a server shutting down, a full disk, a
    lock or statement timeout; InterfaceError: a connection already closed. Other
    database errors (a constraint, a bad statement) are bugs and stay internal errors.
    """
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise _unavailable(_brief(exc)) from None


@contextlib.contextmanager
def _driver_errors() -> Iterator[None]:
    """StoreUnavailable for a database failure, wrapped by SQLAlchemy or straight from the DB-API driver."""
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        raise _unavailable(_brief(exc)) from None
    except Exception as exc:  # a driver error outside SQLAlchemy's wrapping (a DB-API cursor of our own)
        if "database" in type(exc).__module__ or "sqlite" in type(exc).__module__ or "psycopg" in type(exc).__module__:
            raise _unavailable(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None
        raise


@dataclass(frozen=True)
class CrlEntries:
    """The entries of a CRL to be built: concatenated DER, how many, and the change they reach."""

    der: bytearray
    count: int
    change_seq: int


def _published_crl(row: Row[Any], with_der: bool) -> PublishedCrl:
    m = row._mapping
    return PublishedCrl(
        issuer_key_id=m["issuer_key_id"],
        crl_number=int(m["crl_number"]),
        base_crl_number=int(m["base_crl_number"]) if m["base_crl_number"] is not None else None,
        this_update=_utc(m["this_update"]),
        next_update=_utc(m["next_update"]),
        change_seq=int(m["change_seq"]),
        entries=int(m["entries"]),
        der=bytes(m["der"]) if with_der else b"",
        published_at=_utc(m["published_at"]),
    )


def _discarded(cert: IssuedCertificate, audit: AuditEvent, conflict: AlreadyExists | QuotaExceeded | CaKeyChanged) -> AuditEvent:
    if conflict.rule == "ca-key-compromised":
        note = "signed with a CA key an emergency switch had halted (compromised) when it was committed; discarded"
    elif isinstance(conflict, CaKeyChanged):
        note = "signed with a CA key that was no longer active when it was committed; discarded"
    else:
        note = "signed concurrently with a conflicting request; discarded"
    return AuditEvent(
        time=_now(),
        actor=audit.actor,
        action="certificate.issue",
        outcome="refused",
        serial=cert.serial,
        device_id=cert.device_id,
        key_id=cert.issuer_key_id,
        request_digest=cert.csr_sha256,
        reason=conflict.rule,
        details={**audit.details, "note": note},
    )


def _key_changed(cert: IssuedCertificate, status: str | None) -> CaKeyChanged | None:
    """A certificate signed by a key that is not the active one now (a worker that has not followed a switch yet), or
    by one an emergency halted ("halted": its successor is not active yet, and the worker has nothing to follow)."""
    if status == KeyStatus.ACTIVE.value:
        return None
    if status == "halted":
        return CaKeyChanged(
            f"certificate {serial_hex(cert.serial)} was signed with CA key {cert.issuer_key_id}, which is compromised: an "
            "emergency switch to its successor is under way and nothing this key signs is stored any more, so the certificate "
            "was discarded; issuance resumes once the successor key is active: retry with the same request_id",
            rule="ca-key-compromised",
            expected="a certificate signed with the active CA key, once the emergency switch has activated it",
        )
    return CaKeyChanged(
        f"certificate {serial_hex(cert.serial)} was signed with CA key {cert.issuer_key_id}, which is {status or 'unknown'} now: "
        "the CA key changed while the request was signed, and the certificate was discarded; retry with the same request_id "
        "to get a certificate signed with the active key",
        rule="ca-key-changed",
        expected="a certificate signed with the active CA key",
    )


def _uniqueness_conflict(cert: IssuedCertificate, active: tuple[int, ...], others: tuple[str, ...]) -> AlreadyExists | None:
    if active:
        return AlreadyExists(
            f"device {cert.device_id!r} already has an active certificate ({serial_hex(active[0])}); "
            "revoke it first or use a profile that allows re-issue",
            rule="device-unique",
            field="subject.CN",
            expected="a device ID without an active certificate",
        )
    if others:
        return AlreadyExists(
            f"this public key is already certified for another device ({others[0]!r}); every device needs its own key",
            rule="public-key-unique",
            field="csr.public_key",
            expected="a key pair not certified for another device ID",
        )
    return None


def replay_or_conflict(existing: IssuedCertificate, csr_sha256: bytes, caller: str) -> IssuanceOutcome | AlreadyExists:
    """The answer to a request_id used before: the same certificate, or a conflict."""
    return _replay(existing, csr_sha256, caller)


def _replay(existing: IssuedCertificate, csr_sha256: bytes, caller: str) -> IssuanceOutcome | AlreadyExists:
    if existing.caller and existing.caller != caller:
        # Another caller's request: it learns only that the id is taken, never the certificate or its serial.
        return AlreadyExists(
            f"request_id {echo(existing.request_id)} was used by another caller; request ids are one namespace for all "
            "callers: give yours a prefix of your own",
            rule="idempotency",
            field="request_id",
            expected="a request_id no other caller has used",
        )
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


def _minute(moment: datetime) -> int:
    """The quota counts' bucket of a moment: Unix time // 60."""
    return int(moment.timestamp() // 60)


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at path, None if there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _brief(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).splitlines()[0][:200]


# A path in a driver's reason: quoted, with a slash in it (psycopg's 'on socket "/run/postgresql/.s.PGSQL.5432"', a
# server's 'could not open file "base/16384/2619"'), or bare and absolute.
_PATH_IN_REASON = re.compile(r"\"[^\"]*/[^\"]*\"|'[^']*/[^']*'|(?<![\w:/])/[^\s,;:'\"]+")


def _unavailable(reason: str) -> StoreUnavailable:
    """StoreUnavailable with the database's reason; the caller's copy without the paths it may name (the host's layout)."""
    message = f"the database is unavailable: {reason}"
    return StoreUnavailable(message, caller_message=_PATH_IN_REASON.sub("(path in the daemon's log)", message))


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
        halted_at=_utc(m["halted_at"]) if m["halted_at"] is not None else None,
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
        "caller": cert.caller,
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
        caller=m["caller"],
    )


def _audit_values(event_: AuditEvent) -> dict[str, Any]:
    return {
        "time": _utc(event_.time).astimezone(UTC),
        "actor": event_.actor,
        "action": event_.action,
        "outcome": event_.outcome,
        "serial": serial_hex(event_.serial) if event_.serial is not None else None,
        "device_id": event_.device_id,
        "key_id": event_.key_id,
        "request_digest": event_.request_digest,
        "reason": event_.reason,
        "details": details_text(event_.details),
    }


def _record_activation(conn: Connection, key_id: str, at: datetime) -> None:
    """The key's activated_at life-cycle time, unless one is recorded."""
    row = conn.execute(select(ca_key_lifecycle.c.activated_at).where(ca_key_lifecycle.c.key_id == key_id)).first()
    if row is None:
        conn.execute(insert(ca_key_lifecycle).values(key_id=key_id, activated_at=at))
    elif row.activated_at is None:
        conn.execute(update(ca_key_lifecycle).where(ca_key_lifecycle.c.key_id == key_id).values(activated_at=at))


__all__ = ["CrlEntries", "SqlStore", "IssuanceOutcome", "serial_hex", "IntegrityError"]
