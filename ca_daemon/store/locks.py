"""Serialisation that the database enforces, so several replicas can write at once.

SQLite needs no help: every write transaction starts with BEGIN IMMEDIATE (see sql.py),
which takes the database's one write lock, so writers already run one at a time, and
only one daemon may use a SQLite file (its state-directory lock keeps a second one out).

PostgreSQL runs writers concurrently under READ COMMITTED. Wherever a use case reads
and then writes what it read (the next revocation change_seq, the next CRL number, the
tip of the audit chain, the uniqueness re-check of an issuance), it first takes a
transaction-scoped advisory lock on what it is about to read. The lock is released by
COMMIT or ROLLBACK, so a replica that dies never leaves one behind, and because each
statement under READ COMMITTED sees what was committed before it started, the reads
after the lock see the previous holder's writes.

Deadlock rule: a transaction takes all the locks it needs for its data in one
`xact_locks` call (they are taken in one global order), and AUDIT_CHAIN, if it needs it,
last, just before it appends audit events.

Leadership (who publishes CRLs) is a session-level advisory lock held on a dedicated
connection: when the process or its connection dies, PostgreSQL drops the session and
the lock with it, and another replica takes it over. On SQLite it is an flock beside
the database file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
from collections.abc import Iterable
from enum import IntEnum
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from ca_daemon.errors import FailedPrecondition

log = logging.getLogger(__name__)

# The rule of the refusal a fenced-out former leader gets: not a failure of the work, which another replica does now.
LEADER_FENCE = "leader-fence"


class LockSpace(IntEnum):
    """The first key of pg_advisory_(xact_)lock(int4, int4): what kind of thing is locked ("CA" + a number)."""

    MIGRATIONS = 0x43410001
    # The tip of the one audit chain (whoever appends events).
    AUDIT_CHAIN = 0x43410002
    # Per issuer: the revocations.change_seq counter (a delta covers the changes after its base).
    REVOCATIONS = 0x43410003
    # Per issuer: the CRL number sequence.
    CRL_NUMBER = 0x43410004
    # Issuance uniqueness re-checks: per device ID, per public key, per request_id.
    DEVICE = 0x43410005
    PUBLIC_KEY = 0x43410006
    REQUEST_ID = 0x43410007
    # Session-level: the one replica that publishes CRLs.
    CRL_LEADER = 0x43410008
    # Per caller: its issuance count for the quota (read, then raised, in the issuing transaction).
    CALLER_QUOTA = 0x43410009
    # The audit checkpoints: one per chain head, whichever worker or replica signs it first.
    AUDIT_CHECKPOINTS = 0x4341000A


def lock_id(space: LockSpace, key: str = "") -> tuple[int, int]:
    """(classid, objid) of a lock: the space and a 32-bit digest of the key (a collision only serialises more)."""
    return int(space), int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big", signed=True)


def xact_locks(conn: Connection, targets: Iterable[tuple[LockSpace, str]]) -> None:
    """Hold each (space, key) lock until this transaction ends; a no-op on SQLite, where BEGIN IMMEDIATE serialises.

    All targets are taken in one global order, so two transactions that lock
    overlapping sets wait for each other instead of deadlocking.
    """
    if conn.dialect.name != "postgresql":
        return
    for classid, objid in sorted({lock_id(space, key) for space, key in targets}):
        conn.execute(select(func.pg_advisory_xact_lock(classid, objid)))


def xact_lock(conn: Connection, space: LockSpace, key: str = "") -> None:
    """One transaction-scoped lock (see xact_locks); e.g. xact_lock(conn, LockSpace.AUDIT_CHAIN) before appending to the chain."""
    xact_locks(conn, [(space, key)])


class Leadership:
    """Whether this process is the one that publishes CRLs, decided by the database.

    `poll()` tries to take the lock when not holding it and, when holding it, checks it is
    still held (the connection may have died); call it before every round of work. A
    leader must also pass itself as the fence of store_crl, so a process that lost the
    lock without noticing (a network partition, a long pause) cannot publish.
    """

    def __init__(self, url: str, name: str = "crl") -> None:
        self.url = url
        self.name = name
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self.classid, self.objid = lock_id(LockSpace.CRL_LEADER, name)
        self.held = False
        self.backend_pid: int | None = None
        self._conn: Connection | None = None
        self._file: int | None = None
        self._engine: Engine | None = None
        if self.dialect == "postgresql":
            # A dedicated connection, outside the store's pool: the lock lives as long as this session.
            # Keepalives (both ends) make a dead peer visible within seconds, not the kernel's two hours.
            self._engine = create_engine(
                url.replace("postgresql://", "postgresql+psycopg://", 1),
                poolclass=NullPool,
                isolation_level="AUTOCOMMIT",
                connect_args={
                    "application_name": f"ca-daemon {name}-leader-candidate {socket.gethostname()} pid {os.getpid()}",
                    "connect_timeout": 5,
                    "keepalives": 1,
                    "keepalives_idle": 5,
                    "keepalives_interval": 2,
                    "keepalives_count": 3,
                },
            )

    def poll(self) -> bool:
        """Become or stay the leader if possible; return whether this process leads now."""
        try:
            held = self._poll_postgresql() if self.dialect == "postgresql" else self._poll_file()
        except (DBAPIError, OSError) as exc:
            if self.held:
                log.warning("lost %s leadership: %s", self.name, str(getattr(exc, "orig", exc)).splitlines()[0][:200])
            self._drop()
            held = False
        if held and not self.held:
            log.info("became the %s leader (pid %d, database session %s)", self.name, os.getpid(), self.backend_pid)
        elif self.held and not held:
            log.warning("no longer the %s leader", self.name)
        self.held = held
        return held

    def _poll_postgresql(self) -> bool:
        assert self._engine is not None
        if self._conn is None:
            self._conn = self._engine.connect()
            for setting in (
                "tcp_keepalives_idle = 5",
                "tcp_keepalives_interval = 2",
                "tcp_keepalives_count = 3",
                "tcp_user_timeout = 15000",
            ):
                self._conn.execute(text(f"SET {setting}"))
            self.backend_pid = int(self._conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        if not self.held:
            got = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:c, :o)"), {"c": self.classid, "o": self.objid}).scalar_one())
            if got:
                self._conn.execute(
                    text("SELECT set_config('application_name', :n, false)"),
                    {"n": f"ca-daemon {self.name}-leader {socket.gethostname()} pid {os.getpid()}"},
                )
            return got
        # Still ours? Asking pg_locks is also the liveness check of this connection.
        return bool(self._conn.execute(_HELD, {"c": self.classid, "o": self.objid}).scalar_one())

    def _poll_file(self) -> bool:
        if self.held:
            return True
        path = self.url.split("///", 1)[-1]
        if not path or path == ":memory:":
            return True
        if self._file is None:
            self._file = os.open(Path(path).with_name(Path(path).name + f".{self.name}-leader"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def fence(self, conn: Connection) -> None:
        """Inside a write transaction: refuse to go on unless this process still holds the leadership lock."""
        if self.dialect != "postgresql":
            return  # one daemon per SQLite file; the flock dies with the process
        still = self.held and conn.execute(_HELD_BY, {"c": self.classid, "o": self.objid, "p": self.backend_pid}).scalar_one()
        if not still:
            raise FailedPrecondition(f"this process is no longer the {self.name} leader; another replica publishes", rule=LEADER_FENCE)

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
            self.backend_pid = None
        self.held = False

    def release(self) -> None:
        """Give the lock up (closing the session releases it) so another replica takes over at once."""
        self._drop()
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.close(self._file)  # releases the flock
            self._file = None
        if self._engine is not None:
            self._engine.dispose()


# pg_locks shows advisory keys as oid columns; the two-int4 form has objsubid 2.
_HELD = text(
    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND classid::int = :c AND objid::int = :o "
    "AND objsubid = 2 AND granted AND pid = pg_backend_pid()"
)
_HELD_BY = text(
    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND classid::int = :c AND objid::int = :o "
    "AND objsubid = 2 AND granted AND pid = :p"
)


__all__ = ["LEADER_FENCE", "Leadership", "LockSpace", "lock_id", "xact_lock", "xact_locks"]
