"""A full disk: writes are UNAVAILABLE, the daemon stays up, and signing resumes once there is room.

The state directory lies on a small tmpfs mounted for the test (root only; skipped where mounting
is not allowed). Real daemon with two workers, real token, real SQLite, gRPC over loopback.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ca_daemon import metrics
from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from tests.conftest import Daemon, device_csr, free_port, make_env, mounted_tmpfs, wait_workers_serving
from tests.integration.crl_helpers import stub

pytestmark = pytest.mark.slow


def test_metrics_files_live_in_shared_memory_in_a_directory_of_their_own(tmp_path: Path) -> None:
    """prometheus_client grows its files through mmap: on the database's full disk a worker died of SIGBUS."""
    shared, state = tmp_path / "shm", tmp_path / "state"
    shared.mkdir()
    state.mkdir()
    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    try:
        directory = metrics.prepare_directory(state, shared)
        assert directory.parent == shared and directory.stat().st_mode & 0o777 == 0o700
        (directory / "stale.db").write_bytes(b"x")
        # A previous run's files go; the lock file says the directory's daemon runs (see _remove_abandoned).
        assert [path.name for path in metrics.prepare_directory(state, shared).iterdir()] == ["supervisor.lock"]
        # Someone else's name in the shared directory is never used: the state directory is.
        shutil.rmtree(directory)
        directory.symlink_to(tmp_path)
        assert metrics.prepare_directory(state, shared) == state / "metrics"
        assert directory.is_symlink() and (tmp_path / "shm").exists()
    finally:
        if saved is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved


def test_a_shared_memory_where_the_lock_file_cannot_be_made_leaves_nothing_there_and_the_state_directory_is_used(
    tmp_path: Path,
) -> None:
    """Shared memory has room for the staging directory but not for its lock file (a tmpfs of two inodes: its root and that).

    The lock file's open was outside any try: its OSError ended the start-up and left the `.ca-daemon-metrics-...`
    staging directory behind, where the other failures to make the directory fall back to the state directory.
    """
    state = tmp_path / "state"
    state.mkdir()
    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    with mounted_tmpfs(tmp_path / "shm", "1m", inodes=2) as shared:
        try:
            assert metrics.prepare_directory(state, shared) == state / "metrics"
            assert os.listdir(shared) == []
            (shared / "room").mkdir()  # the inode the lock file could not have: the staging directory's is free again
        finally:
            if saved is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as mount:
        yield mount


def _sign(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    try:
        stub(channel).Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=20)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_full_disk_makes_signing_unavailable_and_it_resumes_without_a_restart(small_disk: Path, softhsm_conf: Path) -> None:
    env = make_env(small_disk, softhsm_conf, workers=2)
    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{free_port()}"')
    daemon = Daemon(env, env.state_dir.parent.parent / "daemon.log").start()  # the log off the small disk
    try:
        # Both workers up before the disk fills: health is SERVING once one serves, and one still starting on the full
        # disk could fail its start and be restarted (the "exited with" the test rules out).
        wait_workers_serving(daemon.log, 2, 60, daemon.process)
        filler = small_disk / "filler"
        with filler.open("wb") as f:  # fill the disk but for a few hundred KiB
            while os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize > 256 * 1024:
                f.write(b"\0" * 65536)
        answers: list[tuple[grpc.StatusCode, str]] = []
        with grpc.insecure_channel(env.target) as channel:
            deadline = time.monotonic() + 60
            while not any(code == grpc.StatusCode.UNAVAILABLE for code, _ in answers):
                assert time.monotonic() < deadline, answers[-5:]
                answers.append(_sign(channel))
            full = [details for code, details in answers if code == grpc.StatusCode.UNAVAILABLE]
            assert "full" in full[0], full[0]
            assert {code for code, _ in answers} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, answers
            for _ in range(20):  # the workers stay up while the disk is full
                assert _sign(channel)[0] == grpc.StatusCode.UNAVAILABLE
            assert daemon.process is not None and daemon.process.poll() is None
            filler.unlink()
            deadline = time.monotonic() + 30
            while (outcome := _sign(channel))[0] != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, outcome
                time.sleep(0.2)
        assert daemon.process is not None and daemon.process.poll() is None
        assert "exited with" not in daemon.log(), daemon.log()[-3000:]  # no worker died (SIGBUS) and was restarted
    finally:
        daemon.stop()
