"""A real daemon while its store fails under it: PostgreSQL sessions killed mid-transaction or the server stopped, a SQLite file deleted.

Every failure must be UNAVAILABLE with the database's own reason, leave nothing half
written, and the daemon must serve again once the store is back, without a restart.
The PostgreSQL tests share one throwaway cluster of their own (this module stops it).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import CaEnv, Daemon, device_csr, free_port, make_env
from tests.pg import ThrowawayCluster, create_database


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayCluster]:
    c = ThrowawayCluster()
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pg(cluster: ThrowawayCluster, tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[tuple[CaEnv, Daemon, Engine]]:
    """One daemon on a database of the module's cluster, and an engine on that database for the test's own sessions."""
    url = create_database(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
    base = tmp_path_factory.mktemp("outage")
    env = make_env(base, softhsm_conf, init=False)
    env.edit_config('url = "sqlite:///ca.db"', f'url = "{url}"')
    env.edit_config('http_listen = "127.0.0.1:8080"', f'http_listen = "127.0.0.1:{free_port()}"')
    env.cli("init")
    daemon = Daemon(env, base / "daemon.log").start()
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    yield env, daemon, engine
    daemon.stop()
    engine.dispose()


def _stub(env: CaEnv) -> ca_pb2_grpc.CertificateAuthorityStub:
    return ca_pb2_grpc.CertificateAuthorityStub(grpc.insecure_channel(env.target))


def _killed_while_blocked(engine: Engine, table: str, call: Callable[[], Any]) -> grpc.RpcError | Any:
    """Run call while another session holds table's ACCESS EXCLUSIVE lock; kill the daemon's session that waits for it.

    The daemon's connection was alive when it was checked out (pool_pre_ping passed) and
    dies in the middle of its statement, as when PostgreSQL restarts or a proxy cuts it.
    Returns the call's answer or its RpcError.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except grpc.RpcError as exc:
            outcome.append(exc)

    with engine.connect() as holder, engine.connect() as killer:
        transaction = holder.begin()
        holder.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 10
        killed = 0
        while not killed and time.monotonic() < deadline:
            time.sleep(0.05)
            killed = killer.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
            killer.commit()
        transaction.rollback()
    thread.join(timeout=20)
    assert killed, f"no daemon session waited for the lock on {table}"
    return outcome[0]


def test_a_read_whose_session_dies_mid_statement_is_unavailable_and_the_next_one_is_served(pg: tuple[CaEnv, Daemon, Engine]) -> None:
    env, _, engine = pg
    stub = _stub(env)
    answer = _killed_while_blocked(engine, "ca_keys", lambda: stub.GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=15))
    assert isinstance(answer, grpc.RpcError), "the read was answered although its session was killed"
    assert answer.code() == grpc.StatusCode.UNAVAILABLE, f"{answer.code()}: {answer.details()}"
    assert "terminating connection" in (answer.details() or ""), answer.details()
    assert stub.GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10).certificates


def test_a_revoke_whose_session_dies_mid_transaction_is_unavailable_revokes_nothing_and_a_retry_revokes(
    pg: tuple[CaEnv, Daemon, Engine],
) -> None:
    env, _, engine = pg
    stub = _stub(env)
    serial = stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10).serial
    revoke = ca_pb2.RevokeRequest(serial=serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    answer = _killed_while_blocked(engine, "revocations", lambda: stub.Revoke(revoke, timeout=15))
    assert isinstance(answer, grpc.RpcError), "the revocation was acknowledged although its transaction was killed"
    assert answer.code() == grpc.StatusCode.UNAVAILABLE, f"{answer.code()}: {answer.details()}"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM revocations WHERE serial = :s"), {"s": serial}).scalar_one() == 0
    stub.Revoke(revoke, timeout=10)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM revocations WHERE serial = :s"), {"s": serial}).scalar_one() == 1


def test_a_sign_whose_commit_dies_says_why_stores_nothing_and_its_retry_issues(pg: tuple[CaEnv, Daemon, Engine]) -> None:
    env, daemon, engine = pg
    stub = _stub(env)
    request = ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4()))
    # The group commit writes the caller's issuance count after the certificate: its session dies there, mid-transaction.
    answer = _killed_while_blocked(engine, "caller_issuance_by_minute", lambda: stub.Sign(request, timeout=15))
    assert isinstance(answer, grpc.RpcError), "a certificate was returned although its commit was killed"
    assert answer.code() == grpc.StatusCode.UNAVAILABLE, f"{answer.code()}: {answer.details()}"
    # The database's reason, not only the exception class's name.
    assert "terminating connection" in (answer.details() or ""), answer.details()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM certificates WHERE request_id = :r"), {"r": request.request_id}).scalar_one() == 0
    reply = stub.Sign(request, timeout=10)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT serial FROM certificates WHERE request_id = :r"), {"r": request.request_id}).scalar_one()
    assert stored == reply.serial
    # An outage the store reports is not a bug of the daemon: no traceback for it.
    tracebacks = [line for line in daemon.log().splitlines() if '"exc"' in line and "group commit" in line]
    assert not tracebacks, tracebacks[-1][:2000]


