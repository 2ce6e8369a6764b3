"""Client PKIs over real mTLS (SoftHSM, TLS on loopback, gRPC): what an outside client CA needs, and streams.

One daemon set up with `ca-daemon mtls init --apply`, plus, in the client CA bundle, an outside
PKI (software keys): a root whose CRL revokes one of its two intermediates, and a lone root with
no CRL in tls.client_crl. Found by a review: each of these was let in.
"""

from __future__ import annotations

import os
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import device_csr, make_env, spawn_daemon, wait_channel_serving
from tests.csr_forge import oid, seq, tlv
from tests.integration.test_access_audit import TlsDaemon

pytestmark = pytest.mark.slow


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    public: ec.EllipticCurvePublicKey,
    issuer_name: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    serial: int,
) -> x509.Certificate:
    now = datetime.now(UTC) - timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=(0 if subject != issuer_name else None) if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _crl(issuer_name: str, signer: ec.EllipticCurvePrivateKey, revoked: list[int]) -> x509.CertificateRevocationList:
    now = datetime.now(UTC).replace(microsecond=0)
    entries = [x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build() for s in revoked]
    return x509.CertificateRevocationListBuilder(
        issuer_name=_name(issuer_name),
        last_update=now,
        next_update=now + timedelta(days=30),
        revoked_certificates=entries,
    ).sign(signer, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_key_pem(key))


