"""Sign over real gRPC against a real daemon, SoftHSM token and SQLite store."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from ca_daemon import config as config_module
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.store import SqlStore
from tests.conftest import BIN, Daemon, device_csr, free_port, make_env, openssl_verify


def _stub(channel: grpc.Channel) -> ca_pb2_grpc.CertificateAuthorityStub:
    return ca_pb2_grpc.CertificateAuthorityStub(channel)


def _store(daemon: Daemon) -> SqlStore:
    return SqlStore(config_module.load(daemon.env.config_path).store.url)


def _sign(channel: grpc.Channel, csr: bytes, request_id: str | None = None) -> ca_pb2.SignResponse:
    return _stub(channel).Sign(ca_pb2.SignRequest(csr=csr, request_id=request_id or str(uuid.uuid4())), timeout=10)


def _lint(tmp_path: Path, pem: str) -> list[str]:
    """Run pkilint's RFC 5280 linter; return its ERROR and FATAL findings."""
    path = tmp_path / f"lint-{uuid.uuid4().hex}.pem"
    path.write_text(pem)
    result = subprocess.run([str(BIN / "lint_pkix_cert"), "lint", "-f", "JSON", str(path)], capture_output=True, text=True, check=False)
    report = json.loads(result.stdout)
    findings = [(r["validator"], f) for r in report["results"] for f in r["finding_descriptions"]]
    # The linter parsed the certificate: it always reports how the SKI was derived.
    assert any(f["code"].startswith("pkix.subject_key_identifier") for _, f in findings), result.stdout
    return [f"{validator}: {f['code']}" for validator, f in findings if f["severity"] in {"ERROR", "FATAL"}]


def test_signed_certificate_verifies_and_has_the_device_profile(channel: grpc.Channel, tmp_path: Path) -> None:
    before = datetime.now(UTC)
    response = _sign(channel, device_csr("sensor-0001"))
    leaf = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    chain = x509.load_pem_x509_certificates(response.chain_pem.encode())
    result = openssl_verify(tmp_path, response.certificate_pem, response.chain_pem, "-purpose", "sslclient")
    assert result.returncode == 0, result.stdout + result.stderr
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0001")])
    assert response.device_id == "sensor-0001"
    assert response.serial == format(leaf.serial_number, "x")
    assert leaf.serial_number > 0 and leaf.serial_number.bit_length() > 128
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == chain[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    cdp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name and str(cdp[0].full_name[0].value).startswith("http://127.0.0.1:8080/crl/")
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert str(aia[0].access_location.value).startswith("http://127.0.0.1:8080/ca/")
    assert leaf.not_valid_before_utc <= before - timedelta(seconds=55)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=365, seconds=60)
    assert response.not_after.ToDatetime(tzinfo=UTC) == leaf.not_valid_after_utc