def _log_records(daemon: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


def test_a_stopped_database_is_unavailable_at_once_logged_once_per_loop_and_served_again_when_it_is_back(
    pg: tuple[CaEnv, Daemon, Engine], cluster: ThrowawayCluster
) -> None:
    env, daemon, _ = pg
    stub = _stub(env)
    stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
    seen = len(_log_records(daemon))
    cluster.pause()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "the database is unavailable" in (refused.value.details() or ""), refused.value.details()
        assert time.monotonic() - started < 2
        time.sleep(6)  # six rounds of every once-a-second background loop (CRL schedule, CA certificates, key follow)
        # Health says so too, as for a lost token: a load balancer sends Sign calls to replicas that still reach it.
        assert _health(env) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        cluster.resume()
    outage = [r for r in _log_records(daemon)[seen:] if r["logger"] != "ca_daemon.rpc" and r["level"] in ("WARNING", "ERROR")]
    # A store outage is expected: each loop says so once (again only if the reason changes), without a traceback.
    assert not [r for r in outage if "exc" in r and not r["logger"].startswith("sqlalchemy")], [r["msg"] for r in outage if "exc" in r]
    by_message: dict[str, int] = {}
    for record in outage:
        by_message[record["msg"].split(":")[0]] = by_message.get(record["msg"].split(":")[0], 0) + 1
    assert all(count <= 3 for count in by_message.values()), by_message
    deadline = time.monotonic() + 15
    while True:
        try:
            stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=5)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(0.2)
    while _health(env) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health did not come back to SERVING"
        time.sleep(0.2)


def _health(env: CaEnv) -> int:
    with grpc.insecure_channel(env.target) as channel:
        status: int = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        return status


def test_a_sqlite_file_moved_away_under_the_daemon_is_unavailable_until_it_is_back_and_a_deleted_one_issues_nothing(
    tmp_path: Path, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path, softhsm_conf)
    env.edit_config('http_listen = "127.0.0.1:8080"', f'http_listen = "127.0.0.1:{free_port()}"')
    database = env.state_dir / "ca.db"
    daemon = Daemon(env, tmp_path / "daemon.log").start()
    returned: list[str] = []
    try:
        stub = _stub(env)
        returned.append(stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10).serial)
        away = tmp_path / "ca.db.away"
        database.rename(away)  # the pooled connections keep the file open: they would write into it unseen
        try:
            with pytest.raises(grpc.RpcError) as refused:
                returned.append(stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10).serial)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            # The caller learns why and to retry; the path is the operator's, in the daemon's log (test_secret_exposure).
            assert "deleted, moved or replaced" in (refused.value.details() or ""), refused.value.details()
            assert not database.exists(), "the daemon made a new, empty database where its own had been"
        finally:
            away.rename(database)
        returned.append(stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10).serial)
        database.unlink()
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                returned.append(stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10).serial)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert not database.exists(), "the daemon made a new, empty database where its own had been"
    finally:
        daemon.stop()
    assert len(returned) == 2  # both issued while the file was in place, and recorded in it until it was deleted
