"""Reload under hostile timing and bad files: a reload signal during start-up, a worker restarted
while the file on disk was refused, a refusal only the workers find, a client CRL that cannot be
read, and settings that need a restart. Real daemons (SoftHSM, SQLite, gRPC and TLS on loopback).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import time
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import CaEnv, Daemon, Snapshot, device_csr, free_port, make_env, spawn_daemon, wait_serving, wait_workers_serving
from tests.integration.test_access_audit import TlsDaemon, _scrape, prepare_tls, serve_tls
from tests.integration.test_reload import _children, _profile_views

SENSOR = '\n[profiles.sensor]\ndescription = "Added by reload"\nvalidity_days = 30\n'
CALLER = 'profiles = ["device"]'
CALLER_WITH_SENSOR = 'profiles = ["device", "sensor"]'


def _add_sensor(config_path: Path) -> None:
    text = config_path.read_text()
    assert CALLER in text
    config_path.write_text(text.replace(CALLER, CALLER_WITH_SENSOR) + SENSOR)


def _wait_log(daemon: Daemon | TlsDaemon, text: str, count: int = 1, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while daemon.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s): {daemon.log()[-3000:]}"
        time.sleep(0.1)


def _wait_views(target: str, expected: set[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        views = _profile_views(target)
        if all(view == expected for view in views):
            return
        assert time.monotonic() < deadline, f"workers serve {views}, expected {expected} everywhere"
        time.sleep(0.2)


def _sign(target: str, profile: str = "") -> ca_pb2.SignResponse:
    with grpc.insecure_channel(target) as channel:
        response: ca_pb2.SignResponse = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
            ca_pb2.SignRequest(csr=device_csr(), profile=profile, request_id=str(uuid.uuid4())), timeout=10
        )
        return response


def _token_loaded(pid: int) -> bool:
    """Whether process pid has the PKCS#11 module mapped: it has read its configuration and is logging in."""
    try:
        return "libsofthsm2" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_a_reload_signal_during_start_up_neither_kills_the_daemon_nor_is_lost(tmp_path: Path, softhsm_conf: Path) -> None:
    """One worker: `ca-daemon reload` finds the pid file while the daemon still starts; SIGHUP's default action killed it."""
    env = make_env(tmp_path, softhsm_conf, workers=1)
    log_path = tmp_path / "daemon.log"
    process = spawn_daemon(env, log_path)
    daemon = Daemon(env, log_path)
    daemon.process = process
    try:
        pid_file = env.state_dir / "ca-daemon.pid"
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, daemon.log()
            time.sleep(0.01)
        _add_sensor(env.config_path)
        os.kill(process.pid, signal.SIGHUP)  # what `ca-daemon reload` does
        wait_serving(env.target, 30, process, log_path)
        _wait_views(env.target, {"device", "sensor"})  # the reload asked for during start-up happened
        assert _sign(env.target, "sensor").profile == "sensor"
        assert process.poll() is None
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def two_worker_env(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Snapshot:
    """One CA for the module's two-worker tests (they add no keys to the token); its files put back before each."""
    env = make_env(tmp_path_factory.mktemp("two-workers"), softhsm_conf, workers=2)
    return Snapshot(env, tmp_path_factory.mktemp("two-workers-snapshot") / "state")


@pytest.fixture
def two_workers(two_worker_env: Snapshot, tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(two_worker_env.restore(), tmp_path / "daemon.log").start()
    wait_workers_serving(daemon.log, 2, 30, daemon.process)
    yield daemon
    daemon.stop()


def _workers(daemon: Daemon) -> set[int]:
    """The daemon's worker processes (its other child is multiprocessing's resource tracker)."""
    assert daemon.process is not None
    workers = set()
    for pid in _children(daemon.process.pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.add(pid)
    return workers


def _restart_worker(daemon: Daemon, old: int) -> int:
    """SIGKILL worker old (a crash); the pid of the worker the parent starts in its place."""
    assert daemon.process is not None
    before = _workers(daemon)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while not (new := _workers(daemon) - before - {old}):
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.01)
    return new.pop()


def test_a_worker_starting_when_a_reload_is_forwarded_takes_it_too(two_workers: Daemon) -> None:
    """A worker restarted after a crash ignored SIGHUP until it served: a reload forwarded meanwhile never reached it."""
    daemon, env = two_workers, two_workers.env
    assert daemon.process is not None
    new = _restart_worker(daemon, max(_workers(daemon)))
    deadline = time.monotonic() + 15
    while not _token_loaded(new):  # it has read its configuration and is opening the token
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.005)
    os.kill(new, signal.SIGSTOP)  # hold it there, still starting, while the reload is forwarded
    try:
        _add_sensor(env.config_path)
        os.kill(daemon.process.pid, signal.SIGHUP)
        _wait_log(daemon, "reloading the configuration in 2 worker(s)")
    finally:
        os.kill(new, signal.SIGCONT)
    _wait_log(daemon, f"worker {new} serving gRPC")
    _wait_views(env.target, {"device", "sensor"})


def test_a_worker_restarted_while_the_file_on_disk_is_refused_serves_the_configuration_in_force(two_workers: Daemon) -> None:
    """A crash of one worker after a refused reload: its replacement read the refused file and exited, again and again."""
    daemon, env = two_workers, two_workers.env
    assert daemon.process is not None
    env.config_path.write_text(env.config_path.read_text() + "\n[profiles.broken\n")
    os.kill(daemon.process.pid, signal.SIGHUP)
    _wait_log(daemon, "reload refused, the previous configuration stays in force")
    # The daemon refused it before any worker saw it, and records that for `ca-daemon reload` to report.
    refused = _daemon_refusals(daemon)
    assert len(refused) == 1 and "not valid TOML" in refused[0], refused
    for old in sorted(_workers(daemon), reverse=True):  # the non-primary, then the primary
        serving = daemon.log().count("serving gRPC on")
        _restart_worker(daemon, old)
        _wait_log(daemon, "serving gRPC on", serving + 1)
    assert "restarting it" in daemon.log() and "exited with 1" not in daemon.log()
    assert daemon.process.poll() is None and len(_workers(daemon)) == 2
    _wait_views(env.target, {"device"})
    assert _sign(env.target).profile == "device"


def test_a_reload_of_a_file_that_is_not_utf8_is_refused_and_the_daemon_keeps_serving(two_workers: Daemon) -> None:
    """A SIGHUP (systemctl reload) after a Latin-1 edit ('# Zürich'): UnicodeDecodeError escaped the supervisor's loop,
    which ended, removed the pid file and left its workers serving unsupervised; SIGTERM was then ignored (found in a
    review). Now the daemon refuses the file like any other, records why, and the command says so too."""
    daemon, env = two_workers, two_workers.env
    assert daemon.process is not None
    good = env.config_path.read_bytes()
    env.config_path.write_bytes(good + "\n# Zürich\n".encode("latin-1"))
    os.kill(daemon.process.pid, signal.SIGHUP)
    _wait_log(daemon, "not UTF-8")
    time.sleep(0.5)
    assert daemon.process.poll() is None and (env.state_dir / "ca-daemon.pid").exists()
    assert _sign(env.target).profile == "device"  # still serving, supervised
    refused = _daemon_refusals(daemon)
    assert len(refused) == 1 and "not UTF-8" in refused[0], refused
    command = env.cli("reload", check=False)  # the command reads the file as the daemon does
    assert command.returncode != 0 and "not UTF-8 (byte" in command.stderr, command.stderr
    env.config_path.write_bytes(good)
    daemon.stop()  # SIGTERM is still heard: the supervisor stops its workers and itself
    assert daemon.process.returncode == 0 and not (env.state_dir / "ca-daemon.pid").exists()


def test_a_changed_setting_that_needs_a_restart_is_reported_at_reload(two_workers: Daemon) -> None:
    """[crl], [audit], [rotation], [metrics] and state_dir are read at start only; a reload changing them ignored it silently.

    The daemon's log said so, but `ca-daemon reload` printed only that it had asked: it now waits for the workers'
    config.reload events and names what needs a restart."""
    daemon, env = two_workers, two_workers.env
    env.edit_config("delta_interval_seconds = 300", "delta_interval_seconds = 60")
    env.edit_config("checkpoint_interval_seconds = 300", "checkpoint_interval_seconds = 60")
    env.edit_config("approval_window_seconds = 86400", "approval_window_seconds = 3600")
    reloaded = env.cli("reload")
    assert "applied by 2 worker(s): device in force" in reloaded.stdout, reloaded.stdout
    assert "not in force until a restart: [crl], [audit], [rotation]" in reloaded.stderr, reloaded.stderr
    for section in ("crl", "audit", "rotation"):
        _wait_log(daemon, f"reload: [{section}] changed; that takes effect only after a restart", 2)  # each worker
    _wait_log(daemon, "profile(s) in force", 2)
    again = env.cli("reload")  # the workers still run what they started with: still named
    assert "not in force until a restart: [crl], [audit], [rotation]" in again.stderr, again.stderr


@pytest.fixture(scope="module")
def tls_env(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> tuple[Snapshot, int]:
    """One CA and internal mTLS PKI for the module's mTLS tests; its files (put back before each) and metrics port."""
    env = make_env(tmp_path_factory.mktemp("reload-tls"), softhsm_conf, workers=2)
    metrics_port = prepare_tls(env, "--client", "prog:programmer", "--client", "aud:auditor")
    return Snapshot(env, tmp_path_factory.mktemp("reload-tls-snapshot") / "state"), metrics_port


@pytest.fixture
def tls_daemon(tls_env: tuple[Snapshot, int]) -> Iterator[TlsDaemon]:
    daemon = serve_tls(tls_env[0].restore(), tls_env[1])
    yield daemon
    daemon.stop()


def _tls_sign(daemon: TlsDaemon) -> ca_pb2.SignResponse:
    with daemon.channel("prog") as channel:
        response: ca_pb2.SignResponse = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
            ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10
        )
        return response


def test_a_reload_the_workers_refuse_changes_nothing_at_the_metrics_endpoint_either(tls_daemon: TlsDaemon) -> None:
    """Half-applied: the workers refused a profile failing the lint, but the metrics endpoint took the file's new [roles]."""
    env = tls_daemon.env
    env.edit_config('auditor = ["aud"]', 'auditor = ["aud", "prog"]')
    env.config_path.write_text(env.config_path.read_text() + '\n[profiles.bad-san]\nsan_templates = ["thing:{device_id}"]\n')
    os.kill(tls_daemon.process.pid, signal.SIGHUP)
    _wait_log(tls_daemon, "would fail the pre-issuance lint")
    decided = ("is refused by the workers", "reload: the metrics endpoint uses the reloaded")
    deadline = time.monotonic() + 20  # until the parent has decided the metrics endpoint's part, either way
    while not any(line in tls_daemon.log() for line in decided):
        assert time.monotonic() < deadline, tls_daemon.log()[-3000:]
        time.sleep(0.1)
    with pytest.raises(urllib.error.HTTPError) as refused:
        _scrape(tls_daemon, "prog")
    assert refused.value.code == 403
    assert "reload: the metrics endpoint uses the reloaded" not in tls_daemon.log()


def test_a_reload_naming_a_client_crl_that_does_not_parse_is_refused(tls_daemon: TlsDaemon) -> None:
    """The reload was applied and every caller refused from then on (fail closed, but the service down) with no refusal logged."""
    env = tls_daemon.env
    corrupt = env.state_dir / "tls" / "other-ca.crl"
    corrupt.write_bytes(b"-----BEGIN X509 CRL-----\nnot a CRL\n-----END X509 CRL-----\n")
    env.edit_config('client_crl = "', f'client_crl = "{corrupt}"\n# was: client_crl = "')
    os.kill(tls_daemon.process.pid, signal.SIGHUP)
    _wait_log(tls_daemon, "reload refused, the previous configuration stays in force")
    assert f"client CA CRL {corrupt}" in tls_daemon.log()
    _wait_log(tls_daemon, "reload refused, the previous configuration stays in force", 2)  # both workers
    for _ in range(4):  # fresh connections, both workers
        assert _tls_sign(tls_daemon).profile == "device"


def test_a_worker_restarted_after_a_reload_keeps_the_settings_read_at_start_only(two_workers: Daemon) -> None:
    """A reload that changed server.listen was reported as 'not in force until a restart', but a worker restarted after a
    crash started on the whole accepted file: it listened on the new address while its sibling served the old one (and
    as well on a new [store] url, [hsm] PIN source, [ca] key or development mode). It takes the reloaded profiles only."""
    daemon, env = two_workers, two_workers.env
    assert daemon.process is not None
    moved = free_port()
    env.edit_config(f'listen = "{env.target}"', f'listen = "127.0.0.1:{moved}"')
    _add_sensor(env.config_path)
    reloaded = env.cli("reload")
    assert "applied by 2 worker(s)" in reloaded.stdout, reloaded.stdout + reloaded.stderr
    assert "not in force until a restart: [server]" in reloaded.stderr, reloaded.stderr
    for old in sorted(_workers(daemon), reverse=True):  # the non-primary, then the primary
        serving = daemon.log().count("serving gRPC on")
        new = _restart_worker(daemon, old)
        _wait_log(daemon, "serving gRPC on", serving + 1)
        assert f"worker {new} serving gRPC on {env.target}" in daemon.log(), daemon.log()[-3000:]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", moved)) != 0, "a restarted worker listens on the address that needs a restart"
    _wait_views(env.target, {"device", "sensor"})  # the reloaded part is in force in both
    assert _sign(env.target, "sensor").profile == "sensor"
    again = env.cli("reload")
    assert "applied by 2 worker(s)" in again.stdout and "not in force until a restart: [server]" in again.stderr, again.stderr


def test_every_worker_applies_the_file_the_daemon_checked_even_if_it_changes_meanwhile(two_workers: Daemon) -> None:
    """Each worker read the file again when the forwarded SIGHUP reached it: a worker whose loop was busy for a moment read
    the operator's next, half-written save, refused it and kept the old profiles while its sibling served the new ones
    (and a worker restarted later the daemon's text), the workers differing until another reload. Now they all apply
    the text the daemon checked, and their config.reload events name its digest, not that of whatever is on disk."""
    daemon, env = two_workers, two_workers.env
    assert daemon.process is not None
    busy, other = sorted(_workers(daemon))
    _add_sensor(env.config_path)
    checked = env.config_path.read_bytes()
    mark = daemon.log().count("profile(s) in force")
    os.kill(busy, signal.SIGSTOP)  # its event loop busy for a moment (a long batch, a slow store)
    try:
        os.kill(daemon.process.pid, signal.SIGHUP)
        _wait_log(daemon, "reloading the configuration in 2 worker(s)")
        _wait_log(daemon, "profile(s) in force", mark + 1)  # the other one applied it
        env.config_path.write_bytes(checked[: len(checked) // 2])  # the operator's editor saving the next change
    finally:
        os.kill(busy, signal.SIGCONT)
    _wait_log(daemon, f'"pid": {busy}, "msg": "reload', 1)
    time.sleep(0.5)
    env.config_path.write_bytes(checked + b"\n# saved\n")
    _wait_views(env.target, {"device", "sensor"}, timeout=5)
    with sqlite3.connect(env.state_dir / "ca.db") as database:
        events = database.execute("SELECT actor, outcome, request_digest FROM audit_events WHERE action = 'config.reload'").fetchall()
    assert sorted(actor for actor, _, _ in events) == sorted(f"worker-{pid}" for pid in (busy, other)), events
    assert all(outcome == "applied" and bytes(digest) == hashlib.sha256(checked).digest() for _, outcome, digest in events), events


def test_reload_reports_a_changed_store_url_as_read_at_start_only(two_workers: Daemon) -> None:
    """The command read the daemon's events in the store the file names: with [store] url already naming the next
    database (for the next restart), it created that database, waited 15 s for events the daemon writes elsewhere and
    said 'no worker recorded the reload', exit 1, where both workers had applied it and [store] needed a restart."""
    daemon, env = two_workers, two_workers.env
    env.edit_config('url = "sqlite:///ca.db"', 'url = "sqlite:///next.db"')
    _add_sensor(env.config_path)
    started = time.monotonic()
    reloaded = env.cli("reload", check=False)
    assert reloaded.returncode == 0 and "applied by 2 worker(s): device, sensor in force" in reloaded.stdout, reloaded
    assert "not in force until a restart: [store]" in reloaded.stderr, reloaded.stderr
    assert time.monotonic() - started < 10 and not (env.state_dir / "next.db").exists()
    _wait_views(env.target, {"device", "sensor"})
    daemon.stop()
    assert not (env.state_dir / "ca-daemon.reload.toml").exists()  # both go with the pid file
    assert not (env.state_dir / "ca-daemon.started.toml").exists()


def _daemon_refusals(daemon: Daemon, timeout: float = 10.0) -> list[str]:
    """The reasons of the daemon's own config.reload refusals, once there is one: written on a thread of their own,
    they may reach the store a moment after the log line (reading at once made a test fail now and then)."""
    assert daemon.process is not None
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(daemon.env.state_dir / "ca.db") as database:
            refused = database.execute(
                "SELECT reason FROM audit_events WHERE action = 'config.reload' AND outcome = 'refused' AND actor = ?",
                (f"daemon-{daemon.process.pid}",),
            ).fetchall()
        if refused or time.monotonic() > deadline:
            return [str(reason) for (reason,) in refused]
        time.sleep(0.1)


def test_a_reload_waiting_for_the_database_holds_up_no_call(tmp_path: Path, softhsm_conf: Path) -> None:
    """The reload's audit event waits for the store's write lock (another writer holds it); calls go on meanwhile.

    The reload ran on the worker's event loop: every call, reads included, waited with it, up to the
    store's lock wait (30 s), or for as long as a PostgreSQL outage lasted.
    """
    env = make_env(tmp_path, softhsm_conf)
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            stub.GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10)
            blocker = sqlite3.connect(env.state_dir / "ca.db", isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another writer: the reload's audit event waits for it
            try:
                _add_sensor(env.config_path)
                assert daemon.process is not None
                os.kill(daemon.process.pid, signal.SIGHUP)
                _wait_log(daemon, "reload: 2 profile(s) in force")  # the policy is in force; its audit event waits
                started = time.monotonic()
                for _ in range(3):
                    stub.GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=5)
                assert time.monotonic() - started < 5
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
        assert _profile_views(env.target, samples=1) == [{"device", "sensor"}]
        deadline = time.monotonic() + 40
        while not _reload_events(env):  # written once the other writer is gone
            assert time.monotonic() < deadline, "the reload's audit event was never written"
            time.sleep(0.2)
    finally:
        daemon.stop()


def _reload_events(env: CaEnv) -> list[str]:
    with contextlib.closing(sqlite3.connect(env.state_dir / "ca.db")) as db:
        return [row[0] for row in db.execute("SELECT outcome FROM audit_events WHERE action = 'config.reload'")]


def test_a_reload_after_state_dir_was_changed_in_the_file_says_it_needs_a_restart_and_creates_nothing(two_workers: Daemon) -> None:
    """The command looked for the daemon in the new directory, created it (and a lock file in it) and said only 'no running
    ca-daemon found' beside a daemon serving the old one."""
    env = two_workers.env
    moved = env.state_dir.parent / "next-state"
    env.edit_config('state_dir = "."', f'state_dir = "{moved}"')
    reloaded = env.cli("reload", check=False)
    assert reloaded.returncode != 0 and "state_dir is read at start only" in reloaded.stderr, reloaded.stderr
    assert not moved.exists()
    moved.mkdir()  # made by hand, and no daemon in it
    reloaded = env.cli("reload", check=False)
    assert reloaded.returncode != 0 and "restart the daemon instead of reloading" in reloaded.stderr, reloaded.stderr
    assert two_workers.process is not None and two_workers.process.poll() is None
