"""Reload: `ca-daemon reload` (SIGHUP) puts a valid new configuration in force in every worker
without a restart; an invalid one is refused with a message and the old profiles stay."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from ca_daemon import app
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.model import AuditEvent
from ca_daemon.store import open_store
from ca_daemon.store.audit_store import AuditStore
from tests.conftest import Daemon, Snapshot, device_csr, wait_workers_serving
from tests.integration.policy_env import make_policy_env

NEW_PROFILE = """
[profiles.sensor]
description = "Added by reload"
validity_days = 30
"""


@pytest.fixture(scope="module")
def policy_env(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Snapshot:
    """One CA for the module (the tests add no keys to the token); its files put back before each test."""
    env = make_policy_env(tmp_path_factory.mktemp("reload"), softhsm_conf, workers=2)
    return Snapshot(env, tmp_path_factory.mktemp("reload-snapshot") / "state")


@pytest.fixture
def reload_daemon(policy_env: Snapshot, tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(policy_env.restore(), tmp_path / "daemon.log").start()
    # Both workers, whose reloads the tests count ("applied by 2 worker(s)", two refusals): health is SERVING once one
    # serves, and one still starting reloads only once it serves.
    wait_workers_serving(daemon.log, 2, 60, daemon.process)
    yield daemon
    daemon.stop()


def _profile_views(target: str, samples: int = 12) -> list[set[str]]:
    """ListProfiles over fresh connections, so both SO_REUSEPORT workers get asked."""
    views = []
    for _ in range(samples):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = ca_pb2_grpc.CertificateAuthorityStub(channel).ListProfiles(ca_pb2.ListProfilesRequest(), timeout=10)
            views.append({p.name for p in reply.profiles})
    return views


def _wait_for(target: str, predicate: object, timeout: float = 15.0) -> list[set[str]]:
    deadline = time.monotonic() + timeout
    while True:
        views = _profile_views(target)
        if all(predicate(v) for v in views):  # type: ignore[operator]
            return views
        if time.monotonic() > deadline:
            raise AssertionError(f"workers did not converge: {views}")
        time.sleep(0.2)


def _sign(target: str, profile: str) -> ca_pb2.SignResponse:
    with grpc.insecure_channel(target) as channel:
        response: ca_pb2.SignResponse = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
            ca_pb2.SignRequest(csr=device_csr(), profile=profile, request_id=str(uuid.uuid4())), timeout=10
        )
        return response


def test_valid_change_takes_effect_in_every_worker_without_restart(reload_daemon: Daemon) -> None:
    env = reload_daemon.env
    assert process_ids_unchanged_after(reload_daemon, lambda: _add_sensor_and_reload(reload_daemon))
    _wait_for(env.target, lambda v: "sensor" in v)
    response = _sign(env.target, "sensor")
    assert response.profile == "sensor"
    lifetime = response.not_after.ToDatetime() - response.not_before.ToDatetime()
    assert 29 <= lifetime.days <= 30
    listed = env.cli("profiles", "list").stdout
    assert "sensor\tAdded by reload" in listed and "device-id-format" in listed


def _add_sensor_and_reload(daemon: Daemon) -> None:
    env = daemon.env
    env.config_path.write_text(env.config_path.read_text() + NEW_PROFILE)
    env.edit_config(
        'profiles = ["device", "fleet", "open-cn", "renewable"]', 'profiles = ["device", "fleet", "open-cn", "renewable", "sensor"]'
    )
    result = env.cli("reload")
    assert "asked ca-daemon" in result.stdout
    assert "applied by 2 worker(s)" in result.stdout and "sensor" in result.stdout, result.stdout
    assert "restart" not in result.stderr, result.stderr  # only profiles changed: all of it in force


def process_ids_unchanged_after(daemon: Daemon, action: object) -> bool:
    assert daemon.process is not None
    before = _children(daemon.process.pid)
    action()  # type: ignore[operator]
    time.sleep(0.5)
    return daemon.process.poll() is None and _children(daemon.process.pid) == before


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(x) for x in path.read_text().split()} if path.exists() else set()


def test_invalid_change_is_refused_and_the_old_profiles_stay(reload_daemon: Daemon) -> None:
    env = reload_daemon.env
    good = env.config_path.read_text()
    env.config_path.write_text(good + "\n[profiles.broken]\ndevice_id_pattern = '([unclosed'\n")
    result = env.cli("reload", check=False)
    assert result.returncode != 0
    assert "profiles.broken.device_id_pattern is not a valid regular expression" in result.stderr
    # A SIGHUP sent by hand gets the same checks in the daemon: refused and logged, nothing changes.
    assert reload_daemon.process is not None
    os.kill(reload_daemon.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in reload_daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reload refused, the previous configuration stays in force" in reload_daemon.log()
    assert reload_daemon.process.poll() is None
    views = _profile_views(env.target)
    assert all(v == {"device", "fleet", "open-cn", "renewable", "restricted"} for v in views)
    assert _sign(env.target, "device").profile == "device"


def test_a_profile_that_fails_the_template_lint_is_refused_by_the_workers(reload_daemon: Daemon) -> None:
    env = reload_daemon.env
    env.config_path.write_text(env.config_path.read_text() + '\n[profiles.bad-san]\nsan_templates = ["thing:{device_id}"]\n')
    result = env.cli("reload", check=False)
    assert result.returncode != 0
    assert "profiles.bad-san: its certificates would fail the pre-issuance lint" in result.stderr
    assert "pkix.invalid_uri_syntax" in result.stderr
    assert reload_daemon.process is not None
    os.kill(reload_daemon.process.pid, signal.SIGHUP)  # the workers run the same check
    deadline = time.monotonic() + 10
    while reload_daemon.log().count("would fail the pre-issuance lint") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reload_daemon.log().count("would fail the pre-issuance lint") == 2  # both workers refused
    assert all("bad-san" not in v for v in _profile_views(env.target))


def test_a_profile_whose_key_usage_a_key_type_it_allows_cannot_have_is_refused(reload_daemon: Daemon) -> None:
    """A new profile with keyAgreement, allowing RSA and Ed25519 keys beside EC ones by default, was put in force: its
    template (an EC key, as the CA key is) passed the lint, and every Sign of it for an RSA key was then refused."""
    env = reload_daemon.env
    env.config_path.write_text(env.config_path.read_text() + '\n[profiles.agreement]\nkey_usage = ["digitalSignature", "keyAgreement"]\n')
    result = env.cli("reload", check=False)
    assert result.returncode != 0
    assert "profiles.agreement.key_usage: keyAgreement is prohibited for RSA and Ed25519 keys" in result.stderr, result.stderr
    assert "rsa_max_bits = 8192, the default; ed25519 = true, the default" in result.stderr, result.stderr
    assert all("agreement" not in v for v in _profile_views(env.target))


def test_the_reload_outcome_is_read_from_the_signalled_daemons_config_reload_events(tmp_path: Path) -> None:
    """What `ca-daemon reload` reports after its SIGHUP (app.await_reload), from real events in a real store: only the
    signalled daemon's (its pid and host: replicas share a PostgreSQL log), as many as it has workers, refusals with
    their reason, restart-only settings once each, a file that changed after the command checked it."""
    store = open_store(f"sqlite:///{tmp_path / 'ca.db'}")
    host, daemon, digest = socket.gethostname(), 4242, b"\x01" * 32
    try:
        started = time.monotonic()
        assert app.await_reload(store, 0, daemon, digest, timeout_s=0.3) is None
        assert time.monotonic() - started < 2

        def reload_event(actor: str, outcome: str, *, reason: str = "", restart: str = "", **who: str) -> AuditEvent:
            details = {"path": "ca-daemon.toml", "daemon": str(daemon), "host": host, "workers": "2"} | who
            details |= {"restart_needed": restart} if restart else {}
            return AuditEvent(datetime.now(UTC), actor, "config.reload", outcome, request_digest=digest, reason=reason, details=details)

        mark = AuditStore(store).last_seq()
        store.append_audit([reload_event("worker-9", "refused", reason="another replica's", host="replica-b")])
        store.append_audit([reload_event("worker-8", "refused", reason="another daemon's", daemon="1")])
        store.append_audit([reload_event("worker-1", "applied", restart="[crl], tls.ca_key")])
        store.append_audit([reload_event("worker-1", "applied", restart="[crl], tls.ca_key")])  # two reloads close together
        partial = app.await_reload(store, mark, daemon, digest, timeout_s=0.5)  # one of two workers answered in time
        assert partial == app.ReloadOutcome(2, 1, [], ["[crl]", "tls.ca_key"], other_file=False) and partial.silent == 1
        store.append_audit([reload_event("worker-2", "refused", reason="[tls]: the client CRL has expired", restart="[crl]")])
        both = app.await_reload(store, mark, daemon, b"\x02" * 32)
        assert both == app.ReloadOutcome(2, 1, ["worker-2: [tls]: the client CRL has expired"], ["[crl]", "tls.ca_key"], other_file=True)

        mark = AuditStore(store).last_seq()
        store.append_audit([reload_event(f"daemon-{daemon}", "refused", reason="ca-daemon.toml: not valid TOML")])
        started = time.monotonic()
        refused = app.await_reload(store, mark, daemon, digest)  # the daemon refused before any worker: no waiting for them
        assert refused is not None and refused.refusals == [f"daemon-{daemon}: ca-daemon.toml: not valid TOML"] and refused.applied == 0
        assert time.monotonic() - started < 2
    finally:
        store.close()
