"""A real PostgreSQL for the tests, and an isolated database per test or module.

The server is the one named by CA_DAEMON_TEST_PG_URL (a URL whose database may be
administered: CREATE/DROP DATABASE) if set; otherwise a throwaway cluster started here
from the Debian `postgresql` package's binaries (`make test` installs the package), on
a free loopback port, in a temporary directory removed at the end. initdb and postgres
refuse to run as root, so as root the cluster runs as the `postgres` system user the
package creates. Durability settings are off: the tests kill daemons, not the database.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ENV_URL = "CA_DAEMON_TEST_PG_URL"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bindir() -> Path:
    """The newest /usr/lib/postgresql/N/bin that has initdb (Debian keeps them off PATH), else PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name or 0))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError(
        f"no PostgreSQL server binaries (initdb): install the Debian package `postgresql` (make system-deps) or set {ENV_URL}"
    )


class ThrowawayCluster:
    """initdb + pg_ctl start in a temporary directory; stop() removes everything."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="ca-daemon-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = _free_port()
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            entry = pwd.getpwnam(self._user)  # created by the postgresql package
            os.chmod(self.base, 0o700)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=self.base)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}{log}")

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        return self.resume()

    def pause(self, mode: str = "fast") -> None:
        """Stop the server and keep its data (an outage); resume() starts it again on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def resume(self) -> str:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.base}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
                "-c shared_buffers=64MB",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def _admin(server_url: str, statement: str) -> None:
    engine = create_engine(server_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def create_database(server_url: str, prefix: str = "ca_test") -> str:
    """A new, empty database on the server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(server_url, f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    with contextlib.suppress(Exception):
        _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a PostgreSQL server the tests may create databases on."""
    url = os.environ.get(ENV_URL, "")
    if url:
        yield url
        return
    cluster = ThrowawayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[Callable[[], str]]:
    """Make isolated databases on the test server (dropped after the test): `url = pg_database()`."""
    made: list[str] = []

    def make() -> str:
        made.append(create_database(pg_server))
        return made[-1]

    yield make
    for url in made:
        drop_database(pg_server, url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database's URL, once per backend: a SQLite file, then a PostgreSQL database of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ca.db'}"
    make: Callable[[], str] = request.getfixturevalue("pg_database")
    return make()
