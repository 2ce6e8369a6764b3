"""A refused request is audited like a granted one: Sign, Revoke, Unrevoke, RevokeBulk, IssueVerificationCertificate.

Real daemon with the policy test profiles (SoftHSM, SQLite, gRPC on loopback). Found by a review:
a CSR refused by a profile rule (key type, subject, SAN, extensions) was recorded with no device
ID and the SHA-256 of the PEM text, so an auditor filtering by device ID missed it. Found by a
hostile tester: refused Revoke, Unrevoke, RevokeBulk and IssueVerificationCertificate calls got the
right status but left no audit event at all (README "The gRPC API": "the refusal is recorded").
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import Daemon, device_csr
from tests.integration.policy_env import make_policy_env

pytestmark = pytest.mark.slow


def _csr(cn: str, *, key: ec.EllipticCurvePrivateKey | None = None, sans: list[x509.GeneralName] | None = None, org: str = "") -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _der_sha256(pem: bytes) -> str:
    return hashlib.sha256(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def policy_daemon(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[Daemon]:
    env = make_policy_env(tmp_path_factory.mktemp("policy-audit"), softhsm_conf)
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    yield daemon
    daemon.stop()


def _refused_events(daemon: Daemon, request_id: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(daemon.env.state_dir / "ca.db")
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM audit_events WHERE outcome = 'refused' ORDER BY seq").fetchall()
    finally:
        db.close()
    return [r for r in rows if request_id in (r["details"] or "")]


def _digest_hex(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else str(value or "")


def test_a_policy_refusal_is_audited_with_its_device_id_and_the_csr_digest_issuance_uses(policy_daemon: Daemon) -> None:
    """README "Audit log": every refusal records its object (device ID) and the request digest (CSR SHA-256)."""
    device = f"fleet-{uuid.uuid4().hex[:8]}"
    pem = _csr(device, org="Example Corp", sans=[x509.DNSName(f"{device}.evil.example.net")])  # refused: san-pattern
    request_id = str(uuid.uuid4())
    with grpc.insecure_channel(policy_daemon.env.target) as channel, pytest.raises(grpc.RpcError) as refused:
        ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(ca_pb2.SignRequest(csr=pem, profile="fleet", request_id=request_id), timeout=15)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[rule san-pattern]" in (refused.value.details() or "")
    events = _refused_events(policy_daemon, request_id)
    assert len(events) == 1, events
    event = events[0]
    assert event["reason"] == "san-pattern"
    assert (event["device_id"], _digest_hex(event["request_digest"])) == (device, _der_sha256(pem))


# -- refusals of the revocation and registration calls ----------------------------------------

ACTOR = "local-developer"  # the development-mode identity, which has every role


def _query(daemon: Daemon, sql: str, *args: object) -> list[sqlite3.Row]:
    db = sqlite3.connect(daemon.env.state_dir / "ca.db")
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _records(daemon: Daemon) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    """Every certificates and revocations row, and the last audit seq."""
    certificates = [tuple(r) for r in _query(daemon, "SELECT * FROM certificates ORDER BY serial")]
    revocations = [tuple(r) for r in _query(daemon, "SELECT * FROM revocations ORDER BY serial")]
    return certificates, revocations, int(_query(daemon, "SELECT coalesce(max(seq), 0) FROM audit_events")[0][0])


def _events_after(daemon: Daemon, seq: int) -> list[sqlite3.Row]:
    """Events after seq, but the CRL scheduler's (it publishes a delta on its own after a revocation)."""
    return _query(daemon, "SELECT * FROM audit_events WHERE seq > ? AND action != 'crl.publish' ORDER BY seq", seq)


def _refused(daemon: Daemon, call: Callable[[], object]) -> tuple[grpc.StatusCode, sqlite3.Row]:
    """Make a call that is refused: its status, and the one event it left; it changed no other row.

    The event is committed before the answer, as Sign's are, so nothing is waited for.
    """
    certificates, revocations, seq = _records(daemon)
    with pytest.raises(grpc.RpcError) as refusal:
        call()
    events = _events_after(daemon, seq)
    assert len(events) == 1, [dict(e) for e in events]
    assert _records(daemon)[:2] == (certificates, revocations)
    return refusal.value.code(), events[0]


def _shape(event: sqlite3.Row) -> tuple[str, str, str, str]:
    return event["action"], event["outcome"], event["reason"], event["actor"]


def _serial(event: sqlite3.Row) -> int | None:
    return None if event["serial"] is None else int(event["serial"], 16)


