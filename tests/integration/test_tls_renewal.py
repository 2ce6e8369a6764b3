"""TLS credentials without a restart: a renewed server certificate and a new client CA take
effect at `ca-daemon reload` in every worker; a broken file is refused and the old
credentials stay. Real daemon (two workers), real TLS handshakes on loopback.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import CaEnv, Snapshot, device_csr, make_env, openssl_verify, spawn_daemon, wait_channel_serving
from tests.factory_helpers import ForeignCa
from tests.integration.test_access_audit import TlsDaemon, _scrape, prepare_tls, serve_tls, x509_serial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> tuple[Snapshot, int]:
    """One CA and internal mTLS PKI for the module (the tests add no keys to the token); its files and metrics port."""
    env = make_env(tmp_path_factory.mktemp("renew"), softhsm_conf, workers=2)
    metrics_port = prepare_tls(env, "--client", "prog:programmer", "--host", "localhost")
    return Snapshot(env, tmp_path_factory.mktemp("renew-snapshot") / "state"), metrics_port


@pytest.fixture
def tls_env(prepared: tuple[Snapshot, int]) -> CaEnv:
    """The module's set-up with its files as they were before any test changed them."""
    return prepared[0].restore()


@pytest.fixture
def tls_daemon(tls_env: CaEnv, prepared: tuple[Snapshot, int]) -> Iterator[TlsDaemon]:
    """A daemon of the test's own (two workers) on those files."""
    daemon = serve_tls(tls_env, prepared[1])
    yield daemon
    daemon.stop()


def served_serials(daemon: TlsDaemon, connections: int = 8, *, metrics: bool = False) -> set[int]:
    """The serials of the server certificates that fresh TLS connections are handed (either worker, or the metrics endpoint)."""
    context = ssl.create_default_context(cafile=daemon.tls_dir / "ca.pem")
    if metrics:  # the metrics endpoint requires a client certificate
        context.load_cert_chain(daemon.tls_dir / "clients" / "prog.pem", daemon.tls_dir / "clients" / "prog.key")
    serials = set()
    for _ in range(connections):
        raw = socket.create_connection(("127.0.0.1", daemon.metrics_port if metrics else daemon.env.port), timeout=5)
        with context.wrap_socket(raw, server_hostname="localhost") as connection:
            der = connection.getpeercert(binary_form=True)
            assert der is not None
            serials.add(x509.load_der_x509_certificate(der).serial_number)
    return serials


def wait_served(daemon: TlsDaemon, expected: set[int], timeout: float = 15.0, *, metrics: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while (seen := served_serials(daemon, metrics=metrics)) != expected:
        assert time.monotonic() < deadline, f"fresh connections see {seen}, expected {expected}"
        time.sleep(0.3)


def sign_over(channel: grpc.Channel) -> ca_pb2.SignResponse:
    response: ca_pb2.SignResponse = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
        ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10
    )
    return response


def export_events(env: CaEnv, tmp_path: Path) -> list[dict[str, object]]:
    out = tmp_path / f"audit-{uuid.uuid4().hex[:6]}.jsonl"
    env.cli("audit", "export", "--out", str(out))
    return [record for line in out.read_text().splitlines() if (record := json.loads(line))["type"] == "event"]


def worker_pids(daemon: TlsDaemon) -> set[str]:
    out = subprocess.run(["pgrep", "-P", str(daemon.process.pid)], capture_output=True, text=True, check=False).stdout
    return set(out.split())


