"""Worker processes and the CPUs they run on (`[server] cpu_affinity`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import CA_DAEMON, CaEnv, daemon_environment, device_csr, make_env, wait_serving

ALLOWED = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to pin two workers to")


def _workers(parent: int) -> list[int]:
    """The daemon's worker processes (multiprocessing's resource tracker is a child too, but not a worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry))
    return found


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
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=20)


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_with_a_worker_per_cpu_each_worker_keeps_to_its_own_cpu_unless_turned_off(
    mode: str, tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    env = make_env(tmp_path_factory.mktemp(f"affinity-{mode}"), softhsm_conf, workers=2)
    env.edit_config("workers = 2", f'workers = 2\ncpu_affinity = "{mode}"')
    log_path = env.config_path.parent / "daemon.log"
    process = _serve_on_two_cpus(env, log_path)
    try:
        workers = _workers(process.pid)
        assert len(workers) == 2, workers
        cpus = [os.sched_getaffinity(pid) for pid in workers]
        # Every thread of a worker (event loop, token, commit, gRPC's) inherits the worker's CPU.
        threads = {frozenset(os.sched_getaffinity(int(t))) for pid in workers for t in os.listdir(f"/proc/{pid}/task")}
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
