"""The programming-service client and the simulator over mTLS, against a daemon set up with `ca-daemon mtls init`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_daemon.client import CaClient, TlsOptions
from ca_daemon.simulate import simulate
from tests.conftest import CaEnv, make_env, spawn_daemon


@dataclass
class TlsSetup:
    env: CaEnv
    tls_dir: Path
    process: subprocess.Popen[bytes]

    @property
    def target(self) -> str:
        return f"localhost:{self.env.port}"

    def options(self, name: str) -> TlsOptions:
        return TlsOptions(self.tls_dir / "ca.pem", self.tls_dir / "clients" / f"{name}.pem", self.tls_dir / "clients" / f"{name}.key")

    def cli_args(self, name: str) -> list[str]:
        o = self.options(name)
        return ["--target", self.target, "--tls-ca", str(o.ca_bundle), "--tls-cert", str(o.cert), "--tls-key", str(o.key)]


@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[TlsSetup]:
    env = make_env(tmp_path_factory.mktemp("factory-mtls"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "line3:programmer", "--client", "alice:officer", "--apply")
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    setup = TlsSetup(env, tls_dir, process)
    try:
        deadline = time.monotonic() + 40
        with CaClient(setup.target, tls=setup.options("alice"), timeout=2, retries=0) as probe:
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    probe.ca_certificates()
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.2)
        yield setup
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_programming_service_signs_over_mtls(tls_setup: TlsSetup, tmp_path: Path) -> None:
    with CaClient(tls_setup.target, tls=tls_setup.options("line3")) as ca:
        summary = simulate(ca, devices=3, out_dir=tmp_path / "devices", concurrency=3)
        assert summary.issued == 3, summary.lines()
        # A programmer may not register the CA with a cloud service: that is an officer's job.
        with pytest.raises(grpc.RpcError) as info:
            ca.verification_certificate("0123456789ABCDEF")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with CaClient(tls_setup.target, tls=tls_setup.options("alice")) as officer:
        assert officer.verification_certificate("0123456789ABCDEF").certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
    # Without a client certificate the handshake fails: nothing is signed.
    with CaClient(tls_setup.target, tls=TlsOptions(tls_setup.tls_dir / "ca.pem"), retries=0) as anonymous, pytest.raises(grpc.RpcError):
        anonymous.sign(b"not even a CSR")


def test_cli_commands_take_tls_options(tls_setup: TlsSetup, tmp_path: Path) -> None:
    env = tls_setup.env
    result = env.cli("simulate-factory", *tls_setup.cli_args("line3"), "--devices", "2", "--out", str(tmp_path / "d"), "--quiet")
    assert "2 issued, 0 refused, 0 failed" in result.stdout
    env.cli("client", "chain", *tls_setup.cli_args("line3"), "--out", str(tmp_path / "chain.pem"))
    assert (tmp_path / "chain.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    plaintext = env.cli("client", "ca-certs", "--target", tls_setup.target, "--retries", "0", check=False)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    # The simulator counts failures rather than raising them, and says the same about TLS.
    args = ["--target", tls_setup.target, "--retries", "0", "--devices", "2", "--out", str(tmp_path / "p"), "--quiet"]
    simulated = env.cli("simulate-factory", *args, check=False)
    assert simulated.returncode == 1 and "0 issued, 0 refused, 2 failed" in simulated.stdout, simulated.stdout
    assert "pass --tls-ca, --tls-cert and --tls-key" in simulated.stderr, simulated.stderr


def test_a_client_certificate_the_daemon_would_refuse_is_named_before_connecting(tls_setup: TlsSetup, tmp_path: Path) -> None:
    """The daemon's TLS handshake refuses it, which gRPC reports as a bare UNAVAILABLE, retried in vain."""
    env, line3 = tls_setup.env, tls_setup.options("line3")
    key = serialization.load_pem_private_key(Path(str(line3.key)).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    issued = x509.load_pem_x509_certificate(Path(str(line3.cert)).read_bytes())
    now = datetime.now(UTC)
    _self_signed(tmp_path / "expired.pem", issued.subject, key, now - timedelta(days=2), now - timedelta(days=1))
    _self_signed(tmp_path / "early.pem", issued.subject, key, now + timedelta(days=1), now + timedelta(days=2))
    base = ["client", "ca-certs", "--target", tls_setup.target, "--tls-ca", str(line3.ca_bundle)]
    expired = env.cli(*base, "--tls-cert", str(tmp_path / "expired.pem"), "--tls-key", str(line3.key), check=False)
    assert expired.returncode != 0 and f"client certificate in {tmp_path / 'expired.pem'} expired on" in expired.stderr, expired.stderr
    assert "UNAVAILABLE" not in expired.stderr
    early = env.cli(*base, "--tls-cert", str(tmp_path / "early.pem"), "--tls-key", str(line3.key), check=False)
    assert early.returncode != 0 and "is valid only from" in early.stderr and "check the clock" in early.stderr, early.stderr
    swapped = env.cli(*base, "--tls-cert", str(line3.cert), "--tls-key", str(tls_setup.options("alice").key), check=False)
    assert swapped.returncode != 0 and "is not the key of the certificate in" in swapped.stderr, swapped.stderr
    with pytest.raises(ValueError, match="expired on"):
        CaClient(tls_setup.target, tls=TlsOptions(line3.ca_bundle, tmp_path / "expired.pem", line3.key))
    # A pair the daemon refuses in its handshake (another CA issued it): gRPC says only 'Socket closed' or 'Connection reset'.
    foreign_key = ec.generate_private_key(ec.SECP256R1())
    _self_signed(tmp_path / "foreign.pem", issued.subject, foreign_key, now - timedelta(days=1), now + timedelta(days=1))
    (tmp_path / "foreign.key").write_bytes(
        foreign_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    refused = env.cli(
        *["client", "ca-certs", "--target", f"127.0.0.1:{env.port}", "--tls-server-name", "localhost", "--retries", "0"],
        *["--tls-ca", str(line3.ca_bundle), "--tls-cert", str(tmp_path / "foreign.pem"), "--tls-key", str(tmp_path / "foreign.key")],
        check=False,
    )
    assert refused.returncode == 1 and "the daemon refuses this client certificate" in refused.stderr, refused.stderr
    # The right pair still works.
    assert env.cli(*base, "--tls-cert", str(line3.cert), "--tls-key", str(line3.key)).stdout.startswith("-----BEGIN CERTIFICATE-----")


def _self_signed(path: Path, subject: x509.Name, key: ec.EllipticCurvePrivateKey, not_before: datetime, not_after: datetime) -> None:
    """A client certificate for key that no CA of the daemon's issued, valid from not_before to not_after, to path (PEM)."""
    builder = x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
    builder = builder.serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
    path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