def test_a_renewed_server_certificate_is_served_after_reload_without_restart(tls_daemon: TlsDaemon, tmp_path: Path) -> None:
    env, tls_dir = tls_daemon.env, tls_daemon.tls_dir
    old_serial = int(x509_serial(tls_dir / "server.pem"), 16)
    assert served_serials(tls_daemon) == {old_serial}
    assert served_serials(tls_daemon, 1, metrics=True) == {old_serial}
    pids = worker_pids(tls_daemon)
    with tls_daemon.channel("prog") as open_before:
        sign_over(open_before)
        result = env.cli("mtls", "renew-server", "--days", "30", "--reload")
        assert "asked ca-daemon" in result.stdout, result.stdout
        assert "applied by 2 worker(s)" in result.stdout, result.stdout  # both workers recorded the reload
        new = x509.load_pem_x509_certificate((tls_dir / "server.pem").read_bytes())
        assert new.serial_number != old_serial
        wait_served(tls_daemon, {new.serial_number})  # both workers hand out the new one
        wait_served(tls_daemon, {new.serial_number}, metrics=True)  # and so does the metrics endpoint
        sign_over(open_before)  # a connection made before the reload keeps working
    with tls_daemon.channel("prog") as fresh:
        issued = sign_over(fresh)
    assert worker_pids(tls_daemon) == pids  # no worker was restarted
    # The new credentials: same host names, 30 days, a new key only its owner reads, chained to the mTLS CA.
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert timedelta(days=29) < new.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=30)
    assert stat.S_IMODE((tls_dir / "server.key").stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((tls_dir / "server.key").read_bytes(), password=None)
    assert key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == (
        new.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    verified = openssl_verify(tmp_path, (tls_dir / "server.pem").read_text(), (tls_dir / "ca.pem").read_text(), "-purpose", "sslserver")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert issued.serial
    # Audited: the issuance of the server certificate, and a reload applied by each worker.
    events = export_events(env, tmp_path)
    assert any(
        e["action"] == "mtls.issue" and json.loads(str(e["details"]))["kind"] == "server" and int(str(e["serial"]), 16) == new.serial_number
        for e in events
    )
    assert sum(1 for e in events if e["action"] == "config.reload" and e["outcome"] == "applied") == 2
    assert env.cli("mtls", "list").stdout.count("\tserver\t") == 2
    checked = env.cli("check-config").stdout
    assert "ok    TLS credentials:" in checked and "(29 days); renew it soon" in checked, checked


def test_a_broken_server_key_is_refused_and_the_old_credentials_stay(tls_daemon: TlsDaemon) -> None:
    env, tls_dir = tls_daemon.env, tls_daemon.tls_dir
    old_serial = int(x509_serial(tls_dir / "server.pem"), 16)
    good_key = (tls_dir / "server.key").read_bytes()
    (tls_dir / "server.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    try:
        checked = env.cli("check-config", check=False)
        assert checked.returncode == 1 and "FAIL  TLS credentials: [tls]" in checked.stdout, checked.stdout
        refused = env.cli("reload", check=False)  # the CLI checks the files before it signals anything
        assert refused.returncode != 0 and "[tls]" in refused.stderr, refused.stderr
        assert tls_daemon.process.poll() is None
        tls_daemon.process.send_signal(signal.SIGHUP)  # a SIGHUP by hand: each worker checks them too
        deadline = time.monotonic() + 15
        while tls_daemon.log().count("reload refused, the previous configuration stays in force") < 2:
            assert time.monotonic() < deadline, tls_daemon.log()[-2000:]
            time.sleep(0.2)
        assert served_serials(tls_daemon) == {old_serial}
        assert served_serials(tls_daemon, 1, metrics=True) == {old_serial}
        assert "the metrics endpoint keeps its TLS credentials" in tls_daemon.log()
        with tls_daemon.channel("prog") as channel:
            sign_over(channel)
    finally:
        (tls_dir / "server.key").write_bytes(good_key)


def test_a_client_ca_added_to_the_bundle_is_trusted_after_reload(tls_daemon: TlsDaemon, tmp_path: Path) -> None:
    """A second factory's own client PKI joins without a restart: its CA appended to tls.client_ca, its client given a role."""
    env, tls_dir = tls_daemon.env, tls_daemon.tls_dir
    outside = ForeignCa.create("factory two client CA")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = outside.issue(client_key.public_key(), "line9")
    credentials = grpc.ssl_channel_credentials(
        (tls_dir / "ca.pem").read_bytes(),
        client_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        client.public_bytes(serialization.Encoding.PEM),
    )

    def sign_as_line9() -> grpc.StatusCode:
        with grpc.secure_channel(f"localhost:{env.port}", credentials) as channel:
            try:
                sign_over(channel)
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    assert sign_as_line9() != grpc.StatusCode.OK  # an unknown CA: refused at the handshake
    bundle = (tls_dir / "ca.pem").read_bytes() + outside.certificate.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "bundle.pem").write_bytes(bundle)
    env.edit_config(f'client_ca = "{tls_dir / "ca.pem"}"', f'client_ca = "{tmp_path / "bundle.pem"}"')
    env.edit_config('programmer = ["prog"]', 'programmer = ["prog", "line9"]')
    env.edit_config('[callers."prog"]', '[callers."line9"]\nprofiles = ["device"]\n\n[callers."prog"]')
    env.cli("reload")
    deadline = time.monotonic() + 15
    # Trusted, but without its CRL in tls.client_crl the revocation of its clients cannot be checked.
    while (codes := {sign_as_line9() for _ in range(6)}) != {grpc.StatusCode.UNAUTHENTICATED}:
        assert time.monotonic() < deadline, codes
        time.sleep(0.3)
    crl_file = tls_dir / "client-ca.crl"
    crl_file.write_bytes(crl_file.read_bytes() + outside.crl().public_bytes(serialization.Encoding.PEM))
    deadline = time.monotonic() + 15
    while (codes := {sign_as_line9() for _ in range(6)}) != {grpc.StatusCode.OK}:  # fresh connections reach either worker
        assert time.monotonic() < deadline, codes
        time.sleep(0.3)
    with tls_daemon.channel("prog") as channel:
        sign_over(channel)  # the internal CA's clients are still in


def test_after_a_reload_to_another_server_certificate_file_the_expiry_warning_is_about_that_file(
    tls_daemon: TlsDaemon, tmp_path: Path
) -> None:
    """A reload that names another tls.cert moves the expiry warning to it (it used to keep watching the first file)."""
    env, tls_dir = tls_daemon.env, tls_daemon.tls_dir
    original = (tls_dir / "server.pem").read_bytes(), (tls_dir / "server.key").read_bytes()
    env.cli("mtls", "renew-server", "--days", "20")  # writes server.pem/.key in place; moved aside below
    new_cert, new_key = tmp_path / "server-2.pem", tmp_path / "server-2.key"
    new_cert.write_bytes((tls_dir / "server.pem").read_bytes())
    new_key.write_bytes((tls_dir / "server.key").read_bytes())
    new_key.chmod(0o600)
    (tls_dir / "server.pem").write_bytes(original[0])
    (tls_dir / "server.key").write_bytes(original[1])
    assert "expires at" not in tls_daemon.log()  # the first certificate has a year to go
    env.edit_config(f'cert = "{tls_dir / "server.pem"}"', f'cert = "{new_cert}"')
    env.edit_config(f'key = "{tls_dir / "server.key"}"', f'key = "{new_key}"')
    env.cli("reload")
    wait_served(tls_daemon, {x509.load_pem_x509_certificate(new_cert.read_bytes()).serial_number})
    warning = f"the TLS server certificate {new_cert} expires at"
    in_force = f"reload: TLS server certificate {new_cert} in force"
    deadline = time.monotonic() + 15
    while tls_daemon.log().count(in_force) < 2:  # both workers reloaded
        assert time.monotonic() < deadline, tls_daemon.log()[-2000:]
        time.sleep(0.2)
    assert tls_daemon.log().count(warning) == 1  # from the primary only, not once per worker
    assert f"the TLS server certificate {tls_dir / 'server.pem'} expires at" not in tls_daemon.log()


def test_renew_server_refuses_a_certificate_from_another_pki(tls_env: CaEnv) -> None:
    """A command-line refusal: no daemon needed."""
    env, tls_dir = tls_env, tls_env.state_dir / "tls"
    foreign = ForeignCa.create("ca.factory.example").certificate
    original = (tls_dir / "server.pem").read_bytes(), (tls_dir / "server.key").read_bytes()
    (tls_dir / "server.pem").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
    try:
        result = env.cli("mtls", "renew-server", check=False)
        assert result.returncode != 0
        assert "not by the internal mTLS CA" in result.stderr and "renew it with the PKI that issued it" in result.stderr, result.stderr
        assert (tls_dir / "server.pem").read_bytes() == foreign.public_bytes(serialization.Encoding.PEM)
        assert (tls_dir / "server.key").read_bytes() == original[1]
    finally:
        (tls_dir / "server.pem").write_bytes(original[0])


def test_the_daemon_warns_when_its_server_certificate_expires_within_30_days(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp("expiring"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "prog:programmer", "--days", "5", "--apply")
    log_path = env.state_dir / "daemon.log"
    daemon = TlsDaemon(env, tls_dir, spawn_daemon(env, log_path), log_path, 0)
    try:
        with daemon.channel("prog") as channel:
            wait_channel_serving(channel, 40, daemon.process, daemon.log)
        deadline = time.monotonic() + 10
        while "renew it with `ca-daemon mtls renew-server --reload`" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()[-2000:]
            time.sleep(0.2)
        assert str(tls_dir / "server.pem") in daemon.log()
    finally:
        daemon.stop()


def test_a_role_given_by_reload_opens_the_metrics_endpoint(tls_daemon: TlsDaemon) -> None:
    """The metrics endpoint judges scrapers by the [roles] in force: a reload that makes prog an auditor lets it scrape."""
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        _scrape(tls_daemon, "prog")
    assert refused.value.code == 403 and b"needs role auditor or admin" in refused.value.read()
    tls_daemon.env.edit_config("auditor = []", 'auditor = ["prog"]')
    tls_daemon.env.cli("reload")
    deadline = time.monotonic() + 15
    while True:
        try:
            assert "ca_daemon_requests_total" in _scrape(tls_daemon, "prog")
            break
        except urllib.error.HTTPError as still:
            assert still.code == 403 and time.monotonic() < deadline, still
            time.sleep(0.2)
