"""A CA key certified by an outside parent whose certificate carries nameConstraints (RFC 5280 4.2.1.10).

Before, the daemon signed whatever names the profile allowed, and a leaf whose names the parent's
constraints forbid passed every check here but failed at every relying party ("permitted subtree
violation"). Now Sign refuses it (INVALID_ARGUMENT, rule name-constraints, nothing stored), and
`ca import-cert` refuses an intermediate whose own names the parent forbids.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ca_daemon import issuer
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import CaEnv, Daemon, make_env, openssl_verify

_PERMITTED = [x509.DNSName("devices.example")]
_EXCLUDED = [x509.DNSName("lab.devices.example")]


def _constrained_parent(constraints: x509.NameConstraints) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = issuer.build_root(
        issuer.parse_subject("CN=Constrained Outside Root"), key.public_key(), datetime.now(UTC), timedelta(days=365)
    )
    return key, builder.add_extension(constraints, critical=True).sign(key, hashes.SHA256())


def _install_intermediate(env: CaEnv, tmp_path: Path, subject: str, constraints: x509.NameConstraints) -> tuple[int, str]:
    """`init --csr-out`, the constrained parent's answer, then `ca import-cert`: its exit code and output."""
    csr_path, cert_path, parent_path = tmp_path / "ca.csr", tmp_path / "ca.pem", tmp_path / "parent.pem"
    env.cli("init", "--csr-out", str(csr_path), "--subject", subject)
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    parent_key, parent = _constrained_parent(constraints)
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(parent.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=200))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(issuer.ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()), critical=False)
        .sign(parent_key, hashes.SHA256())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    parent_path.write_bytes(parent.public_bytes(serialization.Encoding.PEM))
    done = env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(parent_path), check=False)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def constrained(tmp_path: Path, softhsm_conf: Path) -> Iterator[CaEnv]:
    """A daemon whose CA key is an intermediate under a parent that permits devices.example but not lab.devices.example,
    with a device profile that allows any dNSName SAN (the constraints, not the profile, must refuse)."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    code, output = _install_intermediate(
        env, tmp_path, "CN=Factory Issuing CA", x509.NameConstraints(permitted_subtrees=_PERMITTED, excluded_subtrees=_EXCLUDED)
    )
    assert code == 0, output
    env.edit_config("uri = '^urn:dev:ops:{device_id}$'", "uri = '^urn:dev:ops:{device_id}$'\ndns = '^[a-z0-9.-]+$'")
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        yield env
    finally:
        daemon.stop()


def _csr(common_name: str, *dns_names: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _certificates_stored(env: CaEnv) -> int:
    with sqlite3.connect(env.state_dir / "ca.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0])


def test_sign_refuses_names_the_parents_constraints_forbid_and_issues_the_others(constrained: CaEnv, tmp_path: Path) -> None:
    with grpc.insecure_channel(constrained.target) as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)

        def sign(csr: bytes) -> ca_pb2.SignResponse:
            return stub.Sign(ca_pb2.SignRequest(csr=csr, request_id=str(uuid.uuid4())), timeout=30)

        # Names within the permitted subtree: issued, and a relying party (openssl) accepts the chain.
        for csr in (_csr("dev-nc-1", "dev-nc-1.devices.example"), _csr("dev-nc-2"), _csr("dev-nc-3.devices.example")):
            issued = sign(csr)
            checked = openssl_verify(tmp_path, issued.certificate_pem, issued.chain_pem)
            assert checked.returncode == 0, checked.stdout + checked.stderr
        before = _certificates_stored(constrained)

        refused = [
            (_csr("dev-nc-4", "dev-nc-4.other.example"), "san.dns", "outside every subtree it permits (devices.example)"),
            (_csr("dev-nc-5", "dev-nc-5.lab.devices.example"), "san.dns", "in the excluded subtree 'lab.devices.example'"),
            (_csr("dev-nc-6.other.example"), "subject.commonName", "commonName (a host name to relying parties)"),
        ]
        for csr, field, reason in refused:
            with pytest.raises(grpc.RpcError) as error:
                sign(csr)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
            details = error.value.details() or ""
            assert reason in details and "Constrained Outside Root" in details and "nameConstraints" in details, details
            assert _rule_and_field(error.value) == ("name-constraints", field)
        assert _certificates_stored(constrained) == before  # nothing issued, nothing half-written


def _rule_and_field(error: grpc.RpcError) -> tuple[str, str]:
    """The refusal's google.rpc.ErrorInfo: its reason (the rule) and field."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason, info.metadata["field"]


