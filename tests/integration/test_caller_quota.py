"""Per-caller issuance quotas: a stolen programming-service credential mints a bounded number of certificates.

Real daemon with two worker processes (the quota is kept in the store, so it holds across
processes), real token, real SQLite, gRPC over loopback.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from tests.conftest import CaEnv, Daemon, device_csr, make_env, spawn_daemon, wait_serving, wait_workers_serving
from tests.e2e.test_replicas import _replicas
from tests.integration.crl_helpers import stub
from tests.integration.test_clock_steps import SteppedClock

pytestmark = pytest.mark.slow


def _sign(target: str, request_id: str, csr: bytes) -> tuple[grpc.StatusCode, str, str]:
    """One Sign on a connection of its own (so that calls spread over both workers): (code, serial, details)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            reply = stub(channel).Sign(ca_pb2.SignRequest(csr=csr, request_id=request_id), timeout=20)
        except grpc.RpcError as error:
            return error.code(), "", error.details() or ""
    return grpc.StatusCode.OK, reply.serial, ""


def _reload(env: CaEnv, daemon: Daemon) -> None:
    """`ca-daemon reload`, then wait until both workers put the new configuration in force."""
    reloads = daemon.log().count("profile(s) in force")
    env.cli("reload")
    deadline = time.monotonic() + 15
    while daemon.log().count("profile(s) in force") < reloads + 2:
        assert time.monotonic() < deadline, daemon.log()[-2000:]
        time.sleep(0.1)


