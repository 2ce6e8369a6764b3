"""deploy/mosquitto-crl-refresh.service: the command it runs keeps a real Mosquitto's crlfile current, and only with good CRLs.

Mosquitto reads crlfile only at start and at SIGHUP, and OpenSSL refuses every device once that full
CRL's nextUpdate has passed (7 days by default): without a scheduled refresh the fleet goes offline a
week after the file was last written. Here the unit's own ExecStart line runs, with only its paths, the
CDP URL and the reload command (`systemctl try-reload-or-restart`, here `kill -HUP` of the test's broker)
changed, against a real daemon (SoftHSM, HTTP on loopback); `openssl crl` and the broker judge the file.
Stale and foreign CRLs come from a real HTTP mirror on loopback serving what a stale cache or an
attacker would.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca_daemon import cli, cli_factory
from ca_daemon.client import CaClient
from ca_daemon.simulate import Device, simulate
from tests.conftest import CA_DAEMON, CaEnv, CrlServer, Daemon, daemon_environment, free_port
from tests.e2e.test_mqtt import BROKER_PROFILE, MOSQUITTO, Broker, _broker_certificate, connect_and_publish
from tests.factory_helpers import ForeignCa
from tests.integration.crl_helpers import crl_env, start

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto-crl-refresh.service"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="the Debian mosquitto package is not installed (make system-deps)"),
]


@dataclass
class Ca:
    env: CaEnv
    daemon: Daemon
    client: CaClient
    cdp_url: str  # the full CRL's URL, as the device certificates name it
    devices: dict[str, Device]
    home: Path  # devices' directories
    cafile: Path  # `ca-daemon ca export`: what the broker trusts


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[Ca]:
    base = tmp_path_factory.mktemp("crl-refresh")
    env, _ = crl_env(base / "ca", softhsm_conf)
    env.config_path.write_text(env.config_path.read_text() + BROKER_PROFILE)
    env.edit_config(
        '[callers."local-developer"]\nprofiles = ["device"]\n', '[callers."local-developer"]\nprofiles = ["device", "broker"]\n'
    )
    daemon = start(env, base)
    try:
        with CaClient(env.target) as client:
            devices: list[Device] = []
            summary = simulate(client, devices=2, out_dir=base / "devices", on_issued=lambda d, _i: devices.append(d))
            assert summary.issued == 2, summary.lines()
            leaf = x509.load_pem_x509_certificate((base / "devices" / devices[0].device_id / "device.crt").read_bytes())
            (point,) = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
            assert point.full_name is not None
            cdp_url = str(point.full_name[0].value)
            env.cli("ca", "export", "--out", str(base / "ca-chain.pem"))
            yield Ca(env, daemon, client, cdp_url, {d.device_id: d for d in devices}, base / "devices", base / "ca-chain.pem")
    finally:
        daemon.stop()


def unit_command(crlfile: Path, cafile: Path, urls: list[str], reload: str) -> list[str]:
    """The unit's ExecStart, with the paths of this test, its URLs and its reload command in place of the example's."""
    (line,) = [line.removeprefix("ExecStart=") for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    line = (
        line.replace("/opt/ca-daemon/.venv/bin/ca-daemon", CA_DAEMON)
        .replace("--url http://ca.example.net:8080/crl/ca-root-1.crl", " ".join(f"--url {url}" for url in urls))
        .replace("/etc/mosquitto/ca-chain.pem", str(cafile))
        .replace("/etc/mosquitto/ca.crl", str(crlfile))
        .replace("systemctl try-reload-or-restart mosquitto.service", reload)
    )
    assert "/etc/" not in line and "example.net" not in line and "systemctl" not in line, line
    return shlex.split(line)  # systemd splits the line the same way: test_deploy checks it has no $, % or backslash


def refresh(crlfile: Path, cafile: Path, urls: list[str], reload: str = "true", *, new_process: bool = False) -> Ran:
    """Run it as the timer would, on a host with no ca-daemon configuration (the broker's).

    new_process runs the whole line as a program; otherwise its arguments go to cli.main in this process,
    the same code without the interpreter's start (over a second here, for each of the many runs).
    """
    argv = unit_command(crlfile, cafile, urls, reload)
    assert argv[0] == CA_DAEMON
    if new_process:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=crlfile.parent, env=daemon_environment())
        return Ran(done.returncode, done.stdout, done.stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(crlfile.parent), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv[1:])
    return Ran(code, out.getvalue(), err.getvalue())


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def openssl_crl(crlfile: Path, cafile: Path, *options: str) -> str:
    """`openssl crl` on the first CRL of the file, its signature checked against cafile ("verify OK" on stderr)."""
    result = subprocess.run(
        ["openssl", "crl", "-in", str(crlfile), "-CAfile", str(cafile), "-noout", *options], capture_output=True, text=True, check=True
    )
    assert "verify OK" in result.stderr, result.stderr
    return result.stdout


def openssl_crl_number(crlfile: Path, cafile: Path) -> int:
    return int(openssl_crl(crlfile, cafile, "-crlnumber").strip().removeprefix("crlNumber="), 16)


def crl_blocks(crlfile: Path) -> list[x509.CertificateRevocationList]:
    return [
        x509.load_pem_x509_crl(b) for b in re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", crlfile.read_bytes(), re.S)
    ]


@contextlib.contextmanager
def mirror(bodies: dict[str, bytes]) -> Iterator[str]:
    """A plain HTTP server on loopback answering GET path with bodies[path]; yields its base URL."""
    server = CrlServer()
    server.bodies.update(bodies)
    try:
        yield server.url
    finally:
        server.close()


def publish(ca: Ca) -> int:
    """A full CRL now (`ca-daemon crl publish`); returns its number once the daemon serves it over HTTP (within 100 ms here)."""
    ca.env.cli("crl", "publish")
    number = ca.client.crl().number
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(ca.cdp_url, timeout=5) as response:
            body = response.read()
        crl = x509.load_der_x509_crl(body)
        if crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number:
            return number
        assert time.monotonic() < deadline, "the daemon did not serve its new CRL over HTTP"
        time.sleep(0.05)


def _serial(ca: Ca, device_id: str) -> int:
    return x509.load_pem_x509_certificate((ca.home / device_id / "device.crt").read_bytes()).serial_number


def test_the_units_command_keeps_a_real_brokers_crlfile_current(ca: Ca, tmp_path: Path) -> None:
    """First install, a run with nothing new (file and broker untouched), a revocation (new CRL, broker reloaded): the
    device still connects and the revoked one is refused."""
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    cafile, crlfile = broker_dir / "cafile.pem", broker_dir / "crl.pem"  # the names Broker's configuration uses
    cafile.write_bytes(ca.cafile.read_bytes())
    (broker_dir / "monitor").write_text("nobody")
    _broker_certificate(ca.client, broker_dir)

    # First run, before the broker runs (try-reload-or-restart does nothing then): the current full CRL, checked by openssl.
    first = refresh(crlfile, cafile, [ca.cdp_url], new_process=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"installed 1 CRL(s) in {crlfile}" in first.stdout, first.stdout
    current = ca.client.crl()
    assert openssl_crl_number(crlfile, cafile) == current.number
    assert crlfile.read_bytes() == x509.load_der_x509_crl(current.der).public_bytes(serialization.Encoding.PEM)

    broker = Broker(broker_dir, free_port()).start()
    try:
        assert broker.process is not None
        reload = f"kill -HUP {broker.process.pid}"
        (good, revoked) = sorted(ca.devices)
        for device_id in (good, revoked):
            assert connect_and_publish(broker, ca.home / device_id, device_id).connected

        # Nothing new: the file is not rewritten (same inode and time) and the broker is not reloaded.
        before = crlfile.stat()
        log_mark = broker.log.stat().st_size
        again = refresh(crlfile, cafile, [ca.cdp_url], reload)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "already holds these CRLs: left as it was" in again.stdout, again.stdout
        after = crlfile.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        time.sleep(0.3)
        assert b"Reloading config" not in broker.log.read_bytes()[log_mark:]

        # A revocation and the next full CRL (here published at once): installed, the broker reloaded.
        ca.client.revoke(f"{_serial(ca, revoked):x}", reason="key-compromise")
        publish(ca)
        changed = refresh(crlfile, cafile, [ca.cdp_url], reload, new_process=True)
        assert changed.returncode == 0, changed.stdout + changed.stderr
        assert f"installed 1 CRL(s) in {crlfile}; ran `{reload}`" in changed.stdout, changed.stdout
        deadline = time.monotonic() + 5
        while b"Reloading config" not in broker.log.read_bytes()[log_mark:]:
            assert time.monotonic() < deadline, "the refresh did not reload the broker"
            time.sleep(0.05)
        time.sleep(0.3)
        assert openssl_crl_number(crlfile, cafile) == ca.client.crl().number > current.number
        assert [entry.serial_number for entry in crl_blocks(crlfile)[0]] == [_serial(ca, revoked)]
        assert connect_and_publish(broker, ca.home / good, good).connected
        outcome = connect_and_publish(broker, ca.home / revoked, revoked)
        assert not outcome.connected, outcome
    finally:
        broker.stop()


def test_an_older_foreign_or_delta_crl_is_refused_and_the_installed_file_stays(ca: Ca, tmp_path: Path) -> None:
    crlfile, marker = tmp_path / "ca.crl", tmp_path / "reloaded"
    stale = ca.client.crl().der
    publish(ca)
    assert refresh(crlfile, ca.cafile, [ca.cdp_url]).returncode == 0
    installed, installed_stat = crlfile.read_bytes(), crlfile.stat()

    our_ca = x509.load_pem_x509_certificates(ca.cafile.read_bytes())[0]
    impostor = ForeignCa.create("impostor")
    forged = (
        x509.CertificateRevocationListBuilder(
            issuer_name=our_ca.subject,  # our CA's name, another key: an empty CRL would un-revoke every device
            last_update=x509.load_der_x509_crl(stale).last_update_utc,
            next_update=x509.load_der_x509_crl(stale).last_update_utc.replace(year=2099),
        )
        .add_extension(x509.CRLNumber(10**6), critical=False)
        .sign(impostor.key, hashes.SHA256())
    )
    delta = ca.client.crl(delta=True).der
    cases = {
        "/stale.crl": (stale, "older than the installed CRL"),
        "/forged.crl": (forged.public_bytes(serialization.Encoding.DER), "not signed by any CA certificate the broker trusts"),
        "/delta.crl": (delta, "serves a delta CRL"),
    }
    with mirror({path: body for path, (body, _) in cases.items()}) as base:
        for path, (_, why) in cases.items():
            result = refresh(crlfile, ca.cafile, [base + path], f"touch {marker}")
            assert result.returncode == 1 and why in result.stderr, (path, result.stdout, result.stderr)
            assert crlfile.read_bytes() == installed and crlfile.stat().st_ino == installed_stat.st_ino, path
            assert not marker.exists(), path
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

        # Several issuers in one file (a key rotation), in the order of the URLs; each one refused alone refuses all.
        foreign = ForeignCa.create("second root")
        trust = tmp_path / "two-roots.pem"
        trust.write_bytes(ca.cafile.read_bytes() + foreign.certificate.public_bytes(serialization.Encoding.PEM))
        stale_second = foreign.crl().public_bytes(serialization.Encoding.DER)
        time.sleep(1.1)  # the next CRL of the second root is a second later
        cases_second = {"/second.crl": foreign.crl().public_bytes(serialization.Encoding.DER), "/stale-second.crl": stale_second}
    with mirror(cases_second) as base:
        both = refresh(crlfile, trust, [ca.cdp_url, base + "/second.crl"], f"touch {marker}")
        assert both.returncode == 0, both.stdout + both.stderr
        assert [c.issuer for c in crl_blocks(crlfile)] == [our_ca.subject, foreign.certificate.subject] and marker.exists()
        for device_id in ca.devices:  # what the broker decides with this file: OpenSSL finds our CA's CRL in it
            check = subprocess.run(
                [
                    "openssl",
                    "verify",
                    "-crl_check",
                    "-CAfile",
                    str(trust),
                    "-CRLfile",
                    str(crlfile),
                    str(ca.home / device_id / "device.crt"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert check.returncode == 0 or "certificate revoked" in check.stdout + check.stderr, check
        marker.unlink()
        two = crlfile.read_bytes()
        older = refresh(crlfile, trust, [ca.cdp_url, base + "/stale-second.crl"], f"touch {marker}")
        assert older.returncode == 1 and "older than the installed CRL" in older.stderr, older.stderr
        assert crlfile.read_bytes() == two and not marker.exists()


def test_a_failed_reload_puts_the_previous_file_back_and_a_replacement_keeps_owner_and_mode(ca: Ca, tmp_path: Path) -> None:
    crlfile = tmp_path / "ca.crl"
    assert refresh(crlfile, ca.cafile, [ca.cdp_url]).returncode == 0
    if os.geteuid() == 0:
        os.chown(crlfile, 0, 65534)
    crlfile.chmod(0o640)
    previous = crlfile.read_bytes()
    publish(ca)
    failed = refresh(crlfile, ca.cafile, [ca.cdp_url], "false")
    assert failed.returncode == 1 and "the file has its previous content back" in failed.stderr, failed.stderr
    assert crlfile.read_bytes() == previous
    done = refresh(crlfile, ca.cafile, [ca.cdp_url])  # the next run finds the change again
    assert done.returncode == 0 and "installed 1 CRL(s)" in done.stdout, done.stdout + done.stderr
    assert crlfile.read_bytes() != previous
    stat = crlfile.stat()
    assert stat.st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (stat.st_uid, stat.st_gid) == (0, 65534)


def test_a_reload_that_hangs_is_killed_and_fails_the_run_in_one_line(ca: Ca, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--on-change past its time limit (120 s) raised subprocess.TimeoutExpired out of the command: a traceback in the
    journal instead of the reason. It is now a refused run like a reload that failed: one line, exit 1, previous file back."""
    monkeypatch.setattr(cli_factory, "ON_CHANGE_TIMEOUT_S", 1.0, raising=False)
    crlfile = tmp_path / "ca.crl"
    assert refresh(crlfile, ca.cafile, [ca.cdp_url]).returncode == 0
    previous = crlfile.read_bytes()
    publish(ca)
    started = time.monotonic()
    hung = refresh(crlfile, ca.cafile, [ca.cdp_url], "sleep 30")
    assert time.monotonic() - started < 10
    assert hung.returncode == 1 and hung.stderr.count("\n") == 1, hung.stderr
    assert "`sleep 30` did not finish within 1 s and was killed: the file has its previous content back" in hung.stderr, hung.stderr
    assert crlfile.read_bytes() == previous


def test_a_fetch_that_fails_is_reported_in_one_line(ca: Ca, tmp_path: Path) -> None:
    """A redirect loop (urllib's message spans three lines) and a garbage status line (which kept the server's CRLF)
    wrote several lines to the journal for one refusal: the reason is now one line."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    path = conn.recv(65536).split(b" ")[1]
                    if path == b"/loop.crl":
                        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /loop.crl\r\nContent-Length: 0\r\n\r\n")
                    else:
                        conn.sendall(b"SPAM SPAM\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        crlfile = tmp_path / "ca.crl"
        for name in ("loop.crl", "garbage.crl"):
            ran = refresh(crlfile, ca.cafile, [f"http://127.0.0.1:{port}/{name}"])
            assert ran.returncode == 1 and ran.stderr.startswith("ca-daemon: cannot fetch the CRL at"), ran.stderr
            assert ran.stderr.count("\n") == 1 and "\r" not in ran.stderr, repr(ran.stderr)
        assert not crlfile.exists()
    finally:
        listener.close()
