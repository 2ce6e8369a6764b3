"""The wall clock stepped under a running daemon (an NTP step, a VM restored from a snapshot).

A real `ca-daemon serve` runs under libfaketime with its offset in a file the test rewrites,
and only CLOCK_REALTIME moves, as in an NTP step (FAKETIME_DONT_FAKE_MONOTONIC). The spawned worker processes inherit the library and
the offset; SoftHSM signs under it unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from ca_daemon.crl import CRL_HEALTH_SERVICE
from tests.conftest import CA_DAEMON, CaEnv, daemon_environment, spawn_daemon, wait_serving
from tests.integration.crl_helpers import crl_env, get_crl, sign, stub, wait_for_crl

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FAKETIME.exists(), reason=f"{FAKETIME} is missing: install the Debian package faketime (make test-deps)"),
]

# libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC hands the kernel a negative time for
# clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), which Python 3.11's time.sleep uses: every
# time.sleep in the daemon failed with OSError EINVAL (wolfcw/libfaketime#426). A real clock step
# leaves CLOCK_MONOTONIC alone, so the faked daemon sleeps with a relative select() instead.
_SLEEP_SHIM = "import select, time\ntime.sleep = lambda seconds: select.select([], [], [], seconds) and None\n"


# libfaketime reads the offset file again once more than FAKETIME_CACHE_DURATION whole seconds of the real clock have
# passed since its last read: a step is in force in every process of the daemon at most 2 s after it. Without the cache
# (FAKETIME_NO_CACHE) it opens and parses the file at every read of the wall clock, of which gRPC and the daemon make
# many: the daemon became so slow (a Sign or GetCRL took 1-10 s, 127 % CPU) that these tests failed on their deadlines.
_CACHE_LAPSE_S = 2.2

# How long these tests wait for a call or a CRL; most take milliseconds.
_PATIENCE_S = 45.0


class SteppedClock:
    """The offset of a daemon's wall clock from the real one, changed while it runs."""

    def __init__(self, directory: Path) -> None:
        self.file = directory / "faketime-offset"
        self.shim = directory / "faketime-shim"
        self.shim.mkdir()
        (self.shim / "sitecustomize.py").write_text(_SLEEP_SHIM)
        self.step("+0", settle=False)

    def step(self, offset: str, *, settle: bool = True) -> None:
        """Set the offset, e.g. "-1h", "+1d" or "+0" (libfaketime's relative format); with settle, wait until it is in force."""
        temp = self.file.with_suffix(".tmp")
        temp.write_text(offset + "\n")
        os.replace(temp, self.file)
        if settle:
            time.sleep(_CACHE_LAPSE_S)

    def environment(self, offset_file: bool = True) -> dict[str, str]:
        path = [str(self.shim), *filter(None, [os.environ.get("PYTHONPATH", "")])]
        env = {"LD_PRELOAD": str(FAKETIME), "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": os.pathsep.join(path)}
        return env | ({"FAKETIME_TIMESTAMP_FILE": str(self.file), "FAKETIME_CACHE_DURATION": "1"} if offset_file else {})


def _init_a_day_ago(env: CaEnv, clock: SteppedClock) -> None:
    """`ca-daemon init` with the clock a day back, so the CA certificate is valid an hour before now too."""
    result = subprocess.run(
        [CA_DAEMON, "--config", str(env.config_path), "init"],
        env={**daemon_environment(), **clock.environment(offset_file=False), "FAKETIME": "-1d"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass
class Stepped:
    env: CaEnv
    clock: SteppedClock
    log: Path
    http_port: int


@pytest.fixture
def stepped(tmp_path: Path, softhsm_conf: Path) -> Iterator[Stepped]:
    """A one-worker daemon with HTTP and a 100 ms CRL check, its wall clock under the test's control."""
    env, http_port = crl_env(tmp_path, softhsm_conf, init=False)
    clock = SteppedClock(tmp_path)
    _init_a_day_ago(env, clock)
    log = tmp_path / "daemon.log"
    process = spawn_daemon(env, log, clock.environment())
    try:
        wait_serving(env.target, 30, process, log)
        yield Stepped(env, clock, log, http_port)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _crl_health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=CRL_HEALTH_SERVICE), timeout=_PATIENCE_S)
    return int(reply.status)


