"""An intermediate under an outside parent that expires before it: nothing issued outlives the parent.

A leaf's notAfter was capped by the issuing CA certificate's notAfter only, so under an intermediate
imported with `ca import-cert` whose parent expires first, every leaf (and verification certificate)
outlived its chain: from the parent's expiry on, relying parties rejected it while it was still "valid".
"""

from __future__ import annotations

import sqlite3
import subprocess
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_daemon import app, config, issuer
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.authority import load_active_ca
from tests.conftest import CaEnv, Daemon, device_csr, make_env, openssl_verify


def _parent(key: ec.EllipticCurvePrivateKey, not_after: datetime) -> x509.Certificate:
    """An outside root CA certificate for key, valid until not_after."""
    now = datetime.now(UTC)
    builder = issuer.build_root(issuer.parse_subject("CN=Short-lived Outside Root"), key.public_key(), now, not_after - now)
    return builder.sign(key, hashes.SHA256())


def _parent_and_intermediate(
    csr_pem: bytes,
    parent_days: int,
    intermediate_days: int,
    *,
    subject: x509.Name | None = None,
    extra: tuple[x509.ExtensionType, ...] = (),
) -> tuple[x509.Certificate, x509.Certificate]:
    """An outside root valid parent_days, and its answer to the CSR valid intermediate_days (longer: the parent expires first).

    subject: the one the parent puts in its answer instead of the CSR's; extra: non-critical extensions it adds.
    """
    parent_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    parent_cert = _parent(parent_key, now + timedelta(days=parent_days))
    csr = x509.load_pem_x509_csr(csr_pem)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or csr.subject)
        .issuer_name(parent_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=intermediate_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(issuer.ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_key.public_key()), critical=False)
    )
    for extension in extra:
        builder = builder.add_extension(extension, critical=False)
    return parent_cert, builder.sign(parent_key, hashes.SHA256())


