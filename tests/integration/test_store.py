"""The Store on both backends: the same tests on SQLite and on a real PostgreSQL.

Each test gets its own database (a file, or CREATE DATABASE on the test server; see
tests/pg.py). "Replicas" are separate SqlStore instances, each with its own connection
pool, writing from several threads at once: what keeps them correct must be the
database (constraints, transactions, locks), since they share no memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text

from ca_daemon.errors import AlreadyExists, CaKeyChanged, FailedPrecondition, NotFound, QuotaExceeded, StoreUnavailable
from ca_daemon.model import AuditEvent, CaKey, IssuedCertificate, KeySpec, KeyStatus, PublishedCrl, RevocationReason
from ca_daemon.store import IssuanceOutcome, SqlStore, open_store, schema, serial_hex
from ca_daemon.store.locks import Leadership, LockSpace, lock_id, xact_lock
from ca_daemon.store.rotation_store import RotationStore, StatusChange

ISSUER = "ca-test-1"
SUCCESSOR = "ca-test-2"
_WINDOW = timedelta(hours=1)
_numbers = itertools.count(1)


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    s = open_store(store_url)
    s.save_ca_key(_ca_key())
    yield s
    s.close()


# One fixed time, so a key saved by the fixture equals the one a test builds a second later.
_KEY_CREATED = datetime.now(UTC).replace(microsecond=0)


def _ca_key(key_id: str = ISSUER, status: KeyStatus = KeyStatus.ACTIVE) -> CaKey:
    return CaKey(
        key_id=key_id,
        pkcs11_uri=f"pkcs11:token=t;object={key_id}",
        spec=KeySpec.EC_P256,
        public_key_der=b"pk-" + key_id.encode(),
        status=status,
        created_at=_KEY_CREATED,
        certificate_der=b"\x30\x03\x02\x01\x01",
    )


def _cert(
    device_id: str | None = None, *, key: bytes | None = None, request_id: str | None = None, csr: bytes | None = None
) -> IssuedCertificate:
    n = next(_numbers)
    now = datetime.now(UTC).replace(microsecond=0)
    return IssuedCertificate(
        serial=secrets.randbits(159) | 1 << 158,
        issuer_key_id=ISSUER,
        device_id=device_id or f"dev-{n}",
        profile="device",
        subject=f"CN={device_id or n}",
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=30),
        der=b"der-%d" % n,
        csr_sha256=hashlib.sha256(csr or b"csr-%d" % n).digest(),
        public_key_sha256=hashlib.sha256(key or b"key-%d" % n).digest(),
        request_id=request_id or f"req-{n}-{secrets.token_hex(4)}",
        created_at=now,
    )


def _audit(cert: IssuedCertificate) -> AuditEvent:
    return AuditEvent(time=cert.created_at, actor="test", action="certificate.issue", outcome="issued", serial=cert.serial)


def _issue(store: SqlStore, *certs: IssuedCertificate, allow_reissue: bool = False) -> list[object]:
    return list(store.record_unique_issuances([(c, _audit(c), allow_reissue, 0) for c in certs]))


def _entry(serial: int, _revoked_at: datetime, _reason: int, _invalidity: datetime | None) -> bytes:
    """A fixed-width stand-in for the DER entry, so a test can split the concatenation."""
    return serial.to_bytes(20, "big")


def _revoke(store: SqlStore, serial: int, reason: int = RevocationReason.KEY_COMPROMISE) -> None:
    store.record_revocations(
        serials=[serial],
        device_id="",
        reason=reason,
        revoked_at=datetime.now(UTC).replace(microsecond=0),
        invalidity_date=None,
        actor="test",
        encode_entry=_entry,
    )


def _lift(store: SqlStore, serial: int, *, reissue_profiles: frozenset[str] = frozenset()) -> None:
    store.lift_hold(serial, lifted_at=datetime.now(UTC), actor="officer", encode_entry=_entry, reissue_profiles=reissue_profiles)


def _active(store: SqlStore, device_id: str) -> set[int]:
    return set(store.issuance_facts(device_id, b"\x00" * 32, datetime.now(UTC))[0])


def _serials(der: bytes | bytearray) -> set[int]:
    return {int.from_bytes(der[i : i + 20], "big") for i in range(0, len(der), 20)}


def _crl(number: int, *, base: int | None = None, seq: int = 0) -> PublishedCrl:
    now = datetime.now(UTC).replace(microsecond=0)
    return PublishedCrl(ISSUER, number, base, now, now + timedelta(hours=1), seq, 0, b"crl-%d" % number, now)


def _run_threads(count: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


# -- schema ----------------------------------------------------------------------


def test_version_6_gives_an_older_database_the_caller_column(store: SqlStore) -> None:
    """A database of schema 5 has no certificates.caller: version 6 adds it, and its old rows keep replaying."""
    old = _cert()
    store.record_issuances([(old, _audit(old))])
    with store.engine.begin() as conn:  # back to schema 5, as a database of the previous release is
        conn.execute(text("ALTER TABLE certificates DROP COLUMN caller"))
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 6"))
    assert store.migrate() == [6]
    kept = store.get_certificate(old.serial)
    assert kept == old and kept.caller == ""
    again = store.record_issuances([(dataclasses.replace(old, serial=old.serial + 1, caller="line-2"), _audit(old))])
    assert again == [IssuanceOutcome(old, created=False)]  # no caller recorded: replayed to the same CSR as before


def test_version_7_moves_hourly_quota_counts_to_minutes_without_forgetting_any(store: SqlStore) -> None:
    """A database of schema 6 counts per clock hour: version 7 keeps each count for as long as it could be in a window."""
    now = datetime.now(UTC)
    this_hour = int(now.timestamp() // 3600)
    with store.engine.begin() as conn:  # back to schema 6, as a database of the previous release is
        conn.execute(text("DROP TABLE caller_issuance_by_minute"))
        schema.caller_issuance.create(conn)
        rows = [("line-1", this_hour, 5), ("line-1", this_hour - 1, 7), ("line-1", this_hour - 2, 11), ("line-2", this_hour - 1, 2)]
        conn.execute(schema.caller_issuance.insert(), [{"caller": c, "hour": h, "issued": n} for c, h, n in rows])
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 7"))
    assert store.migrate() == [7]
    assert "caller_issuance" not in inspect(store.engine).get_table_names()
    with store.sign_reads() as reads:
        # This hour's 5 and the previous hour's 7 (which may lie within the last 60 minutes); not the 11 of two hours ago.
        assert reads.issued_last_hour("line-1", datetime.now(UTC)) == 12
        assert reads.issued_last_hour("line-2", datetime.now(UTC)) == 2
        # The previous hour's counts stay until 60 minutes after that hour ended, this hour's until 60 minutes after now.
        end_of_last_hour = datetime.fromtimestamp(this_hour * 3600, UTC)
        assert reads.issued_last_hour("line-2", end_of_last_hour + timedelta(minutes=59)) == 2
        assert reads.issued_last_hour("line-2", end_of_last_hour + timedelta(minutes=61)) == 0
        assert reads.issued_last_hour("line-1", now + timedelta(minutes=59)) >= 5


def test_a_request_id_of_one_caller_is_refused_to_another_without_its_certificate(store: SqlStore) -> None:
    """A request_id is one namespace: another caller learned the serial, or got the certificate with the same CSR."""
    first = dataclasses.replace(_cert(), caller="line-1")
    store.record_issuances([(first, _audit(first))])
    for csr in (first.csr_sha256, hashlib.sha256(b"another CSR").digest()):
        retry = dataclasses.replace(first, serial=first.serial + 1, csr_sha256=csr, caller="line-2")
        (outcome,) = store.record_issuances([(retry, _audit(retry))])
        assert isinstance(outcome, AlreadyExists) and outcome.rule == "idempotency"
        assert "used by another caller" in outcome.message and serial_hex(first.serial) not in outcome.message
    assert store.record_issuances([(first, _audit(first))]) == [IssuanceOutcome(first, created=False)]  # its own caller
    assert store.count_certificates() == 1


def test_migrations_run_once_even_when_replicas_start_together(store_url: str) -> None:
    stores = [SqlStore(store_url) for _ in range(4)]
    applied: list[list[int]] = []
    try:
        errors = _run_threads(4, lambda i: applied.append(stores[i].migrate()))
        assert not errors, errors
        assert sorted(v for versions in applied for v in versions) == [v for v, _, _ in schema.MIGRATIONS]
        assert all(s.schema_version() == schema.LATEST_VERSION for s in stores)
        assert stores[0].migrate() == []
    finally:
        for s in stores:
            s.close()


# -- CA keys ---------------------------------------------------------------------


def test_ca_keys_are_saved_updated_and_listed(store: SqlStore) -> None:
    got = store.get_ca_key(ISSUER)
    assert got == _ca_key()
    store.save_ca_key(_ca_key("ca-test-2", KeyStatus.PENDING))
    store.save_ca_key(_ca_key(ISSUER, KeyStatus.RETIRED))
    keys = {k.key_id: k.status for k in store.list_ca_keys()}
    assert keys == {ISSUER: KeyStatus.RETIRED, "ca-test-2": KeyStatus.PENDING}
    assert store.get_ca_key("nope") is None


# -- issuance --------------------------------------------------------------------


def test_issuance_batch_is_stored_with_its_audit_events(store: SqlStore) -> None:
    certs = [_cert() for _ in range(5)]
    outcomes = _issue(store, *certs)
    assert [getattr(o, "created", None) for o in outcomes] == [True] * 5
    for cert in certs:
        assert store.get_certificate(cert.serial) == cert
        assert store.find_by_request_id(cert.request_id) == cert
    assert store.count_certificates() == 5
    assert {e["serial"] for e in store.audit_events() if e["outcome"] == "issued"} == {format(c.serial, "x") for c in certs}


def test_request_id_is_idempotent_within_and_across_batches(store: SqlStore) -> None:
    first = _cert(request_id="r-1", csr=b"csr-a")
    same_again = _cert(request_id="r-1", csr=b"csr-a")
    other_csr = _cert(request_id="r-1", csr=b"csr-b")
    outcomes = _issue(store, first, same_again, other_csr)
    assert outcomes[0].certificate == first and outcomes[0].created  # type: ignore[attr-defined]
    assert outcomes[1].certificate == first and not outcomes[1].created  # type: ignore[attr-defined]
    assert isinstance(outcomes[2], AlreadyExists) and outcomes[2].rule == "idempotency"
    later = _issue(store, _cert(request_id="r-1", csr=b"csr-a"))
    assert later[0].certificate == first and not later[0].created  # type: ignore[attr-defined]
    assert store.count_certificates() == 1


def test_one_active_certificate_per_device_and_one_device_per_key(store: SqlStore) -> None:
    first = _cert("device-a", key=b"k1")
    assert _issue(store, first)[0].created  # type: ignore[attr-defined]
    again = _issue(store, _cert("device-a", key=b"k2"))[0]
    assert isinstance(again, AlreadyExists) and again.rule == "device-unique"
    stolen_key = _issue(store, _cert("device-b", key=b"k1"))[0]
    assert isinstance(stolen_key, AlreadyExists) and stolen_key.rule == "public-key-unique"
    assert _issue(store, _cert("device-a", key=b"k3"), allow_reissue=True)[0].created  # type: ignore[attr-defined]
    assert store.issuance_facts("device-a", hashlib.sha256(b"k9").digest(), datetime.now(UTC))[0]
    # Once its certificates are revoked, the device may get a new one.
    store.record_revocations(
        serials=[],
        device_id="device-a",
        reason=RevocationReason.SUPERSEDED,
        revoked_at=datetime.now(UTC),
        invalidity_date=None,
        actor="t",
        encode_entry=_entry,
    )
    assert _issue(store, _cert("device-a", key=b"k4"))[0].created  # type: ignore[attr-defined]
    refused = [e for e in store.audit_events() if e["outcome"] == "refused"]
    assert {e["reason"] for e in refused} == {"device-unique", "public-key-unique"}


def test_replicas_issuing_at_once_keep_every_uniqueness_rule(store: SqlStore, store_url: str) -> None:
    """Three replicas x four committers, each batch racing for the same device IDs, keys and request_ids."""
    replicas = [SqlStore(store_url) for _ in range(3)]
    devices = [f"race-{i}" for i in range(12)]
    outcomes: list[object] = []
    lock = threading.Lock()

    def committer(index: int) -> None:
        replica = replicas[index % len(replicas)]
        for round_ in range(6):
            batch = []
            for d, device in enumerate(devices[::-1] if index % 2 else devices):
                if (d + round_) % 3 == 0:  # same device, a key of its own per writer
                    batch.append(_cert(device, key=f"{device}-{index}-{round_}".encode()))
                elif (d + round_) % 3 == 1:  # same request_id and CSR from every writer
                    batch.append(
                        _cert(
                            f"idem-{device}-{round_}",
                            key=f"idem-{device}-{round_}".encode(),
                            request_id=f"rid-{device}-{round_}",
                            csr=b"same",
                        )
                    )
                else:  # one key claimed for many devices
                    batch.append(_cert(f"{device}-{index}-{round_}", key=f"shared-{round_}".encode()))
            got = _issue(replica, *batch)
            with lock:
                outcomes.extend(got)

    try:
        errors = _run_threads(12, committer)
        assert not errors, errors  # no deadlock, no unique-violation escaping as an error
    finally:
        for r in replicas:
            r.close()
    with store.engine.connect() as conn:
        from ca_daemon.store.schema import certificates as c

        per_device = conn.execute(select(c.c.device_id, func.count()).group_by(c.c.device_id).having(func.count() > 1)).all()
        per_key = conn.execute(
            select(c.c.public_key_sha256, func.count(func.distinct(c.c.device_id))).group_by(c.c.public_key_sha256)
        ).all()
        per_request = conn.execute(select(c.c.request_id, func.count()).group_by(c.c.request_id).having(func.count() > 1)).all()
    assert per_device == []
    assert all(count == 1 for _, count in per_key)
    assert per_request == []
    created = [o for o in outcomes if getattr(o, "created", False)]
    replayed = [o for o in outcomes if getattr(o, "created", None) is False]
    assert len(created) == store.count_certificates()
    assert replayed, "the writers that lost a request_id race get the stored answer"
    for outcome in replayed:
        assert store.get_certificate(outcome.certificate.serial) == outcome.certificate  # type: ignore[attr-defined]


def test_group_commits_of_replicas_holding_the_same_callers_in_other_orders_do_not_deadlock(store: SqlStore, store_url: str) -> None:
    """Two replicas group-commit batches of the same two callers (no quota, the default), listed in opposite orders.

    Each commit counts every caller in caller_issuance_by_minute. Counted in batch order, each replica
    held one caller's row and waited for the other's: PostgreSQL aborted one transaction
    (deadlock detected) and every certificate of that batch, already signed, was thrown away.
    """
    replicas = [SqlStore(store_url) for _ in range(2)]
    stop = threading.Event()

    def item(caller: str) -> tuple[IssuedCertificate, AuditEvent, bool, int]:
        cert = _cert()
        event = AuditEvent(time=datetime.now(UTC), actor=caller, action="certificate.issue", outcome="issued", serial=cert.serial)
        return cert, event, False, 0  # no quota: the default for every caller

    def group_commits(index: int) -> None:
        callers = ["line-1", "line-2"] if index == 0 else ["line-2", "line-1"]
        try:
            for _ in range(200):
                if stop.is_set():
                    return
                outcomes = replicas[index].record_unique_issuances([item(caller) for caller in callers])
                assert all(isinstance(o, IssuanceOutcome) and o.created for o in outcomes), outcomes
        except BaseException:
            stop.set()
            raise

    try:
        errors = _run_threads(2, group_commits)
    finally:
        for r in replicas:
            r.close()
    assert errors == [], [str(e).splitlines()[0][:200] for e in errors]
    assert store.count_certificates() == 800
    with store.sign_reads() as reads:
        for caller in ("line-1", "line-2"):  # every certificate counted (approx: the run may straddle an hour)
            assert reads.issued_last_hour(caller, datetime.now(UTC)) == pytest.approx(400, abs=1)


# -- revocations -----------------------------------------------------------------


def test_revocation_rules(store: SqlStore) -> None:
    held, other = _cert(), _cert()
    _issue(store, held, other)
    _revoke(store, held.serial, RevocationReason.CERTIFICATE_HOLD)
    first_seq = store.max_change_seq(ISSUER)
    assert store.get_revocation(held.serial).reason == RevocationReason.CERTIFICATE_HOLD  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition):
        _revoke(store, held.serial, RevocationReason.CERTIFICATE_HOLD)
    with pytest.raises(NotFound):
        _revoke(store, 12345)
    _lift(store, held.serial)
    assert store.get_revocation(held.serial) is None
    assert store.max_change_seq(ISSUER) == first_seq + 1
    _revoke(store, other.serial)
    with pytest.raises(FailedPrecondition) as info:
        _revoke(store, other.serial)
    assert info.value.rule == "already-revoked"
    full = store.crl_entries(ISSUER, after_seq=None, drop_expired=None)
    assert _serials(full.der) == {other.serial} and full.change_seq == first_seq + 2
    delta = store.crl_entries(ISSUER, after_seq=first_seq, drop_expired=None)
    assert _serials(delta.der) == {held.serial, other.serial}  # the lifted hold as removeFromCRL


def test_lifting_a_hold_is_refused_while_the_device_has_another_active_certificate(store: SqlStore) -> None:
    """allow_reissue = false: one active certificate per device ID (README, "Issuance policy"), a lifted hold included.

    A certificate on hold is not active, so its device may get a new one; lifting the hold made
    both active. The lift is refused, naming the other certificate, until that one is revoked;
    a profile that allows re-issue lifts at once.
    """
    held = _cert("meter-7", key=b"meter-7-key-1")
    assert _issue(store, held)[0].created  # type: ignore[attr-defined]
    _revoke(store, held.serial, RevocationReason.CERTIFICATE_HOLD)
    replacement = _cert("meter-7", key=b"meter-7-key-2")
    assert _issue(store, replacement)[0].created  # type: ignore[attr-defined]
    changes, events = store.max_change_seq(ISSUER), len(store.audit_events())
    with pytest.raises(FailedPrecondition) as refused:
        _lift(store, held.serial, reissue_profiles=frozenset({"other"}))
    assert refused.value.rule == "device-unique"
    assert f"another active certificate ({serial_hex(replacement.serial)})" in refused.value.message
    assert f"revoke {serial_hex(replacement.serial)} first" in refused.value.message
    assert store.get_revocation(held.serial).reason == RevocationReason.CERTIFICATE_HOLD  # type: ignore[union-attr]
    assert (store.max_change_seq(ISSUER), len(store.audit_events())) == (changes, events)  # nothing written
    assert _active(store, "meter-7") == {replacement.serial}
    _revoke(store, replacement.serial, RevocationReason.SUPERSEDED)
    _lift(store, held.serial)
    assert _active(store, "meter-7") == {held.serial}
    # A profile that allows re-issue allows a device several active certificates, a lifted hold too.
    first, second = _cert("meter-8"), _cert("meter-8")
    _issue(store, first)
    _revoke(store, first.serial, RevocationReason.CERTIFICATE_HOLD)
    _issue(store, second)
    _lift(store, first.serial, reissue_profiles=frozenset({"device"}))
    assert _active(store, "meter-8") == {first.serial, second.serial}


def test_a_hold_lift_waits_for_an_issuance_for_its_device_in_flight(store: SqlStore) -> None:
    """The lift checks the device under the DEVICE lock the issuing transaction holds until it commits."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite serialises every write transaction with BEGIN IMMEDIATE")
    held = _cert("meter-9")
    _issue(store, held)
    _revoke(store, held.serial, RevocationReason.CERTIFICATE_HOLD)
    replacement = _cert("meter-9")
    refusals: list[FailedPrecondition] = []

    def lift() -> None:
        try:
            _lift(store, held.serial)
        except FailedPrecondition as exc:
            refusals.append(exc)

    with store.engine.begin() as issuing:  # a replica's group commit for the device, not yet committed
        xact_lock(issuing, LockSpace.DEVICE, "meter-9")
        issuing.execute(schema.certificates.insert().values(**{**replacement.__dict__, "serial": serial_hex(replacement.serial)}))
        lifting = threading.Thread(target=lift)
        lifting.start()
        lifting.join(timeout=1.0)
        assert lifting.is_alive(), "the lift did not wait for the device's issuing transaction"
    lifting.join(timeout=30)
    assert [e.rule for e in refusals] == ["device-unique"]
    assert _active(store, "meter-9") == {replacement.serial}


