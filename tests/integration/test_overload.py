"""More calls than a worker takes (`[server] max_calls_in_flight`): each one over is refused at once, saying why."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import sqlite3
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.client import CaClient
from tests.conftest import CaEnv, Daemon, device_csr, free_port, make_env

CAP = 3


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[Daemon]:
    """One worker that takes CAP calls at once."""
    env = make_env(tmp_path_factory.mktemp("overload"), softhsm_conf, workers=1)
    env.edit_config("workers = 1", f"workers = 1\nmax_calls_in_flight = {CAP}")
    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{free_port()}"')
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    yield daemon
    daemon.stop()


def _database(env: CaEnv) -> Path:
    return env.state_dir / "ca.db"


def _certificates_of(env: CaEnv, device_id: str) -> int:
    with sqlite3.connect(f"file:{_database(env)}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM certificates WHERE device_id = ?", (device_id,)).fetchone()[0])


def _calls_in_flight(env: CaEnv) -> float:
    listen = re.search(r'\[metrics\]\nlisten = "([^"]+)"', env.config_path.read_text())
    assert listen is not None
    body = urllib.request.urlopen(f"http://{listen.group(1)}/metrics", timeout=5).read().decode()
    return next(float(line.split()[1]) for line in body.splitlines() if line.startswith("ca_daemon_calls_in_flight "))


def test_a_call_over_the_cap_is_unavailable_saying_why_and_does_nothing_while_health_still_answers(capped: Daemon) -> None:
    env = capped.env
    # Hold the store's write lock, as another process's write would: Sign calls then wait in their commit, in flight.
    lock = os.open(str(_database(env)) + ".writelock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    released = False
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)

            def hold(i: int) -> Any:  # a grpc.Future that is also a grpc.Call
                return stub.Sign.future(ca_pb2.SignRequest(csr=device_csr(f"held-{i}"), request_id=f"held-{i}"), timeout=60)

            held = [hold(i) for i in range(CAP)]
            # A quick call is refused once all CAP are in flight (until then it is answered and leaves).
            deadline = time.monotonic() + 20
            while True:
                for i, future in enumerate(held):
                    if future.done():  # it came in while a probe was in flight and was refused: send it again
                        assert future.code() == grpc.StatusCode.UNAVAILABLE, future.exception()
                        held[i] = hold(i)
                try:
                    stub.GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=5)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    break
                assert time.monotonic() < deadline, "the held Sign calls never filled the cap"
                time.sleep(0.05)

            with pytest.raises(grpc.RpcError) as refused:
                stub.Sign(ca_pb2.SignRequest(csr=device_csr("over-the-cap"), request_id="over-the-cap"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            message = refused.value.details() or ""
            assert f"already has {CAP} calls in flight" in message and "server.max_calls_in_flight" in message, message
            assert "retry after a back-off" in message, message
            # The metrics show how close the worker is to its cap (sampled each second).
            deadline = time.monotonic() + 5
            while _calls_in_flight(env) != CAP:
                assert time.monotonic() < deadline, _calls_in_flight(env)
                time.sleep(0.2)
            # A load balancer still learns the worker is serving.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            fcntl.flock(lock, fcntl.LOCK_UN)
            released = True
            issued = [future.result(timeout=30) for future in held]
            assert [answer.device_id for answer in issued] == [f"held-{i}" for i in range(CAP)]
            assert _certificates_of(env, "over-the-cap") == 0
            # Once the calls in flight are answered, the refused request goes through.
            retried = stub.Sign(ca_pb2.SignRequest(csr=device_csr("over-the-cap"), request_id="over-the-cap"), timeout=30)
            assert retried.device_id == "over-the-cap" and _certificates_of(env, "over-the-cap") == 1
    finally:
        if not released:
            fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    log = capped.log()
    assert "UNAVAILABLE" in log and "max_calls_in_flight" in log, "the refusal is in the request log"


def test_a_burst_beyond_what_grpc_queues_by_default_gets_an_answer_with_a_reason_for_every_call(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """2,500 Sign calls at once to one worker with the default cap (2,048).

    gRPC's own queue of calls not yet taken up holds 1,000 by default: past it gRPC cancelled
    calls the daemon never saw (CANCELLED, no reason, no log line; 151 of 2,000 here).
    """
    env = make_env(tmp_path_factory.mktemp("burst"), softhsm_conf, workers=1)
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        csrs = [device_csr(f"burst-{i}", pem=False) for i in range(2500)]
        outcomes = asyncio.run(_send_at_once(env.target, csrs))
    finally:
        daemon.stop()
    kinds = Counter(
        code if code != grpc.StatusCode.UNAVAILABLE else f"UNAVAILABLE:{'max_calls_in_flight' in details}" for code, details in outcomes
    )
    assert set(kinds) <= {grpc.StatusCode.OK, "UNAVAILABLE:True"}, kinds
    # A call is refused only while 2,048 are in flight, each of which is then answered.
    assert kinds[grpc.StatusCode.OK] >= 2048, kinds


async def _send_at_once(target: str, csrs: list[bytes]) -> list[tuple[grpc.StatusCode, str]]:
    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    try:
        stubs = [ca_pb2_grpc.CertificateAuthorityStub(channel) for channel in channels]
        await asyncio.gather(*(stub.GetCACertificates(ca_pb2.GetCACertificatesRequest()) for stub in stubs))  # connected

        async def sign(i: int) -> tuple[grpc.StatusCode, str]:
            try:
                await stubs[i % len(stubs)].Sign(ca_pb2.SignRequest(csr=csrs[i], request_id=f"burst-{i}"), timeout=120)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
            return grpc.StatusCode.OK, ""

        return await asyncio.gather(*(sign(i) for i in range(len(csrs))))
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))


def test_a_shared_clients_retries_in_other_threads_do_not_turn_a_refused_revoke_into_a_success(capped: Daemon) -> None:
    """Revoking a certificate already revoked is FAILED_PRECONDITION, also while another thread of the client retries.

    CaClient.revoke took a refusal for its own retry's finding (the first attempt committed) whenever the
    client's retry count had moved during the call: on a client shared by threads, another thread's retry
    moved it, and the refused revoke returned as if it had revoked the certificate.
    """
    env = capped.env
    client = CaClient(env.target, retries=40, max_backoff=0.2, timeout=60)
    serial = client.sign(device_csr("revoked-before"), request_id="revoked-before").serial
    client.revoke(serial, reason="key-compromise")
    lock = os.open(str(_database(env)) + ".writelock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # writes wait: the held Sign calls and the second revoke stay in flight
    released = False
    outcome: dict[str, Any] = {}

    def revoke_again() -> None:
        try:
            outcome["revoked_at"] = client.revoke(serial, reason="key-compromise")
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()

    def read() -> None:
        outcome["read"] = client.certificate(serial).serial

    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            held = [
                stub.Sign.future(ca_pb2.SignRequest(csr=device_csr(f"shared-held-{i}"), request_id=f"shared-held-{i}"), timeout=60)
                for i in range(CAP - 1)
            ]
            reviser = threading.Thread(target=revoke_again)
            reviser.start()
            deadline = time.monotonic() + 10
            while _calls_in_flight(env) != CAP:  # both Sign calls and the revoke wait for the write lock
                assert time.monotonic() < deadline and not any(f.done() for f in held), _calls_in_flight(env)
                time.sleep(0.2)
            assert client.retried == 0
            reader = threading.Thread(target=read)
            reader.start()
            deadline = time.monotonic() + 10
            while client.retried == 0:  # the read is refused (max_calls_in_flight) and retried by this same client
                assert time.monotonic() < deadline, "the read was never refused and retried"
                time.sleep(0.05)
            fcntl.flock(lock, fcntl.LOCK_UN)
            released = True
            reviser.join(timeout=60)
            reader.join(timeout=60)
            assert [f.result(timeout=30).device_id for f in held] == [f"shared-held-{i}" for i in range(CAP - 1)]
    finally:
        if not released:
            fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        client.close()
    assert outcome.get("read") == serial
    assert outcome.get("code") == grpc.StatusCode.FAILED_PRECONDITION, outcome
