"""The SQLite store's write lock (store/write_lock.py) against real second processes holding it.

Every process's writers queue on a flock of `<database>.writelock`. A holder that stops in the
middle of a write (an operator's command suspended with Ctrl-Z) made every writer of the daemon
wait for ever: Sign calls hung with no status. The wait is now bounded like SQLite's busy_timeout
and PostgreSQL's lock_timeout (SqlStore(lock_wait_ms)), and ends in StoreUnavailable (UNAVAILABLE).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ca_daemon.errors import StoreUnavailable
from ca_daemon.model import AuditEvent, CaKey, IssuedCertificate, KeySpec, KeyStatus
from ca_daemon.store import IssuanceOutcome, SqlStore, open_store

ISSUER = "ca-lock-1"

# A writer of another process, as the store's own writers do it: the flock, then SQLite's write lock (BEGIN IMMEDIATE);
# it says "held", and with "stop" suspends itself there (SIGSTOP, as Ctrl-Z would); it lets go when its stdin closes.
HOLDER = """
import fcntl, os, signal, sqlite3, sys
database, how = sys.argv[1], sys.argv[2]
lock = os.open(database + ".writelock", os.O_RDWR)
fcntl.flock(lock, fcntl.LOCK_EX)
db = sqlite3.connect(database, isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
if how == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)
sys.stdin.read()
db.execute("ROLLBACK")
"""


def _cert() -> IssuedCertificate:
    now = datetime.now(UTC).replace(microsecond=0)
    token = secrets.token_hex(8)
    return IssuedCertificate(
        serial=secrets.randbits(159) | 1 << 158,
        issuer_key_id=ISSUER,
        device_id=f"dev-{token}",
        profile="device",
        subject=f"CN=dev-{token}",
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=30),
        der=b"der-" + token.encode(),
        csr_sha256=hashlib.sha256(b"csr-" + token.encode()).digest(),
        public_key_sha256=hashlib.sha256(b"key-" + token.encode()).digest(),
        request_id=f"req-{token}",
        created_at=now,
    )


def _record(store: SqlStore, cert: IssuedCertificate) -> list[object]:
    audit = AuditEvent(time=cert.created_at, actor="test", action="certificate.issue", outcome="issued", serial=cert.serial)
    return list(store.record_issuances([(cert, audit)]))


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ca.db"
    store = open_store(f"sqlite:///{path}")
    store.save_ca_key(
        CaKey(ISSUER, f"pkcs11:token=t;object={ISSUER}", KeySpec.EC_P256, b"pk", KeyStatus.ACTIVE, datetime.now(UTC), b"\x30\x00")
    )
    store.close()
    yield path


class Holder:
    """A second process holding the database's write lock (and SQLite's), running or stopped."""

    def __init__(self, database: Path, how: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(database), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None and self.process.stdout.readline() == "held\n"
        if how == "stop":
            _wait_for(lambda: _state(self.process.pid) == "T")

    def release(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
        self.process.communicate(timeout=10)  # closes its stdin: it rolls back and ends
        assert self.process.returncode == 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _in_thread(call: Callable[[], object], timeout: float) -> object:
    """call's result or exception, or a failure if it still waits after timeout (the old code waited for ever)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"the write still waited for the lock after {timeout} s"
    return outcome[0]


@pytest.mark.parametrize("how", ["stop", "run"])
def test_a_write_behind_a_holder_that_does_not_let_go_is_unavailable_in_time_writes_nothing_and_a_retry_succeeds(
    database: Path, how: str
) -> None:
    holder = Holder(database, how)
    store = SqlStore(f"sqlite:///{database}", lock_wait_ms=500)
    try:
        cert = _cert()
        started = time.monotonic()
        refused = _in_thread(lambda: _record(store, cert), timeout=10)
        waited = time.monotonic() - started
        assert isinstance(refused, StoreUnavailable), refused
        assert 0.45 <= waited < 3, waited
        message = refused.message
        assert f"write lock {database}.writelock has been held for over 0.5 s by pid {holder.process.pid}" in message, message
        if how == "stop":
            assert "stopped)" in message and f"resume pid {holder.process.pid} (fg in its shell, or kill -CONT)" in message, message
        # What a gRPC caller is told: no path, no pid (the host's business), and to retry.
        assert refused.caller_message == (
            "the database's write lock has been held by another process for over 0.5 s, so nothing was written; retry later "
            "(the daemon's log names the holder)"
        ), refused.caller_message
        assert store.count_certificates() == 0  # nothing half-written

        holder.release()
        assert _record(store, cert) == [IssuanceOutcome(cert, created=True)]
        assert store.count_certificates() == 1
    finally:
        holder.kill()
        store.close()


def test_a_writer_that_gave_up_leaves_the_lock_free_and_the_next_one_gets_it_the_moment_it_is_released(database: Path) -> None:
    """After a writer gives up, the store's waiter thread still waits for the flock: it must hand it to the next writer of
    this store, or release it at once when none waits, never keep it, and never release a lock a writer holds."""
    other = SqlStore(f"sqlite:///{database}", lock_wait_ms=10_000)  # another process's store, as far as the flock goes
    store = SqlStore(f"sqlite:///{database}", lock_wait_ms=300)
    holder = Holder(database, "run")
    try:
        assert isinstance(_in_thread(lambda: _record(store, _cert()), timeout=10), StoreUnavailable)
        # Released while nobody of `store` waits: the waiter thread's flock is let go at once, so `other` writes.
        holder.release()
        assert _in_thread(lambda: _record(other, _cert()), timeout=5) != []
        # Released while a writer of `store` waits: it is handed over at once (the flock, not a poll).
        holder = Holder(database, "run")
        store_waiting = SqlStore(f"sqlite:///{database}", lock_wait_ms=10_000)
        results: list[object] = []
        writer = threading.Thread(target=lambda: results.append(_record(store_waiting, _cert())))
        writer.start()
        time.sleep(0.3)
        released = time.monotonic()
        holder.release()
        writer.join(5)
        assert results and time.monotonic() - released < 1, results
        # Many writers of two stores at once, each often behind the other's lock: all written, none refused.
        failures: list[BaseException] = []

        def write_many(target: SqlStore) -> None:
            try:
                for _ in range(40):
                    _record(target, _cert())
            except BaseException as exc:
                failures.append(exc)

        third = SqlStore(f"sqlite:///{database}", lock_wait_ms=10_000)
        threads = [threading.Thread(target=write_many, args=(s,)) for s in (third, other, store_waiting, third, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == [] and store.count_certificates() == 2 + 5 * 40
        third.close()
        store_waiting.close()
    finally:
        holder.kill()
        store.close()
        other.close()