def test_concurrent_revocations_leave_no_gap_for_a_delta(store: SqlStore, store_url: str) -> None:
    """A reader that asks "what changed after the last N" while replicas revoke sees every revocation.

    This fails when two transactions can take the same change_seq, or commit a lower one
    after a reader has seen a higher one.
    """
    certs = [_cert() for _ in range(240)]
    for i in range(0, len(certs), 60):
        _issue(store, *certs[i : i + 60])
    replicas = [SqlStore(store_url) for _ in range(3)]
    seen: set[int] = set()
    done = threading.Event()

    def reader() -> None:
        upto = 0
        while True:
            finished = done.is_set()
            entries = store.crl_entries(ISSUER, after_seq=upto, drop_expired=None)
            seen.update(_serials(entries.der))
            upto = entries.change_seq
            if finished:
                return

    def revoke_share(i: int) -> None:
        for c in certs[i::8]:
            _revoke(replicas[i % 3], c.serial)

    reading = threading.Thread(target=reader)
    reading.start()
    try:
        errors = _run_threads(8, revoke_share)
    finally:
        done.set()
        reading.join()
        for r in replicas:
            r.close()
    assert not errors, errors
    assert seen == {c.serial for c in certs}
    with store.engine.connect() as conn:
        from ca_daemon.store.schema import revocations

        distinct = conn.execute(select(func.count(func.distinct(revocations.c.change_seq)))).scalar()
    assert distinct == len(certs), "every revoking transaction got its own change_seq"