def _outside_client(tls_dir: Path, name: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, serial: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert(name, key.public_key(), issuer.subject.rfc4514_string().removeprefix("CN="), issuer_key, ca=False, serial=serial)
    _write_key(tls_dir / "clients" / f"{name}.key", key)
    chain = _pem(issuer) if issuer.issuer != issuer.subject else b""
    (tls_dir / "clients" / f"{name}.pem").write_bytes(_pem(leaf) + chain)


def _unreadable_name_client(
    tls_dir: Path, name: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, serial: int
) -> None:
    """A client certificate whose subject CN is a PrintableString with '_' and '@', characters that type does not allow.

    OpenSSL verifies it and Python's ssl reads it; cryptography cannot read the name. Built with a UTF8String
    placeholder of the same length, patched in the to-be-signed bytes and signed again by its CA.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC) - timedelta(minutes=5)
    draft = (
        x509.CertificateBuilder()
        .subject_name(_name("placeholder"))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    utf8_cn = bytes([0x0C, len("placeholder")]) + b"placeholder"
    printable_cn = bytes([0x13, len("placeholder")]) + f"{name}_@x".ljust(len("placeholder"), "x").encode()
    tbs = draft.tbs_certificate_bytes.replace(utf8_cn, printable_cn)
    signature = issuer_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    der = seq(tbs, seq(oid("1.2.840.10045.4.3.2")), tlv(0x03, b"\x00" + signature))
    _write_key(tls_dir / "clients" / f"{name}.key", key)
    (tls_dir / "clients" / f"{name}.pem").write_bytes(ssl.DER_cert_to_PEM_cert(der).encode() + _pem(issuer))


@pytest.fixture(scope="module")
def pki_daemon(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[TlsDaemon]:
    env = make_env(tmp_path_factory.mktemp("pki"), softhsm_conf, workers=1)
    tls_dir = env.state_dir / "tls"
    clients = ["prog:programmer", "off:officer", "revoked:programmer", "spare:programmer"]
    env.cli("mtls", "init", "--out", str(tls_dir), *[a for c in clients for a in ("--client", c)], "--apply")
    revoked = x509.load_pem_x509_certificate((tls_dir / "clients" / "revoked.pem").read_bytes()).serial_number
    env.cli("mtls", "revoke", "--serial", format(revoked, "x"))

    # An outside PKI joins as the README says: root and intermediates in tls.client_ca, the CRL of
    # each in tls.client_crl. The root has revoked one intermediate (say its key leaked).
    root_key, bad_key, good_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("Outside Root", root_key.public_key(), "Outside Root", root_key, ca=True, serial=0x1001)
    bad = _cert("Outside Intermediate", bad_key.public_key(), "Outside Root", root_key, ca=True, serial=0x2002)
    good = _cert("Outside Intermediate 2", good_key.public_key(), "Outside Root", root_key, ca=True, serial=0x2003)
    with (tls_dir / "ca.pem").open("ab") as bundle:
        bundle.write(_pem(root) + _pem(bad) + _pem(good))
    with (tls_dir / "client-ca.crl").open("ab") as crls:
        crls.write(_crl("Outside Root", root_key, [bad.serial_number]).public_bytes(serialization.Encoding.PEM))
        crls.write(_crl("Outside Intermediate", bad_key, []).public_bytes(serialization.Encoding.PEM))
        crls.write(_crl("Outside Intermediate 2", good_key, []).public_bytes(serialization.Encoding.PEM))
    _outside_client(tls_dir, "off2", bad, bad_key, 0x3003)
    _outside_client(tls_dir, "off4", good, good_key, 0x3004)
    _unreadable_name_client(tls_dir, "off5", good, good_key, 0x3005)
    # A second outside PKI whose CRL was left out of tls.client_crl.
    lone_key = ec.generate_private_key(ec.SECP256R1())
    lone = _cert("Lone Root", lone_key.public_key(), "Lone Root", lone_key, ca=True, serial=0x4004)
    with (tls_dir / "ca.pem").open("ab") as bundle:
        bundle.write(_pem(lone))
    _outside_client(tls_dir, "off3", lone, lone_key, 0x5005)
    env.edit_config('officer = ["off"]', 'officer = ["off", "off2", "off3", "off4", "off5"]')

    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    daemon = TlsDaemon(env, tls_dir, process, log_path, 0)
    with daemon.channel("off") as channel:
        wait_channel_serving(channel, 40, process, daemon.log, settle=0.5)
    yield daemon
    daemon.stop()


def _list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def _refusal(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        ca_pb2_grpc.CertificateAuthorityStub(channel).ListProfiles(ca_pb2.ListProfilesRequest(), timeout=10)
    return refused.value


@pytest.mark.parametrize("client", [None, "revoked"], ids=["no-certificate", "revoked"])
def test_streams_refuse_whom_a_unary_call_refuses(pki_daemon: TlsDaemon, client: str | None) -> None:
    """Reflection (a bidirectional stream) listed every service, KeyCeremony too, to callers refused everywhere else."""
    with pki_daemon.channel(client) as channel:
        assert _refusal(channel).code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as reflected:
            _list_services(channel)
        assert reflected.value.code() == grpc.StatusCode.UNAUTHENTICATED
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.RpcError) as watched:
            next(watch)
        assert watched.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_authenticated_caller_reflects_and_watches_health(pki_daemon: TlsDaemon) -> None:
    """Health's Watch answers with context.write, not by yielding: guarded as a generator it ended in INTERNAL."""
    with pki_daemon.channel("prog") as channel:
        assert "ca_daemon.v1.CertificateAuthority" in _list_services(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_a_certificate_under_a_revoked_client_intermediate_is_refused(pki_daemon: TlsDaemon) -> None:
    with pki_daemon.channel("off2") as channel:
        refused = _refusal(channel)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "is revoked (on the CRL of client CA 'CN=Outside Root')" in (refused.details() or "")


def test_a_certificate_under_a_valid_client_intermediate_is_admitted(pki_daemon: TlsDaemon) -> None:
    with pki_daemon.channel("off4") as channel:
        profiles = ca_pb2_grpc.CertificateAuthorityStub(channel).ListProfiles(ca_pb2.ListProfilesRequest(), timeout=10)
    assert profiles.profiles


def test_a_client_ca_without_a_crl_has_its_certificates_refused(pki_daemon: TlsDaemon) -> None:
    with pki_daemon.channel("off3") as channel:
        refused = _refusal(channel)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "issued by client CA 'CN=Lone Root', which has no CRL in" in (refused.details() or "")
    assert "has no CRL of CN=Lone Root" in pki_daemon.log()


def test_a_request_id_of_one_programming_service_tells_another_nothing(pki_daemon: TlsDaemon) -> None:
    """Another caller reusing a request_id learned it was used and its serial, and with the same CSR got the certificate."""
    request_id = f"batch-7/{uuid.uuid4()}"
    csr = device_csr()
    with pki_daemon.channel("prog") as channel:
        first = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(ca_pb2.SignRequest(csr=csr, request_id=request_id), timeout=10)
    with pki_daemon.channel("spare") as channel:
        for attempt in (device_csr(), csr):
            with pytest.raises(grpc.RpcError) as refused:
                ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(ca_pb2.SignRequest(csr=attempt, request_id=request_id), timeout=10)
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            details = refused.value.details() or ""
            assert "used by another caller" in details and first.serial not in details, details
    with pki_daemon.channel("prog") as channel:  # its own retry is still answered with its certificate
        again = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(ca_pb2.SignRequest(csr=csr, request_id=request_id), timeout=10)
    assert again.serial == first.serial


def test_a_plaintext_cli_client_is_told_to_pass_its_tls_files(pki_daemon: TlsDaemon) -> None:
    # It got only "UNAVAILABLE: failed to connect to all addresses; ... Socket closed". (Not beside the TLS 1.2 test of
    # test_access_audit: this refusal is logged as protocol, which holds back that test's line for 10 s.)
    result = pki_daemon.env.cli("client", "ca-certs", "--target", pki_daemon.env.target, "--retries", "0", check=False)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "pass --tls-ca, --tls-cert and --tls-key" in result.stderr, result.stderr


def test_revoking_an_internal_client_keeps_the_outside_cas_crls(pki_daemon: TlsDaemon) -> None:
    """`mtls revoke` rewrites tls.client_crl: it replaced the whole file, dropping the outside CAs' CRLs."""
    crl_file = pki_daemon.tls_dir / "client-ca.crl"
    issuers_before = sorted(c.issuer.rfc4514_string() for c in _crls(crl_file.read_bytes()))
    spare = x509.load_pem_x509_certificate((pki_daemon.tls_dir / "clients" / "spare.pem").read_bytes())
    pki_daemon.env.cli("mtls", "revoke", "--serial", format(spare.serial_number, "x"))
    crls = _crls(crl_file.read_bytes())
    assert sorted(c.issuer.rfc4514_string() for c in crls) == issuers_before
    assert any(c.get_revoked_certificate_by_serial_number(spare.serial_number) is not None for c in crls)
    deadline = time.monotonic() + 10
    while True:  # the daemon re-reads the file within a second
        with pki_daemon.channel("spare") as channel:
            if _refusal_or_none(channel) is not None:
                break
        assert time.monotonic() < deadline, "the revoked client is still let in"
        time.sleep(0.2)
    with pki_daemon.channel("off4") as channel:
        assert _refusal_or_none(channel) is None  # the outside CA's clients are still checked and let in


def _crls(data: bytes) -> list[x509.CertificateRevocationList]:
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S)
    return [x509.load_pem_x509_crl(block) for block in blocks]


def _refusal_or_none(channel: grpc.Channel) -> grpc.RpcError | None:
    try:
        ca_pb2_grpc.CertificateAuthorityStub(channel).ListProfiles(ca_pb2.ListProfilesRequest(), timeout=10)
    except grpc.RpcError as error:
        return error
    return None


def test_a_client_name_that_begins_a_role_pattern_is_refused(tmp_path: Path, softhsm_conf: Path) -> None:
    """`mtls init --client "uri:.*:auditor"` wrote auditor = ["uri:.*"]: every client (all have a SAN URI) became an auditor."""
    env = make_env(tmp_path, softhsm_conf)
    out = tmp_path / "tls"
    configuration = env.config_path.read_text()
    for spec in ("uri:.*:auditor", "ou:ops:admin"):
        result = env.cli("mtls", "init", "--out", str(out), "--client", "prog:programmer", "--client", spec, "--apply", check=False)
        assert result.returncode == 1 and "which in [roles] begins a pattern, not a name" in result.stderr, result.stderr
        assert not (out / "clients").exists()
        assert env.config_path.read_text() == configuration


def test_a_certificate_whose_name_cannot_be_read_is_refused_with_the_reason(pki_daemon: TlsDaemon) -> None:
    """A client CA's certificate with a PrintableString CN holding '_' passed the handshake (OpenSSL reads it), and then
    every call ended in INTERNAL with a traceback in the log and no access.deny event: cryptography could not read the name."""
    with pki_daemon.channel("off5") as channel:
        refused = _refusal(channel)
    details = refused.details() or ""
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, (refused.code(), details)
    assert details.startswith("the client certificate cannot be read: error parsing asn1 value: "), details
    assert "PrintableString" in details, details
    assert details.endswith("[rule client-certificate]"), details
    assert "Traceback" not in pki_daemon.log()