def test_a_caller_gets_no_more_certificates_per_hour_than_its_quota(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env = make_env(tmp_path_factory.mktemp("quota"), softhsm_conf, workers=2)
    env.edit_config(
        '[callers."local-developer"]\nprofiles = ["device"]',
        '[callers."local-developer"]\nprofiles = ["device"]\nmax_certificates_per_hour = 3',
    )
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        # Both workers, which _reload waits to see reload: health is SERVING once one serves (one still starting under
        # load reloaded only once it served, too late for the wait).
        wait_workers_serving(daemon.log, 2, 60, daemon.process)
        requests = [(str(uuid.uuid4()), device_csr()) for _ in range(8)]
        with ThreadPoolExecutor(max_workers=8) as pool:  # all in flight together, over both workers
            answers = list(pool.map(lambda r: _sign(env.target, *r), requests))
        issued = [(r, a) for r, a in zip(requests, answers, strict=True) if a[0] == grpc.StatusCode.OK]
        refused = [a for a in answers if a[0] != grpc.StatusCode.OK]
        assert len(issued) == 3, answers
        assert {code for code, _, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
        assert all("its quota is 3 per hour" in details and "max_certificates_per_hour" in details for _, _, details in refused)

        # A retry of an answered request is still answered (idempotency beats the quota); a new one is not.
        (request_id, csr), (_, serial, _) = issued[0]
        assert _sign(env.target, request_id, csr)[:2] == (grpc.StatusCode.OK, serial)
        assert _sign(env.target, str(uuid.uuid4()), device_csr())[0] == grpc.StatusCode.RESOURCE_EXHAUSTED

        database = sqlite3.connect(env.state_dir / "ca.db")
        try:
            assert database.execute("SELECT count(*) FROM certificates").fetchone()[0] == 3
            reasons = [row[0] for row in database.execute("SELECT reason FROM audit_events WHERE outcome = 'refused'")]
        finally:
            database.close()
        assert reasons.count("caller-quota") == len(refused) + 1  # every refusal is in the audit log

        # The quota is reloadable: raised, the caller may go on.
        env.edit_config("max_certificates_per_hour = 3", "max_certificates_per_hour = 5")
        _reload(env, daemon)
        codes = [_sign(env.target, str(uuid.uuid4()), device_csr())[0] for _ in range(6)]
        assert codes.count(grpc.StatusCode.OK) == 2 and codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    finally:
        daemon.stop()


def test_a_quota_added_by_reload_counts_what_the_caller_was_issued_before(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """An officer who caps a suspicious caller mid-incident caps the last hour, not from now on."""
    env = make_env(tmp_path_factory.mktemp("quota-later"), softhsm_conf, workers=2)
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        # Both workers, which _reload waits to see reload: health is SERVING once one serves.
        wait_workers_serving(daemon.log, 2, 60, daemon.process)
        assert [_sign(env.target, str(uuid.uuid4()), device_csr())[0] for _ in range(3)] == [grpc.StatusCode.OK] * 3
        env.edit_config(
            '[callers."local-developer"]\nprofiles = ["device"]',
            '[callers."local-developer"]\nprofiles = ["device"]\nmax_certificates_per_hour = 4',
        )
        _reload(env, daemon)
        codes = [_sign(env.target, str(uuid.uuid4()), device_csr())[0] for _ in range(3)]
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED], codes
    finally:
        daemon.stop()


def test_a_quota_must_be_a_whole_number(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env = make_env(tmp_path_factory.mktemp("quota-config"), softhsm_conf, init=False)
    env.edit_config(
        '[callers."local-developer"]\nprofiles = ["device"]',
        '[callers."local-developer"]\nprofiles = ["device"]\nmax_certificates_per_hour = -1',
    )
    result = env.cli("check-config", check=False)
    assert result.returncode != 0 and "callers.local-developer.max_certificates_per_hour" in result.stdout + result.stderr, result.stdout


def test_a_retry_whose_certificate_took_the_last_of_the_quota_is_answered(tmp_path: Path, softhsm_conf: Path) -> None:
    """The quota is counted after the request_id is looked up, each seeing what is committed when it runs: a retry whose
    first attempt committed in between was refused RESOURCE_EXHAUSTED although its certificate exists. Here the first
    attempt commits at the start of the quota count (SQLite's statement trace), in this process, with the real token."""
    from datetime import UTC, datetime

    from sqlalchemy import event

    from ca_daemon import app, config
    from ca_daemon.authority import Authority, SignResult
    from ca_daemon.model import AuditEvent, CertificateRequest, IssuedCertificate

    env = make_env(tmp_path, softhsm_conf)
    env.edit_config(
        '[callers."local-developer"]\nprofiles = ["device"]',
        '[callers."local-developer"]\nprofiles = ["device"]\nmax_certificates_per_hour = 1',
    )
    cfg = config.load(env.config_path)
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    authority = Authority.load(cfg, hsm, store)
    try:
        request = CertificateRequest(device_csr(), "", "retry-1", cfg.server.local_identity)
        first = hsm.run(lambda: authority.prepare_one(request, authority.policy))
        assert isinstance(first, IssuedCertificate)
        committing = False

        def commit_the_first_at_the_quota_count(statement: str) -> None:
            nonlocal committing
            if committing or "caller_issuance_by_minute" not in statement or not statement.lstrip().upper().startswith("SELECT"):
                return
            committing = True
            issued = AuditEvent(time=datetime.now(UTC), actor=request.caller, action="certificate.issue", outcome="issued")
            store.record_unique_issuances([(first, issued, False, 1)])

        event.listen(
            store.engine, "connect", lambda dbapi_connection, _: dbapi_connection.set_trace_callback(commit_the_first_at_the_quota_count)
        )
        store.engine.dispose()  # every new connection traces its statements
        retried = hsm.run(lambda: authority.prepare_one(request, authority.policy))
        assert committing, "the quota was not counted"
        assert isinstance(retried, SignResult) and retried.replayed and retried.certificate.serial == first.serial, retried
    finally:
        authority.close()
        store.close()
        hsm.close()


def test_a_replica_whose_clock_is_ahead_does_not_wipe_the_other_replicas_quota_counts(
    tmp_path: Path, softhsm_conf: Path, pg_database: Callable[[], str]
) -> None:
    """Two replicas on one PostgreSQL, one with its clock two hours ahead: the caller's quota holds at both.

    Each commit removed the caller's counts older than the committing replica's last 60 minutes: one
    Sign at the replica ahead removed every count of the real last hour, and the replica on time
    issued the quota again (found by a hostile review of replicas on PostgreSQL).
    """
    on_time, ahead = _replicas(tmp_path, softhsm_conf, pg_database(), count=2)
    for env in (on_time, ahead):
        env.edit_config(
            '[callers."local-developer"]\nprofiles = ["device"]',
            '[callers."local-developer"]\nprofiles = ["device"]\nmax_certificates_per_hour = 3',
        )
    clock = SteppedClock(tmp_path)
    clock.step("+2h")
    daemons = [Daemon(on_time, tmp_path / "on-time.log").start()]  # first: it leads, and publishes CRLs dated right
    try:
        process = spawn_daemon(ahead, tmp_path / "ahead.log", clock.environment())
        daemons.append(Daemon(ahead, tmp_path / "ahead.log"))
        daemons[-1].process = process
        wait_serving(ahead.target, 30, process, tmp_path / "ahead.log")
        assert [_sign(on_time.target, str(uuid.uuid4()), device_csr())[0] for _ in range(2)] == [grpc.StatusCode.OK] * 2
        assert _sign(ahead.target, str(uuid.uuid4()), device_csr())[0] == grpc.StatusCode.OK
        # Three in the last hour by the database's clock, which stamps and windows the counts of both: the fourth is
        # refused at either. (By each replica's own clock, the replica ahead counted only its own last hour, which
        # starts after the two on time, and issued two more.)
        for replica in (on_time, ahead):
            code, _, details = _sign(replica.target, str(uuid.uuid4()), device_csr())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (replica.target, code, details)
            assert "has had 3 certificate(s) in the last hour" in details, details
    finally:
        for daemon in daemons:
            daemon.stop()