# -- CRL numbers -----------------------------------------------------------------


def test_nothing_but_a_final_crl_follows_a_final_crl(store: SqlStore) -> None:
    """A retiring key's final CRL stays its last: a scheduled one stored in the moment before the key is marked retired
    would replace it with one that expires in days (and a delta on it would point where no delta is published)."""
    store.store_crl(_crl(1))
    store.store_crl(_crl(2), final=True)
    for late in (_crl(3), _crl(3, base=2)):
        with pytest.raises(FailedPrecondition) as refused:
            store.store_crl(late)
        assert refused.value.rule == "issuer-final-crl"
    assert store.max_crl_number(ISSUER) == 2
    store.store_crl(_crl(3), final=True)  # the ceremony may publish it again, e.g. after a retry
    assert store.max_crl_number(ISSUER) == 3


def test_version_8_gives_an_older_database_the_final_crl_column(store: SqlStore) -> None:
    store.store_crl(_crl(1))
    with store.engine.begin() as conn:  # back to schema 7, as a database of the previous release is
        conn.execute(text("ALTER TABLE crls DROP COLUMN is_final"))
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 8"))
    assert store.migrate() == [8]
    store.store_crl(_crl(2))  # the old CRL counts as not final
    assert store.latest_crl(ISSUER, delta=False).crl_number == 2  # type: ignore[union-attr]


def test_version_9_gives_an_older_database_the_halted_column(store: SqlStore) -> None:
    with store.engine.begin() as conn:  # back to schema 8, as a database of the previous release is
        conn.execute(text("ALTER TABLE ca_keys DROP COLUMN halted_at"))
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 9"))
    assert store.migrate() == [9]
    cert = _cert()
    assert _issue(store, cert) == [IssuanceOutcome(cert, created=True)]  # the keys of before count as not halted
    assert _halt(_approve_emergency(store, "alice", "bob")) is True
    assert isinstance(_issue(store, _cert())[0], CaKeyChanged)


def test_crl_numbers_only_go_up(store: SqlStore) -> None:
    store.store_crl(_crl(1))
    store.store_crl(_crl(2, base=1))
    for number in (2, 1):
        with pytest.raises(FailedPrecondition) as info:
            store.store_crl(_crl(number))
        assert info.value.rule == "crl-number-monotonic"
    for n in range(3, 9):
        store.store_crl(_crl(n, base=1))
    assert store.max_crl_number(ISSUER) == 8
    assert store.latest_crl(ISSUER, delta=True).crl_number == 8  # type: ignore[union-attr]
    assert store.latest_crl(ISSUER, delta=False).crl_number == 1  # type: ignore[union-attr]


