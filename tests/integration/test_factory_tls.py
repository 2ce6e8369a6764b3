"""The programming-service client and the simulator over mTLS, against a daemon set up with `ca-daemon mtls init`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

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
