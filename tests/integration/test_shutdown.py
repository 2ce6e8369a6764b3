"""Stopping the daemon (SIGTERM, as systemd does): calls in flight are answered, health watchers hear it first, the log says so."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import device_csr, make_env, spawn_daemon, wait_serving, wait_workers_serving


def test_sigterm_answers_the_calls_in_flight_tells_health_watchers_first_and_logs_the_stop(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp("shutdown"), softhsm_conf, workers=2)
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    wait_serving(env.target, 30, process, log_path)
    # Both workers, whose stop lines the test counts: health answers SERVING once one serves (a second one still
    # starting under load was stopped before it logged any).
    wait_workers_serving(log_path.read_text, 2, 60, process)
    # The store's write lock, held as another process's write would hold it: Sign calls wait in their commit.
    lock = os.open(str(env.state_dir / "ca.db") + ".writelock", os.O_RDWR)
    try:
        with grpc.insecure_channel(env.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            fcntl.flock(lock, fcntl.LOCK_EX)
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            in_flight = [
                stub.Sign.future(ca_pb2.SignRequest(csr=device_csr(f"stopping-{i}"), request_id=f"stopping-{i}"), timeout=30)
                for i in range(20)
            ]
            time.sleep(0.5)  # let them reach the daemon
            assert not any(future.done() for future in in_flight)
            process.send_signal(signal.SIGTERM)  # the parent, which stops its workers (systemd's KillMode=mixed)
            heard: list[int] = []
            listener = threading.Thread(target=_listen, args=(watch, heard), daemon=True)
            listener.start()
            deadline = time.monotonic() + 10
            while health_pb2.HealthCheckResponse.NOT_SERVING not in heard and time.monotonic() < deadline:
                time.sleep(0.05)
            assert health_pb2.HealthCheckResponse.NOT_SERVING in heard, heard
            fcntl.flock(lock, fcntl.LOCK_UN)
            answers = [future.result(timeout=30) for future in in_flight]
        assert sorted(answer.device_id for answer in answers) == sorted(f"stopping-{i}" for i in range(20))
        assert process.wait(timeout=30) == 0
    finally:
        os.close(lock)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log = log_path.read_text()
    stopping = [int(count) for count in re.findall(r"worker \d+ stopping: (\d+) calls in flight", log)]
    assert len(stopping) == 2 and sum(stopping) == 20, log[-3000:]
    assert len(re.findall(r"worker \d+ stopped", log)) == 2, log[-3000:]
    assert '"msg": "ca-daemon stopped"' in log.rstrip().splitlines()[-1], log[-1000:]


def _listen(watch: Any, heard: list[int]) -> None:
    """Collect what a health Watch stream says until it ends (the daemon closes it as it stops)."""
    with contextlib.suppress(grpc.RpcError):
        heard.extend(answer.status for answer in watch)