def test_a_caller_quota_counts_the_last_hour_and_is_enforced_in_the_commit(store: SqlStore) -> None:
    """Requests in flight together all pass the check before signing; the commit keeps the quota exact."""

    def item(cert: IssuedCertificate, caller: str, quota: int) -> tuple[IssuedCertificate, AuditEvent, bool, int]:
        event = AuditEvent(time=datetime.now(UTC), actor=caller, action="certificate.issue", outcome="issued", serial=cert.serial)
        return cert, event, False, quota

    def issued_last_hour(caller: str, now: datetime) -> float:
        with store.sign_reads() as reads:  # what Sign reads for a batch, over one connection
            return reads.issued_last_hour(caller, now)

    now = datetime.now(UTC)
    assert issued_last_hour("line1", now) == 0
    first = [_cert(f"q-{n}") for n in range(4)]
    outcomes = store.record_unique_issuances([item(c, "line1", 3) for c in first])
    assert [type(o).__name__ for o in outcomes] == ["IssuanceOutcome"] * 3 + ["QuotaExceeded"]
    refused = outcomes[3]
    assert isinstance(refused, QuotaExceeded) and refused.rule == "caller-quota" and "quota is 3 per hour" in refused.message
    assert store.get_certificate(first[3].serial) is None  # signed, discarded, never stored
    assert issued_last_hour("line1", datetime.now(UTC)) == 3
    with store.sign_reads() as reads:
        assert reads.precheck(first[0].request_id, first[0].device_id, first[0].public_key_sha256, datetime.now(UTC))[0] == first[0]
    # Another caller has its own count; a caller without a quota is counted too, so a quota given to it later applies at once.
    other = _cert("q-other")
    assert isinstance(store.record_unique_issuances([item(other, "line2", 3)])[0], IssuanceOutcome)
    unlimited = _cert("q-free")
    assert isinstance(store.record_unique_issuances([item(unlimited, "line3", 0)])[0], IssuanceOutcome)
    assert issued_last_hour("line3", datetime.now(UTC)) == 1
    # Each certificate counts in full for 60 to 61 minutes (its minute and the 60 after it), so no
    # 60 minutes hold more than the quota: weighting the previous clock hour by its part in the
    # window counted these three as less than one 59 minutes later, and let two more through.
    committed = datetime.now(UTC)
    assert issued_last_hour("line1", committed + timedelta(minutes=59, seconds=59)) == 3
    assert issued_last_hour("line1", committed + timedelta(minutes=61, seconds=1)) == 0
    discarded = [e for e in store.audit_events() if e["outcome"] == "refused" and e["reason"] == "caller-quota"]
    assert [e["serial"] for e in discarded] == [serial_hex(first[3].serial)]


def test_a_certificate_whose_issuer_key_is_no_longer_active_is_discarded_in_the_commit(store: SqlStore) -> None:
    """A worker signs with the key it last saw active until its next poll: what it signed after the switch was stored
    and handed out, then revoked by the emergency's second pass. The commit now checks the issuer key's status."""
    answered = _cert("k-1")
    _issue(store, answered)
    store.save_ca_key(_ca_key(ISSUER, KeyStatus.SUPERSEDED))  # the switch to ca-test-2
    store.save_ca_key(_ca_key("ca-test-2", KeyStatus.ACTIVE))
    late, retried = _cert("k-2", request_id="req-late"), _cert("k-3")
    fresh = dataclasses.replace(_cert("k-4"), issuer_key_id="ca-test-2")
    outcomes = _issue(store, late, fresh, answered, retried)
    refused = outcomes[0]
    assert isinstance(refused, CaKeyChanged) and refused.rule == "ca-key-changed", outcomes
    assert "retry with the same request_id" in refused.message and "ca-test-1, which is superseded now" in refused.message
    assert isinstance(outcomes[1], IssuanceOutcome) and outcomes[1].created
    assert isinstance(outcomes[2], IssuanceOutcome) and not outcomes[2].created  # a replay of what was stored before
    assert isinstance(outcomes[3], CaKeyChanged)
    assert store.get_certificate(late.serial) is None and store.get_certificate(retried.serial) is None
    # The retry, signed with the new key, is stored under the same request_id.
    again = dataclasses.replace(_cert("k-2"), request_id="req-late", issuer_key_id="ca-test-2")
    assert _issue(store, again)[0] == IssuanceOutcome(again, created=True)
    discarded = [e for e in store.audit_events() if e["outcome"] == "refused"]
    assert [(e["serial"], e["key_id"], e["reason"]) for e in discarded] == [
        (serial_hex(late.serial), ISSUER, "ca-key-changed"),
        (serial_hex(retried.serial), ISSUER, "ca-key-changed"),
    ]
    assert "no longer active" in json.loads(discarded[0]["details"])["note"]
    for status in (KeyStatus.RETIRED, KeyStatus.DESTROYED, KeyStatus.PENDING):
        store.save_ca_key(_ca_key(ISSUER, status))
        assert isinstance(_issue(store, _cert())[0], CaKeyChanged), status
    unknown = dataclasses.replace(_cert(), issuer_key_id="ca-nobody")
    assert isinstance(_issue(store, unknown)[0], CaKeyChanged)


def test_a_commit_waits_for_a_key_switch_in_flight_and_then_refuses_the_old_keys_certificate(store: SqlStore) -> None:
    """Race-free on PostgreSQL too: the commit reads the issuer key's row FOR SHARE, so under READ COMMITTED it waits
    for the switch's UPDATE and then sees the new status. A plain read took the last committed status (active), and
    the certificate was stored after the switch. (SQLite: the switch holds the write lock the commit waits for.)"""
    cert = _cert("k-race")
    outcomes: list[object] = []
    with store.engine.begin() as switching:  # the key ceremony's transaction, not yet committed
        switching.execute(schema.ca_keys.update().where(schema.ca_keys.c.key_id == ISSUER).values(status="superseded"))
        committing = threading.Thread(target=lambda: outcomes.extend(_issue(store, cert)))
        committing.start()
        committing.join(timeout=1.0)
        assert committing.is_alive(), f"the commit did not wait for the key switch: {outcomes}"
    committing.join(timeout=30)
    assert len(outcomes) == 1 and isinstance(outcomes[0], CaKeyChanged), outcomes
    assert store.get_certificate(cert.serial) is None


def _approve_emergency(store: SqlStore, *officers: str) -> RotationStore:
    rotation = RotationStore(store)
    store.save_ca_key(_ca_key(SUCCESSOR, KeyStatus.PENDING))
    now = datetime.now(UTC).replace(microsecond=0)
    for officer in officers:
        event = AuditEvent(time=now, actor=officer, action="key.approve", outcome="approved", key_id=ISSUER)
        rotation.approve("emergency", ISSUER, SUCCESSOR, officer, now, _WINDOW, event)
    return rotation


def _halt(rotation: RotationStore) -> bool:
    now = datetime.now(UTC).replace(microsecond=0)
    event = AuditEvent(time=now, actor="bob", action="key.emergency", outcome="halted", key_id=ISSUER)
    return rotation.halt(ISSUER, SUCCESSOR, now, _WINDOW, event)


def test_a_certificate_of_a_key_an_emergency_halted_is_discarded_until_the_switch(store: SqlStore) -> None:
    """The emergency revoked what the compromised key signed and only then switched: a certificate a worker committed
    while that pass ran was handed out and revoked moments later. The halt, before the pass, stops the commits first."""
    with pytest.raises(FailedPrecondition, match="live: 1"):  # dual control: one officer cannot halt a key
        _halt(_approve_emergency(store, "alice"))
    rotation = _approve_emergency(store, "bob")
    before = _cert("h-1")
    assert _issue(store, before) == [IssuanceOutcome(before, created=True)]
    assert _halt(rotation) is True
    assert _halt(rotation) is False  # a retry's halt changes nothing
    late = _cert("h-2")
    refused = _issue(store, late)[0]
    assert isinstance(refused, CaKeyChanged) and refused.rule == "ca-key-compromised", refused
    assert "which is compromised" in refused.message and "issuance resumes once the successor key is active" in refused.message
    assert store.get_certificate(late.serial) is None
    # Nothing else changed: the key is still the active one and the approvals are live, for the switch (or a retry).
    assert store.active_key_id() == ISSUER
    now = datetime.now(UTC)
    assert rotation.live_officers("emergency", ISSUER, SUCCESSOR, now, _WINDOW) == ["alice", "bob"]
    assert rotation.unexpired_unrevoked(ISSUER, now) == [before.serial]
    discarded = [e for e in store.audit_events() if e["outcome"] == "refused"]
    assert [(e["serial"], e["reason"]) for e in discarded] == [(serial_hex(late.serial), "ca-key-compromised")]
    assert "halted (compromised)" in json.loads(discarded[0]["details"])["note"]
    # After the switch the old key's certificate is refused as any superseded key's, and the successor's is stored.
    changes = [
        StatusChange(ISSUER, (KeyStatus.ACTIVE,), KeyStatus.SUPERSEDED, "compromised_at"),
        StatusChange(SUCCESSOR, (KeyStatus.PENDING,), KeyStatus.ACTIVE, "activated_at"),
    ]
    switched = AuditEvent(time=now, actor="bob", action="key.emergency", outcome="executed", key_id=ISSUER)
    rotation.execute("emergency", ISSUER, SUCCESSOR, now.replace(microsecond=0), _WINDOW, changes, switched)
    after = _issue(store, _cert("h-3"))[0]
    assert isinstance(after, CaKeyChanged) and after.rule == "ca-key-changed", after
    fresh = dataclasses.replace(_cert("h-4"), issuer_key_id=SUCCESSOR)
    assert _issue(store, fresh) == [IssuanceOutcome(fresh, created=True)]
    with pytest.raises(FailedPrecondition, match="live: 0"):  # a second execution finds the approvals consumed
        _halt(rotation)


