"""Prometheus metrics, in prometheus-client's multiprocess mode.

The daemon serves from several worker processes on one port, so each worker writes its
counters and histograms to files in a directory of /dev/shm (PROMETHEUS_MULTIPROC_DIR, set by
the parent before any worker starts and before prometheus_client is imported), and the
parent serves one endpoint (`metrics.listen`) that sums them. Values that live in the
store (CRL number and age, audit chain length, last checkpoint age) are read at scrape
time by the parent, so they are right whichever worker changed them.

prometheus_client is imported lazily: the multiprocess value class is chosen when the
module is first imported, which must come after the directory is set.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from ca_daemon.errors import ConfigError
from ca_daemon.logs import LogThrottle
from ca_daemon.model import KeyStatus
from ca_daemon.thread_names import name_os_thread

log = logging.getLogger(__name__)

_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SHARED_MEMORY = Path("/dev/shm")  # noqa: S108 - a directory of our own is made there with mkdir, see prepare_directory
_DIRECTORY_PREFIX = "ca-daemon-metrics-"
_DIRECTORY_NAME = re.compile(re.escape(_DIRECTORY_PREFIX) + "[0-9a-f]{16}")
# In each metrics directory in shared memory: the daemon that serves its metrics holds it locked (flock) while it runs.
_LOCK_FILE = "supervisor.lock"
_held_locks: list[int] = []
_HANDSHAKE_TIMEOUT_S = 10.0
# The OS name of the thread serving one connection (thread_names.py: `top -H` and /proc tell them from the rest).
CONNECTION_THREAD = "metrics-conn"
# Each connection is served in a thread of the supervisor. A client gets this long (after its TLS handshake)
# to send its request head, in all, however it spaces its bytes; and at most MAX_CONNECTIONS are served at
# once: beyond them the one that has waited longest for its handshake or request head is closed to make room
# (see _Connections). Prometheus sends its whole request at once, from one or two servers.
_REQUEST_HEAD_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256
_REFUSAL_LOG_INTERVAL_S = 60.0
_STORE_FAILURE_LOG_INTERVAL_S = 60.0
# CA keys whose certificate expiry matters: they sign, or are about to, or still sign CRLs.
_SIGNING_OR_ABOUT_TO = (KeyStatus.PENDING, KeyStatus.ACTIVE, KeyStatus.SUPERSEDED)
# The WSGI environ key under which a refused scraper's reason travels to the app.
_REFUSAL = "ca_daemon.metrics_refusal"
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def worker_metrics_collector() -> Any:
    """The workers' counters and histograms, summed from their files in PROMETHEUS_MULTIPROC_DIR.

    prometheus-client's MultiProcessCollector fails the whole scrape (HTTP 500) on a file of zero
    bytes, and a worker killed between creating a file and sizing it leaves one until the daemon
    restarts. Such a file holds no sample yet: it is left out.
    """
    from prometheus_client.multiprocess import MultiProcessCollector

    class SkipsUnsizedFiles(MultiProcessCollector):
        def collect(self) -> Iterable[Any]:
            files = [path for path in glob.glob(os.path.join(self._path, "*.db")) if _sized(path)]
            return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]

    return SkipsUnsizedFiles(None)  # type: ignore[no-untyped-call]


def _sized(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8  # the header: how much of the file is used
    except FileNotFoundError:  # a dead worker's live gauge, removed since the listing
        return False


def prepare_directory(state_dir: Path, shared_memory: Path = _SHARED_MEMORY) -> Path:
    """Empty the metrics directory and point this process (and the workers it spawns) at it.

    In shared memory (/dev/shm), one directory per state directory, where the host has it; else
    state_dir/metrics. prometheus_client grows its files through mmap: on a full disk a worker
    touching a new page died of SIGBUS, again after each restart, until the supervisor gave up, where
    the full disk should only have made writes UNAVAILABLE. Shared memory is not the database's disk.
    """
    directory = _own_directory_in(shared_memory, state_dir)
    if directory is None:
        directory = state_dir / "metrics"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[_ENV] = str(directory)
    return directory


def _own_directory_in(shared_memory: Path, state_dir: Path) -> Path | None:
    """A new directory of this daemon's in shared_memory, named after its state directory; None if it cannot be made.

    A previous run's is removed first (rmtree leaves a symbolic link alone; the caller holds the state directory's
    lock, so no daemon uses it), and so are those of daemons that no longer run (_remove_abandoned). The directory
    is made under a temporary name with its lock file held, then renamed: under its own name it is never unlocked
    while its daemon runs. shared_memory is everyone's: whatever another user put at that name makes the rename
    fail, and the caller uses the state directory; so it does when shared memory is full.
    """
    if not (shared_memory.is_dir() and os.access(shared_memory, os.W_OK)):
        return None
    _remove_abandoned(shared_memory)
    directory = shared_memory / f"{_DIRECTORY_PREFIX}{hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]}"
    shutil.rmtree(directory, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=shared_memory))  # mode 0700
    except OSError:
        return None
    lock = None
    try:  # shared memory full (the lock file has no room), or another user's name at directory: the state directory
        lock = os.open(staging / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.rename(staging, directory)
    except OSError:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(staging, ignore_errors=True)
        return None
    while _held_locks:  # a directory prepared before in this process (tests): no longer in use
        os.close(_held_locks.pop())
    _held_locks.append(lock)  # held for the life of this process, which serves the directory's metrics
    return directory


def _remove_abandoned(shared_memory: Path) -> None:
    """Remove the metrics directories of daemons that no longer run: their lock file is there and nobody holds it.

    `kill -9` of a daemon left its workers' files in shared memory (the host's RAM) until a daemon of the same state
    directory started again, which may be never. Only this user's directories with a lock file are looked at: one
    without was made by an earlier version, whose daemon may still run. What is removed is that directory's content,
    through its descriptor, then its name if empty: a daemon of that state directory starting meanwhile puts a new
    directory (never empty: it holds its lock file) at the name, which stays.
    """
    for name in os.listdir(shared_memory):
        if not _DIRECTORY_NAME.fullmatch(name):
            continue
        with contextlib.ExitStack() as closing:
            try:
                directory = os.open(shared_memory / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                closing.callback(os.close, directory)
                if os.fstat(directory).st_uid != os.geteuid():
                    continue
                lock = os.open(_LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
                closing.callback(os.close, lock)
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # gone meanwhile, not a directory, no lock file, or its daemon runs (BlockingIOError)
                continue
            for entry in os.listdir(directory):
                with contextlib.suppress(OSError):
                    os.unlink(entry, dir_fd=directory)
            try:
                os.rmdir(shared_memory / name)
            except OSError:
                continue
            log.info("metrics: removed %s, left by a daemon that no longer runs", shared_memory / name)


class RequestMetrics:
    """A worker's request and HSM metrics (no-ops unless the metrics directory is set)."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get(_ENV))
        if not self.enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram

        self._requests = Counter("ca_daemon_requests", "gRPC requests by method and status code", ["method", "code"])
        self._latency = Histogram(
            "ca_daemon_request_duration_seconds", "gRPC request latency by method and status code", ["method", "code"], buckets=_BUCKETS
        )
        self._hsm_sign = Histogram("ca_daemon_hsm_sign_duration_seconds", "Latency of one signature in the HSM", buckets=_BUCKETS)
        self._tls_refused = Counter("ca_daemon_tls_handshakes_refused", "TLS handshakes the mTLS front end refused, by reason", ["reason"])
        self._connections_closed = Counter(
            "ca_daemon_connections_closed",
            "Connections the mTLS front end closed at one of its own limits (server.max_connections, "
            "server.tls_handshakes_per_client, the share without a client certificate), by limit",
            ["limit"],
        )
        # Sampled each second rather than moved on every call: a multiprocess gauge update takes a lock and writes a file.
        self._in_flight = Gauge(
            "ca_daemon_calls_in_flight",
            "gRPC calls the workers are handling, sampled each second (health and reflection not counted); "
            "each worker refuses calls beyond server.max_calls_in_flight",
            multiprocess_mode="livesum",
        )

    def request(self, method: str, code: str, seconds: float) -> None:
        if self.enabled:
            self._requests.labels(method, code).inc()
            self._latency.labels(method, code).observe(seconds)

    def hsm_sign(self, seconds: float) -> None:
        if self.enabled:
            self._hsm_sign.observe(seconds)

    def calls_in_flight(self, calls: int) -> None:
        if self.enabled:
            self._in_flight.set(calls)

    def tls_handshake_refused(self, reason: str) -> None:
        if self.enabled:
            self._tls_refused.labels(reason).inc()

    def connection_closed(self, limit: str) -> None:
        if self.enabled:
            self._connections_closed.labels(limit).inc()

    def expect_tls_refusals(self, reasons: Iterable[str]) -> None:
        """Expose each reason's counter at 0 before its first refusal, so `increase()` counts that one too.

        Prometheus sees no increase in a series whose first sample is already 1: a lone client rejecting
        our certificate left CaDaemonServerCertificateRejected (increase over 10 m > 0) at 0.
        """
        if self.enabled:
            for reason in reasons:
                self._tls_refused.labels(reason)

    def expect_closed_connections(self, limits: Iterable[str]) -> None:
        """Expose each limit's counter at 0 before its first closure (see expect_tls_refusals)."""
        if self.enabled:
            for limit in limits:
                self._connections_closed.labels(limit)