def test_pkilint_finds_no_errors_in_leaf_and_ca(channel: grpc.Channel, tmp_path: Path) -> None:
    response = _sign(channel, device_csr())
    assert _lint(tmp_path, response.certificate_pem) == []
    assert _lint(tmp_path, response.chain_pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n") == []


def test_der_csr_is_accepted(channel: grpc.Channel, tmp_path: Path) -> None:
    response = _sign(channel, device_csr("der-device", pem=False))
    assert response.device_id == "der-device"
    assert openssl_verify(tmp_path, response.certificate_pem, response.chain_pem).returncode == 0


def test_same_request_id_and_csr_returns_the_same_certificate(channel: grpc.Channel, daemon: Daemon) -> None:
    csr = device_csr()
    request_id = str(uuid.uuid4())
    first = _sign(channel, csr, request_id)
    count = _store(daemon).count_certificates()
    second = _sign(channel, csr, request_id)
    assert second.certificate_pem == first.certificate_pem
    assert second.serial == first.serial
    assert _store(daemon).count_certificates() == count


def test_same_request_id_with_another_csr_is_already_exists(channel: grpc.Channel, daemon: Daemon) -> None:
    request_id = str(uuid.uuid4())
    first = _sign(channel, device_csr(), request_id)
    count = _store(daemon).count_certificates()
    with pytest.raises(grpc.RpcError) as excinfo:
        _sign(channel, device_csr(), request_id)
    assert excinfo.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already used for another CSR" in (excinfo.value.details() or "")
    assert first.serial in (excinfo.value.details() or "")
    assert _store(daemon).count_certificates() == count

    # Refused, so audited like every refusal (it was not).
    def refused() -> list[dict[str, object]]:
        events = _store(daemon).audit_events()
        return [e for e in events if (e["outcome"], e["reason"]) == ("refused", "idempotency") and request_id in e["details"]]

    deadline = time.monotonic() + 10
    while not refused():
        assert time.monotonic() < deadline, "the reused request_id's refusal is not in the audit log"
        time.sleep(0.1)


def _valid_pem() -> bytes:
    return device_csr()


def _bad_signature() -> bytes:
    der = bytearray(device_csr(pem=False))
    der[-3] ^= 0x40
    return bytes(der)


@pytest.mark.parametrize(
    ("csr", "request_id", "fragment"),
    [
        (b"", "r", "csr is empty"),
        (b"this is not a csr", "r", "not a valid PKCS#10"),
        (device_csr(pem=False)[:-10], "r", "truncated"),
        (device_csr(pem=False) + b"\x00garbage", "r", "trailing data"),
        (device_csr() + b"garbage", "r", "exactly one CERTIFICATE REQUEST block"),
        (b"\x30" * (64 * 1024 + 1), "r", "over the limit of 65536 bytes"),
        (_bad_signature(), "r", "signature"),
        (device_csr("not a device id!"), "r", "is not a valid device ID"),
        (device_csr("x" * 65), "r", "is not a valid device ID"),
        (_valid_pem(), "", "request_id is required"),
    ],
    ids=["empty", "garbage", "truncated", "der-trailing", "pem-trailing", "oversize", "bad-pop", "bad-cn", "long-cn", "no-request-id"],
)
def test_bad_input_is_invalid_argument_and_stores_nothing(
    channel: grpc.Channel, daemon: Daemon, csr: bytes, request_id: str, fragment: str
) -> None:
    count = _store(daemon).count_certificates()
    with pytest.raises(grpc.RpcError) as excinfo:
        _stub(channel).Sign(ca_pb2.SignRequest(csr=csr, request_id=request_id), timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (excinfo.value.details() or "")
    status = rpc_status.from_call(excinfo.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "ca-daemon" and info.reason
    assert _store(daemon).count_certificates() == count


def test_unknown_profile_is_permission_denied(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        _stub(channel).Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4()), profile="web-server"), timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "web-server" in (excinfo.value.details() or "")


def test_get_certificate_by_serial(channel: grpc.Channel) -> None:
    issued = _sign(channel, device_csr("lookup-me"))
    found = _stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=issued.serial.upper()), timeout=10)
    assert found.certificate_pem == issued.certificate_pem
    assert found.device_id == "lookup-me"
    with pytest.raises(grpc.RpcError) as excinfo:
        _stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial="abcdef"), timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in ["", "xyz", "0", "-5", "ab" * 21]:
        with pytest.raises(grpc.RpcError) as excinfo:
            _stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=bad), timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_ca_certificates_list_the_active_root(channel: grpc.Channel) -> None:
    reply = _stub(channel).GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10)
    active = [c for c in reply.certificates if c.status == "active"]
    assert len(active) == 1
    root = x509.load_pem_x509_certificate(active[0].certificate_pem.encode())
    assert root.subject == root.issuer
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = root.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    issued = x509.load_pem_x509_certificate(_sign(channel, device_csr()).certificate_pem.encode())
    issued.verify_directly_issued_by(root)
    assert public


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"ca_daemon.v1.CertificateAuthority", "grpc.health.v1.Health"} <= names


