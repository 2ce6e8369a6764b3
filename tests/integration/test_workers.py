"""Worker processes, the CPUs they run on and how they are scheduled (`[server] cpu_affinity`, `cpu_scheduling`)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import CA_DAEMON, CaEnv, child_processes, daemon_environment, device_csr, make_env, wait_serving, wait_workers_serving

ALLOWED = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to pin two workers to")


def _workers(parent: int) -> list[int]:
    """The daemon's worker processes (multiprocessing's resource tracker is a child too, but not a worker)."""
    return [pid for pid, cmdline in child_processes(parent).items() if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline]


def _serve_on_two_cpus(env: CaEnv, log_path: Path) -> subprocess.Popen[bytes]:
    """`ca-daemon serve` allowed two CPUs, as `taskset` or a container's cpuset would allow it."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            ["taskset", "--cpu-list", f"{ALLOWED[0]},{ALLOWED[1]}", CA_DAEMON, "--config", str(env.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=daemon_environment(),
            start_new_session=True,
        )
    wait_serving(env.target, 30, process, log_path)
    # Both workers: the tests read each one's CPUs and scheduling policy (set as it starts) and spread connections over
    # both; health is SERVING once one serves.
    wait_workers_serving(log_path.read_text, 2, 60, process)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=20)


@pytest.mark.parametrize(("mode", "scheduling"), [("auto", None), ("off", "normal")])
def test_with_a_worker_per_cpu_each_worker_keeps_to_its_own_cpu_unless_turned_off(
    mode: str, scheduling: str | None, tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Each mode with a scheduling policy: the defaults (auto, SCHED_BATCH), and both turned off."""
    env = make_env(tmp_path_factory.mktemp(f"affinity-{mode}"), softhsm_conf, workers=2)
    env.edit_config("workers = 2", f'workers = 2\ncpu_affinity = "{mode}"' + (f'\ncpu_scheduling = "{scheduling}"' if scheduling else ""))
    log_path = env.config_path.parent / "daemon.log"
    process = _serve_on_two_cpus(env, log_path)
    try:
        workers = _workers(process.pid)
        assert len(workers) == 2, workers
        cpus = [os.sched_getaffinity(pid) for pid in workers]
        # Every thread of a worker (event loop, token, commit, gRPC's) inherits the worker's CPU.
        threads = {frozenset(os.sched_getaffinity(int(t))) for pid in workers for t in os.listdir(f"/proc/{pid}/task")}
        # And every thread (gRPC's included) runs under the worker's scheduling policy.
        policies = {os.sched_getscheduler(int(t)) for pid in workers for t in os.listdir(f"/proc/{pid}/task")}
        assert policies == {os.SCHED_OTHER if scheduling == "normal" else os.SCHED_BATCH}, policies
        if mode == "auto":
            assert sorted(next(iter(c)) for c in cpus) == ALLOWED[:2] and all(len(c) == 1 for c in cpus)
            assert threads == {frozenset({ALLOWED[0]}), frozenset({ALLOWED[1]})}
            assert f"pinned to CPUs {ALLOWED[0]}, {ALLOWED[1]}" in log_path.read_text()
        else:
            assert cpus == [set(ALLOWED[:2])] * 2 and threads == {frozenset(ALLOWED[:2])}
            assert "pinned" not in log_path.read_text()
        with grpc.insecure_channel(env.target) as channel:
            issued = ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
                ca_pb2.SignRequest(csr=device_csr(), request_id=f"affinity-{mode}"), timeout=10
            )
        assert issued.serial
    finally:
        _stop(process)


def _client_ports(server_port: int) -> set[int]:
    """Local ports of the established connections to server_port (from /proc/net/tcp and tcp6: gRPC uses dual-stack sockets)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(remote.split(":")[1], 16) == server_port:  # 01: ESTABLISHED
                ports.add(int(local.split(":")[1], 16))
    return ports


def test_a_connection_older_than_its_age_is_replaced_without_failing_a_call(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """`max_connection_age_seconds`: the client is told to reconnect (GOAWAY) and does, so connections spread again."""
    env = make_env(tmp_path_factory.mktemp("connection-age"), softhsm_conf, workers=2)
    env.edit_config("workers = 2", "workers = 2\nmax_connection_age_seconds = 1")
    log_path = env.config_path.parent / "daemon.log"
    process = _serve_on_two_cpus(env, log_path)
    try:
        seen: set[int] = set()
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            deadline = time.monotonic() + 5
            calls = 0
            while time.monotonic() < deadline:
                stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)  # raises on any failure
                calls += 1
                seen |= _client_ports(env.port)
                time.sleep(0.05)
        assert calls > 20
        assert len(seen) >= 3, seen  # one channel, several connections one after another
    finally:
        _stop(process)
