"""A refused Sign is audited like an issued one: with its device ID and the digest of the CSR's DER.

Real daemon with the policy test profiles (SoftHSM, SQLite, gRPC on loopback). Found by a review:
a CSR refused by a profile rule (key type, subject, SAN, extensions) was recorded with no device
ID and the SHA-256 of the PEM text, so an auditor filtering by device ID missed it.
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import Daemon
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