def _listed(serial: str) -> Callable[[x509.CertificateRevocationList], bool]:
    return lambda crl: crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def _revoke(channel: grpc.Channel, serial: str) -> None:
    stub(channel).Revoke(ca_pb2.RevokeRequest(serial=serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=_PATIENCE_S)


def _http_delta(port: int, if_modified_since: datetime, name: str = "ca-root-1-delta.crl") -> int:
    """The status of a conditional GET of the delta CRL (or another), as a cache or a CRL fetcher holding an earlier one sends it."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/crl/{name}", headers={"If-Modified-Since": format_datetime(if_modified_since, usegmt=True)}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_clock_stepped_back_publishes_no_crl_that_goes_back_in_time(stepped: Stepped, tmp_path: Path) -> None:
    env, clock = stepped.env, stepped.clock
    with grpc.insecure_channel(env.target) as channel:
        first = sign(channel, timeout=_PATIENCE_S)
        _revoke(channel, first.serial)
        before = wait_for_crl(channel, _listed(first.serial), timeout=_PATIENCE_S)
        before_crl = x509.load_der_x509_crl(before.crl_der)
        full = get_crl(channel, timeout=_PATIENCE_S)

        clock.step("-1h")
        second = sign(channel)  # issuance goes on: the CA certificate was valid an hour ago too
        assert x509.load_pem_x509_certificate(second.certificate_pem.encode()).not_valid_before_utc < before_crl.last_update_utc
        _revoke(channel, second.serial)

        # The delta that would list it is refused, not published an hour back: the last one stays in force.
        deadline = time.monotonic() + _PATIENCE_S
        while _crl_health(channel) == health_pb2.HealthCheckResponse.SERVING:
            published = get_crl(channel, delta=True, timeout=_PATIENCE_S)
            assert published.crl_number == before.crl_number, (
                f"delta CRL {published.crl_number} published with thisUpdate "
                f"{x509.load_der_x509_crl(published.crl_der).last_update_utc}, after one of {before_crl.last_update_utc}"
            )
            assert time.monotonic() < deadline, f"{CRL_HEALTH_SERVICE} still SERVING"
            time.sleep(0.1)
        assert get_crl(channel, delta=True, timeout=_PATIENCE_S).crl_number == before.crl_number
        refusals = [line for line in stepped.log.read_text().splitlines() if "not published: the clock" in line]
        assert refusals and "is behind thisUpdate" in refusals[0] and "Check the system clock (NTP)" in refusals[0]
        # `ca-daemon crl publish` (a full CRL for a broker) on the same host is refused alike.
        manual = subprocess.run(
            [CA_DAEMON, "--config", str(env.config_path), "crl", "publish"],
            env={**daemon_environment(), **clock.environment()},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert manual.returncode != 0 and "is behind thisUpdate" in manual.stderr, manual.stdout + manual.stderr
        assert get_crl(channel, timeout=_PATIENCE_S).crl_number == full.crl_number

        # Back on time, the revocation is published at once, after the CRL it follows.
        clock.step("+0")
        after = wait_for_crl(channel, _listed(second.serial), timeout=_PATIENCE_S)
        deadline = time.monotonic() + _PATIENCE_S
        while _crl_health(channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, f"{CRL_HEALTH_SERVICE} still NOT_SERVING"
            time.sleep(0.1)
    after_crl = x509.load_der_x509_crl(after.crl_der)
    assert after.crl_number > before.crl_number and after_crl.last_update_utc > before_crl.last_update_utc
    assert after_crl.next_update_utc is not None and before_crl.next_update_utc is not None
    assert after_crl.next_update_utc > before_crl.next_update_utc

    # An HTTP client holding the earlier delta gets the new one (not 304, which a thisUpdate an hour back would earn) ...
    assert _http_delta(stepped.http_port, before_crl.last_update_utc) == 200
    # ... and a relying party whose clock the earlier delta was current by finds the new one current too.
    files = []
    for name, der in (("full", full.crl_der), ("delta", after.crl_der)):
        files += ["-CRLfile", str(tmp_path / f"{name}.crl")]
        (tmp_path / f"{name}.crl").write_bytes(der)
    (tmp_path / "root.pem").write_bytes(
        x509.load_pem_x509_certificates(second.chain_pem.encode())[-1].public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "second.pem").write_text(second.certificate_pem)
    at = str(int(before_crl.next_update_utc.timestamp()) - 1)
    checks = ["-crl_check", "-use_deltas", "-extended_crl", "-attime", at]
    result = subprocess.run(
        ["openssl", "verify", *checks, "-CAfile", str(tmp_path / "root.pem"), *files, str(tmp_path / "second.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "certificate revoked" in result.stdout + result.stderr, result.stdout + result.stderr


def _crl_publish(env: CaEnv, *args: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CA_DAEMON, "--config", str(env.config_path), "crl", "publish", *args],
        env={**daemon_environment(), **(environment or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _wait_crl_health(channel: grpc.Channel, status: int) -> None:
    deadline = time.monotonic() + _PATIENCE_S
    while _crl_health(channel) != status:
        assert time.monotonic() < deadline, f"{CRL_HEALTH_SERVICE} is not {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        time.sleep(0.1)


def test_crls_made_while_the_clock_was_ahead_are_replaced_by_an_operator_once_it_is_right(stepped: Stepped, tmp_path: Path) -> None:
    """Dated a day ahead, relying parties refuse them as not yet valid, and nothing dated earlier follows by itself."""
    env, clock = stepped.env, stepped.clock
    with grpc.insecure_channel(env.target) as channel:
        clock.step("+1d")
        ahead = sign(channel, timeout=_PATIENCE_S)
        _revoke(channel, ahead.serial)
        # A day after the last full CRL, the schedule publishes the next, and a delta on it: both dated a day ahead.
        tomorrow = datetime.now(UTC) + timedelta(hours=12)
        future_full = x509.load_der_x509_crl(
            wait_for_crl(channel, lambda crl: crl.last_update_utc > tomorrow, delta=False, timeout=_PATIENCE_S).crl_der
        )
        wait_for_crl(channel, lambda crl: crl.last_update_utc >= future_full.last_update_utc, timeout=_PATIENCE_S)
        # The revocation is on the full CRL or on a delta after it, whichever came after it.
        deadline = time.monotonic() + _PATIENCE_S
        while not any(
            _listed(ahead.serial)(x509.load_der_x509_crl(get_crl(channel, delta=d, timeout=_PATIENCE_S).crl_der)) for d in (False, True)
        ):
            assert time.monotonic() < deadline, "the revocation made while the clock was ahead was never published"
            time.sleep(0.1)

        clock.step("+0")
        now = sign(channel, timeout=_PATIENCE_S)
        _revoke(channel, now.serial)
        _wait_crl_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
        hint = [line for line in stepped.log.read_text().splitlines() if "not published: the clock" in line]
        assert hint and "ca-daemon crl publish --clock-was-ahead" in hint[-1], hint

        replaced = _crl_publish(env, "--clock-was-ahead")  # the operator, with the clock right
        assert replaced.returncode == 0, replaced.stdout + replaced.stderr
        assert "published full CRL" in replaced.stdout and "published delta CRL" in replaced.stdout, replaced.stdout
        full = get_crl(channel, timeout=_PATIENCE_S)
        delta = get_crl(channel, delta=True, timeout=_PATIENCE_S)
        _wait_crl_health(channel, health_pb2.HealthCheckResponse.SERVING)  # the schedule goes on from the replacements
        # A fetcher holding the CRL dated ahead asks If-Modified-Since its (future) date: the replacement is no 304.
        deadline = time.monotonic() + _PATIENCE_S
        while _http_delta(stepped.http_port, future_full.last_update_utc, "ca-root-1.crl") != 200:
            assert time.monotonic() < deadline, "a conditional GET dated ahead of the clock still gets 304"
            time.sleep(0.1)
        again = sign(channel, timeout=_PATIENCE_S)
        _revoke(channel, again.serial)
        assert wait_for_crl(channel, _listed(again.serial), timeout=_PATIENCE_S).crl_number > delta.crl_number
    full_crl = x509.load_der_x509_crl(full.crl_der)
    assert full_crl.last_update_utc < future_full.last_update_utc and _listed(now.serial)(full_crl) and _listed(ahead.serial)(full_crl)
    assert x509.load_der_x509_crl(delta.crl_der).last_update_utc < future_full.last_update_utc

    # A relying party with a right clock takes the replacement: the certificate revoked after the clock came back is refused as revoked.
    (tmp_path / "full.crl").write_bytes(full.crl_der)
    (tmp_path / "root.pem").write_bytes(
        x509.load_pem_x509_certificates(now.chain_pem.encode())[-1].public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "now.pem").write_text(now.certificate_pem)
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-CRLfile",
            str(tmp_path / "full.crl"),
            str(tmp_path / "now.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "certificate revoked" in result.stdout + result.stderr, result.stdout + result.stderr
    events = env.cli("audit", "export", "--out", str(tmp_path / "audit.jsonl"))
    assert events.returncode == 0
    details = [
        json.loads(row["details"]) for row in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines()) if "details" in row
    ]
    assert [d["kind"] for d in details if d.get("clock_was_ahead") == "true"] == ["full", "delta"], "the replacements are audited as such"
