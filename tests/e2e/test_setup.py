"""Set-up as a security officer and a new user meet it: init, intermediates, start-up failures, the CLI client."""

from __future__ import annotations

import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import CA_DAEMON, Daemon, device_csr, make_env, openssl_verify


def test_init_dev_creates_everything_once_and_reuses_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    config = tmp_path / "state" / "ca-daemon.toml"
    first = subprocess.run([CA_DAEMON, "--config", str(config), "init", "--dev"], capture_output=True, text=True, env=env, check=False)
    assert first.returncode == 0, first.stderr
    assert "generated ec-p256 CA key" in first.stdout and "self-signed root CA" in first.stdout
    state = tmp_path / "state"
    for pin in ("user.pin", "so.pin"):
        assert (state / "pins" / pin).stat().st_mode & 0o777 == 0o600
        assert (state / "pins" / pin).read_text().strip() not in first.stdout + first.stderr
    assert (state / "ca.db").exists() and any((state / "tokens").iterdir())
    second = subprocess.run([CA_DAEMON, "--config", str(config), "init", "--dev"], capture_output=True, text=True, env=env, check=False)
    assert second.returncode == 0, second.stderr
    assert "already has a certificate; nothing to do" in second.stdout


def test_wrong_pin_stops_the_daemon_with_one_line(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf)
    pin = env.state_dir / "pins" / "user.pin"
    real = pin.read_text()
    pin.write_text("0000-wrong\n")
    result = env.cli("serve", check=False)
    pin.write_text(real)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"ca-daemon: wrong PIN for PKCS#11 token {env.token!r}"
    assert "0000-wrong" not in result.stderr


def test_missing_token_stops_the_daemon_with_one_line(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf)
    env.edit_config(f'token = "{env.token}"', 'token = "no-such-token"')
    result = env.cli("serve", check=False)
    assert result.returncode != 0
    assert "token 'no-such-token' not found" in result.stderr.strip().splitlines()[-1]


def test_key_without_certificate_stops_the_daemon_with_a_hint(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf, init=False)
    env.cli("key", "generate", "--type", "ec-p256", "--label", "ca-root-1")
    result = env.cli("serve", check=False)
    assert result.returncode != 0
    assert "has no certificate installed" in result.stderr


def test_key_generate_types_and_help(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf, init=False)
    for key_type in ("ec-p384", "rsa-2048", "ed25519"):
        uri = env.cli("key", "generate", "--type", key_type, "--label", f"k-{key_type}").stdout.strip()
        assert uri.startswith(f"pkcs11:token={env.token};object=k-{key_type};id=%")
    listing = env.cli("key", "list").stdout
    assert "k-ed25519\ted25519\tpending\tno certificate" in listing
    assert "Ed25519 needs a token that offers" in env.cli("key", "generate", "--help").stdout.replace("\n", " ").replace("  ", " ")


class _ParentCa:
    """An outside parent CA (software key, test only) that certifies our HSM key."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outside Root CA")])
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA384())
        )

    def certify(self, csr_pem: bytes) -> x509.Certificate:
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1825))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA384())
        )


def test_intermediate_signed_by_an_outside_parent(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf, init=False)
    csr_path = tmp_path / "ca.csr"
    env.cli("init", "--csr-out", str(csr_path), "--subject", "CN=Factory Issuing CA 1,O=Example Devices")
    parent = _ParentCa()
    intermediate = parent.certify(csr_path.read_bytes())
    cert_path, root_path = tmp_path / "intermediate.pem", tmp_path / "root.pem"
    root_path.write_bytes(parent.cert.public_bytes(serialization.Encoding.PEM))

    # A certificate for another key is refused: its public key must match the HSM key.
    stranger = _ParentCa().certify(
        x509.CertificateSigningRequestBuilder()
        .subject_name(intermediate.subject)
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert_path.write_bytes(stranger.public_bytes(serialization.Encoding.PEM))
    refused = env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(root_path), check=False)
    assert refused.returncode != 0 and "does not match CA key" in refused.stderr

    cert_path.write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
    env.cli("ca", "import-cert", "--label", "ca-root-1", "--cert", str(cert_path), "--chain", str(root_path))
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        csr_file, out = tmp_path / "device.csr", tmp_path / "device.pem"
        csr_file.write_bytes(device_csr("line-7-device-42"))
        result = subprocess.run(
            [
                CA_DAEMON,
                "client",
                "sign",
                "--target",
                env.target,
                "--csr",
                str(csr_file),
                "--out",
                str(out),
                "--request-id",
                str(uuid.uuid4()),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "for device line-7-device-42" in result.stdout
        certs = x509.load_pem_x509_certificates(out.read_bytes())
        assert [c.subject.rfc4514_string() for c in certs] == [
            "CN=line-7-device-42",
            "CN=Factory Issuing CA 1,O=Example Devices",
            "CN=Outside Root CA",
        ]
        leaf_pem = certs[0].public_bytes(serialization.Encoding.PEM).decode()
        chain_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs[1:])
        verified = openssl_verify(tmp_path, leaf_pem, chain_pem)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        daemon.stop()


@pytest.mark.parametrize("key_type", ["rsa-2048", "ec-p384", "ed25519"])
def test_other_ca_key_types_issue_verifiable_certificates(tmp_path: Path, softhsm_conf: Path, key_type: str) -> None:
    env = make_env(tmp_path, softhsm_conf, key_type=key_type)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        csr_file, out = tmp_path / "device.csr", tmp_path / "device.pem"
        csr_file.write_bytes(device_csr(pem=False))
        result = subprocess.run(
            [CA_DAEMON, "client", "sign", "--target", env.target, "--csr", str(csr_file), "--out", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        certs = x509.load_pem_x509_certificates(out.read_bytes())
        pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs]
        assert openssl_verify(tmp_path, pems[0], "".join(pems[1:])).returncode == 0
    finally:
        daemon.stop()


def test_second_daemon_on_the_same_state_is_refused(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        second = env.cli("serve", check=False)
        assert second.returncode != 0
        assert "already running" in second.stderr or "already listening" in second.stderr
    finally:
        daemon.stop()
