"""Each worker's threads carry their names in the OS (thread_names.py), so `top -H` and /proc tell them apart.

Every thread of a worker showed as `python3`: an operator (or the Sign benchmark) could not see whether the token's
thread, the event loop or the group commit was using the CPU. A real daemon, two workers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import pytest

from tests.conftest import Daemon, make_env, wait_workers_serving
from tests.integration.crl_helpers import sign


def _thread_names(pid: int) -> set[str]:
    names = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            names.add((task / "comm").read_text().strip())
    return names


def test_a_workers_threads_are_named_in_the_os(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env = make_env(tmp_path_factory.mktemp("thread-names"), softhsm_conf, workers=2)
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        # Health is SERVING once one worker serves: the other may still be starting, its threads not all made yet.
        wait_workers_serving(daemon.log, 2, 60, daemon.process)
        with grpc.insecure_channel(env.target) as channel:
            sign(channel)
        assert daemon.process is not None
        children = Path(f"/proc/{daemon.process.pid}/task/{daemon.process.pid}/children").read_text().split()
        workers = [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, children
        for worker in workers:
            names = _thread_names(worker)
            assert {"pkcs11_0", "group-commit", "audit-refusals", "audit-events"} <= names, names
    finally:
        daemon.stop()
