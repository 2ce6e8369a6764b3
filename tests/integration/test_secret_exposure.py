"""Where a PIN could leak from a running daemon: the environment its child processes inherit, argv, logs.

Real `ca-daemon serve` processes with two workers, a real SoftHSM token; the processes are read
from /proc as another process of the same user would read them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import (
    CaEnv,
    child_processes,
    device_csr,
    free_port,
    make_env,
    spawn_daemon,
    wait_channel_serving,
    wait_serving,
    wait_workers_serving,
)

PIN_VARIABLE = "CA_DAEMON_EXPOSURE_TEST_PIN"


def _children(parent: int) -> list[int]:
    """Every process whose parent is parent (the workers and multiprocessing's resource tracker)."""
    return sorted(child_processes(parent))


def _environment_names(pid: int) -> set[str]:
    return {item.split(b"=", 1)[0].decode() for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if item}


def _sign(env: CaEnv) -> None:
    with grpc.insecure_channel(env.target) as channel:
        ca_pb2_grpc.CertificateAuthorityStub(channel).Sign(
            ca_pb2.SignRequest(csr=device_csr(f"exposure-{uuid.uuid4().hex[:12]}"), request_id=str(uuid.uuid4())), timeout=10
        )


@pytest.fixture
def pin_env_daemon(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[tuple[CaEnv, subprocess.Popen[bytes], str]]:
    """A two-worker daemon whose configuration takes the user PIN from an environment variable."""
    env = make_env(tmp_path_factory.mktemp("pin-env"), softhsm_conf, workers=2)
    env.edit_config('pin_file = "pins/user.pin"', f'pin_env = "{PIN_VARIABLE}"')
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")  # the CRL port: not the default other daemons may hold
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path, {PIN_VARIABLE: env.user_pin})
    try:
        wait_serving(env.target, 30, process, log_path)
        # Both workers: the test kills one to see it restarted as after a crash; health is SERVING once one serves.
        wait_workers_serving(log_path.read_text, 2, 60, process)
        yield env, process, log_path.read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_a_pin_from_the_environment_is_not_inherited_by_the_daemons_child_processes(
    pin_env_daemon: tuple[CaEnv, subprocess.Popen[bytes], str],
) -> None:
    """The workers get the PIN from the parent over multiprocessing's pipe, not from an inherited environment, and the
    parent's /proc/PID/environ no longer shows it.

    The variable stayed in the parent's environment, so every process it started inherited it: the
    workers, multiprocessing's resource tracker, and whatever a PKCS#11 module or a worker starts. A
    worker restarted after a crash still logs in.
    """
    env, process, _ = pin_env_daemon
    _sign(env)
    children = _children(process.pid)
    assert len(children) >= 2, children
    pin = env.user_pin
    # The supervisor's own start-up block, which the kernel shows as /proc/PID/environ for its whole life, no longer
    # holds the value either (environ_block.py); its name is left with NULs where the PIN was.
    assert b"ca-daemon" in Path(f"/proc/{process.pid}/cmdline").read_bytes()
    supervisor_environ = Path(f"/proc/{process.pid}/environ").read_bytes()
    assert pin.encode() not in supervisor_environ and f"{PIN_VARIABLE}=".encode() in supervisor_environ
    for pid in children:
        assert PIN_VARIABLE not in _environment_names(pid), f"child {pid} inherited {PIN_VARIABLE}"
        assert pin.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        assert pin.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        restarted = [
            pid for pid in _children(process.pid) if pid not in children and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        if restarted:
            break
        assert time.monotonic() < deadline, "no worker was restarted"
        time.sleep(0.1)
    assert PIN_VARIABLE not in _environment_names(restarted[0])
    log_path = env.state_dir / "daemon.log"
    deadline = time.monotonic() + 30
    while f"worker {restarted[0]} serving gRPC" not in log_path.read_text():
        assert f"worker {restarted[0]} cannot serve" not in log_path.read_text(), log_path.read_text()[-2000:]
        assert time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.1)
    for _ in range(4):
        _sign(env)
    assert pin not in log_path.read_text()


def test_the_sqlite_database_is_private_whatever_the_umask(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """ca.db and its -wal and -shm files are created 0600 under the usual umask 022, like the backups and lock files.

    The database holds every certificate and the audit log (who asked for what, every refusal). It was
    created with the umask's mode (0644): in a state directory an operator made with mkdir (0755), or
    with the store URL pointing elsewhere, every local user could read it; `db backup` already wrote
    its copies 0600.
    """
    env = make_env(tmp_path_factory.mktemp("db-mode"), softhsm_conf, init=False)
    database_dir = env.state_dir.parent / "db"
    database_dir.mkdir(mode=0o755)
    database = database_dir / "ca.db"
    env.edit_config('url = "sqlite:///ca.db"', f'url = "sqlite:///{database}"')

    env.cli("db", "migrate", umask=0o022)  # as an operator whose umask lets every user read new files
    assert database.stat().st_mode & 0o777 == 0o600
    env.cli("init", umask=0o022)
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path, umask=0o022)
    try:
        wait_serving(env.target, 30, process, log_path)
        _sign(env)
        files = sorted(database_dir.iterdir())
        assert {f.name for f in files} >= {"ca.db", "ca.db-wal", "ca.db-shm"}, files
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
        assert {name: mode for name, mode in modes.items() if mode != "0o600"} == {}, modes
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_a_database_other_users_can_read_is_reported_at_start_and_by_check_config_and_left_alone(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """A database made by an older version (0644 under umask 022) kept its mode without a word: every local user could
    read every certificate and the audit log. serve and check-config now name each such file, its mode and the chmod to
    run (one line), and change nothing themselves."""
    import json
    import sqlite3

    env = make_env(tmp_path_factory.mktemp("db-loose"), softhsm_conf)
    database = env.state_dir / "ca.db"
    database.chmod(0o644)  # as an older version left it
    reader = sqlite3.connect(database)  # an open connection keeps the -wal and -shm, which SQLite gives the database's mode
    try:
        reader.execute("SELECT count(*) FROM certificates").fetchone()
        wal, shm = Path(f"{database}-wal"), Path(f"{database}-shm")
        assert wal.stat().st_mode & 0o777 == 0o644 and shm.stat().st_mode & 0o777 == 0o644
        files = f"{database} {wal} {shm}"

        checked = env.cli("check-config")  # a warning, not a failure: exit code 0
        warned = [line for line in checked.stdout.splitlines() if line.startswith("WARN")]
        assert warned == [
            f"WARN  database file: the SQLite database is open to other local users ({database} is mode 0644, {wal} is mode "
            f"0644, {shm} is mode 0644): it holds every certificate and the audit log; ca-daemon leaves existing modes alone, "
            f"so run: chmod 600 {files}"
        ], checked.stdout

        log_path = env.state_dir / "daemon.log"
        process = spawn_daemon(env, log_path)
        try:
            wait_serving(env.target, 30, process, log_path)
            _sign(env)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        warnings = [r["msg"] for r in records if r["level"] == "WARNING" and "open to other local users" in r["msg"]]
        assert len(warnings) == 1 and f"{database} is mode 0644" in warnings[0] and f"chmod 600 {files}" in warnings[0], warnings
        assert {oct(path.stat().st_mode & 0o777) for path in (database, wal, shm)} == {"0o644"}  # not changed behind the operator's back
    finally:
        reader.close()

    for path in database.parent.glob("ca.db*"):
        path.chmod(0o600)
    assert "WARN" not in env.cli("check-config").stdout


def test_callers_learn_the_hsm_or_database_is_unavailable_and_to_retry_not_the_hosts_paths_which_the_log_keeps(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """A Sign caller was told 'PKCS#11 token ... not found in module /usr/lib/softhsm/libsofthsm2.so' or 'the database file
    /var/lib/.../ca.db is gone': the host's file layout, which an authenticated programming service has no use for. It
    now learns what is unavailable and to retry; the daemon's log line of the refused call keeps the whole message."""
    from ca_daemon import config as config_module
    from tests.integration.test_hsm import _token_label

    base = tmp_path_factory.mktemp("paths")
    env = make_env(base, softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    module = config_module.load(env.config_path).hsm.module
    database = env.state_dir / "ca.db"
    log_path = base / "daemon.log"
    process = spawn_daemon(env, log_path)
    refusals: list[str] = []

    def refused_sign() -> str:
        with pytest.raises(grpc.RpcError) as refused:
            _sign(env)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        refusals.append(refused.value.details() or "")
        return refusals[-1]

    try:
        wait_serving(env.target, 30, process, log_path)
        _sign(env)

        away = base / "ca.db.away"
        database.rename(away)
        try:
            message = refused_sign()
            assert "the database file was deleted, moved or replaced while the daemon ran" in message and "retry" in message, message
        finally:
            away.rename(database)
        _sign(env)

        tokens = [d for d in (softhsm_conf.parent / "tokens").iterdir() if _token_label(d) == env.token]
        assert len(tokens) == 1
        token_away = base / "token-away"
        shutil.move(tokens[0], token_away)
        try:
            # The first call finds the session broken; a later one (past the reconnect interval) looks for the token anew.
            deadline = time.monotonic() + 10
            while not any("its token" in message for message in refusals):
                assert time.monotonic() < deadline, refusals
                refused_sign()
                time.sleep(0.3)
        finally:
            shutil.move(token_away, tokens[0])
        message = next(message for message in refusals if "its token" in message)
        assert message == f"the HSM is unavailable: its token {env.token!r} is not reachable; retry later", message
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    for message in refusals:
        assert "/" not in message, message  # no path of any kind
    log = log_path.read_text()
    assert f"the database file {database} is gone" in log
    assert f"PKCS#11 token {env.token!r} not found in module {module}" in log


def test_a_database_driver_reason_reaches_the_caller_without_the_socket_path(tmp_path: Path) -> None:
    """psycopg's reason for a refused connection names the server's Unix socket; the caller's message keeps the reason."""
    from ca_daemon.errors import StoreUnavailable
    from ca_daemon.store import SqlStore

    sockets = tmp_path / "no-server-here"
    sockets.mkdir()
    store = SqlStore(f"postgresql://ca@/ca?host={sockets}")
    try:
        with pytest.raises(StoreUnavailable) as unavailable:
            store.count_certificates()
    finally:
        store.close()
    assert f"{sockets}/.s.PGSQL.5432" in unavailable.value.message, unavailable.value.message
    caller = unavailable.value.caller_message
    assert caller.startswith("the database is unavailable: ") and "No such file or directory" in caller, caller
    assert str(tmp_path) not in caller and ".s.PGSQL" not in caller, caller


def test_silent_connections_to_the_metrics_port_do_not_hold_up_a_scrape(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """With mTLS, TCP connections that never start a TLS handshake leave an auditor's scrape answered at once.

    The endpoint made the TLS handshake in its accept loop, with a 10 s timeout: each silent connection,
    which needs no certificate, only the port, held every scrape back for 10 s, and a few per minute
    kept Prometheus from ever scraping. The handshake is now made in the connection's own thread. And
    more silent connections than metrics.MAX_CONNECTIONS had every scrape closed unanswered for 10 s:
    now the one that has waited longest for its handshake is closed to make room.
    """
    from ca_daemon import metrics

    env = make_env(tmp_path_factory.mktemp("metrics-silent"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "aud:auditor", "--apply")
    metrics_port = free_port()
    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"')
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    clients = tls_dir / "clients"
    try:
        credentials = grpc.ssl_channel_credentials(
            (tls_dir / "ca.pem").read_bytes(), (clients / "aud.key").read_bytes(), (clients / "aud.pem").read_bytes()
        )
        with grpc.secure_channel(f"localhost:{env.port}", credentials) as channel:
            wait_channel_serving(channel, 40, process, log_path.read_text)
        scraper = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
        scraper.load_cert_chain(clients / "aud.pem", clients / "aud.key")
        url = f"https://localhost:{metrics_port}/metrics"
        assert b"ca_daemon_audit_chain_length" in urllib.request.urlopen(url, context=scraper, timeout=10).read()
        # More than the endpoint serves at once: the oldest silent ones are closed to make room for the scrape.
        silent = [socket.create_connection(("127.0.0.1", metrics_port), timeout=10) for _ in range(metrics.MAX_CONNECTIONS + 20)]
        try:
            time.sleep(0.5)  # all accepted before the scrape connects
            started = time.monotonic()
            body = urllib.request.urlopen(url, context=scraper, timeout=25).read()
            took = time.monotonic() - started
        finally:
            for connection in silent:
                connection.close()
        assert b"ca_daemon_audit_chain_length" in body
        assert took < 3, f"the scrape waited {took:.1f} s behind connections that never spoke"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _threads(pid: int, name: str) -> int:
    """The process's threads of this OS thread name (thread_names.py)."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            count += (task / "comm").read_text().strip() == name
    return count


def _closed_by_the_server(connections: list[socket.socket], within: float) -> list[socket.socket]:
    """The connections the server closed (EOF or reset) within `within` seconds; the others are still open."""
    deadline = time.monotonic() + within
    for connection in connections:
        connection.setblocking(False)  # with a timeout, recv waits for data even with MSG_DONTWAIT
    open_ = set(connections)
    closed = []
    while open_ and time.monotonic() < deadline:
        for connection in list(open_):
            try:
                if connection.recv(65536, socket.MSG_DONTWAIT) == b"":
                    closed.append(connection)
                    open_.discard(connection)
            except BlockingIOError:
                pass
            except ConnectionError:
                closed.append(connection)
                open_.discard(connection)
        time.sleep(0.2)
    return closed


def test_idle_and_slow_connections_to_the_metrics_port_are_bounded_and_dropped(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """300 connections that start a request and never finish it, one of them a byte a second (slowloris).

    The endpoint ran each connection in a thread of the supervisor (the parent process) with no timeout
    in development mode: 300 idle connections were 300 threads, still there minutes later, and a local
    process could go on until the supervisor (whose tasks count against the unit's TasksMax together with
    the workers') could neither start a thread nor restart a worker. With mTLS the same held for 10 s
    per connection that never finished its handshake, from anyone who reaches the port. Now at most
    metrics.MAX_CONNECTIONS are served at once (beyond that, the one that has waited longest for its request
    head is closed), and a request head not received within 10 s is dropped; the log stays JSON (a dropped
    client wrote a bare traceback).
    """
    from ca_daemon import metrics

    env = make_env(tmp_path_factory.mktemp("metrics-slowloris"), softhsm_conf)
    metrics_port = env.serve_metrics()
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    connections: list[socket.socket] = []
    try:
        wait_serving(env.target, 90, process, log_path)
        assert b"ca_daemon_audit_chain_length" in urllib.request.urlopen(url, timeout=10).read()
        # The listen backlog (ss's Send-Q of a listening socket) takes a burst: socketserver's 5 made connections made
        # at once wait 1 s each for the kernel to take their SYN again.
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{metrics_port}"], capture_output=True, text=True, check=True).stdout
        assert int(listening.split()[2]) >= metrics.MAX_CONNECTIONS, listening
        for _ in range(300):
            connection = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the empty line that ends the head
            connections.append(connection)
        time.sleep(1)
        # (+2: the first scrape's thread may still be ending, and one closed to make room)
        held = _threads(process.pid, metrics.CONNECTION_THREAD)
        assert 0 < held <= metrics.MAX_CONNECTIONS + 2, f"{held} connection threads: a thread for every connection, whatever their number"
        # The newest: the oldest ones are closed at once to make room for those beyond the cap.
        dribbler, started = connections[-1], time.monotonic()
        while time.monotonic() - started < 20:  # a byte a second: no read waits long, the head never ends
            try:
                dribbler.sendall(b"X")
            except OSError:  # closed by the server
                break
            time.sleep(1)
        assert time.monotonic() - started < 15, "a client sending a byte a second held its connection for 20 s"
        closed = _closed_by_the_server(connections, within=15)
        assert len(closed) == len(connections), f"{len(connections) - len(closed)} of 300 unfinished requests still held open"
        assert b"ca_daemon_audit_chain_length" in urllib.request.urlopen(url, timeout=10).read()
        # The connections' threads are gone (the last scrape's may still be ending). Counted by name: the supervisor's
        # thread pool grows on demand as its own tasks run meanwhile (a count of all its threads was once 3 over).
        assert _threads(process.pid, metrics.CONNECTION_THREAD) <= 1
    finally:
        for connection in connections:
            connection.close()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    not_json = [line for line in log_path.read_text().splitlines() if line and not line.startswith("{")]
    assert not_json == [], not_json[:20]


def test_a_scrape_is_answered_while_more_idle_connections_than_the_cap_are_open(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Connections that never send a request head, more than metrics.MAX_CONNECTIONS, and then a scrape.

    The endpoint served at most MAX_CONNECTIONS at once and closed any connection beyond them unanswered:
    anyone who reaches the port kept every scrape from being answered by keeping that many idle, each
    for the 10 s head timeout, again and again. Now the connection that has waited longest for its head
    is closed to make room, and the scrape is answered at once; the threads stay bounded by the cap.
    """
    from ca_daemon import metrics

    env = make_env(tmp_path_factory.mktemp("metrics-idle"), softhsm_conf)
    metrics_port = env.serve_metrics()
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    beyond = 44
    idle: list[socket.socket] = []
    try:
        wait_serving(env.target, 90, process, log_path)
        assert b"ca_daemon_audit_chain_length" in urllib.request.urlopen(url, timeout=10).read()
        time.sleep(0.2)  # that scrape's thread ends
        idle = [socket.create_connection(("127.0.0.1", metrics_port), timeout=10) for _ in range(metrics.MAX_CONNECTIONS + beyond)]
        time.sleep(0.5)  # all accepted before the scrape connects
        held = _threads(process.pid, metrics.CONNECTION_THREAD)
        assert 0 < held <= metrics.MAX_CONNECTIONS + 1, f"{held} connection threads: a thread for every connection, whatever their number"
        started = time.monotonic()
        body = urllib.request.urlopen(url, timeout=10).read()
        took = time.monotonic() - started
        assert b"ca_daemon_audit_chain_length" in body
        assert took < 3, f"the scrape waited {took:.1f} s behind idle connections"
        closed = _closed_by_the_server(idle, within=1)
        # The oldest ones, one for each connection beyond the cap and one for the scrape; the newer ones keep their place.
        assert set(closed) == set(idle[: beyond + 1]), f"closed {len(closed)}, not the {beyond + 1} oldest"
        assert _threads(process.pid, metrics.CONNECTION_THREAD) <= metrics.MAX_CONNECTIONS + 1
    finally:
        for connection in idle:
            connection.close()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
