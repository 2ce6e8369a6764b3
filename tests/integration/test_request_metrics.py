"""The request log line and request metrics of calls the caller gave up on, with a real daemon over loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import device_csr, make_env, spawn_daemon, wait_serving

SIGN = "/ca_daemon.v1.CertificateAuthority/Sign"
CHECK = "/grpc.health.v1.Health/Check"
_GAVE_UP = {"DEADLINE_EXCEEDED", "CANCELLED"}


def _sign_counts(body: str) -> dict[str, float]:
    """ca_daemon_requests_total for Sign, by code."""
    counts = {}
    for line in body.splitlines():
        if line.startswith("ca_daemon_requests_total{") and f'method="{SIGN}"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            counts[code] = float(line.rsplit(" ", 1)[1])
    return counts


def test_sign_calls_past_their_deadline_are_logged_and_counted(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """Sign calls whose deadline passes while the daemon works on them: one log line and one count each.

    With the database's write lock held for 3 s, five Sign calls with a 0.5 s deadline were in the daemon's
    hands when their callers gave up: gRPC cancels the handler, and the interceptor logged and counted
    only what it caught as an Exception (CancelledError is not one). Measured before the fix: 200 Sign calls
    with a 4 ms deadline issued 147 certificates, and the log and ca_daemon_requests_total had no Sign at
    all: a CA whose every caller timed out looked idle, and no alert on Sign's status codes could fire.
    """
    env = make_env(tmp_path_factory.mktemp("deadline-metrics"), softhsm_conf)
    metrics_port = env.serve_metrics()
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    try:
        wait_serving(env.target, 90, process, log_path)
        csrs = [device_csr() for _ in range(5)]
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=30)  # connected, warm
            blocker = sqlite3.connect(env.state_dir / "ca.db", isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # the store's write lock: issuance waits for it
            try:

                def sign(csr: bytes) -> str:
                    try:
                        stub.Sign(ca_pb2.SignRequest(csr=csr, request_id=str(uuid.uuid4())), timeout=0.5)
                    except grpc.RpcError as exc:
                        return str(exc.code().name)
                    return "OK"

                with ThreadPoolExecutor(5) as pool:
                    seen = list(pool.map(sign, csrs))
                time.sleep(1)
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            # A library's handler that ends a call itself (health's Check of a service it does not know) is counted by its status.
            with pytest.raises(grpc.RpcError) as unknown:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no-such-service"), timeout=10)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert seen == ["DEADLINE_EXCEEDED"] * 5, seen
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while sum((counts := _sign_counts(urllib.request.urlopen(url, timeout=10).read().decode())).values()) < 6:
            assert time.monotonic() < deadline, f"Sign calls counted by code: {counts}; the callers saw DEADLINE_EXCEEDED 5 times"
            time.sleep(0.2)
        # Mostly DEADLINE_EXCEEDED; CANCELLED if the caller's cancellation came more than 250 ms before the deadline here.
        assert counts.pop("OK") == 1 and set(counts) <= _GAVE_UP and sum(counts.values()) == 5, counts
        deadline = time.monotonic() + 10
        while f'ca_daemon_requests_total{{code="NOT_FOUND",method="{CHECK}"}} 1.0' not in (
            body := urllib.request.urlopen(url, timeout=10).read().decode()
        ):
            assert time.monotonic() < deadline, [line for line in body.splitlines() if line.startswith("ca_daemon_requests_total{")]
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    statuses = [line["status"] for line in lines if line.get("method") == SIGN]
    assert statuses.count("OK") == 1 and len(statuses) == 6 and set(statuses) - {"OK"} <= _GAVE_UP, statuses
    assert "NOT_FOUND" in [line["status"] for line in lines if line.get("method") == CHECK]


def _metrics_directory(state_dir: Path) -> Path:
    """Where a daemon of state_dir keeps its workers' metric files (ca_daemon.metrics.prepare_directory)."""
    return Path("/dev/shm") / f"ca-daemon-metrics-{hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]}"


def test_a_start_removes_the_metrics_directory_of_a_daemon_killed_with_sigkill_and_no_running_ones(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """`kill -9` of a daemon left its workers' files in /dev/shm (memory) until a daemon of the same state directory started.

    A state directory that never serves again (moved, a test's, a host repurposed) left them until a reboot. A start
    now removes the directory of every daemon that no longer runs (it holds no lock on it), and never a running one's.
    """
    killed_env = make_env(tmp_path_factory.mktemp("metrics-killed"), softhsm_conf)
    running_env = make_env(tmp_path_factory.mktemp("metrics-running"), softhsm_conf)
    next_env = make_env(tmp_path_factory.mktemp("metrics-next"), softhsm_conf)
    ports = {env.state_dir: env.serve_metrics() for env in (killed_env, running_env, next_env)}
    killed_dir, running_dir = _metrics_directory(killed_env.state_dir), _metrics_directory(running_env.state_dir)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for env in (killed_env, running_env):
            started.append(spawn_daemon(env, env.state_dir / "daemon.log"))
        for env, process in zip((killed_env, running_env), started, strict=True):
            wait_serving(env.target, 90, process, env.state_dir / "daemon.log")
            with grpc.insecure_channel(env.target) as channel:
                ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
                    ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=30
                )
        killed = started[0]
        os.kill(killed.pid, signal.SIGKILL)  # the supervisor; its workers follow it (PR_SET_PDEATHSIG)
        killed.wait(timeout=10)
        assert sorted(killed_dir.glob("*.db")), "the killed daemon's workers wrote metric files"
        running_files = sorted(path.name for path in running_dir.glob("*.db"))
        assert running_files
        started.append(spawn_daemon(next_env, next_env.state_dir / "daemon.log"))
        wait_serving(next_env.target, 90, started[-1], next_env.state_dir / "daemon.log")
        assert not killed_dir.exists(), sorted(path.name for path in killed_dir.iterdir())
        # Every file the running daemon had is still there (it may have made more meanwhile: a metric's file is
        # created at its first use, which a slower machine reached after the listing above).
        assert set(running_files) <= {path.name for path in running_dir.glob("*.db")}
        body = urllib.request.urlopen(f"http://127.0.0.1:{ports[running_env.state_dir]}/metrics", timeout=10).read().decode()
        assert _sign_counts(body) == {"OK": 1.0}, _sign_counts(body)
    finally:
        for process in started:
            with contextlib.suppress(ProcessLookupError):  # the killed one's group is gone
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        shutil.rmtree(killed_dir, ignore_errors=True)


_A_WORKER = """
from prometheus_client import Counter
Counter("ca_daemon_test_calls", "calls").inc(3)
"""


def test_a_worker_file_of_zero_bytes_does_not_fail_the_scrape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed between creating its metrics file and sizing it leaves one; prometheus-client failed every scrape on it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from ca_daemon.metrics import worker_metrics_collector

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    subprocess.run([sys.executable, "-c", _A_WORKER], env={**os.environ}, check=True, timeout=60)
    (tmp_path / "counter_424242.db").touch()
    with pytest.raises(struct.error):
        generate_latest(MultiProcessCollector(CollectorRegistry()))  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    registry.register(worker_metrics_collector())
    assert "ca_daemon_test_calls_total 3.0" in generate_latest(registry).decode()
