"""The factory-to-cloud path against a real daemon: client, simulator, verification certificate, verifier.

Real parts only: a `ca-daemon serve` process with SoftHSM, SQLite and HTTP CRLs on loopback
ports; openssl judges what the daemon signs.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_daemon import app
from ca_daemon import config as config_module
from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from ca_daemon.client import CaClient, UnexpectedAnswer
from ca_daemon.crlfile import CrlRefused, fetch_checked
from ca_daemon.registration import AUDIT_ACTION
from ca_daemon.simulate import Device, Progress, simulate
from ca_daemon.verify import CrlCache, DeviceVerifier, IdentityRule, http_fetch, sign_challenge
from tests.conftest import CA_DAEMON, CaEnv, Daemon, daemon_environment, device_csr, free_port, make_env, openssl_verify
from tests.factory_helpers import ForeignCa, private_key_needles
from tests.integration.crl_helpers import crl_env, start


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> tuple[CaEnv, int]:
    return crl_env(tmp_path_factory.mktemp("factory"), softhsm_conf)


@pytest.fixture(scope="module")
def daemon(setup: tuple[CaEnv, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start(setup[0], tmp_path_factory.mktemp("log"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[tuple[CaEnv, _Http]]:
    """A daemon whose certificates name a CRL URL served by a mirror (CDN) in front of the daemon's HTTP server."""
    env, cdp_port = crl_env(tmp_path_factory.mktemp("mirrored"), softhsm_conf)
    daemon_http = free_port()
    env.edit_config(f'http_listen = "127.0.0.1:{cdp_port}"', f'http_listen = "127.0.0.1:{daemon_http}"')
    mirror = _Http(cdp_port, upstream=daemon_http)
    daemon = start(env, tmp_path_factory.mktemp("mirrored-log"))
    try:
        yield env, mirror
    finally:
        daemon.stop()
        mirror.close()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[CaClient]:
    with CaClient(daemon.env.target) as ca:
        yield ca


def _root(client: CaClient) -> x509.Certificate:
    return x509.load_pem_x509_certificates(client.chain_pem().encode())[-1]


def _provision(client: CaClient, out: Path | None = None) -> tuple[Device, str, str]:
    """One simulated device through the simulator: its key, certificate PEM and chain PEM."""
    got: list[tuple[Device, str, str]] = []
    summary = simulate(client, devices=1, out_dir=out, on_issued=lambda d, i: got.append((d, i.certificate_pem, i.chain_pem)))
    assert summary.issued == 1, summary.lines()
    return got[0]