def test_a_halt_waits_for_a_commit_in_flight_and_a_commit_waits_for_a_halt_in_flight(store: SqlStore) -> None:
    """PostgreSQL, READ COMMITTED: the halt locks the key's row FOR UPDATE, so it waits for a group commit that read the
    key's status FOR SHARE (whose certificate the revocation pass then finds), and a commit waiting for the halt reads
    halted_at once it commits. (SQLite: the write lock orders them.)"""
    rotation = _approve_emergency(store, "alice", "bob")
    cert = _cert("h-flight")
    halted: list[object] = []
    with store.engine.begin() as committing:  # a group commit's transaction, between its status read and its COMMIT
        keys = schema.ca_keys
        status = committing.execute(select(keys.c.status).where(keys.c.key_id == ISSUER).with_for_update(read=True)).scalar_one()
        assert status == "active"
        committing.execute(schema.certificates.insert().values(**{**cert.__dict__, "serial": serial_hex(cert.serial)}))
        halting = threading.Thread(target=lambda: halted.append(_halt(rotation)))
        halting.start()
        halting.join(timeout=1.0)
        assert halting.is_alive(), f"the halt did not wait for the commit in flight: {halted}"
    halting.join(timeout=30)
    assert halted == [True]
    assert cert.serial in rotation.unexpired_unrevoked(ISSUER, datetime.now(UTC))  # the revocation pass finds it

    # The other way round: a halt not yet committed (as RotationStore.halt writes it) holds the commit, which then refuses.
    with store.engine.begin() as conn:
        conn.execute(schema.ca_keys.update().where(schema.ca_keys.c.key_id == ISSUER).values(halted_at=None))
    late = _cert("h-late")
    outcomes: list[object] = []
    with store.engine.begin() as halting_tx:
        keys = schema.ca_keys
        halting_tx.execute(select(keys.c.status).where(keys.c.key_id == ISSUER).with_for_update()).scalar_one()
        halting_tx.execute(keys.update().where(keys.c.key_id == ISSUER).values(halted_at=datetime.now(UTC)))
        committing_late = threading.Thread(target=lambda: outcomes.extend(_issue(store, late)))
        committing_late.start()
        committing_late.join(timeout=1.0)
        assert committing_late.is_alive(), f"the commit did not wait for the halt in flight: {outcomes}"
    committing_late.join(timeout=30)
    assert len(outcomes) == 1 and isinstance(outcomes[0], CaKeyChanged) and outcomes[0].rule == "ca-key-compromised", outcomes
    assert store.get_certificate(late.serial) is None


def test_the_ceremony_passes_skip_a_serial_revoked_since_they_listed_it(store: SqlStore) -> None:
    """Two executions of one emergency at once: the second one's pass listed serials the first then revoked, and its
    revocation was refused (already revoked), so the officer whose approval started it was told it failed."""
    first, second = _cert(), _cert()
    _issue(store, first, second)
    _revoke(store, first.serial, RevocationReason.CA_COMPROMISE)
    now = datetime.now(UTC).replace(microsecond=0)
    revoked = store.record_revocations(
        serials=[first.serial, second.serial],
        device_id="",
        reason=RevocationReason.CA_COMPROMISE,
        revoked_at=now,
        invalidity_date=None,
        actor="bob",
        encode_entry=_entry,
        skip_revoked=True,
    )
    assert [r.serial for r in revoked] == [second.serial]
    with pytest.raises(FailedPrecondition, match="already revoked"):  # without it (Revoke), still refused
        _revoke(store, second.serial)


def test_a_crl_number_floor_is_never_lowered_and_the_next_crl_goes_above_it(store: SqlStore) -> None:
    """After a restore from an older backup: relying parties may have seen higher numbers than the store holds."""

    def floor_event(above: int) -> AuditEvent:
        return AuditEvent(time=datetime.now(UTC), actor="test", action="crl.number-floor", outcome="raised", details={"above": str(above)})

    store.store_crl(_crl(3))
    assert store.raise_crl_number_floor(ISSUER, 40, floor_event(40)) == 40
    assert store.max_crl_number(ISSUER) == 40
    assert store.raise_crl_number_floor(ISSUER, 10, floor_event(10)) == 40  # never lowered
    with pytest.raises(FailedPrecondition):
        store.store_crl(_crl(40))
    store.store_crl(_crl(41))
    assert store.latest_crl(ISSUER, delta=False).crl_number == 41  # type: ignore[union-attr]
    assert store.raise_crl_number_floor(ISSUER, 41, floor_event(41)) == 41  # not above what is published: nothing changes
    raised = [e for e in store.audit_events() if e["action"] == "crl.number-floor"]
    assert [json.loads(e["details"])["above"] for e in raised] == ["40"]  # only the floor that took effect is recorded


def test_a_crl_dated_before_one_another_publisher_stored_meanwhile_is_refused(store: SqlStore, store_url: str) -> None:
    """thisUpdate never goes back, also when two publishers race (found by a hostile review of replicas on PostgreSQL).

    The publisher dates a CRL, then reads the next number and builds it (after waiting up to 2 s for the next second);
    `ca-daemon crl publish` on a replica whose clock is a second ahead stored a later dated CRL in between, and the
    leader's, numbered above it but dated before it, was stored: OpenSSL and HTTP caches keep the later dated one.
    """
    now = datetime.now(UTC).replace(microsecond=0)
    store.store_crl(dataclasses.replace(_crl(1), this_update=now))
    other = SqlStore(store_url)  # the other publisher's process
    try:
        other.store_crl(dataclasses.replace(_crl(2, base=1), this_update=now + timedelta(seconds=2)))
    finally:
        other.close()
    for late in (_crl(3, base=1), _crl(3)):  # the leader's, dated before it waited: refused whichever kind
        with pytest.raises(FailedPrecondition) as refused:
            store.store_crl(dataclasses.replace(late, this_update=now + timedelta(seconds=1)))
        assert refused.value.rule == "crl-this-update-monotonic", refused.value.message
    assert store.max_crl_number(ISSUER) == 2
    store.store_crl(dataclasses.replace(_crl(3, base=1), this_update=now + timedelta(seconds=2)))  # not before it: stored
    # An operator replacing CRLs dated while the clock was ahead (`crl publish --clock-was-ahead`) dates them now.
    store.store_crl(dataclasses.replace(_crl(4), this_update=now), clock_was_ahead=True)
    assert store.max_crl_number(ISSUER) == 4


def test_racing_publishers_never_store_a_number_twice(store: SqlStore, store_url: str) -> None:
    replicas = [SqlStore(store_url) for _ in range(4)]
    won: list[int] = []

    def publisher(index: int) -> None:
        replica = replicas[index]
        for _ in range(15):
            number = replica.max_crl_number(ISSUER) + 1
            try:
                replica.store_crl(_crl(number))
                won.append(number)
            except FailedPrecondition:
                pass  # lost the race: the database said so, not a unique-violation error

    try:
        errors = _run_threads(4, publisher)
    finally:
        for r in replicas:
            r.close()
    assert not errors, errors
    assert len(won) == len(set(won)) and max(won) == store.max_crl_number(ISSUER)


# -- leadership and locks --------------------------------------------------------


def test_one_leader_at_a_time_and_a_fence_for_the_one_that_lost(store: SqlStore, store_url: str) -> None:
    first, second = Leadership(store_url), Leadership(store_url)
    try:
        assert first.poll() is True
        assert second.poll() is False
        assert first.poll() is True  # stays leader
        store.store_crl(_crl(1), fence=first)
        if store.dialect == "postgresql":
            with pytest.raises(FailedPrecondition) as info:
                store.store_crl(_crl(2), fence=second)
            assert info.value.rule == "leader-fence"
            # The leader's connection dies (a crash, a partition): the lock goes with it.
            with store.engine.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": first.backend_pid})
                conn.commit()
                # pg_terminate_backend only signals the backend: wait until it is gone, and its lock with it.
                deadline = time.monotonic() + 10
                while conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": first.backend_pid}).scalar():
                    assert time.monotonic() < deadline, "the leader's backend did not end"
                    time.sleep(0.05)
                    conn.commit()  # a new snapshot of pg_stat_activity
            with pytest.raises(FailedPrecondition):
                store.store_crl(_crl(2), fence=first)  # fenced before it even notices
            assert first.poll() is False
        else:
            first.release()
        assert second.poll() is True
        store.store_crl(_crl(2), fence=second)
        assert first.poll() is False
    finally:
        first.release()
        second.release()


