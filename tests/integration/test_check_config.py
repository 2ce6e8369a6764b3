"""`ca-daemon check-config` and `ca-daemon db migrate` against a real token, SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import make_env


def _lines(stdout: str) -> dict[str, str]:
    return {line.split(":", 1)[0][6:]: line[:4] for line in stdout.splitlines()}


def test_check_config_reports_each_check_and_fails_on_any(tmp_path: Path, softhsm_conf: Path, pg_database: Callable[[], str]) -> None:
    env = make_env(tmp_path, softhsm_conf)
    ok = env.cli("check-config")
    assert _lines(ok.stdout) == {
        "configuration": "ok  ",
        "PKCS#11 module": "ok  ",
        "PIN": "ok  ",
        "tls": "ok  ",
        "database": "ok  ",
        "token": "ok  ",
        "CA key": "ok  ",
    }, ok.stdout
    assert env.user_pin not in ok.stdout + ok.stderr

    # A fresh PostgreSQL database: reachable, but needs `db migrate`; then the CA key is unknown to it.
    url = pg_database()
    env.edit_config('url = "sqlite:///ca.db"', f'url = "{url}"')
    fresh = env.cli("check-config", check=False)
    assert fresh.returncode == 1 and "FAIL  database" in fresh.stdout and "db migrate" in fresh.stdout, fresh.stdout
    migrated = env.cli("db", "migrate")
    assert "schema at version" in migrated.stdout
    assert env.cli("db", "migrate").stdout.endswith("(up to date)\n")
    after = env.cli("check-config", check=False)
    assert after.returncode == 1 and _lines(after.stdout)["database"] == "ok  " and _lines(after.stdout)["CA key"] == "FAIL", after.stdout
    assert "postgresql" in after.stdout

    # A wrong PIN fails the token check with a reason, and never prints the PIN.
    pin_file = env.state_dir / "pins" / "user.pin"
    pin_file.write_text("0000\n")
    wrong = env.cli("check-config", check=False)
    assert wrong.returncode == 1 and _lines(wrong.stdout)["token"] == "FAIL", wrong.stdout


def test_serve_names_the_metrics_address_it_cannot_listen_on(tmp_path: Path, softhsm_conf: Path) -> None:
    """A taken metrics port stopped the daemon with only "[Errno 98] Address already in use": which of the addresses?"""
    env = make_env(tmp_path, softhsm_conf)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{port}"')
        result = env.cli("serve", check=False)
    assert result.returncode != 0
    assert f"metrics.listen = '127.0.0.1:{port}': cannot listen there: Address already in use" in result.stderr, result.stderr
    # It stopped after writing its pid file, and left it: `ca-daemon reload` would signal whatever process gets that pid.
    assert not (env.state_dir / "ca-daemon.pid").exists()


def test_reload_signals_no_process_through_a_stale_pid_file(tmp_path: Path, softhsm_conf: Path) -> None:
    """A daemon killed with SIGKILL leaves its pid file; the pid may since belong to another process, which SIGHUP ends."""
    env = make_env(tmp_path, softhsm_conf)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (env.state_dir / "ca-daemon.pid").write_text(f"{bystander.pid}\n")
        result = env.cli("reload", check=False)
        assert result.returncode != 0 and "no running ca-daemon found" in result.stderr and "stale" in result.stderr, result.stderr
        time.sleep(0.2)
        assert bystander.poll() is None, "the process named by the stale pid file was signalled"
    finally:
        bystander.kill()
        bystander.wait()