def test_reserved_rpcs_exist_in_the_contract() -> None:
    methods = set(ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"].methods_by_name)
    assert {"Sign", "GetCACertificates", "GetCertificate", "Revoke", "GetCRL"} <= methods


def test_requests_in_flight_together_each_get_their_own_answer(channel: grpc.Channel, daemon: Daemon, tmp_path: Path) -> None:
    """The token's thread takes waiting requests as one batch, stage by stage: a refusal or replay leaves it, the rest go on.

    Sixty calls are sent at once over one connection to the one worker, so most of them
    wait together and are prepared as a batch; each must still get exactly its own answer.
    """
    store = _store(daemon)
    before = store.count_certificates()
    retried_csr, retried_id = device_csr(), str(uuid.uuid4())
    duplicate_device = f"dup-{uuid.uuid4().hex[:8]}"
    calls: list[tuple[str, bytes, str, str]] = (
        [("good", device_csr(), str(uuid.uuid4()), "") for _ in range(30)]
        + [("garbage", b"not a CSR", str(uuid.uuid4()), "") for _ in range(8)]
        + [("bad-cn", device_csr("not a device id!"), str(uuid.uuid4()), "") for _ in range(6)]
        + [("no-profile", device_csr(), str(uuid.uuid4()), "web-server") for _ in range(6)]
        + [("same-device", device_csr(duplicate_device), str(uuid.uuid4()), "") for _ in range(4)]
        + [("retried", retried_csr, retried_id, "") for _ in range(2)]
        + [("reused-id", device_csr(), retried_id, "") for _ in range(4)]
    )
    futures = [
        _stub(channel).Sign.future(ca_pb2.SignRequest(csr=csr, request_id=request_id, profile=profile), timeout=30)
        for _, csr, request_id, profile in calls
    ]
    outcomes: dict[str, list[tuple[grpc.StatusCode, ca_pb2.SignResponse | None]]] = {}
    for (kind, _, _, _), future in zip(calls, futures, strict=True):
        try:
            outcomes.setdefault(kind, []).append((grpc.StatusCode.OK, future.result()))
        except grpc.RpcError as error:
            outcomes.setdefault(kind, []).append((error.code(), None))

    def codes(kind: str) -> list[grpc.StatusCode]:
        return [code for code, _ in outcomes[kind]]

    assert codes("good") == [grpc.StatusCode.OK] * 30
    serials = {reply.serial for _, reply in outcomes["good"] if reply is not None}
    assert len(serials) == 30
    for _, reply in outcomes["good"][:3]:
        assert reply is not None and openssl_verify(tmp_path, reply.certificate_pem, reply.chain_pem).returncode == 0
    assert codes("garbage") == [grpc.StatusCode.INVALID_ARGUMENT] * 8
    assert codes("bad-cn") == [grpc.StatusCode.INVALID_ARGUMENT] * 6
    assert codes("no-profile") == [grpc.StatusCode.PERMISSION_DENIED] * 6
    # One certificate per device ID: of four keys for one device in flight together, exactly one is certified.
    assert sorted(codes("same-device"), key=str) == sorted([grpc.StatusCode.OK] + [grpc.StatusCode.ALREADY_EXISTS] * 3, key=str)
    # One request_id is one certificate: the CSR whose call is committed first wins it; the same request
    # again (same CSR) gets that certificate once more, any other CSR under that request_id ALREADY_EXISTS.
    winners = [(kind, reply.serial) for kind in ("retried", "reused-id") for code, reply in outcomes[kind] if reply is not None]
    if codes("retried") == [grpc.StatusCode.OK] * 2:  # the usual order: first sent, first committed
        assert winners[0][1] == winners[1][1] and len(winners) == 2
        assert codes("reused-id") == [grpc.StatusCode.ALREADY_EXISTS] * 4
    else:
        assert [kind for kind, _ in winners] == ["reused-id"], outcomes
        assert codes("retried") == [grpc.StatusCode.ALREADY_EXISTS] * 2
    assert store.count_certificates() == before + 30 + 1 + 1  # nothing else was stored


def test_a_profile_for_rsa_device_keys_under_an_ec_ca_starts_and_issues(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """A profile that allows RSA device keys only, with keyEncipherment (an RSA TLS client), under the default EC P-256 CA
    key: its template was linted with a subject key of the CA key's type, which the profile refuses, so start-up (and
    check-config) refused it ('ERROR pkix.key_usage_value_prohibited_for_ec'), though no EC key could ever get that usage.
    The template now carries a key the profile allows."""
    env = make_env(tmp_path_factory.mktemp("rsa-devices"), softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    env.edit_config('ec_curves = ["P-256", "P-384"]', "ec_curves = []")
    env.edit_config("ed25519 = true", "ed25519 = false")
    env.edit_config('key_usage = ["digitalSignature"]', 'key_usage = ["digitalSignature", "keyEncipherment"]')
    checked = env.cli("check-config", check=False)
    assert checked.returncode == 0, checked.stdout
    daemon = Daemon(env, tmp_path_factory.mktemp("log") / "daemon.log").start()
    try:
        key = rsa.generate_private_key(65537, 2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-device-1")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        with grpc.insecure_channel(env.target) as channel:
            issued = _sign(channel, csr.public_bytes(serialization.Encoding.PEM))
            with pytest.raises(grpc.RpcError) as refused:  # the profile's key types are still the rule
                _sign(channel, device_csr("ec-device-1"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "key-type" in str(refused.value.details())
        leaf = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and usage.key_encipherment
        result = openssl_verify(tmp_path_factory.mktemp("verify"), issued.certificate_pem, issued.chain_pem, "-purpose", "sslclient")
        assert result.returncode == 0, result.stdout + result.stderr
        assert _lint(tmp_path_factory.mktemp("lint"), issued.certificate_pem) == []
    finally:
        daemon.stop()