def test_transaction_lock_is_held_until_commit(store: SqlStore) -> None:
    if store.dialect != "postgresql":
        pytest.skip("SQLite serialises every write transaction with BEGIN IMMEDIATE; the helper is a no-op there")
    classid, objid = lock_id(LockSpace.AUDIT_CHAIN)
    probe = text("SELECT pg_try_advisory_xact_lock(:c, :o)")
    with store.engine.connect() as holder, store.engine.connect() as other:
        with holder.begin():
            xact_lock(holder, LockSpace.AUDIT_CHAIN)
            with other.begin():
                assert other.execute(probe, {"c": classid, "o": objid}).scalar() is False
        with other.begin():
            assert other.execute(probe, {"c": classid, "o": objid}).scalar() is True


def test_one_checkpoint_per_head(store: SqlStore) -> None:
    """A checkpoint of a head already covered (another worker signed it first) is not stored."""
    from ca_daemon.store.audit_store import AuditStore, Checkpoint

    audit = AuditStore(store)
    last = audit.last_checkpoint()
    start = last.seq if last is not None else 0

    def signed(seq: int, tag: bytes) -> Checkpoint:
        return Checkpoint(seq, seq, b"h" * 32, datetime.now(UTC), "audit-1", tag)

    assert audit.add_checkpoint(signed(start + 10, b"first")) is True
    assert audit.add_checkpoint(signed(start + 10, b"second worker")) is False
    assert audit.add_checkpoint(signed(start + 9, b"late")) is False
    assert audit.add_checkpoint(signed(start + 11, b"next head")) is True
    assert [c.signature for c in audit.checkpoints(after_seq=start)] == [b"first", b"next head"]


def test_checkpoint_pages_never_split_one_head(store: SqlStore) -> None:
    """ListAuditCheckpoints pages by seq: several checkpoints of one head (a log written before there was one
    per head) stay together."""
    from sqlalchemy import delete, insert

    from ca_daemon.store.audit_store import AuditStore
    from ca_daemon.store.schema import audit_checkpoints

    audit = AuditStore(store)
    seqs = [1, 2, 2, 2, 3, 5]
    with store.engine.begin() as conn:
        conn.execute(delete(audit_checkpoints))
        for index, seq in enumerate(seqs):
            conn.execute(
                insert(audit_checkpoints).values(
                    seq=seq, count=seq, head_hash=bytes([index]) * 32, time=datetime.now(UTC), key_id="audit-1", signature=b"sig-%d" % index
                )
            )
    pages, after = [], 0
    while True:
        page = audit.checkpoints(after, limit=2)
        pages.append([c.seq for c in page])
        if len(page) < 2:
            break
        after = page[-1].seq
    assert pages == [[1, 2, 2, 2], [3, 5], []]
    assert [c.signature for c in audit.checkpoints()] == [b"sig-%d" % i for i in range(len(seqs))]


def test_a_write_waiting_for_a_lock_held_elsewhere_gives_up_unavailable(store: SqlStore, store_url: str) -> None:
    """A table lock held by another session (or a paused replica's transaction) made PostgreSQL writes wait for as
    long as the caller did, for ever without a deadline; SQLite's busy_timeout already bounded it."""
    import sqlite3

    import psycopg

    from ca_daemon.errors import StoreUnavailable

    bounded = SqlStore(store_url, lock_wait_ms=500)  # a replica of `store`, with a short lock wait
    if bounded.dialect == "sqlite":
        holder: Any = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:
        holder = psycopg.connect(store_url)
        holder.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
    try:
        cert = _cert()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"lock timeout|database is locked"):
            bounded.record_issuances([(cert, _audit(cert))])
        assert time.monotonic() - started < 10
    finally:
        holder.rollback()
        holder.close()
    assert bounded.record_issuances([(cert, _audit(cert))]) == [IssuanceOutcome(cert, created=True)]  # nothing was half-written
    bounded.close()
    assert store.count_certificates() == 1