def _intermediate_env(tmp_path: Path, softhsm_conf: Path, parent_days: int) -> tuple[CaEnv, x509.Certificate, x509.Certificate]:
    """A CA whose key (ca-root-1) was certified by an outside parent with `init --csr-out` and `ca import-cert`."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    csr_path, cert_path, parent_path = tmp_path / "ca.csr", tmp_path / "intermediate.pem", tmp_path / "parent.pem"
    env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Factory Issuing CA 1,O=Example Devices")
    parent, intermediate = _parent_and_intermediate(csr_path.read_bytes(), parent_days=parent_days, intermediate_days=1825)
    cert_path.write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    parent_path.write_bytes(parent.public_bytes(serialization.Encoding.PEM))
    env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(parent_path))
    return env, parent, intermediate


def _verify_at(tmp_path: Path, leaf: x509.Certificate, chain_pem: str, when: datetime) -> subprocess.CompletedProcess[str]:
    """`openssl verify` of the leaf against its chain as a relying party would run it at that moment."""
    pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
    return openssl_verify(tmp_path, pem, chain_pem, "-attime", str(int(when.timestamp())))


def test_leaves_and_verification_certificates_never_outlive_the_parent_of_an_imported_intermediate(
    tmp_path: Path, softhsm_conf: Path
) -> None:
    # The parent expires in 3 days, the intermediate in 5 years; device certificates are valid 365 days by default.
    env, parent, intermediate = _intermediate_env(tmp_path, softhsm_conf, parent_days=3)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            signed = stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=30)
            verification = stub.IssueVerificationCertificate(
                ca_pb2.IssueVerificationCertificateRequest(code="0F3A9C5D", validity_seconds=10 * 86400), timeout=30
            )
    finally:
        daemon.stop()
    leaf = x509.load_pem_x509_certificate(signed.certificate_pem.encode())
    proof = x509.load_pem_x509_certificate(verification.certificate_pem.encode())
    assert [c.subject for c in x509.load_pem_x509_certificates(signed.chain_pem.encode())] == [intermediate.subject, parent.subject]
    # The earliest notAfter of the chain (the parent's), not the intermediate's and not the profile's 365 days.
    got = (leaf.not_valid_after_utc.isoformat(), proof.not_valid_after_utc.isoformat())
    assert got == (parent.not_valid_after_utc.isoformat(),) * 2, got
    for certificate in (leaf, proof):
        # Valid now and still valid to its last second: a relying party never sees it "valid" under an expired parent.
        assert _verify_at(tmp_path, certificate, signed.chain_pem, datetime.now(UTC)).returncode == 0
        last_second = certificate.not_valid_after_utc - timedelta(seconds=1)
        verified = _verify_at(tmp_path, certificate, signed.chain_pem, last_second)
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_nothing_is_signed_once_a_parent_in_the_chain_has_expired(tmp_path: Path, softhsm_conf: Path) -> None:
    """Only the CA certificate's own expiry stopped Sign: under an expired parent it went on issuing leaves no relying
    party accepts (import-cert refuses an expired parent, and the first start one not valid then, so the key is made
    active first, as that start does, and the stored parent then replaced by one that expired)."""
    env, _, _ = _intermediate_env(tmp_path, softhsm_conf, parent_days=30)
    cfg = config.load(env.config_path)
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    try:
        load_active_ca(cfg, hsm, store)
    finally:
        store.close()
        hsm.close()
    expired_parent = _parent(ec.generate_private_key(ec.SECP256R1()), datetime.now(UTC) - timedelta(minutes=1))
    with sqlite3.connect(env.state_dir / "ca.db") as database:
        database.execute(
            "UPDATE ca_keys SET chain_der = ? WHERE key_id = 'ca-root-1'", (expired_parent.public_bytes(serialization.Encoding.DER),)
        )
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    errors = []
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            calls = (
                lambda: stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=30),
                lambda: stub.IssueVerificationCertificate(ca_pb2.IssueVerificationCertificateRequest(code="0F3A9C5D"), timeout=30),
            )
            for call in calls:
                try:
                    call()
                except grpc.RpcError as exc:
                    errors.append((exc.code(), exc.details() or ""))
                else:
                    errors.append((grpc.StatusCode.OK, "issued"))
    finally:
        daemon.stop()
    expected = f"a parent certificate in the chain of CA key ca-root-1 expired at {expired_parent.not_valid_after_utc.isoformat()}"
    for code, details in errors:
        assert code == grpc.StatusCode.FAILED_PRECONDITION and expected in details and "rotate to a new CA key" in details, errors
    with sqlite3.connect(env.state_dir / "ca.db") as database:
        assert database.execute("SELECT COUNT(*) FROM certificates").fetchone() == (0,)


def _import_answer(
    tmp_path: Path, softhsm_conf: Path, *, subject: x509.Name | None = None, extra: tuple[x509.ExtensionType, ...] = ()
) -> tuple[CaEnv, subprocess.CompletedProcess[str]]:
    """`init --csr-out`, then `ca import-cert` of the outside parent's answer (with that subject or extensions)."""
    env = make_env(tmp_path, softhsm_conf, init=False)
    env.cli("init", "--csr-out", str(tmp_path / "ca.csr"), "--subject", "CN=Factory Issuing CA 1,O=Example Devices")
    return env, _import_another_answer(env, tmp_path, subject=subject, extra=extra)