def _details(event: sqlite3.Row) -> dict[str, str]:
    details: dict[str, str] = json.loads(event["details"])
    return details


def _issue(stub: ca_pb2_grpc.CertificateAuthorityStub, device: str | None = None) -> ca_pb2.SignResponse:
    response: ca_pb2.SignResponse = stub.Sign(ca_pb2.SignRequest(csr=device_csr(device), request_id=str(uuid.uuid4())), timeout=15)
    return response


KEY_COMPROMISE = ca_pb2.REVOCATION_REASON_KEY_COMPROMISE


def test_refused_revokes_are_audited_with_the_serial_rule_and_caller(policy_daemon: Daemon) -> None:
    with grpc.insecure_channel(policy_daemon.env.target) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        cert = _issue(stub)

        def revoke(serial: str, reason: int = KEY_COMPROMISE) -> object:
            return stub.Revoke(ca_pb2.RevokeRequest(serial=serial, reason=reason), timeout=15)  # type: ignore[arg-type]

        code, event = _refused(policy_daemon, lambda: revoke("xyz"))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ("certificate.revoke", "refused", "serial", ACTOR),
            None,
        )
        assert "'xyz'" in _details(event)["message"] and _details(event)["requested_reason"] == "key_compromise"
        code, event = _refused(policy_daemon, lambda: revoke("0"))
        assert (code, _shape(event)) == (grpc.StatusCode.INVALID_ARGUMENT, ("certificate.revoke", "refused", "serial", ACTOR))
        # A serial of 100,000 characters: refused and audited, its echo cut short.
        code, event = _refused(policy_daemon, lambda: revoke("1" * 100_000))
        assert (code, event["reason"], _serial(event)) == (grpc.StatusCode.INVALID_ARGUMENT, "serial", None)
        assert len(event["details"]) < 1024, event["details"]
        code, event = _refused(policy_daemon, lambda: revoke("7" * 38))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.NOT_FOUND,
            ("certificate.revoke", "refused", "serial", ACTOR),
            int("7" * 38, 16),
        )
        code, event = _refused(policy_daemon, lambda: revoke(cert.serial, reason=99))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ("certificate.revoke", "refused", "reason", ACTOR),
            int(cert.serial, 16),
        )
        assert _details(event)["requested_reason"] == "99" and _details(event)["field"] == "reason"
        # An invalidity date outside google.protobuf.Timestamp's range was refused before the call reached the revoker: unaudited.
        late = ca_pb2.RevokeRequest(serial=cert.serial, reason=KEY_COMPROMISE, invalidity_date=Timestamp(seconds=10**12))
        code, event = _refused(policy_daemon, lambda: stub.Revoke(late, timeout=15))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ("certificate.revoke", "refused", "timestamp", ACTOR),
            int(cert.serial, 16),
        )
        assert _details(event)["field"] == "invalidity_date"
        bulk = ca_pb2.RevokeBulkRequest(serials=[cert.serial], reason=KEY_COMPROMISE, invalidity_date=Timestamp(seconds=0, nanos=-1))
        code, event = _refused(policy_daemon, lambda: stub.RevokeBulk(bulk, timeout=15))
        assert (code, _shape(event), _details(event)["bulk"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ("certificate.revoke", "refused", "timestamp", ACTOR),
            "true",
        )
        revoke(cert.serial)
        code, event = _refused(policy_daemon, lambda: revoke(cert.serial))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            ("certificate.revoke", "refused", "already-revoked", ACTOR),
            int(cert.serial, 16),
        )


def test_refused_unrevokes_are_audited_with_the_serial_rule_and_caller(policy_daemon: Daemon) -> None:
    with grpc.insecure_channel(policy_daemon.env.target) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)

        def unrevoke(serial: str) -> object:
            return stub.Unrevoke(ca_pb2.UnrevokeRequest(serial=serial), timeout=15)

        code, event = _refused(policy_daemon, lambda: unrevoke("not-a-serial"))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ("certificate.unrevoke", "refused", "serial", ACTOR),
            None,
        )
        active = _issue(stub)
        code, event = _refused(policy_daemon, lambda: unrevoke(active.serial))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            ("certificate.unrevoke", "refused", "not-on-hold", ACTOR),
            int(active.serial, 16),
        )
        # Profile device does not allow re-issue: a held certificate's device got a new one, so the lift is refused.
        device = f"held-{uuid.uuid4().hex[:8]}"
        held = _issue(stub, device)
        stub.Revoke(ca_pb2.RevokeRequest(serial=held.serial, reason=ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD), timeout=15)
        _issue(stub, device)
        code, event = _refused(policy_daemon, lambda: unrevoke(held.serial))
        assert (code, _shape(event), _serial(event)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            ("certificate.unrevoke", "refused", "device-unique", ACTOR),
            int(held.serial, 16),
        )
        assert device in _details(event)["message"]