def test_what_sign_reads_before_signing_takes_no_write_lock(tmp_path: Path) -> None:
    """On SQLite the quota count ran as a write transaction (BEGIN IMMEDIATE) for the whole batch's look-ups, outside
    the store's write flock: every other worker's commit waited for a batch it did not need to wait for. (PostgreSQL
    reads take no lock that blocks writers.)"""
    import sqlite3

    store_url = f"sqlite:///{tmp_path / 'ca.db'}"
    store = open_store(store_url)
    with store.sign_reads() as reads:
        reads.precheck("no-such-request", "dev-x", b"\0" * 32, datetime.now(UTC))
        assert reads.issued_last_hour("line1", datetime.now(UTC)) == 0
        writer = sqlite3.connect(store_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # "database is locked" while the look-ups hold the write lock
            writer.execute("ROLLBACK")
        finally:
            writer.close()
    store.close()


def test_the_checkpointers_gap_check_takes_the_write_lock_only_when_there_is_a_gap(tmp_path: Path) -> None:
    """record_audit_gap (before every checkpoint, every interval) opened a write transaction to read the head: on an idle
    daemon a write every interval, and while another writer held the lock (a backup, a bulk revocation) the check
    waited for it and failed as UNAVAILABLE. Now it reads first and writes only to record a gap it found."""
    import sqlite3

    store_url = f"sqlite:///{tmp_path / 'ca.db'}"
    store = SqlStore(store_url, lock_wait_ms=300)
    store.migrate()
    store.save_ca_key(_ca_key())
    _issue(store, _cert())
    writer = sqlite3.connect(store_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another writer holds SQLite's write lock
        started = time.monotonic()
        store.record_audit_gap()  # no gap: nothing to write, so no wait for the lock
        assert time.monotonic() - started < 0.3
        writer.execute("DELETE FROM audit_events WHERE seq = (SELECT max(seq) FROM audit_events)")
        writer.execute("COMMIT")
    finally:
        writer.close()
    store.record_audit_gap()  # the event it wrote is gone: recorded, under the write lock
    assert [e["action"] for e in store.audit_events()][-1] == "audit.gap"
    store.close()


# -- the audit chain's rows are the ones the store keeps -------------------------------

# Statements an insider with write access to the database could leave behind, so that the daemon's own
# writes drop its audit event while the chain still links: each hides the events of devices named hidden-*.
_HIDING = {
    "sqlite": {
        "after-insert-delete": [
            "CREATE TRIGGER hide AFTER INSERT ON audit_events WHEN NEW.device_id LIKE 'hidden-%' "
            "BEGIN DELETE FROM audit_events WHERE seq = NEW.seq; END"
        ],
        "before-insert-ignore": [
            "CREATE TRIGGER hide BEFORE INSERT ON audit_events WHEN NEW.device_id LIKE 'hidden-%' BEGIN SELECT RAISE(IGNORE); END"
        ],
    },
    "postgresql": {
        "after-insert-delete": [
            "CREATE FUNCTION hide() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN DELETE FROM audit_events WHERE seq = NEW.seq; RETURN NULL; END $$",
            "CREATE TRIGGER hide AFTER INSERT ON audit_events FOR EACH ROW WHEN (NEW.device_id LIKE 'hidden-%') EXECUTE FUNCTION hide()",
        ],
        "before-insert-skip": [
            "CREATE FUNCTION hide() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
            "CREATE TRIGGER hide BEFORE INSERT ON audit_events FOR EACH ROW WHEN (NEW.device_id LIKE 'hidden-%') EXECUTE FUNCTION hide()",
        ],
        # Runs at COMMIT, after anything the writer reads back in its transaction, unless the writer makes it run first.
        "deferred-delete-at-commit": [
            "CREATE FUNCTION hide() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN DELETE FROM audit_events WHERE seq = NEW.seq; RETURN NULL; END $$",
            "CREATE CONSTRAINT TRIGGER hide AFTER INSERT ON audit_events DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW WHEN (NEW.device_id LIKE 'hidden-%') EXECUTE FUNCTION hide()",
        ],
    },
}


@pytest.mark.parametrize(("dialect", "how"), [(dialect, how) for dialect, kinds in _HIDING.items() for how in kinds])
def test_an_issuance_whose_audit_event_the_database_drops_is_not_committed(
    request: pytest.FixtureRequest, tmp_path: Path, dialect: str, how: str
) -> None:
    """A trigger left in the database dropped the daemon's audit event and the issuance committed without it.

    Seen in a hostile review: with an AFTER INSERT trigger deleting the events of devices named evil-*, a Sign
    for evil-1 returned a certificate the CA key had signed, and `audit verify` said OK over a log (and signed
    checkpoints) without it; a second trigger on certificates left the CA unable to revoke it. The writer now
    reads its events back in the same transaction and refuses to commit when they are not there as written.
    """
    store_url = f"sqlite:///{tmp_path / 'ca.db'}" if dialect == "sqlite" else request.getfixturevalue("pg_database")()
    store = open_store(store_url)
    request.addfinalizer(store.close)
    store.save_ca_key(_ca_key())
    _issue(store, _cert())
    head_before = store.audit_events()[-1]
    from sqlalchemy import create_engine

    insider = create_engine(store_url)
    with insider.begin() as conn:
        for statement in _HIDING[dialect][how]:
            conn.execute(text(statement))
    insider.dispose()

    hidden = _cert("hidden-1")
    event = dataclasses.replace(_audit(hidden), device_id=hidden.device_id)
    with pytest.raises(FailedPrecondition, match="do not read back as written"):
        store.record_unique_issuances([(hidden, event, False, 0)])
    assert store.get_certificate(hidden.serial) is None
    assert store.audit_events()[-1]["seq"] == head_before["seq"]

    # Other writes go on, linked to the head as it was.
    shown = _cert("shown-1")
    _issue(store, shown)
    events = store.audit_events()
    assert [e["serial"] for e in events[-1:]] == [format(shown.serial, "x")]
    assert bytes(events[-1]["prev_hash"]) == bytes(head_before["hash"])


def test_records_and_their_events_are_read_in_one_snapshot_on_both_backends(store: SqlStore) -> None:
    """What `audit verify --live` compares (audit.reconcile): only where the tables and the events disagree comes back."""
    from ca_daemon.store.audit_store import AuditStore, RevocationDisagreement

    kept, gone, revoked, unrevoked = _cert(), _cert(), _cert(), _cert()
    for cert in (kept, gone, revoked, unrevoked):
        store.record_unique_issuances([(cert, dataclasses.replace(_audit(cert), key_id=ISSUER), False, 0)])
    _revoke(store, revoked.serial)
    _revoke(store, kept.serial, RevocationReason.CERTIFICATE_HOLD)
    _revoke(store, unrevoked.serial, RevocationReason.CERTIFICATE_HOLD)
    _lift(store, unrevoked.serial)
    audit = AuditStore(store)
    agreeing = audit.records_and_their_events()  # a revocation, a hold and a lifted hold agree
    assert (agreeing.unrecorded_issuances, agreeing.revocations, agreeing.unlogged_revocations, agreeing.unlogged_certificates) == (
        [],
        [],
        [],
        [],
    )
    revoke_seq = next(e["seq"] for e in store.audit_events() if e["serial"] == serial_hex(revoked.serial) and e["outcome"] == "revoked")
    with store._begin() as conn:
        conn.execute(text("DELETE FROM certificates WHERE serial = :s"), {"s": serial_hex(gone.serial)})
        conn.execute(text("DELETE FROM revocations WHERE serial = :s"), {"s": serial_hex(revoked.serial)})
        conn.execute(text("UPDATE revocations SET lifted_at = NULL WHERE serial = :s"), {"s": serial_hex(unrevoked.serial)})
        issued = {"s": serial_hex(kept.serial)}
        conn.execute(text("DELETE FROM audit_events WHERE action = 'certificate.issue' AND serial = :s"), issued)
    found = audit.records_and_their_events()
    assert found.unlogged_certificates == [(serial_hex(kept.serial), kept.device_id, ISSUER)]
    assert [serial for _, serial in found.unrecorded_issuances] == [serial_hex(gone.serial)]
    gone_row = RevocationDisagreement(revoke_seq, serial_hex(revoked.serial), "certificate.revoke", "key_compromise", None)
    assert found.revocations[0] == gone_row
    assert [(d.serial, d.action, d.row) for d in found.revocations[1:]] == [
        (serial_hex(unrevoked.serial), "certificate.unrevoke", ("certificate_hold", False))
    ]
    assert found.unlogged_revocations == []


def test_revocations_in_force_pair_each_row_with_its_last_event_on_both_backends(store: SqlStore) -> None:
    """What `audit verify --live` compares row by row (audit._row_problems): both sides' facts, as UTC times, lifted holds left out."""
    from ca_daemon.store.audit_store import AuditStore

    revoked, held, lifted = _cert(), _cert(), _cert()
    for cert in (revoked, held, lifted):
        store.record_unique_issuances([(cert, dataclasses.replace(_audit(cert), key_id=ISSUER), False, 0)])
    _revoke(store, revoked.serial)
    _revoke(store, held.serial, RevocationReason.CERTIFICATE_HOLD)
    _revoke(store, lifted.serial, RevocationReason.CERTIFICATE_HOLD)
    _lift(store, lifted.serial)
    found = list(AuditStore(store).revocations_in_force())
    assert [(f.serial, f.reason) for f in found] == [
        (serial_hex(revoked.serial), "key_compromise"),
        (serial_hex(held.serial), "certificate_hold"),
    ]
    for fact, cert in zip(found, (revoked, held), strict=True):
        assert fact.revoked_at.tzinfo is not None and fact.row_revoked_at == fact.revoked_at, fact
        assert (fact.key_id, fact.row_issuer_key_id, fact.row_invalidity_date) == (ISSUER, ISSUER, None), fact
        assert fact.row_not_after == cert.not_after and fact.certificate_der == cert.der, fact
        assert fact.entry_der == _entry(cert.serial, fact.revoked_at, 0, None), fact


def test_events_removed_from_the_end_of_the_log_behind_a_writer_are_recorded_by_its_next_append(store: SqlStore, store_url: str) -> None:
    """An insider deleted the newest events (an issuance, before a checkpoint covered it) and the chain went on from the
    event before: seen in a hostile review, `audit verify` then said OK and the deleted seq was reused. The store now
    remembers its last event and records an audit.gap event when the log no longer holds it."""
    replica = open_store(store_url)  # another process appending to the same log: no gap is reported for its events
    try:
        _issue(store, _cert())
        _issue(replica, _cert())
        _issue(store, _cert())
        assert [e["action"] for e in store.audit_events()].count("audit.gap") == 0
        hidden = _cert("hidden-2")
        _issue(store, hidden)
        removed = store.audit_events()[-1]
        assert removed["serial"] == format(hidden.serial, "x")
        with store._begin() as conn:
            conn.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": removed["seq"]})
            conn.execute(text("DELETE FROM certificates WHERE serial = :s"), {"s": serial_hex(hidden.serial)})
        _issue(replica, _cert())  # the other writer knows nothing of it
        assert [e["action"] for e in store.audit_events()].count("audit.gap") == 0
        after = _cert()
        _issue(store, after)
        events = store.audit_events()
        gap, issued = events[-2], events[-1]
        assert (gap["action"], gap["outcome"], gap["actor"]) == ("audit.gap", "detected", "ca-daemon"), gap
        assert json.loads(gap["details"]) == {
            "written_seq": str(removed["seq"]),
            "written_hash": bytes(removed["hash"]).hex(),
            "head_seq": str(removed["seq"]),  # the replica's event took the seq number again
        }
        assert issued["serial"] == format(after.serial, "x") and bytes(issued["prev_hash"]) == bytes(gap["hash"])
        _issue(store, _cert())  # reported once
        assert [e["action"] for e in store.audit_events()].count("audit.gap") == 1
    finally:
        replica.close()


def test_a_retry_committed_between_the_sign_look_ups_is_replayed_not_refused_device_unique(tmp_path: Path) -> None:
    """Each look-up sees what is committed when it runs. With the request_id read first, a certificate of the same
    request committed right after that read was then found as the device's active certificate, and the retry was
    refused device-unique (a hostile review: 12 of 1,560 answers, one request_id sent to three replicas at once).
    Here the other commit lands between two of the look-ups, at the start of the second (SQLite's statement trace)."""
    from sqlalchemy import event

    store = open_store(f"sqlite:///{tmp_path / 'ca.db'}")
    store.save_ca_key(_ca_key())
    first = _cert("dev-race", request_id="race-1", csr=b"csr-race")
    look_ups: list[str] = []
    committing = False

    def commit_the_first_on_the_second_look_up(statement: str) -> None:
        nonlocal committing
        if committing or "FROM certificates" not in statement:
            return
        look_ups.append(statement)
        if len(look_ups) == 2:
            committing = True
            assert _issue(store, first) == [IssuanceOutcome(first, created=True)]
            committing = False

    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(commit_the_first_on_the_second_look_up)

    try:
        event.listen(store.engine, "connect", trace)
        store.engine.dispose()  # from now on every new connection traces its statements
        with store.sign_reads() as reads:
            existing, active, _others = reads.precheck("race-1", "dev-race", first.public_key_sha256, datetime.now(UTC))
        assert len(look_ups) >= 3 and store.get_certificate(first.serial) == first
        assert (existing, active) == (first, ()), "the retry of race-1 was not answered with its certificate"
    finally:
        store.close()


def test_a_deleted_write_ahead_log_stops_writes_and_what_it_held_survives_a_clean_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite went on committing into a deleted ca.db-wal that only the daemon still reached: Sign and Revoke answered OK,
    and a kill -9 then lost the certificates and revocations they acknowledged (a hostile review: 44 certificates, 21
    revocations, and a CRL number published twice). Now the first write after the deletion is refused and the log
    says what to do; what was committed before it is in the database file after a clean stop."""
    import os

    db = tmp_path / "ca.db"
    store = open_store(f"sqlite:///{db}")
    store.save_ca_key(_ca_key())
    before = _cert("dev-before")
    assert _issue(store, before) == [IssuanceOutcome(before, created=True)]
    os.unlink(f"{db}-wal")
    after = _cert("dev-after")
    with pytest.raises(StoreUnavailable, match=r"write-ahead log .* was deleted while the daemon ran"):
        _issue(store, after)
    with pytest.raises(StoreUnavailable, match="write-ahead log"):  # and every write after it
        _issue(store, after)
    assert store.reachable() is False  # health: NOT_SERVING
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("a checkpoint copied" in m and "stop the daemon cleanly (SIGTERM" in m for m in errors), errors
    store.close()
    reopened = open_store(f"sqlite:///{db}")
    try:
        assert reopened.get_certificate(before.serial) == before
        assert reopened.get_certificate(after.serial) is None
        _issue(reopened, after)  # a new process writes again
    finally:
        reopened.close()


def test_a_write_ahead_log_removed_by_the_last_close_is_not_taken_for_a_deleted_one(tmp_path: Path) -> None:
    """SQLite removes the log when the last connection closes; a store whose pool closed them all writes again."""
    import os

    db = tmp_path / "ca.db"
    store = open_store(f"sqlite:///{db}")
    try:
        store.save_ca_key(_ca_key())
        store.engine.dispose()  # every connection closed: SQLite removes ca.db-wal
        assert not os.path.exists(f"{db}-wal")
        first = _cert("dev-1")
        assert _issue(store, first) == [IssuanceOutcome(first, created=True)]
        assert store.reachable()
    finally:
        store.close()


def test_a_call_that_finds_every_pooled_connection_in_use_is_unavailable_and_the_next_is_served(store_url: str) -> None:
    """Sixteen calls stuck on a slow database fill a worker's pool; the next one waited its lock wait and was an INTERNAL error."""
    migrated = open_store(store_url)
    migrated.save_ca_key(_ca_key())
    migrated.close()
    store = SqlStore(store_url, lock_wait_ms=300)
    held = [store.engine.connect() for _ in range(16)]
    try:
        for call in (store.crl_failures, lambda: store.set_crl_status(ISSUER, ok=True, message="")):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="all 16 database connections of this process were in use for 0\\.3 s"):
                call()
            assert time.monotonic() - started < 5
    finally:
        for conn in held:
            conn.close()
    store.set_crl_status(ISSUER, ok=False, message="m")
    assert store.crl_failures() == [(ISSUER, "m")]
    store.close()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_postgresql_sessions_fail_when_the_network_goes_silent_not_after_the_kernel_gives_up(store_url: str) -> None:
    """libpq is asked for keepalives and a TCP user timeout (a partition would otherwise hang a call about 15 minutes)."""
    store = open_store(store_url)
    try:
        with store.engine.connect() as conn:
            parameters = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert parameters.get("keepalives") == "1" and int(parameters["tcp_user_timeout"]) > 0, parameters
    finally:
        store.close()


def test_the_audit_log_read_through_the_cursor_is_what_events_gives(store: SqlStore) -> None:
    """`audit verify --live` and `audit export` read pages straight from the DB-API cursor: the same rows, values and types."""
    from ca_daemon.store.audit_store import AuditStore, EventFilter

    event = AuditEvent(
        time=datetime.now(UTC), actor="a", action="x", outcome="o", serial=5, request_digest=b"\x01" * 32, details={"k": "\u00e9"}
    )
    store.append_audit([event] * 7)
    audit = AuditStore(store)
    start = audit.last_seq() - 7
    page = audit.event_page(start + 2, 3)
    assert [e["seq"] for e in page] == [start + 3, start + 4, start + 5]
    assert page == audit.events(EventFilter(after_seq=start + 2), 3)
    assert [[type(value) for value in e.values()] for e in page] == [
        [type(value) for value in e.values()] for e in audit.events(EventFilter(after_seq=start + 2), 3)
    ]
    assert audit.event_page(0, 5000) == audit.events(EventFilter(after_seq=0), 5000)


def test_a_key_switch_and_a_revocation_of_certificates_of_both_keys_do_not_deadlock(store: SqlStore) -> None:
    """The key switch locked its keys FOR UPDATE, which conflicts with the FOR KEY SHARE lock PostgreSQL's foreign-key
    check takes on ca_keys for every revocation (and certificate, CRL) row inserted. A revocation of certificates of
    both keys holds one key's row, the switch locked the other first (key order) and waited, and the revocation's next
    row waited for the switch: a deadlock, one of them aborted. Its plain UPDATE (FOR NO KEY UPDATE) let both pass."""
    if store.dialect == "sqlite":
        pytest.skip("SQLite serialises writers: no row locks")
    import psycopg

    from ca_daemon.store.rotation_store import RotationStore, StatusChange

    store.save_ca_key(_ca_key("ca-test-0", KeyStatus.PENDING))  # sorts before ISSUER: the switch locks it first
    old = _cert("both-keys")
    new = dataclasses.replace(_cert("both-keys-2"), issuer_key_id="ca-test-0")
    store.record_issuances([(old, _audit(old)), (new, _audit(new))])
    rotation, now, window = RotationStore(store), datetime.now(UTC), timedelta(minutes=5)
    for officer in ("alice", "bob"):
        event = AuditEvent(time=now, actor=officer, action="key.approve", outcome="approved", key_id="ca-test-0")
        rotation.approve("activate", "ca-test-0", "", officer, now, window, event)
    changes = [
        StatusChange(ISSUER, (KeyStatus.ACTIVE,), KeyStatus.SUPERSEDED, "superseded_at"),
        StatusChange("ca-test-0", (KeyStatus.PENDING,), KeyStatus.ACTIVE, "activated_at"),
    ]
    switch_event = AuditEvent(time=now, actor="bob", action="key.activate", outcome="activated", key_id="ca-test-0")
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> threading.Thread:
        def target() -> None:
            try:
                call()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    # Sessions of this test's database only: the server may be shared (CA_DAEMON_TEST_PG_URL).
    waiting_query = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")

    def waiting_for_a_lock(count: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with store.engine.connect() as conn:
                waiting = conn.execute(waiting_query).scalar_one()
            if waiting >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"fewer than {count} sessions waiting for a lock")

    holder = psycopg.connect(store.engine.url.render_as_string(hide_password=False).replace("+psycopg", ""))
    try:
        # Holds the new key's certificate row, so the revocation stops between its two rows (old key's first).
        holder.execute("SELECT 1 FROM certificates WHERE serial = %s FOR UPDATE", (serial_hex(new.serial),))
        revoking = run(
            lambda: store.record_revocations(
                serials=[old.serial, new.serial],
                device_id="",
                reason=RevocationReason.KEY_COMPROMISE,
                revoked_at=now.replace(microsecond=0),
                invalidity_date=None,
                actor="test",
                encode_entry=_entry,
            )
        )
        waiting_for_a_lock(1)
        switching = run(lambda: rotation.execute("activate", "ca-test-0", "", now, window, changes, switch_event))
        time.sleep(0.5)  # the switch locks ca-test-0 and then waits for ISSUER (new code), or commits (old code)
    finally:
        holder.rollback()
        holder.close()
    revoking.join(timeout=30)
    switching.join(timeout=30)
    assert errors == []
    assert store.get_ca_key("ca-test-0").status == KeyStatus.ACTIVE  # type: ignore[union-attr]
    assert store.get_revocation(old.serial) is not None and store.get_revocation(new.serial) is not None


def test_a_key_s_urls_are_recorded_once_each_with_their_first_date(store: SqlStore) -> None:
    """key_urls (schema 10) is what the CRL publisher serves for each key: recording again adds only what is new."""
    store.save_ca_key(_ca_key("ca-test-2", KeyStatus.PENDING))
    first, later = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC)
    store.record_key_urls(ISSUER, [("crl", "http://ca/v1.crl"), ("ca_issuers", "http://ca/v1.der")], first)
    store.record_key_urls(ISSUER, [("crl", "http://ca/v1.crl"), ("crl", "http://ca/v2.crl")], later)
    store.record_key_urls("ca-test-2", [("crl", "http://ca/next.crl")], later)
    store.record_key_urls("ca-test-2", [], later)
    assert store.key_urls() == [
        (ISSUER, "crl", "http://ca/v1.crl"),
        (ISSUER, "ca_issuers", "http://ca/v1.der"),
        ("ca-test-2", "crl", "http://ca/next.crl"),
        (ISSUER, "crl", "http://ca/v2.crl"),
    ]