def _import_another_answer(
    env: CaEnv, tmp_path: Path, *, subject: x509.Name | None = None, extra: tuple[x509.ExtensionType, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`ca import-cert` of a new outside parent's answer to the CSR of _import_answer."""
    cert_path, parent_path = tmp_path / "intermediate.pem", tmp_path / "parent.pem"
    parent, intermediate = _parent_and_intermediate((tmp_path / "ca.csr").read_bytes(), 30, 1825, subject=subject, extra=extra)
    cert_path.write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    parent_path.write_bytes(parent.public_bytes(serialization.Encoding.PEM))
    return env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(parent_path), check=False)


def test_import_cert_refuses_an_intermediate_whose_extended_key_usage_excludes_the_profiles_client_auth(
    tmp_path: Path, softhsm_conf: Path
) -> None:
    """The parent answered with extendedKeyUsage serverAuth only: installed, and every device certificate failed
    `openssl verify -purpose sslclient` (test_rotation_ceremony shows it). The CLI compares with the configured profiles."""
    server_only = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    env, refused = _import_answer(tmp_path, softhsm_conf, extra=(server_only,))
    expected = "has extendedKeyUsage (serverAuth), which excludes clientAuth (issued by profile device)"
    assert refused.returncode == 1 and expected in refused.stderr and "Traceback" not in refused.stderr, refused.stdout + refused.stderr
    assert "no certificate" in env.cli("key", "list").stdout


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """A name as an outside parent may put it in a certificate: cryptography's own checks (CN 1 to 64 bytes) not applied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.Name([x509.NameAttribute(oid, value, _validate=False) for oid, value in attributes])


def test_import_cert_refuses_an_intermediate_whose_subject_exceeds_the_ca_subject_bounds(tmp_path: Path, softhsm_conf: Path) -> None:
    """The CSR's subject is bounded (init, ca csr, the key ceremony), but the parent's answer may name the key otherwise,
    and its subject was installed as it came: every leaf and CRL then carried an out-of-bounds issuer name."""
    cn = NameOID.COMMON_NAME
    cases = [
        (_name((cn, "Factory Issuing CA 1"), (NameOID.ORGANIZATION_NAME, "o" * 65)), "the CA subject's O is 65 characters long"),
        (_name((cn, "c" * 65)), "the CA subject's CN is 65 characters long: RFC 5280 allows at most 64 (ub-common-name)"),
        (_name((cn, "Factory Issuing CA 1"), *[(NameOID.DOMAIN_COMPONENT, "d" * 60)] * 16), "the CA subject encodes to 1"),
    ]
    env, refused = _import_answer(tmp_path, softhsm_conf, subject=cases[0][0])
    for index, (subject, message) in enumerate(cases):
        refused = refused if index == 0 else _import_another_answer(env, tmp_path, subject=subject)
        shown = refused.stdout + refused.stderr
        assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in shown, shown
        assert "no certificate" in env.cli("key", "list").stdout
    # Within the bounds, a subject other than the CSR's is installed (the parent's choice).
    installed = _import_another_answer(env, tmp_path, subject=_name((cn, "c" * 64), (NameOID.ORGANIZATION_NAME, "Example")))
    assert installed.returncode == 0, installed.stdout + installed.stderr


def test_a_profile_given_a_usage_the_active_chain_excludes_is_refused_at_reload_and_by_check_config(
    tmp_path: Path, softhsm_conf: Path
) -> None:
    """import-cert compares the chain's extendedKeyUsage with the profiles of its day; a profile given serverAuth later,
    under an intermediate whose EKU is clientAuth only, was put in force by a reload, and each of its certificates
    failed relying parties that check the purpose along the chain."""
    client_only = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    env, imported = _import_answer(tmp_path, softhsm_conf, extra=(client_only,))
    assert imported.returncode == 0, imported.stderr
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        good = env.config_path.read_text()
        env.config_path.write_text(good + '\n[profiles.gateway]\nextended_key_usage = ["serverAuth"]\n')
        expected = "does not fit the active CA key's chain"
        for command in (("check-config",), ("reload",)):
            refused = env.cli(*command, check=False)
            said = refused.stdout + refused.stderr  # check-config prints its FAIL line; reload says why on stderr
            assert refused.returncode != 0 and expected in said and "serverAuth (issued by profile gateway)" in said, (command, said)
        with grpc.insecure_channel(env.target) as channel:
            listed = ca_pb2_grpc.CertificateAuthorityStub(channel).ListProfiles(ca_pb2.ListProfilesRequest(), timeout=10)
        assert "gateway" not in {profile.name for profile in listed.profiles}
        # A usage the chain allows is still taken.
        env.config_path.write_text(good + '\n[profiles.gateway]\nextended_key_usage = ["clientAuth"]\n')
        assert env.cli("reload", check=False).returncode == 0
    finally:
        daemon.stop()
