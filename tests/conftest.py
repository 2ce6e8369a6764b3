"""Shared fixtures: a real SoftHSM token directory, CA environments and daemon processes.

The test process loads the PKCS#11 module once with one SoftHSM configuration, so all
tokens of a test session live in one session-scoped token directory; each CA
environment gets its own token (label) in it, its own PIN files and its own database.
Daemons run as real `ca-daemon serve` processes on free loopback ports.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_daemon import cli
from tests.pg import pg_database, pg_server, store_url  # noqa: F401 - fixtures: a real PostgreSQL (see tests/pg.py)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CA_DAEMON = str(BIN / "ca-daemon")
_token_numbers = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("softhsm")
    tokens = base / "tokens"
    tokens.mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


@dataclass
class CaEnv:
    """One CA set-up: a token, PIN files, configuration and database."""

    state_dir: Path
    config_path: Path
    token: str
    port: int
    softhsm_conf: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def user_pin(self) -> str:
        return (self.state_dir / "pins" / "user.pin").read_text().strip()

    def edit_config(self, old: str, new: str) -> None:
        text = self.config_path.read_text()
        assert old in text, old
        self.config_path.write_text(text.replace(old, new))

    def serve_metrics(self) -> int:
        """Turn the metrics endpoint on, on a free loopback port (returned), and the CRL server off the default port."""
        port = free_port()
        self.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{port}"')
        self.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")  # the CRL port: not the default other daemons may hold
        return port

    def cli(self, *args: str, check: bool = True, umask: int = -1) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [CA_DAEMON, "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            env=daemon_environment(),
            timeout=120,
            check=False,
            umask=umask,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ca-daemon {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def audit_verifies(self, directory: Path) -> tuple[Path, Path]:
        """`audit verify --live`, then an export with a fresh checkpoint verified offline, each OK with every event covered.

        (the audit public key's file, the export's): for a test that goes on to tamper with the export.
        """
        public, export = directory / "audit.pem", directory / "audit.jsonl"
        self.cli("audit", "public-key", "--out", str(public))
        live = self.cli("audit", "verify", "--live", "--public-key", str(public))
        assert live.stdout.startswith("OK:"), live.stdout
        self.cli("audit", "export", "--out", str(export), "--checkpoint")
        verified = self.cli("audit", "verify", "--file", str(export), "--public-key", str(public))
        assert verified.stdout.startswith("OK:") and "not covered" not in verified.stdout, verified.stdout
        return public, export


def daemon_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)  # the configuration names it
    return env


def make_env(base: Path, softhsm_conf: Path, *, key_type: str = "ec-p256", workers: int = 1, init: bool = True) -> CaEnv:
    """Create a token, PIN files and configuration; with init, also the CA key and root.

    init runs `ca-daemon init` in this process (cli.main, the command's own code): a new interpreter
    for it cost about 0.5 s (more under load) for each of the many environments a session makes.
    Tests of the command itself run it with CaEnv.cli.
    """
    token = f"test-{os.getpid()}-{next(_token_numbers)}"
    state = base / token
    config_path = state / "ca-daemon.toml"
    port = free_port()
    with contextlib.redirect_stdout(None):
        cli.write_dev_setup(state, config_path, token=token, listen=f"127.0.0.1:{port}", workers=workers, softhsm2_conf=softhsm_conf)
    env = CaEnv(state, config_path, token, port, softhsm_conf)
    if init:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["--config", str(config_path), "init", "--key-type", key_type])
        assert code == 0, f"ca-daemon init failed: {out.getvalue()}{err.getvalue()}"
    return env


class Snapshot:
    """A CA environment's files (configuration, database, PIN and TLS files) as set up once; restore() puts them back.

    For a module whose tests each need a fresh daemon on the same set-up and change its files: one
    `ca-daemon init` (and `mtls init`) per module instead of one per test. The token is shared, not restored,
    so the tests may sign with its keys but must not add or remove any: restore() fails if one did.
    """

    def __init__(self, env: CaEnv, copy: Path) -> None:
        self.env = env
        self._copy = copy
        shutil.copytree(env.state_dir, copy, symlinks=True)
        self._token_objects = self._objects_in_token()
        self._restored = 0

    def _objects_in_token(self) -> list[str]:
        """SoftHSM's file store: a directory per token (its label padded to 32 bytes in token.object), a file per object."""
        conf = self.env.softhsm_conf.read_text()
        token_dir = Path(re.findall(r"^directories\.tokendir = (.+)$", conf, re.MULTILINE)[0])
        label = self.env.token.encode().ljust(32)
        (directory,) = [d for d in token_dir.iterdir() if label in (d / "token.object").read_bytes()]
        return sorted(f.name for f in directory.glob("*.object") if f.name != "token.object")

    def restore(self) -> CaEnv:
        """The files as they were when the snapshot was taken; no process may be using them.

        The files the previous test left (its daemon's log too) are kept beside them, numbered.
        """
        assert self._objects_in_token() == self._token_objects, f"a test added or removed keys in token {self.env.token}"
        self._restored += 1
        self.env.state_dir.rename(self.env.state_dir.with_name(f"{self.env.state_dir.name}.{self._restored}"))
        shutil.copytree(self._copy, self.env.state_dir, symlinks=True)
        return self.env


@pytest.fixture(scope="session")
def ca_env(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> CaEnv:
    """A shared EC P-256 CA for tests that only read or add independent certificates."""
    return make_env(tmp_path_factory.mktemp("ca"), softhsm_conf)


def spawn_daemon(
    env: CaEnv, log_path: Path, extra_environment: dict[str, str] | None = None, *, umask: int = -1
) -> subprocess.Popen[bytes]:
    """Start `ca-daemon serve` in its own process group, its output appended to log_path."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [CA_DAEMON, "--config", str(env.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**daemon_environment(), **(extra_environment or {})},
            start_new_session=True,
            umask=umask,
        )


def child_processes(parent: int) -> dict[int, bytes]:
    """The processes whose parent is parent, with their command lines (from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent:
            found[int(entry)] = cmdline
    return found


class Daemon:
    """A `ca-daemon serve` process."""

    def __init__(self, env: CaEnv, log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Daemon:
        self.process = spawn_daemon(self.env, self.log_path)
        wait_serving(self.env.target, timeout, self.process, self.log_path)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole daemon (parent and workers), as a crash would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# A channel that met a port nobody listens on yet waits out gRPC's reconnect backoff (1 s, then 1.6 s, ...)
# before it tries again: a daemon polled from start-up was answered up to 2 s after it served. Channels
# that poll a starting daemon retry every 100 ms instead.
FAST_RECONNECT = [(f"grpc.{bound}_reconnect_backoff_ms", 100) for bound in ("initial", "min", "max")]


def wait_serving(target: str, timeout: float, process: subprocess.Popen[bytes] | None = None, log_path: Path | None = None) -> None:
    """Wait until a plaintext (development mode) daemon reports SERVING."""
    with grpc.insecure_channel(target, options=FAST_RECONNECT) as channel:
        wait_channel_serving(channel, timeout, process, lambda: log_path.read_text() if log_path else "")


def wait_channel_serving(
    channel: grpc.Channel,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Callable[[], str] = lambda: "",
    settle: float = 0.0,
) -> None:
    """Poll grpc.health.v1 over channel (plaintext or mTLS) until SERVING; fail early if the daemon exits.

    settle waits a little longer once it answers, so every worker process has started too.
    """
    deadline = time.monotonic() + timeout
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"daemon exited with {process.returncode}: {log()}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                time.sleep(settle)
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"daemon did not become SERVING within {timeout}s: {log()}")


_WORKER_SERVING = re.compile(r"worker \d+ serving gRPC on ")


def wait_workers_serving(
    log: Callable[[], str], workers: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until workers worker processes have logged that they serve gRPC (their servers and signal handlers are up).

    Health answers SERVING as soon as one worker does; tests that need every worker (reloads, fresh connections
    to either) wait for this too. log is read from its start: give each daemon a log of its own.
    """
    deadline = time.monotonic() + timeout
    while len(_WORKER_SERVING.findall(log())) < workers:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"daemon exited with {process.returncode}: {log()}")
        assert time.monotonic() < deadline, f"{workers} worker(s) not serving within {timeout}s: {log()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def daemon(ca_env: CaEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(ca_env, tmp_path_factory.mktemp("log") / "daemon.log").start()
    yield d
    d.stop()


@pytest.fixture
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.env.target) as ch:
        yield ch


_device_numbers = itertools.count(1)


def device_csr(device_id: str | None = None, key: ec.EllipticCurvePrivateKey | None = None, *, pem: bool = True) -> bytes:
    """A CSR as a device would make it: its own key, its device ID as CN."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    device_id = device_id or f"dev-{os.getpid()}-{next(_device_numbers)}"
    with warnings.catch_warnings():  # over-long CNs are wanted in hostile-input tests
        warnings.simplefilter("ignore", UserWarning)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id, _validate=False)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


def at_once(call: Callable[[], object], times: int = 2, timeout: float = 60.0) -> list[object]:
    """call() in `times` threads released together: what each returned or raised (an Exception), in the order they ended."""
    start = threading.Barrier(times)
    outcomes: list[object] = []

    def run() -> None:
        start.wait()
        try:
            outcomes.append(call())
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return outcomes


def openssl_verify(tmp_path: Path, leaf_pem: str, chain_pem: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Verify a leaf against its chain with `openssl verify` (the last chain certificate is the trust anchor)."""
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    root = tmp_path / f"root-{time.monotonic_ns()}.pem"
    root.write_bytes(certs[-1].public_bytes(serialization.Encoding.PEM))
    untrusted = tmp_path / f"untrusted-{time.monotonic_ns()}.pem"
    untrusted.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[:-1]))
    leaf = tmp_path / f"leaf-{time.monotonic_ns()}.pem"
    leaf.write_text(leaf_pem)
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(root)]
    if certs[:-1]:
        args += ["-untrusted", str(untrusted)]
    return subprocess.run([*args, *extra, str(leaf)], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def mounted_tmpfs(directory: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of size ("1m") mounted on directory, made for it (root only; the test is skipped where mounting is not allowed).

    inodes: how many files and directories it holds, its root included (none given: the kernel's default).
    """
    directory.mkdir()
    options = f"size={size}" + ("" if inodes is None else f",nr_inodes={inodes}")
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)]
    result = subprocess.run(mount, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


class CrlServer:
    """CRLs over real HTTP on loopback (a parent CA's, a mirror's): path -> body, changed by the test; other paths are 404."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        bodies = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = bodies.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/pkix-crl")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