class StoreCollector:
    """Gauges read at scrape time: CRL number and age, audit chain, and when certificates expire.

    The expiry gauges exist to be alerted on: a CA certificate that runs out stops issuance
    and every chain built on it, a TLS server certificate that runs out stops every client.
    """

    def __init__(self, store: Any, tls_cert_file: Path | None = None, *, deltas: bool = True) -> None:
        self._store = store
        self._tls_cert_file = tls_cert_file
        # `[crl] delta`: with false no delta series, though the store may hold one from when deltas were on: its age
        # grew for ever and CaDaemonDeltaCrlStale fired for a CRL that is meant to be gone.
        self._kinds = (False, True) if deltas else (False,)
        self._failures = LogThrottle(_STORE_FAILURE_LOG_INTERVAL_S)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from ca_daemon.store.audit_store import AuditStore
        from ca_daemon.tls import server_certificate_expiry

        number = GaugeMetricFamily("ca_daemon_crl_number", "Number of the last published CRL", labels=["issuer", "kind"])
        age = GaugeMetricFamily("ca_daemon_crl_age_seconds", "Seconds since the last published CRL's thisUpdate", labels=["issuer", "kind"])
        chain = GaugeMetricFamily("ca_daemon_audit_chain_length", "Events in the hash-chained audit log")
        checkpoint = GaugeMetricFamily(
            "ca_daemon_audit_checkpoint_age_seconds",
            "Seconds since the last signed audit checkpoint (before the first one: since the first event)",
        )
        ca_expiry = GaugeMetricFamily(
            "ca_daemon_ca_certificate_expiry_seconds",
            "Seconds until the certificate of a CA key that is pending, active or superseded expires",
            labels=["issuer", "status"],
        )
        tls_expiry = GaugeMetricFamily(
            "ca_daemon_tls_certificate_expiry_seconds", "Seconds until the TLS server certificate (tls.cert) expires"
        )
        readable = GaugeMetricFamily(
            "ca_daemon_store_readable",
            "1 if this scrape read the store's gauges, 0 if it could not (the CRL, audit and CA expiry series are then missing)",
        )
        now = datetime.now(UTC)
        tls_not_after = server_certificate_expiry(self._tls_cert_file) if self._tls_cert_file is not None else None
        if tls_not_after is not None:
            tls_expiry.add_metric([], (tls_not_after - now).total_seconds())
        try:
            for key in self._store.list_ca_keys():
                if key.certificate_der is not None and key.status in _SIGNING_OR_ABOUT_TO:
                    not_after = x509.load_der_x509_certificate(key.certificate_der).not_valid_after_utc
                    ca_expiry.add_metric([key.key_id, key.status.value], (not_after - now).total_seconds())
                for delta in self._kinds:
                    crl = self._store.latest_crl(key.key_id, delta=delta, with_der=False)
                    if crl is not None:
                        kind = "delta" if delta else "full"
                        number.add_metric([key.key_id, kind], crl.crl_number)
                        age.add_metric([key.key_id, kind], (now - crl.this_update).total_seconds())
            audit = AuditStore(self._store)
            head = audit.head(counted=False)  # every scrape: the count would read the whole log
            chain.add_metric([], head.count if head is not None else 0)
            last = audit.last_checkpoint()
            if last is not None:
                checkpoint.add_metric([], (now - last.time).total_seconds())
            elif head is not None:
                # No checkpoint was ever signed (say, the audit key is unusable from the first start): the
                # log has gone unsigned since its first event. Left out, the series would be absent and
                # an alert on it (CaDaemonAuditCheckpointStale) could never fire.
                first = audit.first_event_time()
                if first is not None:
                    checkpoint.add_metric([], (now - first).total_seconds())
        except Exception as exc:
            # A scrape must not fail because the store is briefly busy; but missing series fire no staleness
            # alert, so the failure is a gauge of its own (CaDaemonStoreUnreadable) and a log line.
            readable.add_metric([], 0)
            held_back = self._failures.admit("store")
            if held_back is not None:
                log.warning(
                    "metrics: cannot read the store's gauges%s: %s",
                    f" ({held_back} more scrape(s) failed in the last {_STORE_FAILURE_LOG_INTERVAL_S:.0f} s)" if held_back else "",
                    str(getattr(exc, "orig", exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                )
        else:
            readable.add_metric([], 1)
        yield from (number, age, chain, checkpoint, ca_expiry, tls_expiry, readable)


class ReloadStatus:
    """Whether the last configuration reload was put in force, as Prometheus reports its own.

    A refused reload leaves the daemon serving the previous configuration, and a later
    restart would fail on the file: an ERROR line alone is easily missed, so it is alerted on.
    The parent records its verdict (it runs every check a worker runs) and serves the gauges.
    """

    def __init__(self) -> None:
        self.successful = True
        self.success_time = time.time()

    def record(self, accepted: bool) -> None:
        self.successful = accepted
        if accepted:
            self.success_time = time.time()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "ca_daemon_config_last_reload_successful",
            "1 if the last configuration reload was put in force (or none was asked for since start), 0 if it was refused",
            value=1 if self.successful else 0,
        )
        yield GaugeMetricFamily(
            "ca_daemon_config_last_reload_success_timestamp_seconds",
            "Unix time the configuration in force was loaded (start, or the last reload put in force)",
            value=self.success_time,
        )


def serve(
    listen: str,
    store: Any,
    tls_context: ssl.SSLContext | None = None,
    tls_cert_file: Path | None = None,
    admit: Callable[[ssl.SSLSocket], str | None] | None = None,
    reload_status: ReloadStatus | None = None,
    *,
    deltas: bool = True,
) -> Any:
    """Start the endpoint in this (parent) process: multiprocess sums plus the store gauges (deltas: `[crl] delta`).

    With tls_context (see tls.metrics_context) the endpoint is HTTPS with client certificates,
    and admit judges each request's client (None: served; else the reason, answered 403).
    prometheus-client's own TLS option has no minimum protocol version, so the server is
    built here from its WSGI app, as its start_http_server does.
    """
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class QuietHandler(WSGIRequestHandler):
        timeout = _REQUEST_HEAD_TIMEOUT_S  # on the socket (setup): no read or write waits longer, in plaintext too

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the socket's own file: closed, or the socket stays open after its close()
            self.input = _DeadlineReader(self.connection, _REQUEST_HEAD_TIMEOUT_S)
            self.rfile = io.BufferedReader(self.input)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not worth a log line each."""

        def get_environ(self) -> dict[str, Any]:
            """The request, with the verdict on the client behind its TLS connection (wsgiref exposes no certificate)."""
            connections.answering(self.connection)  # the head is in: no longer the first to go when the endpoint is full
            environ: dict[str, Any] = super().get_environ()
            # The head is in: the answer's writes (and reads of a body, which no GET has) get the whole timeout again.
            self.input.deadline = time.monotonic() + _REQUEST_HEAD_TIMEOUT_S
            self.connection.settimeout(_REQUEST_HEAD_TIMEOUT_S)
            if admit is not None and isinstance(self.connection, ssl.SSLSocket):
                environ[_REFUSAL] = admit(self.connection)
            return environ

    registry = CollectorRegistry()
    registry.register(worker_metrics_collector())
    registry.register(StoreCollector(store, tls_cert_file, deltas=deltas))
    if reload_status is not None:
        registry.register(reload_status)
    metrics_app = make_wsgi_app(registry)

    def guarded_app(environ: dict[str, Any], start_response: Any) -> Any:
        refusal = environ.get(_REFUSAL)
        if refusal is not None:
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{refusal}\n".encode()]
        return metrics_app(environ, start_response)

    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    connections = _Connections(MAX_CONNECTIONS)
    refusals = LogThrottle(_REFUSAL_LOG_INTERVAL_S)

    class Server(ThreadingWSGIServer):
        address_family = family
        # Replaced by a reload (see use_tls): each connection is wrapped with the context in force.
        tls: ssl.SSLContext | None = tls_context
        # The listen backlog. socketserver's 5 filled as soon as a few clients connected at once (the accept loop
        # starts a thread for each), and the kernel then dropped their SYNs: each waited 1 s to try again.
        request_queue_size = MAX_CONNECTIONS

        def get_request(self) -> tuple[socket.socket, Any]:
            connection, address = self.socket.accept()
            if self.tls is None:
                return connection, address
            connection.settimeout(_HANDSHAKE_TIMEOUT_S)
            # The handshake waits for the client: made here, in the accept loop, each connection that never
            # spoke held every scrape back for the timeout. finish_request makes it in the connection's thread.
            return self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False), address

        def process_request(self, request: Any, client_address: Any) -> None:
            """A thread for the connection, closing the one waiting longest for its head if MAX_CONNECTIONS are served."""
            admitted, made_room = connections.admit(request)
            if made_room or not admitted:
                held_back = refusals.admit("busy")
                if held_back is not None:
                    log.warning(
                        "metrics endpoint: %d connection(s) beyond the %d it serves at once%s: %s",
                        held_back + 1,
                        MAX_CONNECTIONS,
                        f" in the last {_REFUSAL_LOG_INTERVAL_S:.0f} s" if held_back else "",
                        "closed the ones that had waited longest for their request" if admitted else "closed at once, all being answered",
                    )
            if not admitted:
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                connections.done(request)
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            name_os_thread(CONNECTION_THREAD)
            try:
                super().process_request_thread(request, client_address)
            finally:
                connections.done(request)

        def handle_error(self, request: Any, client_address: Any) -> None:
            """A client that goes away, resets, or is too slow is no error of ours; anything else is logged as JSON.

            socketserver's own printed a bare traceback on stderr for each (the log is one JSON object per line).
            """
            if not isinstance(sys.exc_info()[1], OSError):
                log.exception("metrics endpoint: unexpected error serving %s", client_address)

        def finish_request(self, request: Any, client_address: Any) -> None:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.do_handshake()
                except OSError:  # ssl.SSLError and a timeout are OSErrors: a refused handshake, as before
                    return
            super().finish_request(request, client_address)

    try:
        server = make_server(host, int(port), guarded_app, Server, handler_class=QuietHandler)
    except OSError as exc:  # e.g. the port is taken: say which setting, not only "[Errno 98] Address already in use"
        raise ConfigError(f"metrics.listen = {listen!r}: cannot listen there: {exc.strerror}") from None

    def serve_named() -> None:
        name_os_thread()
        server.serve_forever()

    threading.Thread(target=serve_named, name="metrics-http", daemon=True).start()
    return server


class _Connections:
    """The connections being served (at most limit), and those of them still waiting for their handshake or head.

    A cap alone let anyone who reaches the port hold every place with connections that never speak, each
    for its 10 s, and every scrape was closed unanswered (as the CRL server's _make_room explains): at the
    cap the connection that has waited longest is closed for the new one. One being answered keeps its place.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._served: set[socket.socket] = set()
        self._waiting: dict[socket.socket, None] = {}  # oldest first

    def admit(self, connection: socket.socket) -> tuple[bool, bool]:
        """(admitted, whether a waiting connection was closed to admit it)."""
        with self._lock:
            made_room = False
            if len(self._served) >= self._limit:
                if not self._waiting:
                    return False, False
                oldest = next(iter(self._waiting))
                del self._waiting[oldest]
                self._served.discard(oldest)
                # Its thread, blocked in the handshake or a read, wakes at once to an end of file and ends.
                # socket.socket's own shutdown: SSLSocket's drops the TLS object that thread is using.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(oldest, socket.SHUT_RDWR)
                made_room = True
            self._served.add(connection)
            self._waiting[connection] = None
            return True, made_room

    def answering(self, connection: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(connection, None)

    def done(self, connection: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(connection, None)
            self._served.discard(connection)


class _DeadlineReader(io.RawIOBase):
    """A connection's input whose reads end at a deadline, in all (each read gets what is left).

    The socket's own timeout bounds each read: a client sending a byte every few seconds (slowloris)
    would have held its thread for as long as it liked.
    """

    def __init__(self, connection: socket.socket, seconds: float) -> None:
        super().__init__()
        self._connection = connection
        self.deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request head took too long")
        self._connection.settimeout(left)
        return self._connection.recv_into(buffer)


def use_tls(server: Any, tls_context: ssl.SSLContext) -> None:
    """Hand later scrapes a reloaded server certificate and client CA bundle (server from serve())."""
    server.tls = tls_context


def mark_dead(pid: int) -> None:
    if os.environ.get(_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def monotonic() -> float:
    return time.perf_counter()


__all__ = ["MAX_CONNECTIONS", "ReloadStatus", "RequestMetrics", "StoreCollector", "mark_dead", "prepare_directory", "serve"]