def test_refused_bulk_revocations_are_audited_once_with_the_device_rule_and_caller(policy_daemon: Daemon) -> None:
    with grpc.insecure_channel(policy_daemon.env.target) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        code, event = _refused(policy_daemon, lambda: stub.RevokeBulk(ca_pb2.RevokeBulkRequest(), timeout=15))
        assert (code, _shape(event)) == (grpc.StatusCode.INVALID_ARGUMENT, ("certificate.revoke", "refused", "bulk", ACTOR))
        device = f"recall-{uuid.uuid4().hex[:8]}"
        mine = _issue(stub, device)
        request = ca_pb2.RevokeBulkRequest(serials=[mine.serial, "9" * 36], device_id=device, reason=KEY_COMPROMISE)
        code, event = _refused(policy_daemon, lambda: stub.RevokeBulk(request, timeout=15))
        assert (code, _shape(event), event["device_id"], _serial(event)) == (
            grpc.StatusCode.NOT_FOUND,
            ("certificate.revoke", "refused", "serial", ACTOR),
            device,
            None,
        )
        assert {k: _details(event)[k] for k in ("bulk", "serials", "requested_reason")} == {
            "bulk": "true",
            "serials": "2",
            "requested_reason": "key_compromise",
        }
        assert "9" * 36 in _details(event)["message"]
        # A device ID of 100,000 characters: kept to 256 in the event.
        code, event = _refused(policy_daemon, lambda: stub.RevokeBulk(ca_pb2.RevokeBulkRequest(device_id="d" * 100_000), timeout=15))
        assert (code, event["reason"], event["device_id"]) == (grpc.StatusCode.NOT_FOUND, "device_id", "d" * 256)


def test_refused_verification_certificates_are_audited_with_the_rule_and_caller(policy_daemon: Daemon) -> None:
    with grpc.insecure_channel(policy_daemon.env.target) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)

        def issue(code: str, validity_seconds: int = 0) -> object:
            request = ca_pb2.IssueVerificationCertificateRequest(code=code, validity_seconds=validity_seconds)
            return stub.IssueVerificationCertificate(request, timeout=15)

        code, event = _refused(policy_daemon, lambda: issue("not a code"))
        assert (code, _shape(event)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ("ca.verification-certificate", "refused", "verification-code", ACTOR),
        )
        assert _details(event)["code"] == ""  # not a code: only the message quotes it, cut short
        code, event = _refused(policy_daemon, lambda: issue("0F3A9C", validity_seconds=2**63))
        assert (code, _shape(event)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ("ca.verification-certificate", "refused", "verification-validity", ACTOR),
        )
        assert (_details(event)["code"], _details(event)["validity_seconds"]) == ("0F3A9C", str(2**63))
        code, event = _refused(policy_daemon, lambda: issue("0F3A9C", validity_seconds=60))
        assert (code, event["reason"]) == (grpc.StatusCode.INVALID_ARGUMENT, "verification-validity")


def test_thirty_concurrent_revokes_of_one_serial_leave_one_revocation_and_29_refusals_and_the_chain_verifies(
    policy_daemon: Daemon, tmp_path: Path
) -> None:
    env = policy_daemon.env
    with grpc.insecure_channel(env.target) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        cert = _issue(stub)
        _, _, seq = _records(policy_daemon)

        def revoke(_: int) -> grpc.StatusCode:
            try:
                stub.Revoke(ca_pb2.RevokeRequest(serial=cert.serial, reason=KEY_COMPROMISE), timeout=30)
            except grpc.RpcError as refusal:
                return refusal.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(revoke, range(30)))
    assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK] + [grpc.StatusCode.FAILED_PRECONDITION] * 29, key=str)
    events = [e for e in _events_after(policy_daemon, seq) if e["serial"] == cert.serial]
    assert sorted((e["action"], e["outcome"], e["reason"], e["actor"]) for e in events) == sorted(
        [("certificate.revoke", "revoked", "key_compromise", ACTOR)] + [("certificate.revoke", "refused", "already-revoked", ACTOR)] * 29
    )
    assert len(_query(policy_daemon, "SELECT * FROM revocations WHERE serial = ?", cert.serial)) == 1
    env.audit_verifies(tmp_path)