def test_import_refuses_an_intermediate_whose_own_name_the_parent_forbids(tmp_path: Path, softhsm_conf: Path) -> None:
    """The parent permits only subjects under O=Acme: every leaf below CN=Factory Issuing CA would fail, so the
    certificate is not installed (and the key stays without one)."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    only_acme = x509.NameConstraints(
        permitted_subtrees=[x509.DirectoryName(x509.Name.from_rfc4514_string("O=Acme"))], excluded_subtrees=None
    )
    code, output = _install_intermediate(env, tmp_path, "CN=Factory Issuing CA", only_acme)
    assert code != 0, output
    assert "nameConstraints of CA 'CN=Constrained Outside Root'" in output and "O=Acme" in output, output
    listed = env.cli("key", "list").stdout
    assert "ca-root-1" in listed and "pending" in listed, listed


def test_a_profile_whose_san_templates_the_constraints_forbid_is_refused_at_import_and_start(tmp_path: Path, softhsm_conf: Path) -> None:
    """Under a parent with a URI constraint, a template URN SAN (no host to check) would have every Sign of the
    profile refused: import-cert refuses such a chain for the profiles of its day, and check-config and serve refuse a
    profile given the template later, naming the profile."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    env.edit_config("san_templates = []", 'san_templates = ["urn:dev:ops:{device_id}"]')
    uri_only = x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier(".devices.example")], excluded_subtrees=None)
    code, output = _install_intermediate(env, tmp_path, "CN=Factory Issuing CA", uri_only)
    reason = "profiles.device.san_templates: uri SAN 'urn:dev:ops:lint-template-device' breaks the nameConstraints"
    assert code != 0 and reason in output, output
    env.edit_config('san_templates = ["urn:dev:ops:{device_id}"]', "san_templates = []")
    imported = env.cli(
        "ca", "import-cert", "--label", "ca-root-1", "--cert", str(tmp_path / "ca.pem"), "--chain", str(tmp_path / "parent.pem")
    )
    assert imported.returncode == 0
    assert env.cli("check-config", check=False).returncode == 0
    env.edit_config("san_templates = []", 'san_templates = ["urn:dev:ops:{device_id}"]')
    checked = env.cli("check-config", check=False)
    assert checked.returncode != 0, checked.stdout
    assert reason in checked.stdout + checked.stderr, checked.stdout + checked.stderr
    served = env.cli("serve", check=False)
    assert served.returncode != 0 and reason in served.stderr, served.stderr


def test_under_a_directory_name_constraint_only_subjects_beneath_it_are_issued(tmp_path: Path, softhsm_conf: Path) -> None:
    """The parent permits O=Acme: the intermediate CN=Factory Issuing CA,O=Acme is installed; a device subject
    without O=Acme, and a verification certificate (CN = the code alone), would fail every relying party and are
    refused; a device subject beneath O=Acme is issued and verifies."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    only_acme = x509.NameConstraints(
        permitted_subtrees=[x509.DirectoryName(x509.Name.from_rfc4514_string("O=Acme"))], excluded_subtrees=None
    )
    code, output = _install_intermediate(env, tmp_path, "CN=Factory Issuing CA,O=Acme", only_acme)
    assert code == 0, output
    env.edit_config('subject_required = ["CN"]', 'subject_required = ["CN"]\nsubject_allowed = { O = "^Acme$" }')
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            key = ec.generate_private_key(ec.SECP256R1())
            beneath = x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"), x509.NameAttribute(NameOID.COMMON_NAME, "dev-dn-1")]
            )
            csr = x509.CertificateSigningRequestBuilder().subject_name(beneath).sign(key, hashes.SHA256())
            issued = stub.Sign(
                ca_pb2.SignRequest(csr=csr.public_bytes(serialization.Encoding.PEM), request_id=str(uuid.uuid4())), timeout=30
            )
            checked = openssl_verify(tmp_path, issued.certificate_pem, issued.chain_pem)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            before = _certificates_stored(env)
            with pytest.raises(grpc.RpcError) as error:
                stub.Sign(ca_pb2.SignRequest(csr=_csr("dev-dn-2"), request_id=str(uuid.uuid4())), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _rule_and_field(error.value) == ("name-constraints", "subject")
            assert "subject 'CN=dev-dn-2'" in (error.value.details() or ""), error.value.details()
            with pytest.raises(grpc.RpcError) as error:
                stub.IssueVerificationCertificate(ca_pb2.IssueVerificationCertificateRequest(code="a1b2c3d4"), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _rule_and_field(error.value) == ("name-constraints", "subject"), error.value.details()
            assert _certificates_stored(env) == before
    finally:
        daemon.stop()