class _Http(http.server.ThreadingHTTPServer):
    """A plain HTTP server on loopback whose answers the test sets per path, passing the others to upstream (a CRL mirror / CDN)."""

    def __init__(self, port: int, upstream: int | None = None) -> None:
        self.fixed: dict[str, bytes] = {}
        self.upstream = upstream
        super().__init__(("127.0.0.1", port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Http

    def do_GET(self) -> None:
        body = self.server.fixed.get(self.path)
        status, etag = 200, ""
        if body is None and self.server.upstream is not None:
            request = urllib.request.Request(f"http://127.0.0.1:{self.server.upstream}{self.path}")
            if self.headers.get("If-None-Match"):
                request.add_header("If-None-Match", self.headers["If-None-Match"])
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    status, body, etag = response.status, response.read(), response.headers.get("ETag", "")
            except urllib.error.HTTPError as exc:
                status, body, etag = exc.code, b"", exc.headers.get("ETag", "")
        if body is None:
            status, body = 404, b""
        self.send_response(status)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Type", "application/pkix-crl")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


# -- programming-service client ------------------------------------------------------------


def test_sign_retries_unavailable_until_the_daemon_is_up_and_stays_idempotent(tmp_path: Path, softhsm_conf: Path) -> None:
    env = make_env(tmp_path, softhsm_conf)
    daemon = Daemon(env, tmp_path / "daemon.log")
    csr = Device.make(f"late-{uuid.uuid4().hex[:8]}").csr_pem
    starter = threading.Timer(1.0, daemon.start)
    starter.start()
    try:
        with CaClient(env.target, retries=30) as ca:
            first = ca.sign(csr, request_id="line-1-0001")  # the daemon is not listening yet: UNAVAILABLE, retried
            assert ca.retried > 0
            again = ca.sign(csr, request_id="line-1-0001")  # a retry after success: the same certificate
            assert again.serial == first.serial and again.certificate_pem == first.certificate_pem
            with pytest.raises(grpc.RpcError) as info:
                ca.sign(Device.make("another").csr_pem, request_id="line-1-0001")
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        starter.join()
        daemon.stop()
    store = app.connect_store(config_module.load(env.config_path))
    try:
        assert store.count_certificates() == 1
    finally:
        store.close()


def test_sign_that_times_out_while_the_daemon_waits_for_its_database_is_retried_with_the_same_request_id(
    daemon: Daemon, setup: tuple[CaEnv, int]
) -> None:
    """A Sign that outlives its deadline is committed anyway: only a retry with the same request_id delivers it.

    The test holds the SQLite write lock (what `ca-daemon db backup` or an operator's command does) for
    longer than the client's timeout; the daemon waits for it (up to 30 s) and commits after the client
    gave up. Without a retry the device had no certificate while the CA had issued one for it.
    """
    env, _ = setup
    database = config_module.load(env.config_path).store.url.removeprefix("sqlite:///")
    device = Device.make(f"slow-{uuid.uuid4().hex[:8]}")
    fd = os.open(database + ".writelock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        release = threading.Timer(2.5, fcntl.flock, (fd, fcntl.LOCK_UN))
        release.start()
        with CaClient(env.target, timeout=1.0, retries=5) as ca:
            issued = ca.sign(device.csr_pem, request_id=f"line-slow-{device.device_id}")
            assert ca.retried >= 1
        release.join()
    finally:
        os.close(fd)
    leaf = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    assert leaf.public_key() == device.key.public_key()
    store = app.connect_store(config_module.load(env.config_path))
    try:
        active, _ = store.issuance_facts(device.device_id, b"", datetime.now(UTC))
    finally:
        store.close()
    assert active == (int(issued.serial, 16),)  # one certificate, and the client has it


class _Relay:
    """A hostile or broken front of the daemon (a proxy, a load balancer's wrong backend): real answers, to other questions."""

    def __init__(self, daemon_target: str, mode: str) -> None:
        self.daemon_target = daemon_target
        self.mode = mode

    def Sign(self, request: ca_pb2.SignRequest, context: grpc.ServicerContext) -> ca_pb2.SignResponse:
        with CaClient(self.daemon_target) as ca:
            if self.mode == "another-device":  # the daemon's certificate for another device and key
                issued = ca.sign(Device.make(f"other-{uuid.uuid4().hex[:8]}").csr_pem)
                return ca_pb2.SignResponse(certificate_pem=issued.certificate_pem, chain_pem=issued.chain_pem, serial=issued.serial)
            issued = ca.sign(request.csr, request_id=request.request_id)  # the right certificate, with another CA's chain
            foreign = ForeignCa.create("Not the issuing CA").certificate.public_bytes(serialization.Encoding.PEM).decode()
            return ca_pb2.SignResponse(certificate_pem=issued.certificate_pem, chain_pem=foreign, serial=issued.serial)


@pytest.mark.parametrize("mode", ["another-device", "foreign-chain"])
def test_a_sign_answer_that_is_not_for_the_csrs_key_or_chain_is_never_installed(daemon: Daemon, tmp_path: Path, mode: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sign = grpc.unary_unary_rpc_method_handler(
        _Relay(daemon.env.target, mode).Sign,
        request_deserializer=ca_pb2.SignRequest.FromString,
        response_serializer=ca_pb2.SignResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("ca_daemon.v1.CertificateAuthority", {"Sign": sign}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with CaClient(f"127.0.0.1:{port}", retries=0) as relayed:
            device = Device.make(f"relayed-{uuid.uuid4().hex[:8]}")
            with pytest.raises(UnexpectedAnswer, match="another key" if mode == "another-device" else "not signed by"):
                relayed.sign(device.csr_pem)
            summary = simulate(relayed, devices=2, out_dir=tmp_path / "devices", concurrency=2)
    finally:
        server.stop(None)
    assert (summary.issued, summary.failed) == (0, 2), summary.lines()
    assert all(reason.startswith("answer refused: ") for reason in summary.reasons), summary.reasons
    assert not (tmp_path / "devices").exists() or not any((tmp_path / "devices").iterdir())  # no device got a certificate


def test_revoke_and_crls_through_client_and_cli(client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    env, _ = setup
    _, cert_pem, _ = _provision(client)
    serial = f"{x509.load_pem_x509_certificate(cert_pem.encode()).serial_number:x}"
    before = env.cli("client", "get", "--target", env.target, "--serial", serial)
    assert before.stdout == cert_pem  # the PEM alone on stdout, for pipes
    assert before.stderr.startswith(f"serial {client.certificate(serial).serial}: device "), before.stderr
    assert before.stderr.strip().endswith("; not revoked"), before.stderr
    env.cli("client", "revoke", "--target", env.target, "--serial", serial, "--reason", "key-compromise")
    info = client.certificate(serial)
    assert info.revocation.reason == 1
    after = env.cli("client", "get", "--target", env.target, "--serial", serial)
    assert after.stdout == cert_pem
    revoked_at = info.revocation.revoked_at.ToDatetime(tzinfo=UTC).isoformat()
    assert after.stderr.strip().endswith(f"; revoked (key-compromise) at {revoked_at}"), after.stderr
    deadline = time.monotonic() + 15
    while True:
        delta = client.crl(delta=True)
        crl = x509.load_der_x509_crl(delta.der)
        if crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None:
            break
        assert time.monotonic() < deadline, "the delta CRL never listed the revoked certificate"
        time.sleep(0.1)
    assert client.crl(delta=True, if_newer_than=delta.number).not_modified
    full = client.crl()
    assert not full.delta and full.number < delta.number
    out = tmp_path / "delta.pem"
    env.cli("client", "crl", "--target", env.target, "--delta", "--out", str(out), "--format", "pem")
    assert x509.load_pem_x509_crl(out.read_bytes()).get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    # A repeated revocation is refused with the reason, not silently accepted.
    with pytest.raises(grpc.RpcError) as failed:
        client.revoke(serial, reason="key-compromise")
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_hold_with_an_invalidity_date_is_put_and_lifted_from_the_command_line(client: CaClient, setup: tuple[CaEnv, int]) -> None:
    """There was no `client unrevoke` (the Unrevoke RPC lifts a certificateHold) and `client revoke` had no
    --invalidity-date, which the Revoke RPC takes."""
    env, _ = setup
    _, cert_pem, _ = _provision(client)
    serial = f"{x509.load_pem_x509_certificate(cert_pem.encode()).serial_number:x}"
    bad = env.cli("client", "revoke", "--serial", serial, "--reason", "certificate-hold", "--invalidity-date", "last tuesday", check=False)
    assert bad.returncode == 2, bad
    assert "--invalidity-date: 'last tuesday' is not an ISO 8601 date-time" in bad.stderr, bad.stderr
    assert not client.certificate(serial).HasField("revocation")
    since = (datetime.now(UTC) - timedelta(hours=3)).replace(microsecond=0)
    local = since.astimezone(timezone(timedelta(hours=2))).isoformat()  # an offset other than UTC's
    held = env.cli("client", "revoke", "--serial", serial, "--reason", "certificate-hold", "--invalidity-date", local)
    assert held.stdout.startswith(f"revoked {serial} (certificate-hold) at "), held.stdout
    revocation = client.certificate(serial).revocation
    assert revocation.reason == ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD
    assert revocation.invalidity_date.ToDatetime(tzinfo=UTC) == since
    shown = env.cli("client", "get", "--serial", serial).stderr
    assert f"revoked (certificate-hold) at {revocation.revoked_at.ToDatetime(tzinfo=UTC).isoformat()}" in shown, shown
    assert f"invalidity date {since.isoformat()}" in shown, shown
    lifted = env.cli("client", "unrevoke", "--serial", serial)
    assert lifted.stdout.startswith(f"lifted the hold of {serial}"), lifted.stdout
    assert not client.certificate(serial).HasField("revocation")
    assert env.cli("client", "get", "--serial", serial).stderr.strip().endswith("; not revoked")


def test_revoke_prints_serials_as_other_outputs_do_and_no_dangling_colon(client: CaClient, setup: tuple[CaEnv, int]) -> None:
    """`client revoke --serial` echoed the serial as typed (4F1C... where everything else prints 4f1c...), and a
    device with nothing to revoke got "revoked 0 certificate(s) of device X: " with a trailing colon."""
    env, _ = setup
    _, cert_pem, _ = _provision(client)
    serial = f"{x509.load_pem_x509_certificate(cert_pem.encode()).serial_number:x}"
    padded = serial.upper().zfill(len(serial) + len(serial) % 2)
    typed = ":".join(padded[i : i + 2] for i in range(0, len(padded), 2))  # as `openssl x509 -text` prints it
    revoked = env.cli("client", "revoke", "--serial", typed)
    assert revoked.stdout.startswith(f"revoked {serial} (unspecified) at "), revoked.stdout
    device, _, _ = _provision(client)
    since = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
    bulk = env.cli("client", "revoke", "--device-id", device.device_id, "--invalidity-date", since.isoformat())
    (device_serial,) = bulk.stdout.strip().removeprefix(f"revoked 1 certificate(s) of device {device.device_id}: ").split()
    assert client.certificate(device_serial).revocation.invalidity_date.ToDatetime(tzinfo=UTC) == since
    again = env.cli("client", "revoke", "--device-id", device.device_id)
    assert again.stdout == f"device {device.device_id} has no unrevoked certificate: nothing was revoked\n"


def _with_file_size_limit(limit: int) -> list[str]:
    """A command prefix that runs the command with writes past `limit` bytes of a file failing with EFBIG, as on a full
    disk (Python ignores SIGXFSZ, so the write raises). util-linux's prlimit sets the limit, not subprocess's
    preexec_fn: a preexec_fn makes the forked child run gRPC's fork handlers, which restart gRPC's poller thread there,
    and closing the inherited descriptors before exec then aborted the child ("Epoll1Poller ... epoll_wait error: Bad
    file descriptor", exit -6) in about one run in ten while this process had gRPC channels open."""
    return ["prlimit", f"--fsize={limit}:{limit}", "--"]


def _cli_with_files_of_200_bytes(env: CaEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """`ca-daemon ARGS` whose writes past 200 bytes of a file fail with EFBIG, as on a full disk."""
    return subprocess.run(
        [*_with_file_size_limit(200), CA_DAEMON, "--config", str(env.config_path), *args],
        capture_output=True,
        text=True,
        env={**daemon_environment(), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
        check=False,
    )


def test_a_crl_write_that_fails_midway_leaves_the_brokers_crlfile_as_it_was(
    client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path
) -> None:
    """`client crl --out` writes a broker's crlfile in place (README, Mosquitto): a write stopped halfway (here a file
    size limit, as a full disk does) must leave the last CRL whole, not a truncated one the broker cannot load."""
    env, _ = setup
    crlfile = tmp_path / "ca.crl"
    env.cli("client", "crl", "--format", "pem", "--out", str(crlfile))
    before = crlfile.read_bytes()
    assert len(before) > 300

    result = _cli_with_files_of_200_bytes(env, "client", "crl", "--format", "pem", "--out", str(crlfile))
    assert result.returncode == 1 and "File too large" in result.stderr, (result.stdout, result.stderr)
    assert crlfile.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ca.crl"]  # no temporary file left behind


def test_an_out_file_in_a_missing_directory_is_named_as_given(client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    """Files written atomically are made beside their target first: `--out missing/ca.crl` failed naming that
    temporary file (`No such file or directory: 'missing/.ca.crl.k3j9x2.tmp'`), a name the user never gave."""
    env, _ = setup
    for args in (["client", "crl"], ["client", "chain"], ["audit", "export"]):
        out = tmp_path / "missing" / "out.file"
        result = env.cli(*args, "--out", str(out), check=False)
        assert result.returncode == 1, result
        assert result.stderr == f"ca-daemon: [Errno 2] No such file or directory: '{out}'\n", (args, result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_client_sign_refuses_an_unwritable_out_before_signing_and_a_failed_write_says_how_to_get_the_certificate(
    client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path
) -> None:
    """`client sign --out typo/device.pem` issued the certificate, then failed to write it: the device's certificate was
    lost, and the next `client sign` of its CSR was refused (ALREADY_EXISTS, rule device-unique)."""
    env, _ = setup
    csr, out = tmp_path / "device.csr", tmp_path / "device.pem"
    device_id = f"sign-out-{uuid.uuid4().hex[:8]}"
    csr.write_bytes(device_csr(device_id))
    missing = tmp_path / "typo" / "device.pem"
    refused = env.cli("client", "sign", "--csr", str(csr), "--out", str(missing), check=False)
    assert refused.returncode == 1 and str(missing) in refused.stderr, refused
    with pytest.raises(grpc.RpcError) as none_issued:  # (this profile allows re-issue; the default refuses the next request)
        client.revoke_device(device_id)
    assert none_issued.value.code() == grpc.StatusCode.NOT_FOUND, none_issued.value.details()
    signed = env.cli("client", "sign", "--csr", str(csr), "--out", str(out))
    serial = signed.stdout.split()[2]
    assert signed.stdout == f"issued serial {serial} for device {device_id}; wrote {out}\n"
    assert x509.load_pem_x509_certificates(out.read_bytes())[0].serial_number == int(serial, 16)

    # A write that fails once the certificate is issued (here a file size limit, as a full disk does) names the request_id.
    again = tmp_path / "again.csr"
    again.write_bytes(device_csr(f"{device_id}-2"))

    failed = _cli_with_files_of_200_bytes(env, "client", "sign", "--csr", str(again), "--out", str(out))
    assert failed.returncode == 1 and "File too large" in failed.stderr, (failed.stdout, failed.stderr)
    assert x509.load_pem_x509_certificates(out.read_bytes())[0].serial_number == int(serial, 16)  # the earlier file, whole
    request_id = failed.stderr.split("--request-id ")[1].split()[0]
    lost = failed.stderr.split("issued serial ")[1].split()[0]
    retried = env.cli("client", "sign", "--csr", str(again), "--out", str(out), "--request-id", request_id)
    assert retried.stdout == f"issued serial {lost} for device {device_id}-2; wrote {out}\n"
    assert x509.load_pem_x509_certificates(out.read_bytes())[0].serial_number == int(lost, 16)


def test_chain_export_pem_and_der(client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    env, _ = setup
    env.cli("client", "chain", "--target", env.target, "--out", str(tmp_path / "chain.pem"))
    env.cli("client", "chain", "--target", env.target, "--out", str(tmp_path / "ca.der"), "--format", "der")
    env.cli("ca", "export", "--out", str(tmp_path / "export.der"), "--format", "der")
    pem = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())
    assert x509.load_der_x509_certificate((tmp_path / "ca.der").read_bytes()) == pem[0]
    assert (tmp_path / "export.der").read_bytes() == (tmp_path / "ca.der").read_bytes()


def test_client_commands_dial_server_listen_of_the_configuration(client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    """`ca-daemon --config FILE client ca-certs` dialled 127.0.0.1:50051 whatever FILE's server.listen said
    (here another port); the key commands already took server.listen. Without a configuration file it stays
    127.0.0.1:50051 (a programming service on another host has none); a named file that is missing is an error."""
    env, _ = setup
    assert env.port != 50051
    expected = "".join(c.certificate_pem for c in client.ca_certificates())
    assert env.cli("client", "ca-certs").stdout == expected
    help_text = env.cli("client", "ca-certs", "--help").stdout
    assert "server.listen of the configuration file" in " ".join(help_text.split()), help_text
    # No configuration: neither --config nor CA_DAEMON_CONFIG, and no state/ca-daemon.toml where it runs.
    environment = {k: v for k, v in daemon_environment().items() if k != "CA_DAEMON_CONFIG"}
    bare = subprocess.run(
        [CA_DAEMON, "client", "ca-certs", "--retries", "0", "--timeout", "2"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "configuration" not in bare.stderr, bare.stderr
    assert bare.returncode == 0 or "127.0.0.1:50051" in bare.stderr, bare.stderr  # 0: a daemon of someone else's there
    missing = env.cli("--config", str(tmp_path / "nowhere.toml"), "client", "ca-certs", check=False)
    assert missing.returncode == 1 and "configuration file not found" in missing.stderr, missing.stderr


def test_a_client_that_reaches_no_daemon_is_told_so_without_the_mtls_hint(setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    """Nothing listening was reported as "the daemon answered UNAVAILABLE: ... Connection refused; if the daemon
    serves mTLS ... pass --tls-ca, --tls-cert and --tls-key": no daemon answered, and TLS options would not help."""
    env, _ = setup
    nobody = f"127.0.0.1:{free_port()}"
    refused = env.cli("client", "ca-certs", "--target", nobody, "--retries", "0", check=False)
    assert refused.returncode == 1, refused
    assert f"nothing is listening at {nobody} (connection refused)" in refused.stderr, refused.stderr
    assert "answered" not in refused.stderr and "--tls-ca" not in refused.stderr, refused.stderr
    unknown = env.cli("client", "ca-certs", "--target", "no-such-host.invalid:50051", "--retries", "0", check=False)
    assert unknown.returncode == 1 and "cannot reach no-such-host.invalid:50051: " in unknown.stderr, unknown.stderr
    assert "answered" not in unknown.stderr and "--tls-ca" not in unknown.stderr, unknown.stderr
    args = ["--target", nobody, "--retries", "0", "--devices", "1", "--out", str(tmp_path / "d"), "--quiet"]
    simulated = env.cli("simulate-factory", *args, check=False)
    assert simulated.returncode == 1 and "0 issued, 0 refused, 1 failed" in simulated.stdout, simulated.stdout
    assert f"no device was issued: nothing is listening at {nobody}" in simulated.stderr, simulated.stderr
    assert "--tls-ca" not in simulated.stderr, simulated.stderr


# -- device simulator ----------------------------------------------------------------------


def test_simulator_installs_devices_and_no_private_key_reaches_the_daemon(
    client: CaClient, daemon: Daemon, setup: tuple[CaEnv, int], tmp_path: Path
) -> None:
    env, _ = setup
    devices: list[Device] = []
    progress_out = tmp_path / "progress.txt"
    with progress_out.open("w") as stream:
        summary = simulate(
            client,
            devices=24,
            out_dir=tmp_path / "devices",
            concurrency=4,
            progress=Progress(24, stream),
            on_issued=lambda d, _i: devices.append(d),
        )
    assert (summary.issued, summary.refused, summary.failed) == (24, 0, 0), summary.lines()
    assert summary.rate > 0 and "24/24 100%" in progress_out.read_text()
    for device in devices:
        home = tmp_path / "devices" / device.device_id
        assert stat.S_IMODE((home / "device.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        leaf = x509.load_pem_x509_certificate((home / "device.crt").read_bytes())
        key = serialization.load_pem_private_key((home / "device.key").read_bytes(), None)
        assert leaf.public_key() == key.public_key()
        assert leaf.subject.rfc4514_string() == f"CN={device.device_id}"
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:dev:ops:{device.device_id}"]
        result = openssl_verify(tmp_path, (home / "device.crt").read_text(), (home / "chain.pem").read_text(), "-purpose", "sslclient")
        assert result.returncode == 0, result.stderr

    # Every byte the daemon keeps: database (with its WAL and shared memory), its log, its CRL files.
    time.sleep(0.5)  # the log line of the last request
    haystacks = {p.name: p.read_bytes() for p in env.state_dir.rglob("*") if p.is_file() and p.suffix != ".pin" and "tokens" not in p.parts}
    haystacks["daemon.log"] = daemon.log_path.read_bytes()
    assert any(name.startswith("ca.db") for name in haystacks), sorted(haystacks)
    # Positive control: the scan sees what the daemon does store (each device's certificate).
    stored = b"".join(haystacks.values())
    for device in devices:
        leaf_der = x509.load_pem_x509_certificate((tmp_path / "devices" / device.device_id / "device.crt").read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        assert leaf_der in stored, f"the scan does not see {device.device_id}'s certificate: is the database elsewhere?"
        assert isinstance(device.key, ec.EllipticCurvePrivateKey)
        for form, needle in private_key_needles(device.key).items():
            for name, data in haystacks.items():
                assert needle not in data, f"{device.device_id}'s private key ({form}) is in {name}"


def test_simulate_factory_command(daemon: Daemon, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    env, _ = setup
    out = tmp_path / "line"
    result = env.cli("simulate-factory", "--target", env.target, "--devices", "6", "--concurrency", "3", "--out", str(out), "--pregenerate")
    assert "6 issued, 0 refused, 0 failed" in result.stdout
    assert "devices/s end to end (device key generation included)" in result.stdout
    assert "devices/s excluding device key generation" in result.stdout
    assert "6/6 100%" in result.stderr  # the progress bar
    assert len(list(out.iterdir())) == 6
    # Refusals are counted, not fatal: a profile the caller may not use.
    refused = env.cli("simulate-factory", "--target", env.target, "--devices", "2", "--no-install", "--profile", "nope", check=False)
    assert refused.returncode == 1 and "0 issued, 2 refused" in refused.stdout and "PERMISSION_DENIED" in refused.stdout


# -- cloud registration ----------------------------------------------------------------------


def test_verification_certificate_over_grpc_and_cli(client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    env, _ = setup
    root = _root(client)
    code = uuid.uuid4().hex.upper() + "0A1B2C3D"
    issued = client.verification_certificate(code)
    env.cli("ca", "verification-cert", "--code", code, "--out", str(tmp_path / "verification.cer"))
    for cert in (
        x509.load_der_x509_certificate(issued.certificate_der),
        x509.load_der_x509_certificate((tmp_path / "verification.cer").read_bytes()),
    ):
        assert cert.subject.rfc4514_string() == f"CN={code}"
        cert.verify_directly_issued_by(root)  # signed by the CA key in the HSM
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=1, minutes=1)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        result = openssl_verify(tmp_path, pem, root.public_bytes(serialization.Encoding.PEM).decode())
        assert result.returncode == 0, result.stderr
    with pytest.raises(grpc.RpcError) as info:
        client.verification_certificate("has spaces in it")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "verification code" in (info.value.details() or "")
    store = app.connect_store(config_module.load(env.config_path))
    try:
        events = [e for e in store.audit_events() if e["action"] == AUDIT_ACTION]
    finally:
        store.close()
    # The refused code is audited too (README "The gRPC API"), with the rule and not the code it quotes.
    refused = [e for e in events if e["outcome"] == "refused"]
    assert [(e["reason"], e["actor"]) for e in refused] == [("verification-code", "local-developer")], refused
    events = [e for e in events if e["outcome"] == "issued"]
    assert len(events) == 2
    for event in events:
        details = event["details"] if isinstance(event["details"], dict) else json.loads(event["details"])
        assert details["code"] == code and details["certificate_der_b64"]
    assert {e["actor"] for e in events} == {"local-developer", f"cli:{_user()}"}
    # A validity out of range names the range.
    long = env.cli("ca", "verification-cert", "--code", code, "--out", str(tmp_path / "long.cer"), "--validity-days", "31", check=False)
    assert long.returncode == 2 and "argument --validity-days: 31 is out of range: give 1 to 30 days" in long.stderr, long.stderr
    assert not (tmp_path / "long.cer").exists()


def _user() -> str:
    import getpass

    return getpass.getuser()


# -- relying-party verifier -------------------------------------------------------------------


def test_verifier_five_steps(client: CaClient, setup: tuple[CaEnv, int]) -> None:
    root = _root(client)
    device, cert_pem, chain_pem = _provision(client)
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    intermediates = x509.load_pem_x509_certificates(chain_pem.encode())[:-1]
    cache = CrlCache(max_age=0)  # revalidate every time: a revocation shows at once
    verifier = DeviceVerifier([root], IdentityRule(), cache)
    assert isinstance(device.key, ec.EllipticCurvePrivateKey)

    def decide(v: DeviceVerifier = verifier, cert: x509.Certificate = leaf, key: ec.EllipticCurvePrivateKey = device.key) -> str:
        challenge = v.challenge()
        return str(v.verify(cert, intermediates, challenge, sign_challenge(key, challenge)))

    granted = verifier.verify(leaf, intermediates, c := verifier.challenge(), sign_challenge(device.key, c))
    assert granted.granted and granted.device_id == device.device_id and granted.crl_numbers[0] is not None, granted
    # 1: someone with the certificate but not the key; a certificate not valid now
    assert decide(key=ec.generate_private_key(ec.SECP256R1())).startswith("REFUSED at step possession: the challenge signature")
    later = DeviceVerifier([root], IdentityRule(), cache, clock=lambda: datetime.now(UTC) + timedelta(days=400))
    assert "not now" in decide(v=later)
    # 2: a certificate of the same shape from another CA
    other = ForeignCa.create()
    foreign_key = ec.generate_private_key(ec.SECP256R1())
    assert decide(cert=other.issue(foreign_key.public_key(), device.device_id), key=foreign_key).startswith("REFUSED at step chain")
    # 4: identity read as another profile would put it
    strict = DeviceVerifier([root], IdentityRule(device_id_pattern=r"^factory-[0-9]+$"), cache)
    assert decide(v=strict).startswith("REFUSED at step identity")
    assert decide(v=DeviceVerifier([root], IdentityRule(source="cn"), cache)).startswith("GRANTED")
    # 3: revoked -> refused as soon as the delta CRL lists it, via base + delta over HTTP
    client.revoke(f"{leaf.serial_number:x}", reason="key-compromise")
    deadline = time.monotonic() + 15
    while (answer := decide()).startswith("GRANTED"):
        assert time.monotonic() < deadline, "the verifier never saw the revocation"
        time.sleep(0.1)
    assert answer.startswith("REFUSED at step revocation") and "key_compromise" in answer, answer
    assert cache.stats.downloads >= 2 and cache.stats.not_modified >= 1


def test_verifier_grants_a_leaf_without_san_by_its_cn(client: CaClient, setup: tuple[CaEnv, int]) -> None:
    """The default profile (san_templates = []) issues no SAN: identity from the CN passes, a SAN rule names step identity."""
    root = _root(client)
    key = ec.generate_private_key(ec.SECP256R1())
    device_id = f"nosan-{uuid.uuid4().hex[:8]}"
    issued = client.sign(device_csr(device_id, key))
    leaf = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    intermediates = x509.load_pem_x509_certificates(issued.chain_pem.encode())[:-1]

    def decide(identity: IdentityRule) -> str:
        verifier = DeviceVerifier([root], identity, CrlCache(max_age=0))
        challenge = verifier.challenge()
        return str(verifier.verify(leaf, intermediates, challenge, sign_challenge(key, challenge)))

    assert decide(IdentityRule(source="cn")) == f"GRANTED device {device_id} (serial {leaf.serial_number:x})"
    assert decide(IdentityRule()).startswith("REFUSED at step identity: expected exactly one SAN URI like urn:dev:ops:{device_id}, found 0")


def test_verifier_refuses_a_replayed_challenge_answer_at_possession(client: CaClient, setup: tuple[CaEnv, int]) -> None:
    """Step 1: each challenge proves possession once, granted or refused: a captured (challenge, signature) pair
    replayed by someone without the key is refused, and so is the right answer after a wrong one."""
    root = _root(client)
    device, cert_pem, chain_pem = _provision(client)
    assert isinstance(device.key, ec.EllipticCurvePrivateKey)
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    intermediates = x509.load_pem_x509_certificates(chain_pem.encode())[:-1]
    verifier = DeviceVerifier([root], IdentityRule(), CrlCache(max_age=60))
    used = "REFUSED at step possession: the challenge was already used: each challenge proves possession once (a replayed answer?)"

    challenge = verifier.challenge()
    signature = sign_challenge(device.key, challenge)
    assert verifier.verify(leaf, intermediates, challenge, signature).granted
    assert str(verifier.verify(leaf, intermediates, challenge, signature)) == used
    challenge = verifier.challenge()
    wrong = sign_challenge(ec.generate_private_key(ec.SECP256R1()), challenge)
    assert str(verifier.verify(leaf, intermediates, challenge, wrong)).startswith("REFUSED at step possession: the challenge signature")
    assert str(verifier.verify(leaf, intermediates, challenge, sign_challenge(device.key, challenge))) == used


def test_verifier_refuses_a_challenge_it_did_not_issue_or_that_expired(client: CaClient, setup: tuple[CaEnv, int]) -> None:
    """Step 1: only a challenge from this verifier's challenge(), within challenge_ttl, is accepted: an empty or
    constant challenge the device once signed, another verifier's, an expired one and one forgotten beyond
    max_challenges are refused, each saying why."""
    root = _root(client)
    device, cert_pem, chain_pem = _provision(client)
    key = device.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    intermediates = x509.load_pem_x509_certificates(chain_pem.encode())[:-1]
    now = [datetime.now(UTC)]
    verifier = DeviceVerifier(
        [root], IdentityRule(), CrlCache(max_age=60), clock=lambda: now[0], challenge_ttl=timedelta(minutes=5), max_challenges=3
    )

    def answer(challenge: bytes) -> str:
        return str(verifier.verify(leaf, intermediates, challenge, sign_challenge(key, challenge)))

    not_issued = (
        "REFUSED at step possession: the challenge is not one this verifier issued, or it was forgotten "
        "(challenges expire after 300 s; at most 3 are kept): answer a fresh one from challenge()"
    )
    other = DeviceVerifier([root], IdentityRule(), CrlCache(max_age=60))
    for challenge in (b"", bytes(32), os.urandom(32), other.challenge()):
        assert answer(challenge) == not_issued
    late = verifier.challenge()
    now[0] += timedelta(minutes=5, seconds=1)
    assert answer(late) == "REFUSED at step possession: the challenge expired: issued 301 s ago, valid for 300 s"
    first, *rest = [verifier.challenge() for _ in range(4)]  # one more than max_challenges: the first is forgotten
    assert answer(first) == not_issued
    assert all(answer(challenge).startswith(f"GRANTED device {device.device_id}") for challenge in rest)


def _foreign_leaf(
    ca: ForeignCa,
    device_key: ec.EllipticCurvePrivateKey,
    crl_url: str,
    *cns: str,
    san: str | None = "urn:dev:ops:attacker-000002",
    client_auth: bool = True,
) -> x509.Certificate:
    """A device certificate of ca shaped like ours: CNs, a SAN URI, EKU clientAuth (unless not), CRL distribution point."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns]))
        .issuer_name(ca.certificate.subject)
        .public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(device_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(
            x509.CRLDistributionPoints([x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)]),
            critical=False,
        )
    )
    if client_auth:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


@contextlib.contextmanager
def _serving_crl(ca: ForeignCa) -> Iterator[str]:
    """ca's CRL served over HTTP on loopback: its URL."""
    port = free_port()
    server = _Http(port)
    server.fixed["/ca.crl"] = ca.crl().public_bytes(serialization.Encoding.DER)
    try:
        yield f"http://127.0.0.1:{port}/ca.crl"
    finally:
        server.close()


def _decide(verifier: DeviceVerifier, certificate: x509.Certificate, device_key: ec.EllipticCurvePrivateKey) -> str:
    challenge = verifier.challenge()
    return str(verifier.verify(certificate, [], challenge, sign_challenge(device_key, challenge)))


def test_verifier_refuses_what_the_profile_would_never_issue_and_a_leaf_without_eku() -> None:
    """A hostile review of the verifier: the device ID pattern was searched, not matched whole ('$' matches before a
    final newline, an unanchored pattern matched inside a longer ID), and a leaf with no EKU at all was granted."""
    ca = ForeignCa.create("Relying-party test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    with _serving_crl(ca) as url:
        by_cn = DeviceVerifier([ca.certificate], IdentityRule(source="cn"), CrlCache(max_age=0))
        assert _decide(by_cn, _foreign_leaf(ca, key, url, "sensor-000001", san=None), key).startswith("GRANTED device sensor-000001")
        assert _decide(by_cn, _foreign_leaf(ca, key, url, "sensor-000001\n", san=None), key).startswith("REFUSED at step identity")
        unanchored = DeviceVerifier([ca.certificate], IdentityRule(device_id_pattern="sensor-[0-9]{6}"), CrlCache(max_age=0))
        inside = _foreign_leaf(ca, key, url, san="urn:dev:ops:evil-sensor-000001-admin")
        assert _decide(unanchored, inside, key).startswith("REFUSED at step identity: device ID 'evil-sensor-000001-admin'")
        no_eku = _foreign_leaf(ca, key, url, "sensor-000001", san=None, client_auth=False)
        assert _decide(by_cn, no_eku, key).startswith("REFUSED at step chain"), _decide(by_cn, no_eku, key)


def test_a_crl_cached_for_one_ca_is_never_used_for_another_naming_the_same_url() -> None:
    """The cache was keyed by URL alone, so a certificate of CA B naming CA A's CRL URL was checked against A's cached
    CRL, which was never authenticated for B: refused with an empty cache, granted once an A device had been checked."""
    a, b = ForeignCa.create("Issuing CA A"), ForeignCa.create("Issuing CA B")
    key = ec.generate_private_key(ec.SECP256R1())
    with _serving_crl(a) as url:
        verifier = DeviceVerifier([a.certificate, b.certificate], IdentityRule(), CrlCache(max_age=60))
        assert _decide(verifier, _foreign_leaf(a, key, url, "attacker-000002"), key).startswith("GRANTED")
        refused = _decide(verifier, _foreign_leaf(b, key, url, "attacker-000002"), key)
        assert refused.startswith("REFUSED at step revocation") and "not by the certificate's issuer" in refused, refused


def test_a_crl_fetch_that_fails_in_any_way_is_a_refusal_and_a_slow_one_holds_up_only_its_own_crl() -> None:
    """http.client's own errors (a body shorter than its Content-Length, a bad status line) escaped verify(); the cache
    held one lock over every fetch, so a CRL server sending a byte every few seconds stalled every verification; and a
    fetch had no bound in time or size."""
    ca = ForeignCa.create("Relying-party test CA")
    key = ec.generate_private_key(ec.SECP256R1())

    def incomplete(_url: str, _etag: str) -> tuple[int, bytes, str]:
        raise http.client.IncompleteRead(b"0\x82", 100)

    verifier = DeviceVerifier([ca.certificate], IdentityRule(), CrlCache(max_age=0, fetch=incomplete))
    refused = _decide(verifier, _foreign_leaf(ca, key, "http://127.0.0.1:9/ca.crl", "attacker-000002"), key)
    assert refused.startswith("REFUSED at step revocation: cannot fetch the CRL"), refused

    slow_started, release = threading.Event(), threading.Event()
    fast_body = ca.crl().public_bytes(serialization.Encoding.DER)

    def fetch(url: str, _etag: str) -> tuple[int, bytes, str]:
        if url.endswith("/slow.crl"):
            slow_started.set()
            release.wait(30)
        return 200, fast_body, ""

    cache = CrlCache(max_age=0, fetch=fetch)
    now = datetime.now(UTC)
    slow = threading.Thread(target=lambda: cache.get("http://127.0.0.1:9/slow.crl", ca.certificate, now), daemon=True)
    slow.start()
    try:
        assert slow_started.wait(10)
        started = time.monotonic()
        assert cache.get("http://127.0.0.1:9/fast.crl", ca.certificate, now).issuer == ca.certificate.subject
        assert time.monotonic() - started < 2  # not behind the slow fetch
    finally:
        release.set()
        slow.join(10)

    port = free_port()
    server = _Http(port)
    server.fixed["/big.crl"] = b"0" * 5000
    try:
        with pytest.raises(ValueError, match="larger than 1000 bytes"):
            http_fetch(f"http://127.0.0.1:{port}/big.crl", "", max_bytes=1000)
    finally:
        server.close()


def test_a_crl_server_that_drips_its_headers_is_cut_off_at_the_fetch_deadline() -> None:
    """The deadline covered only the body: a server sending its status line and headers a byte at a time
    (each read within the 5 s timeout) held a fetch, `crl fetch` or a verification, for as long as it liked."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Drip: " + b"a" * 1000:
                if done.wait(0.2):
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))

    server = threading.Thread(target=drip, daemon=True)
    server.start()
    started = time.monotonic()
    try:
        with pytest.raises(ValueError, match="the download took longer than 2 s"):
            http_fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/ca.crl", "", deadline=2.0)
        assert time.monotonic() - started < 4
    finally:
        done.set()
        server.join(10)
        listener.close()


def test_a_certificate_whose_public_key_cannot_be_read_is_refused_at_possession() -> None:
    """Step 1 reads the key of a certificate anyone can send, before its chain is checked: a key of a type cryptography does
    not know (1.2.840.10045.2.9) or an EC point off the curve raised out of verify() (UnsupportedAlgorithm, ValueError)."""
    ca = ForeignCa.create("Relying-party test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    der = _foreign_leaf(ca, key, "http://127.0.0.1:9/ca.crl", "attacker-000002").public_bytes(serialization.Encoding.DER)
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    id_ec_public_key = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1
    assert der.count(point) == der.count(id_ec_public_key) == 1
    unknown_type = der.replace(id_ec_public_key, bytes.fromhex("2a8648ce3d0209"))
    off_curve = der.replace(point, point[:-1] + bytes([point[-1] ^ 1]))
    verifier = DeviceVerifier([ca.certificate], IdentityRule(), CrlCache(max_age=0))
    for forged, why in ((unknown_type, "Unknown key type: 1.2.840.10045.2.9"), (off_curve, "Invalid key")):
        answer = _decide(verifier, x509.load_der_x509_certificate(forged), key)
        assert answer == f"REFUSED at step possession: the certificate's public key cannot be read: {why}", answer


def test_a_crl_whose_issuer_name_cannot_be_read_is_a_refusal() -> None:
    """Whoever answers the CRL URL (plain HTTP) writes the body; cryptography reads the issuer name on first use, so a
    CRL whose issuer CN is a UTF8String that is not UTF-8 raised ValueError out of verify() instead of a refusal."""
    ca = ForeignCa.create("Relying-party test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    port = free_port()
    server = _Http(port)
    cn = b"\x0c\x15Relying-party test CA"  # UTF8String, 21 bytes
    der = ca.crl().public_bytes(serialization.Encoding.DER)
    assert der.count(cn) == 1
    server.fixed["/ca.crl"] = der.replace(cn, cn[:2] + b"\xff\xfe" + cn[4:])
    url = f"http://127.0.0.1:{port}/ca.crl"
    try:
        answer = _decide(
            DeviceVerifier([ca.certificate], IdentityRule(), CrlCache(max_age=0)), _foreign_leaf(ca, key, url, "attacker-000002"), key
        )
        assert answer.startswith(f"REFUSED at step revocation: the CRL at {url} does not parse: error parsing asn1 value"), answer
        # The broker's CRL refresh (crlfile) read the name outside its parse check too: ValueError, not a refusal.
        with pytest.raises(CrlRefused, match=f"what {url} serves is not a CRL: error parsing asn1 value"):
            fetch_checked(url, [ca.certificate], datetime.now(UTC))
    finally:
        server.close()


class _Redirect(http.server.ThreadingHTTPServer):
    """Answers every GET with 302 to location."""

    def __init__(self, location: str) -> None:
        location_ = location

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", location_)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _ftp_server(body: bytes, logins: list[str]) -> socket.socket:
    """A loopback FTP server enough for urllib (USER, PASS, CWD, TYPE, PASV, RETR) serving body once; logins records USER lines."""
    control, data = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))

    def serve() -> None:  # ends when the test closes control
        with data, contextlib.suppress(OSError), control.accept()[0] as conn, conn.makefile("rwb", buffering=0) as f:
            f.write(b"220 ready\r\n")
            while line := f.readline():
                command = line.split()[0].upper()
                if command == b"USER":
                    logins.append(line.decode().strip())
                if command == b"PASV":
                    port = data.getsockname()[1]
                    f.write(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})\r\n".encode())
                elif command == b"RETR":
                    f.write(b"150 sending\r\n")
                    with data.accept()[0] as transfer:
                        transfer.sendall(body)
                    f.write(b"226 done\r\n")
                else:
                    f.write({b"USER": b"331 password\r\n", b"QUIT": b"221 bye\r\n"}.get(command, b"200 ok\r\n"))

    threading.Thread(target=serve, daemon=True).start()
    return control


def test_a_crl_url_that_redirects_to_ftp_is_a_refusal_and_no_ftp_server_is_contacted() -> None:
    """urllib follows a redirect to ftp:// (not file://): the fetch logged in to the FTP server named by whoever answered
    the CRL URL, outside the fetch deadline, and the answer, which has no HTTP status, made verify() raise TypeError. A
    redirect to another http(s) host (a CDN) is still followed."""
    ca = ForeignCa.create("Relying-party test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    logins: list[str] = []
    ftp = _ftp_server(ca.crl().public_bytes(serialization.Encoding.DER), logins)
    to_ftp = _Redirect(f"ftp://127.0.0.1:{ftp.getsockname()[1]}/ca.crl")
    with _serving_crl(ca) as crl_url:
        to_http = _Redirect(crl_url)
        try:
            verifier = DeviceVerifier([ca.certificate], IdentityRule(), CrlCache(max_age=0))
            via_cdn = _foreign_leaf(ca, key, f"http://127.0.0.1:{to_http.server_address[1]}/ca.crl", "attacker-000002")
            assert _decide(verifier, via_cdn, key).startswith("GRANTED device attacker-000002")
            url = f"http://127.0.0.1:{to_ftp.server_address[1]}/ca.crl"
            answer = _decide(verifier, _foreign_leaf(ca, key, url, "attacker-000002"), key)
            assert answer == (
                f"REFUSED at step revocation: cannot fetch the CRL at {url}: redirected (HTTP 302) to "
                f"'ftp://127.0.0.1:{ftp.getsockname()[1]}/ca.crl', which is not http(s)"
            ), answer
            assert logins == []
        finally:
            for server in (to_ftp, to_http):
                server.shutdown()
                server.server_close()
            ftp.close()


def test_a_crl_of_another_scope_or_with_a_critical_extension_not_processed_is_not_used() -> None:
    """RFC 5280 5.2 and 6.3.3: a CA signs CRLs of several scopes with one key (CA certificates only, partitions by
    distribution point); served at the certificate's URL by whoever answers it, each authenticated and, not listing the
    device, granted it; so did a CRL with a critical extension the verifier does not process. The Issuing Distribution
    Point of earlier ca-daemon CRLs (the leaf's own URL, onlyContainsUserCerts) still decides."""
    ca = ForeignCa.create("Relying-party test CA")
    key = ec.generate_private_key(ec.SECP256R1())
    port = free_port()
    server = _Http(port)
    url = f"http://127.0.0.1:{port}/ca.crl"
    here: list[x509.GeneralName] = [x509.UniformResourceIdentifier(url)]
    elsewhere: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"http://127.0.0.1:{port}/partition-2.crl")]

    def crl(extension: x509.ExtensionType, critical: bool = True) -> bytes:
        now = datetime.now(UTC).replace(microsecond=0)
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=ca.certificate.subject, last_update=now, next_update=now + timedelta(days=7)
        ).add_extension(x509.CRLNumber(1), critical=False)
        return builder.add_extension(extension, critical=critical).sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def idp(
        full_name: list[x509.GeneralName] | None, *, users: bool = False, cas: bool = False, indirect: bool = False
    ) -> x509.IssuingDistributionPoint:
        return x509.IssuingDistributionPoint(full_name, None, users, cas, None, indirect, False)

    scope = "REFUSED at step revocation: the CRL at " + url
    cases = {
        "earlier ca-daemon": (idp(here, users=True), "GRANTED device attacker-000002"),
        "CA certificates only": (
            idp(here, cas=True),
            f"{scope} covers CA certificates only, and the certificate is not one (its Issuing Distribution Point), so it cannot",
        ),
        "another partition": (
            idp(elsewhere, users=True),
            f"{scope} is for distribution point http://127.0.0.1:{port}/partition-2.crl, not one the certificate names",
        ),
        "indirect": (idp(None, indirect=True), f"{scope} is an indirect CRL, which this verifier does not read"),
        "critical, not processed": (
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"),
            f"{scope} has a critical extension this verifier does not process (1.3.6.1.4.1.55555.1); RFC 5280 5.2",
        ),
    }
    try:
        leaf = _foreign_leaf(ca, key, url, "attacker-000002")
        for case, (extension, expected) in cases.items():
            server.fixed["/ca.crl"] = crl(extension)
            answer = _decide(DeviceVerifier([ca.certificate], IdentityRule(), CrlCache(max_age=0)), leaf, key)
            assert answer.startswith(expected), (case, answer)
    finally:
        server.close()


def test_verifier_refuses_a_subject_with_two_cns_at_identity() -> None:
    """Step 4: a subject with two CNs (one of them another device's) is refused whatever the identity source, as a
    broker taking "the" CN as the user name might read either; with one CN the SAN/CN agreement decides."""
    ca = ForeignCa.create("Relying-party test CA")
    port = free_port()
    server = _Http(port)
    server.fixed["/ca.crl"] = ca.crl().public_bytes(serialization.Encoding.DER)
    device_key = ec.generate_private_key(ec.SECP256R1())

    def leaf(*cns: str) -> x509.Certificate:
        return _foreign_leaf(ca, device_key, f"http://127.0.0.1:{port}/ca.crl", *cns)

    def decide(certificate: x509.Certificate, identity: IdentityRule) -> str:
        verifier = DeviceVerifier([ca.certificate], identity, CrlCache(max_age=0))
        challenge = verifier.challenge()
        return str(verifier.verify(certificate, [], challenge, sign_challenge(device_key, challenge)))

    try:
        two = leaf("victim-000001", "attacker-000002")
        for identity in (IdentityRule(), IdentityRule(source="cn")):
            assert decide(two, identity) == (
                "REFUSED at step identity: the subject has 2 CNs ('victim-000001', 'attacker-000002'); at most one is allowed"
            )
        assert decide(leaf("attacker-000002"), IdentityRule()).startswith("GRANTED device attacker-000002")
        assert decide(leaf("victim-000001"), IdentityRule()) == (
            "REFUSED at step identity: the subject CN 'victim-000001' and the SAN device ID 'attacker-000002' disagree"
        )
    finally:
        server.close()


def test_verifier_refuses_a_delta_on_a_newer_full_crl_than_a_stale_mirror_serves(mirrored: tuple[CaEnv, _Http]) -> None:
    """Step 3: "a stale mirror cannot un-revoke". A mirror still serves the previous full CRL while the delta, listing
    the device as key-compromised, is on the newer one: the verifier revalidates the full CRL at once, whatever its
    cache's max_age; while it is still the old one it refuses naming both numbers, and once the mirror serves the new
    one it sees the revocation."""
    env, mirror = mirrored
    key = ec.generate_private_key(ec.SECP256R1())
    with CaClient(env.target) as ca:
        issued = ca.sign(device_csr(f"stale-{uuid.uuid4().hex[:8]}", key))
        leaf = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
        chain = x509.load_pem_x509_certificates(issued.chain_pem.encode())
        revalidating = DeviceVerifier([chain[-1]], IdentityRule(source="cn"), CrlCache(max_age=0))
        # A cache holding the full CRL for 10 minutes (and no delta yet, as when its delta copy passed its nextUpdate).
        cdp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
        cache = CrlCache(max_age=600)
        cache.get(cdp, next(c for c in chain if c.subject == leaf.issuer), datetime.now(UTC))
        caching = DeviceVerifier([chain[-1]], IdentityRule(source="cn"), cache)

        def decide(verifier: DeviceVerifier) -> str:
            challenge = verifier.challenge()
            return str(verifier.verify(leaf, chain[:-1], challenge, sign_challenge(key, challenge)))

        assert decide(revalidating).startswith("GRANTED")
        old = ca.crl()
        mirror.fixed["/" + cdp.split("/", 3)[3]] = old.der  # the mirror does not pick up the next full CRL
        try:
            env.cli("crl", "publish")  # the CA publishes a newer full CRL, then a delta on it
            deadline = time.monotonic() + 15
            while (new := ca.crl()).number == old.number:
                assert time.monotonic() < deadline, "`crl publish` made no new full CRL"
                time.sleep(0.1)
            ca.revoke(f"{leaf.serial_number:x}", reason="key-compromise")
            while not (
                (delta := x509.load_der_x509_crl(ca.crl(delta=True).der)).get_revoked_certificate_by_serial_number(leaf.serial_number)
                and delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == new.number
            ):
                assert time.monotonic() < deadline, f"no delta CRL on full CRL {new.number} lists the revocation"
                time.sleep(0.1)
            stale = f"is on full CRL {new.number}, but the full CRL at {cdp} is still number {old.number} (a stale mirror or cache?)"
            for verifier in (revalidating, caching):
                answer = decide(verifier)
                assert answer.startswith("REFUSED at step revocation: the delta CRL at ") and stale in answer, answer
        finally:
            mirror.fixed.clear()
        # The mirror catches up: the caching verifier does not wait for its max_age to take the newer full CRL.
        assert decide(caching) == f"REFUSED at step revocation: certificate {leaf.serial_number:x} is revoked (key_compromise)"


def test_crl_cache_keeps_the_highest_crl_number(client: CaClient, setup: tuple[CaEnv, int]) -> None:
    """A server (or a stale mirror) that goes back to an older CRL cannot un-revoke a certificate."""
    root = _root(client)
    _, cert_pem, _ = _provision(client)
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    cdp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
    _status, old_body, _etag = http_fetch(cdp, "")
    env, _ = setup
    env.cli("crl", "publish")  # a newer full CRL, published out of band
    responses = [http_fetch(cdp, "")]
    deadline = time.monotonic() + 10
    while x509.load_der_x509_crl(responses[-1][1]).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == (
        x509.load_der_x509_crl(old_body).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    ):
        assert time.monotonic() < deadline, "the daemon's HTTP server never served the CRL published by `crl publish`"
        time.sleep(0.1)
        responses = [http_fetch(cdp, "")]
    served = iter([responses[-1], (200, old_body, '"old"')])
    cache = CrlCache(max_age=0, fetch=lambda _url, _etag: next(served))
    now = datetime.now(UTC)
    newer = cache.get(cdp, root, now)
    again = cache.get(cdp, root, now)
    assert again is newer and cache.stats.rollbacks_refused == 1


def test_verify_device_command(client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    env, _ = setup
    device, _, _ = _provision(client, tmp_path / "devices")
    home = tmp_path / "devices" / device.device_id
    (tmp_path / "trust.pem").write_text(client.chain_pem())
    ok = env.cli(
        "verify-device", "--cert", str(home / "fullchain.pem"), "--trust", str(tmp_path / "trust.pem"), "--key", str(home / "device.key")
    )
    assert ok.stdout.startswith(f"GRANTED device {device.device_id}")
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    bad = env.cli(
        "verify-device", "--cert", str(home / "device.crt"), "--trust", str(tmp_path / "trust.pem"), "--key", str(other), check=False
    )
    assert bad.returncode == 1 and bad.stdout.startswith("REFUSED at step possession")
    # A service's own 32-byte challenge and the device's answer to it; other lengths are refused before any check.
    challenge = os.urandom(32)
    key = serialization.load_pem_private_key((home / "device.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    (tmp_path / "signature").write_bytes(sign_challenge(key, challenge))
    args = ["verify-device", "--cert", str(home / "fullchain.pem"), "--trust", str(tmp_path / "trust.pem")]
    answered = env.cli(*args, "--challenge", challenge.hex(), "--signature", str(tmp_path / "signature"))
    assert answered.stdout.startswith(f"GRANTED device {device.device_id}")
    short = env.cli(*args, "--challenge", "00", "--signature", str(tmp_path / "signature"), check=False)
    assert short.returncode == 1 and short.stderr == "ca-daemon: a challenge is 32 bytes (64 hex digits), got 1\n", short.stderr


def test_crl_publish_makes_a_full_crl_for_full_crl_only_consumers(client: CaClient, setup: tuple[CaEnv, int], tmp_path: Path) -> None:
    """openssl (like Mosquitto) reads full CRLs only: after `crl publish` the full CRL lists a revocation at once."""
    env, _ = setup
    _, cert_pem, chain_pem = _provision(client)
    serial = int(x509.load_pem_x509_certificate(cert_pem.encode()).serial_number)
    client.revoke(f"{serial:x}", reason="superseded")
    assert x509.load_der_x509_crl(client.crl().der).get_revoked_certificate_by_serial_number(serial) is None
    env.cli("crl", "publish")
    full = x509.load_der_x509_crl(client.crl().der)
    assert full.get_revoked_certificate_by_serial_number(serial) is not None
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(full.public_bytes(serialization.Encoding.PEM))
    result = openssl_verify(tmp_path, cert_pem, chain_pem, "-crl_check", "-CRLfile", str(crl_file))
    assert result.returncode != 0 and "certificate revoked" in result.stdout + result.stderr


_INSTALL = """
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from ca_daemon.client import Issued
from ca_daemon.simulate import Device
key_file, cert_file, chain_file, out = sys.argv[1:]
key = serialization.load_pem_private_key(Path(key_file).read_bytes(), None)
issued = Issued(Path(cert_file).read_text(), Path(chain_file).read_text(), "", "", "")
Device(Path(out).name, key, b"").install(Path(out).parent, issued)
"""


def test_an_install_cut_off_mid_write_leaves_no_device_directory_that_looks_installed(
    daemon: Daemon, setup: tuple[CaEnv, int], tmp_path: Path
) -> None:
    """The simulator dies while writing a device's files (here: the file size limit stops it in fullchain.pem).

    It wrote the files one by one in place: the device directory was left with a key, a certificate, a chain and
    half a fullchain.pem, which looks installed. Now the files are written and flushed in a directory of another
    name, renamed to the device's when all are there: a device directory is whole, or not there.
    """
    env, _ = setup
    device = Device.make(f"cut-{uuid.uuid4().hex[:8]}")
    with CaClient(env.target) as ca:
        issued = ca.sign(device.csr_pem, request_id=str(uuid.uuid4()))
    inputs = {"key": device.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    inputs["cert"], inputs["chain"] = issued.certificate_pem.encode(), issued.chain_pem.encode()
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "devices"
    limit = len(inputs["cert"]) + len(inputs["chain"]) - 1  # every file fits but fullchain.pem
    assert limit > max(len(data) for data in inputs.values())

    died = subprocess.run(
        [
            *_with_file_size_limit(limit),
            sys.executable,
            "-c",
            _INSTALL,
            *(str(tmp_path / name) for name in inputs),
            str(out / device.device_id),
        ],
        env=daemon_environment(),
        capture_output=True,
        check=False,
    )
    assert died.returncode == 1 and b"File too large" in died.stderr, died  # (Python ignores SIGXFSZ: EFBIG, an exception)
    assert not (out / device.device_id).exists(), sorted(path.name for path in (out / device.device_id).iterdir())
    device.install(out, issued)  # a later run installs it whole
    home = out / device.device_id
    assert (home / "fullchain.pem").read_text() == issued.certificate_pem + issued.chain_pem
    assert stat.S_IMODE((home / "device.key").stat().st_mode) == 0o600 and stat.S_IMODE(home.stat().st_mode) == 0o700


_KILLED_AT_EACH_STEP = """
import os
import signal
import sys
from pathlib import Path
from ca_daemon.client import Issued
from ca_daemon.simulate import Device, generate_key

base = Path(sys.argv[1])
device = Device("dev-1", generate_key(), b"")
for step in range(1, 1000):
    directory = base / str(step)
    Device("dev-1", generate_key(), b"").install(directory, Issued("old certificate\\n", "old chain\\n", "", "", ""))
    child = os.fork()
    if child == 0:
        seen = 0

        def kill_at_step(event: str, args: object) -> None:
            global seen
            seen += 1
            if seen == step:
                os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(kill_at_step)
        device.install(directory, Issued("new certificate\\n", "new chain\\n", "", "", ""))
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        print(step)
        break
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL, status
"""


def test_an_install_over_an_earlier_one_killed_at_any_step_leaves_the_old_or_the_new_install_whole(tmp_path: Path) -> None:
    """The simulator installs a device again (a new key and certificate) and is killed (SIGKILL) before one of its steps.

    Every step in turn: a child process installs with an audit hook that kills it at the n-th audited operation
    (open, mkdir, rename, unlink, rmdir, ...), over an earlier install made in a directory of its own. The earlier
    install was moved aside and removed before the new one was renamed into place: killed between the two, the
    device had no directory at all, and its new key and certificate stayed in a hidden `.dev-1.*.new`.
    """
    ran = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_EACH_STEP, str(tmp_path)], env=daemon_environment(), capture_output=True, text=True, check=True
    )
    completed_at = int(ran.stdout)
    assert completed_at > 10, ran.stdout  # the kills did land within the install
    found = {}
    for step in range(1, completed_at + 1):
        home = tmp_path / str(step) / "dev-1"
        assert sorted(path.name for path in home.iterdir()) == ["chain.pem", "device.crt", "device.key", "fullchain.pem"], step
        version = (home / "device.crt").read_text().split()[0]
        assert (home / "fullchain.pem").read_text() == f"{version} certificate\n{version} chain\n", step
        assert (home / "chain.pem").read_text() == f"{version} chain\n", step
        found[step] = version
    assert found[1] == "old" and found[completed_at] == "new", found
