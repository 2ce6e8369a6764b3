"""Per-caller issuance quotas: a stolen programming-service credential mints a bounded number of certificates.

Real daemon with two worker processes (the quota is kept in the store, so it holds across
processes), real token, real SQLite, gRPC over loopback.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from tests.conftest import CaEnv, Daemon, device_csr, make_env
from tests.integration.crl_helpers import stub

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
