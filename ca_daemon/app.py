"""The composition root: configuration -> objects -> running servers.

One process serves requests with one event loop, one PKCS#11 thread and one group
commit thread. A single Python process saturates one core well before the token does,
so `serve` runs `server.workers` such processes on the same port (SO_REUSEPORT); each
has its own PKCS#11 initialisation and login, as the module requires. The parent only
validates the set-up, starts the workers, restarts one that dies and forwards signals.
With mTLS, each worker's TLS front end (tls_front.py) terminates TLS on the public port
and relays to the worker's gRPC server on a private loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ca_daemon import config as config_module
from ca_daemon import files, logs, metrics, tls, tls_front
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.access import METRICS, Authenticator, authorize, denial_event
from ca_daemon.audit import AuditLog, AuditReader, Checkpointer
from ca_daemon.authority import (
    Authority,
    check_key_urls,
    check_policy,
    leaf_urls,
    load_active_ca,
    reloadable_part,
    restart_only_changes,
)
from ca_daemon.config import Config
from ca_daemon.crl import CrlServices, await_first_crls, watch_health
from ca_daemon.errors import CaError, ConfigError, FailedPrecondition, PermissionDenied, Unauthenticated
from ca_daemon.hsm import PIN_REFUSED, Hsm, Pkcs11Uri
from ca_daemon.model import AuditEvent
from ca_daemon.registration import VerificationCertificates
from ca_daemon.revocation import MAX_BULK_REQUEST_BYTES, Revocations
from ca_daemon.rotation import KeyCeremony
from ca_daemon.service import (
    SERVICE_NAME,
    CertificateAuthorityServicer,
    ErrorInterceptor,
    KeyCeremonyServicer,
    RequestLog,
    caller_of,
    roles_of,
)
from ca_daemon.store import SqlStore, open_store, sqlite_mode_warning
from ca_daemon.store.audit_store import AuditStore, EventFilter

log = logging.getLogger("ca_daemon")
KEY_CEREMONY_SERVICE = ca_pb2.DESCRIPTOR.services_by_name["KeyCeremony"].full_name

_PR_SET_PDEATHSIG = 1
# A reload (SIGHUP) asked for before this process can act on it: while it starts, or between two
# looks of the parent's loop. SIGHUP's default action would end the process; a worker that ignored
# it while starting missed a reload forwarded meanwhile and served the previous configuration.
_pending = {"reload": False}


def _note_reload(_signum: int, _frame: object) -> None:
    _pending["reload"] = True


def _take_pending_reload() -> bool:
    pending, _pending["reload"] = _pending["reload"], False
    return pending


_HEALTH_INTERVAL_S = 1.0
# The primary worker's warning that the active key is halted by an unfinished emergency: at most one line this often.
_HALTED_KEY_LOG_INTERVAL_S = 60.0
# How long a non-primary worker waits for the primary's first CRLs before it serves anyway.
_FIRST_CRL_WAIT_S = 30.0


def prepare_environment(config: Config) -> None:
    """Point SoftHSM at the configured token directory before the module is loaded."""
    if config.hsm.softhsm2_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(config.hsm.softhsm2_conf)


def connect_hsm(config: Config) -> Hsm:
    prepare_environment(config)
    return Hsm.open(config.hsm.module, config.hsm.token, config.hsm.pin.read())


@contextlib.contextmanager
def connected(config: Config) -> Iterator[tuple[Hsm, SqlStore]]:
    """The token and the store for one command-line job; both are closed however it ends."""
    hsm = connect_hsm(config)
    try:
        store = connect_store(config)
        try:
            yield hsm, store
        finally:
            store.close()
    finally:
        hsm.close()


def connect_store(config: Config) -> SqlStore:
    return open_store(config.store.url, sqlite_synchronous=config.store.sqlite_synchronous)


@dataclass
class Worker:
    """The objects one serving process holds."""

    hsm: Hsm
    store: SqlStore
    authority: Authority
    server: grpc.aio.Server
    port: int
    # CRL schedule, files and HTTP: only in the primary process (see serve()).
    crl: CrlServices | None = None
    audit_log: AuditLog | None = None
    checkpointer: Checkpointer | None = None
    front: tls_front.TlsFrontEnd | None = None
    authenticator: Authenticator | None = None
    request_log: RequestLog | None = None
    health: health_aio.HealthServicer | None = None
    interceptor: ErrorInterceptor | None = None

    async def stop(self, grace: float = 5.0) -> None:
        in_flight = self.interceptor.calls_in_flight if self.interceptor is not None else 0
        log.info("worker %d stopping: %d calls in flight get up to %g s to finish", os.getpid(), in_flight, grace)
        if self.health is not None:  # health watchers (load balancers) hear NOT_SERVING before the port closes
            await self.health.enter_graceful_shutdown()
        if self.front is not None:
            self.front.stop_accepting()  # calls in flight still get their answers during the grace period
        await self.server.stop(grace)
        if self.request_log is not None:
            self.request_log.flush()
        if self.front is not None:
            await self.front.stop()
        if self.crl is not None:
            await self.crl.stop()
        self.authority.close()
        if self.audit_log is not None:
            self.audit_log.close()
        if self.checkpointer is not None:  # at shutdown: sign the head this worker leaves behind
            try:
                await asyncio.to_thread(self.checkpointer.checkpoint)
            except CaError as exc:
                log.error("audit checkpoint at shutdown failed: %s", exc.message)
        self.hsm.close()
        self.store.close()
        log.info("worker %d stopped", os.getpid())


async def start_worker(config: Config, listen: str | None = None, *, primary: bool = False) -> Worker:
    """Open token and store, load the CA and start serving gRPC on listen (default: config).

    The primary worker also publishes CRLs and serves them over HTTP, with this process's
    own HSM connection (one PKCS#11 thread per process); every worker answers GetCRL and
    Revoke from the store.
    """
    hsm = connect_hsm(config)
    try:
        store = connect_store(config)
        store.audit_chain = config.audit.chain
        authority = Authority.load(config, hsm, store)
        checkpointer = Checkpointer(hsm, store, config.audit.key_uri)
        request_metrics = metrics.RequestMetrics()
        front = (
            tls_front.TlsFrontEnd(
                tls.server_context(config),
                config.server.max_connections,
                config.tls.cert_file,
                count_refused_handshake=request_metrics.tls_handshake_refused,
                count_closed_connection=request_metrics.connection_closed,
                handshakes_per_client=config.server.tls_handshakes_per_client,
            )
            if config.tls.enabled
            else None
        )
        if front is not None:
            request_metrics.expect_tls_refusals(tls_front.REFUSAL_REASONS)
            request_metrics.expect_closed_connections(tls_front.CLOSING_LIMITS)
        authenticator = Authenticator.from_config(config)
    except BaseException:
        hsm.close()
        raise
    if request_metrics.enabled:
        hsm.sign_observer = request_metrics.hsm_sign
    audit_log = AuditLog(store, config.store.commit_batch_max)
    interceptor = ErrorInterceptor(
        authenticator,
        audit_log.record,
        request_metrics,
        (lambda context: front.auth_context_of(context.peer())) if front else None,
        config.server.max_calls_in_flight,
    )
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            # Workers share the public port; behind the TLS front end each has a private port of its own.
            ("grpc.so_reuseport", 0 if front else 1),
            ("grpc.max_receive_message_length", max_request_bytes(config)),
            *_pending_call_options(config.server.max_calls_in_flight),
            *_connection_age_options(config.server.max_connection_age_seconds),
        ],
    )
    # Their refusals are recorded as Sign's are: in the authority's refusal log.
    revocations = Revocations(
        store,
        lambda: authority.active.key.key_id,
        reissue_profiles=authority.reissue_profiles,
        caller_profiles=authority.caller_profiles,
        record_refusal=authority.refusals.record,
        deltas=config.crl.delta,
    )
    verification = VerificationCertificates(hsm, store, lambda: authority.active, record_refusal=authority.refusals.record)
    ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(
        CertificateAuthorityServicer(authority, caller_of, roles_of, revocations, verification, AuditReader(store)), server
    )
    ca_pb2_grpc.add_KeyCeremonyServicer_to_server(
        KeyCeremonyServicer(KeyCeremony(config, hsm, store, lambda: authority.policy.source), caller_of, authority.follow_active_key),
        server,
    )
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, KEY_CEREMONY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = listen or config.server.listen
    # With mTLS, gRPC listens in plaintext on a private loopback port behind the TLS front end.
    port = server.add_insecure_port("127.0.0.1:0" if front is not None else address)
    crl = CrlServices(config, hsm, store) if primary else None
    if crl is not None:
        await crl.start()  # before serving, so the first CRLs exist once the server reports SERVING
    elif not await await_first_crls(config, store, authority.active.key.key_id, _FIRST_CRL_WAIT_S):
        log.warning(
            "worker %d: no CRL of %s in the store yet; serving, GetCRL says NOT_FOUND until one is",
            os.getpid(),
            authority.active.key.key_id,
        )
    await server.start()
    if front is not None:
        host, _, public_port = address.rpartition(":")
        port = await front.start(host.strip("[]"), int(public_port), backend_port=port)
    await _set_health(health_servicer, authority.healthy)
    asyncio.get_running_loop().create_task(_watch_health(health_servicer, authority.probe_health))
    if request_metrics.enabled:
        asyncio.get_running_loop().create_task(_sample_calls_in_flight(interceptor, request_metrics), name="calls-in-flight")
    follow = _follow_active_key(authority, config.rotation.poll_interval.total_seconds(), warn_halted=primary)
    asyncio.get_running_loop().create_task(follow, name="key-follow")
    asyncio.get_running_loop().create_task(watch_health(health_servicer, store, crl.healthy_check if crl else lambda: True))
    if primary:
        interval = config.audit.checkpoint_interval.total_seconds()
        asyncio.get_running_loop().create_task(checkpointer.run(interval), name="audit-checkpoints")
        if config.tls.enabled and config.tls.client_crl_refresh.total_seconds() > 0:
            asyncio.get_running_loop().create_task(_keep_client_crl_fresh(config, hsm, store), name="client-crl-refresh")
        if front is not None:
            asyncio.get_running_loop().create_task(_warn_before_server_certificate_expires(front), name="server-cert-expiry")
    return Worker(
        hsm,
        store,
        authority,
        server,
        port,
        crl,
        audit_log,
        checkpointer,
        front,
        authenticator,
        interceptor.request_log,
        health_servicer,
        interceptor,
    )


# Calls in flight on a connection past its age get this long to finish before it closes.
_CONNECTION_AGE_GRACE_MS = 30_000


def max_request_bytes(config: Config) -> int:
    """The largest request message the server takes (grpc.max_receive_message_length).

    The largest request the contract allows is a RevokeBulk of revocation.MAX_BULK_SERIALS serials
    (about 0.66 MB), above a Sign of a max_csr_bytes CSR; 64 KiB is room for the other fields. With
    only the CSR allowed for, about 3,100 serials already ended in RESOURCE_EXHAUSTED from gRPC itself.
    A larger request is refused by gRPC before it reaches a handler.
    """
    return max(config.server.max_csr_bytes, MAX_BULK_REQUEST_BYTES) + 64 * 1024


def _pending_call_options(max_calls_in_flight: int) -> list[tuple[str, int]]:
    """Room in gRPC's queue of calls received but not yet taken up by the event loop.

    Past grpc.server.max_pending_requests (1,000 by default) gRPC refuses some queued calls,
    and every one past its hard limit (3,000): the caller sees CANCELLED or RESOURCE_EXHAUSTED
    with no reason and the daemon never hears of them. In a burst the loop takes calls up more
    slowly than they arrive (151 of 2,000 Sign calls sent at once to a worker were cancelled), so
    the queue holds 16 x the cap: a burst waits there until the loop takes it up, and what is
    beyond the cap is then refused by the ErrorInterceptor, saying why. Measured with 20,000
    calls at once and a cap of 2,048: with this, each was answered OK or UNAVAILABLE with the
    reason; with a queue of twice the cap, gRPC still cancelled 8,826 of them.
    """
    pending = max(1000, 16 * max_calls_in_flight)
    return [("grpc.server.max_pending_requests", pending), ("grpc.server.max_pending_requests_hard_limit", 2 * pending)]


def _connection_age_options(age_seconds: int) -> list[tuple[str, int]]:
    """gRPC's connection age: the client is told (GOAWAY) to open a new connection, transparently.

    Connections are spread over the workers (SO_REUSEPORT) and over replicas (a load
    balancer) only when they are opened; without an age a factory line's long-lived
    connection stays where it landed, also after a worker restart left the other with them all.
    """
    if age_seconds == 0:
        return []
    return [("grpc.max_connection_age_ms", age_seconds * 1000), ("grpc.max_connection_age_grace_ms", _CONNECTION_AGE_GRACE_MS)]


# How often the primary worker looks at the client CA CRL's nextUpdate (and once at start).
_CLIENT_CRL_CHECK_S = 3600.0
_CLIENT_CRL_RETRY_S = 60.0  # after a failed re-signing


async def _keep_client_crl_fresh(config: Config, hsm: Hsm, store: SqlStore) -> None:
    """Re-sign the internal mTLS CA's CRL before it expires: every mTLS call would be refused after (see tls.py)."""
    settings = config.tls
    assert settings.client_crl_file is not None
    crl_file = settings.client_crl_file
    while True:
        wait = _CLIENT_CRL_CHECK_S
        try:
            crl = await hsm.run_async(
                lambda: tls.refresh_client_crl(hsm, store, settings.ca_key_uri, crl_file, settings.client_crl_refresh, datetime.now(UTC))
            )
            if crl is not None:
                log.info("re-signed the client CA CRL %s: %d revoked, next update %s", crl_file, len(crl), crl.next_update_utc)
        except Exception as exc:  # any failure (a full disk: OSError) must not end the task: the CRL would expire
            # Only CaError was caught: a write that failed with OSError ended this task for good, and once the CRL expired
            # every mTLS call was refused. A failure is tried again in a minute, not an hour.
            wait = _CLIENT_CRL_RETRY_S
            reason = exc.message if isinstance(exc, CaError) else f"{type(exc).__name__}: {exc}"
            log.error("could not re-sign the client CA CRL %s (next attempt in %.0f s): %s", crl_file, wait, reason)
        await asyncio.sleep(wait)


# The primary worker warns, hourly, once the TLS server certificate expires within this.
_SERVER_CERT_WARNING = timedelta(days=30)
_SERVER_CERT_CHECK_S = 3600.0


async def _warn_before_server_certificate_expires(front: tls_front.TlsFrontEnd) -> None:
    """Log a warning, hourly, from 30 days before tls.cert expires: after that every client's handshake fails.

    The file is the one the front end serves now, so after a reload that names another
    tls.cert the warnings are about the new certificate.
    """
    while True:
        if front.cert_file is not None:
            await asyncio.to_thread(_warn_if_server_certificate_expires_soon, front.cert_file)
        await asyncio.sleep(_SERVER_CERT_CHECK_S)


def _warn_if_server_certificate_expires_soon(cert_file: Path) -> datetime | None:
    """The certificate's expiry, after a warning if that is less than 30 days away."""
    not_after = tls.server_certificate_expiry(cert_file)
    if not_after is not None and not_after - datetime.now(UTC) < _SERVER_CERT_WARNING:
        log.warning(
            "the TLS server certificate %s expires at %s; renew it with `ca-daemon mtls renew-server --reload` "
            "(or with the PKI that issued it, then `ca-daemon reload`)",
            cert_file,
            not_after.isoformat(),
        )
    return not_after


async def _follow_active_key(authority: Authority, interval: float, *, warn_halted: bool) -> None:
    """Key rotation without a restart: switch to the key the store marks active (see rotation.py).

    From the first round (at start) on, while an emergency has halted the active key and not switched from it (its
    process died in between), every Sign is refused: with warn_halted (one worker per daemon), a poll that finds the
    key halted says so in the log, at most once a minute.
    """
    failures = logs.RetryLog(log, "following the CA key the store marks active")
    halted_lines = logs.LogThrottle(_HALTED_KEY_LOG_INTERVAL_S)
    while True:
        try:
            await authority.follow_active_key()
            failures.succeeded()
            if warn_halted and authority.active_halted_at is not None and halted_lines.admit("halted") is not None:
                notice = await asyncio.to_thread(authority.halted_notice)
                if notice is not None:
                    log.warning("%s", notice)
        except CaError as exc:  # most often the store is unavailable, which every round would repeat
            failures.failed(exc.message)
        except Exception:
            log.exception("could not switch to the newly activated CA key (retrying)")
        await asyncio.sleep(interval)


async def _set_health(servicer: health_aio.HealthServicer, healthy: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _watch_health(servicer: health_aio.HealthServicer, healthy: Callable[[], Awaitable[bool]]) -> None:
    last: bool | None = None
    while True:
        now = await healthy()
        if now != last:
            await _set_health(servicer, now)
            last = now
        await asyncio.sleep(_HEALTH_INTERVAL_S)


async def _sample_calls_in_flight(interceptor: ErrorInterceptor, request_metrics: metrics.RequestMetrics) -> None:
    while True:
        request_metrics.calls_in_flight(interceptor.calls_in_flight)
        await asyncio.sleep(_HEALTH_INTERVAL_S)


async def _serve_forever(
    config: Config, primary: bool = False, after_reload: Callable[[Config | None], None] = lambda _: None, source: Path | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, reloading at SIGHUP: source, the text the daemon checked (a worker of several), else the file."""
    worker = await start_worker(config, primary=primary)
    _settle_garbage_collector()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # A reload reads files, builds TLS contexts and policy, and writes its audit event: in a thread, one at a time.
    # On the event loop it held up every call while it ran, for up to the store's lock wait (30 s) if the database
    # was busy or away.
    one_at_a_time = asyncio.Lock()
    reloads: set[asyncio.Task[None]] = set()

    async def reload_off_the_loop() -> None:
        async with one_at_a_time:
            accepted = await asyncio.to_thread(
                reload_worker,
                worker.authority,
                config.path,
                worker.store,
                worker.authenticator,
                worker.front,
                primary=primary,
                source=source,
            )
        after_reload(accepted)

    def reload() -> None:
        task = loop.create_task(reload_off_the_loop(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info("worker %d serving gRPC on %s", os.getpid(), config.server.listen)
    if _take_pending_reload():  # asked for while this process started: the file may have changed since it was read
        reload()
    await stop.wait()
    if reloads:  # its audit event is written before the store closes
        await asyncio.wait(reloads, timeout=_RELOAD_AT_STOP_S)
    await worker.stop()


# How long a stopping worker waits for a reload in progress (one waiting for the store's lock waits up to 30 s).
_RELOAD_AT_STOP_S = 35.0

# A Sign call allocates thousands of short-lived objects; with the default first-generation
# threshold (700) the collector ran many times per call, and its full collections rescanned
# every start-up object. Measured with the Sign benchmark, three interleaved pairs: p99
# 205/269/218 ms -> 146/178/171 ms, CPU per call 4.71 -> 4.47 ms (medians).
_GC_THRESHOLDS = (50_000, 20, 20)


def _settle_garbage_collector() -> None:
    """After start-up: keep the long-lived objects out of every later collection, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


def reload_worker(
    authority: Authority,
    config_path: Path,
    store: SqlStore | None = None,
    authenticator: Authenticator | None = None,
    front: tls_front.TlsFrontEnd | None = None,
    *,
    primary: bool = True,
    source: Path | None = None,
) -> Config | None:
    """Re-read the configuration and put it in force; on any error keep all of the old one. Audited. The new one, or None.

    In force at once: the policy, [roles], and with mTLS the server certificate and key,
    the client CA bundle and the client CRL file (renewed credentials need no restart).
    Everything new is built and checked before anything is replaced. Each worker reloads
    and audits for itself; only the primary warns of a server certificate about to expire,
    as its hourly check does, so the warning appears once, not once per worker.

    source: where the daemon put the text of config_path it checked before it signalled its workers
    (reload_text_path): each worker of several applies that text, not the file as it finds it when
    the signal reaches it, which may by then be the operator's next, half-saved edit.
    """
    digest = b""
    try:
        data = _read_config(source or config_path)
        digest = hashlib.sha256(data).digest()
        new_config = config_module.loads(data, config_path)
        context, access = _reloaded_tls(new_config, authority.config, front)
        authority.reload(new_config)
    except CaError as exc:
        log.error("reload refused, the previous configuration stays in force: %s", exc.message)
        _audit_reload(store, config_path, digest, authority.config, "refused", exc.message)
        return None
    restart_needed = restart_only_changes(new_config, authority.config)
    if authenticator is not None and access is not None:
        authenticator.adopt(access)
    if front is not None and context is not None:
        front.replace_context(context, new_config.tls.cert_file)
        cert_file = new_config.tls.cert_file
        if cert_file is None:
            expiry = None
        elif primary:
            expiry = _warn_if_server_certificate_expires_soon(cert_file)
        else:
            expiry = tls.server_certificate_expiry(cert_file)
        log.info("reload: TLS server certificate %s in force (expires %s)", cert_file, expiry)
    _audit_reload(store, config_path, digest, authority.config, "applied", "", restart_needed)
    return new_config


def _read_config(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from None


def reload_text_path(config: Config) -> Path:
    """Where a daemon of several workers puts the configuration text it checked, for its workers to reload."""
    return config.state_dir / "ca-daemon.reload.toml"


def _reloaded_tls(new: Config, running: Config, front: tls_front.TlsFrontEnd | None) -> tuple[ssl.SSLContext | None, Authenticator | None]:
    """The TLS context and the authenticator of a reloaded [tls] and [roles], built and checked; (None, None) in development mode."""
    if new.tls.enabled != running.tls.enabled or not new.tls.enabled:  # a switch waits for a restart (Authority.reload logs it)
        return None, None
    return (tls.server_context(new) if front is not None else None), _reloaded_authenticator(new)


def _reloaded_authenticator(new: Config) -> Authenticator:
    """The reloaded [roles], client CAs and client CRL; ConfigError if that CRL would refuse every client."""
    access = Authenticator.from_config(new)
    problem = access.unusable()
    if problem:
        raise ConfigError(f"[tls]: {problem}")
    return access


def _audit_reload(
    store: SqlStore | None,
    config_path: Path,
    digest: bytes,
    running: Config,
    outcome: str,
    reason: str,
    restart_needed: Sequence[str] = (),
    *,
    by_daemon: bool = False,
    daemon_pid: int | None = None,
) -> None:
    """The config.reload event of one worker (or of the daemon, by_daemon, when it refused the file before any worker).

    `ca-daemon reload` waits for these (await_reload): each names the daemon (its pid, the one in
    the pid file, and the host: replicas share a PostgreSQL log) and how many workers it runs,
    so the command counts the answers of the daemon it signalled, and knows how many to expect.
    digest: the SHA-256 of the text read (empty if it could not be read), which the command compares with what it checked.
    """
    if store is None:
        return
    parent = multiprocessing.parent_process()  # a spawned worker's parent is the daemon; a single worker is the daemon
    daemon = daemon_pid or (os.getpid() if by_daemon or parent is None or parent.pid is None else parent.pid)
    details = {"path": str(config_path), "daemon": str(daemon), "host": socket.gethostname(), "workers": str(running.server.workers)}
    event = AuditEvent(
        time=datetime.now(UTC),
        actor=f"daemon-{daemon}" if by_daemon else f"worker-{os.getpid()}",
        action="config.reload",
        outcome=outcome,
        request_digest=digest,
        reason=reason[:512],
        details=details | ({"restart_needed": ", ".join(restart_needed)} if restart_needed else {}),
    )
    try:
        store.append_audit([event])
    except CaError as exc:
        log.error("could not record the configuration reload in the audit log: %s", exc.message)


@dataclass(frozen=True)
class ReloadOutcome:
    """What the signalled daemon's workers recorded of one reload (their config.reload audit events)."""

    workers: int  # how many the daemon runs
    applied: int
    refusals: list[str]  # "actor: reason" of each refusal (a worker's, or the daemon's before any worker)
    restart_needed: list[str]  # settings changed that the workers read at start only (restart_only_changes)
    other_file: bool  # some worker read a file other than the one the command checked (changed in between)

    @property
    def silent(self) -> int:
        """Workers that recorded nothing (in time)."""
        return max(0, self.workers - self.applied - len(self.refusals))


# How long `ca-daemon reload` waits for the workers' config.reload events.
RELOAD_WAIT_S = 15.0


def await_reload(
    store: SqlStore, after_seq: int, daemon_pid: int, config_digest: bytes, timeout_s: float = RELOAD_WAIT_S
) -> ReloadOutcome | None:
    """Wait for the config.reload events the daemon daemon_pid (on this host) writes after after_seq; None if none came.

    Until every worker it runs has answered, the daemon itself has refused the file, or the
    time is up. Events of other daemons (replicas sharing the log) and of other reloads
    before the mark are not counted.
    """
    deadline = time.monotonic() + timeout_s
    host = socket.gethostname()
    mine: list[tuple[dict[str, Any], dict[str, str]]] = []  # (event, its details)
    while True:
        events = AuditStore(store).events(EventFilter(after_seq=after_seq, actions=("config.reload",)), 1000)
        # Each worker's last answer: one that answered two reloads sent close together is one worker, not two.
        latest = {}
        for event in events:
            details = _reload_details(event)
            if (details.get("daemon"), details.get("host")) == (str(daemon_pid), host):
                latest[event["actor"]] = (event, details)
        mine = list(latest.values())
        expected = max((int(details.get("workers", "0") or 0) for _, details in mine), default=0)
        by_daemon = any(str(event["actor"]).startswith("daemon-") for event, _ in mine)
        if (mine and len(mine) >= expected) or by_daemon or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not mine:
        return None
    restart: list[str] = []
    for _, details in mine:
        for setting in details.get("restart_needed", "").split(", "):
            if setting and setting not in restart:
                restart.append(setting)
    return ReloadOutcome(
        workers=expected,
        applied=sum(1 for event, _ in mine if event["outcome"] == "applied"),
        refusals=[f"{event['actor']}: {event['reason']}" for event, _ in mine if event["outcome"] != "applied"],
        restart_needed=restart,
        other_file=any(bytes(event["request_digest"] or b"") not in (b"", config_digest) for event, _ in mine),
    )


def _reload_details(event: dict[str, Any]) -> dict[str, str]:
    try:
        details = json.loads(event["details"])
    except ValueError:
        return {}
    return details if isinstance(details, dict) else {}


def _schedule_as_batch() -> None:
    """Run this worker, and every thread it starts after this, under SCHED_BATCH: a thread woken up does not pre-empt the running one.

    A worker's event loop, token thread and commit thread wake each other many times a
    call; under the default policy each wake-up pre-empted the running thread at once
    (with a worker on one CPU, 13,500 pre-emptions of the event loop in 8 s under load,
    2,700 under SCHED_BATCH), and each switch cost cache refills. Measured here in 15
    alternating pairs of runs: 11 faster, Sign rate +7 % on average (see README).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError) as exc:  # not Linux, or refused by a seccomp profile
        log.warning("cannot run the worker under SCHED_BATCH (%s); it runs under the default policy", exc)


def worker_cpus(mode: str, workers: int, allowed: set[int]) -> list[int | None]:
    """The CPU each worker keeps to (None: wherever the kernel places it).

    With "auto" and at least as many workers as CPUs the daemon may use, worker i keeps to
    the i-th of them (round robin): a worker's threads then share one CPU's caches instead
    of being moved between CPUs. Measured here with 2 workers on 2 CPUs: Sign rate 1,198,
    1,242 and 1,249 /s against 1,023, 1,060 and 1,015 /s unpinned (alternating runs), p99
    45 ms against 52-64 ms. With fewer workers than CPUs nothing is pinned, so a worker's
    threads can still use the idle CPUs.
    """
    cpus = sorted(allowed)
    if mode == "off" or len(cpus) < 2 or workers < len(cpus):
        return [None] * workers
    return [cpus[index % len(cpus)] for index in range(workers)]


def worker_main(
    config_path: str,
    primary: bool = False,
    cpu: int | None = None,
    secrets: dict[str, str] | None = None,
    config_text: str | None = None,
    start_text: str | None = None,
) -> None:
    """Entry point of a spawned worker process; dies with its parent. Worker 0 is the primary.

    secrets: the environment PINs the parent withdrew (config.withdrawn_secrets), passed in multiprocessing's pipe.
    config_text: the configuration in force (the file's text the parent last accepted), so that a worker
    restarted after a crash serves what the others serve, not a file on disk a reload refused or has not read.
    start_text: the file's text the daemon started with, whose settings read at start only the others still
    serve (a reload does not apply them): of config_text, such a worker takes only what a reload applies.
    """
    config_module.adopt_secrets(secrets or {})
    if cpu is not None:  # first, so that every thread the worker starts inherits it
        os.sched_setaffinity(0, {cpu})
    # A reload signal that arrives while the worker starts must not kill it (SIGHUP's default), nor be
    # lost: it is noted, and the worker reloads once it serves (_serve_forever).
    signal.signal(signal.SIGHUP, _note_reload)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    configure_logging()
    if config_text is None:
        config = config_module.load(config_path)
    else:
        config = config_module.parse(tomllib.loads(config_text), Path(config_path).resolve())
        if start_text is not None and start_text != config_text:
            config = reloadable_part(config, config_module.parse(tomllib.loads(start_text), Path(config_path).resolve()))
    if config.server.cpu_scheduling == "batch":
        _schedule_as_batch()
    try:
        asyncio.run(_serve_forever(config, primary, source=reload_text_path(config)))
    except CaError as exc:
        log.error("worker %d cannot serve: %s", os.getpid(), exc.message)
        sys.exit(WORKER_CANNOT_START if isinstance(exc, ConfigError) or exc.rule == PIN_REFUSED else 1)


def check_ready(config: Config) -> None:
    """Fail fast with a one-line reason: token, PIN, store and CA certificate must all be there."""
    hsm = connect_hsm(config)
    try:
        store = connect_store(config)
        try:
            active = load_active_ca(config, hsm, store)
            check_key_urls(store, active.key.key_id, leaf_urls(config, active.key.key_id))
            try:
                hsm.public_key_der(Pkcs11Uri.parse(config.audit.key_uri))
            except CaError:
                raise FailedPrecondition(
                    f"the audit checkpoint key {config.audit.key_uri} is not in the token; run `ca-daemon init` to create it"
                ) from None
            check_tls_files(config)
        finally:
            store.close()
    finally:
        hsm.close()


def check_tls_files(config: Config) -> None:
    """With mTLS: server certificate and key, client CA bundle and CRL must load (ConfigError otherwise)."""
    if config.tls.enabled:
        tls.server_context(config)
        Authenticator.from_config(config)


def try_lock_state_directory(state_dir: Path) -> int | None:
    """The state directory's lock, which a running daemon holds for its lifetime: its fd, or None if held."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "ca-daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _claim(config: Config) -> int:
    """Refuse to start a second daemon on the same state or the same port.

    Workers share the port through SO_REUSEPORT, which would equally let a second daemon
    join it and answer half of the calls; so the parent holds a lock on the state
    directory and checks that nothing listens on the port yet. Returns the lock's fd.
    """
    fd = try_lock_state_directory(config.state_dir)
    if fd is None:
        raise FailedPrecondition(f"another ca-daemon is already running on state directory {config.state_dir}")
    host, _, port = config.server.listen.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host.strip("[]"), int(port))) == 0:
            raise FailedPrecondition(f"something is already listening on {config.server.listen}")
    return fd


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code."""
    configure_logging()
    signal.signal(signal.SIGHUP, _note_reload)  # before the pid file `ca-daemon reload` signals exists
    config.hsm.pin.withdraw()  # before any process starts: workers, the resource tracker, a PKCS#11 module's helpers
    _claim(config)
    check_ready(config)
    if warning := sqlite_mode_warning(config.store.url):
        log.warning("%s", warning)
    started = _write_started_config(config)
    pid_file = write_pid_file(config)
    metrics_server, metrics_store, scrapers, metrics_dir = None, None, None, None
    reload_status = metrics.ReloadStatus()
    try:  # from here on the pid file goes with the process, however it ends
        if config.metrics.listen:
            # Before any worker starts (they inherit the directory) and before prometheus_client is imported.
            metrics_dir = metrics.prepare_directory(config.state_dir)
            metrics_store = connect_store(config)
            tls_context = tls.metrics_context(config) if config.tls.enabled else None
            scrapers = Authenticator.from_config(config) if config.tls.enabled else None
            admit = _metrics_admission(scrapers, metrics_store) if scrapers is not None else None
            metrics_server = metrics.serve(
                config.metrics.listen, metrics_store, tls_context, config.tls.cert_file, admit, reload_status, deltas=config.crl.delta
            )
            scheme = "https" if tls_context else "http"
            log.info("Prometheus metrics on %s://%s/metrics", scheme, config.metrics.listen)

        def after_reload(accepted: Config | None) -> None:
            reload_status.record(accepted is not None)
            if accepted is not None:
                _reload_metrics_tls(config, accepted, metrics_server, scrapers)

        return _serve(config, after_reload)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if metrics_store is not None:
            metrics_store.close()
        if metrics_dir is not None and not metrics_dir.is_relative_to(config.state_dir):
            shutil.rmtree(metrics_dir, ignore_errors=True)  # memory, not disk: nothing of it is needed after a stop
        # The reload text goes too: left behind by a daemon run as root once, it was root's, mode 0600, and the
        # service user's next start could not replace it ('cannot hand the configuration to the workers').
        for written in (pid_file, started, reload_text_path(config)):
            with contextlib.suppress(OSError):
                written.unlink()


def _metrics_admission(scrapers: Authenticator, store: SqlStore) -> Callable[[ssl.SSLSocket], str | None]:
    """Steps 3-5 of client authentication for each scrape, as for an RPC (client CRL, dates, role auditor or admin).

    None admits the scraper; otherwise the reason, which is also an access.deny audit event.
    """

    def admit(connection: ssl.SSLSocket) -> str | None:
        actor = "-"
        try:
            principal = scrapers.authenticate(tls_front.auth_context(connection))
            actor = principal.identity
            authorize(principal, METRICS)
        except (Unauthenticated, PermissionDenied) as refusal:
            try:
                store.append_audit([denial_event(actor, METRICS, refusal)])
            except CaError as exc:
                log.error("could not record a refused metrics scrape in the audit log: %s", exc.message)
            return refusal.message
        return None

    return admit


def _reload_metrics_tls(config: Config, reloaded: Config, metrics_server: object | None, scrapers: Authenticator | None) -> None:
    """After a reload the workers applied: the metrics endpoint takes the reloaded [tls] files and [roles] too."""
    if metrics_server is None or not config.tls.enabled:
        return
    try:
        if not reloaded.tls.enabled:
            return  # switching to development mode needs a restart (the workers say so)
        context = tls.metrics_context(reloaded)
        access = _reloaded_authenticator(reloaded)
    except CaError as exc:
        log.error("reload: the metrics endpoint keeps its TLS credentials and roles: %s", exc.message)
        return
    metrics.use_tls(metrics_server, context)
    if scrapers is not None:
        scrapers.adopt(access)
    log.info("reload: the metrics endpoint uses the reloaded TLS credentials and roles")


def pid_file_path(config: Config) -> Path:
    """Where `serve` writes its pid, for `ca-daemon reload` to signal."""
    return config.state_dir / "ca-daemon.pid"


def started_config_path(config: Config) -> Path:
    """Where `serve` keeps the text of the configuration it started with, for `ca-daemon reload` (running_config)."""
    return config.state_dir / "ca-daemon.started.toml"


def _write_started_config(config: Config) -> Path:
    path = started_config_path(config)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    files.write_atomically(path, config.path.read_bytes())
    return path


def running_config(config: Config) -> Config:
    """The configuration the daemon serving config's state directory started with; config if there is none to read.

    `ca-daemon reload` reads that daemon's config.reload events in that daemon's store, and checks new profiles
    against the CA key active there: a file whose [store] already names the next database (opened only at a
    restart) sent the command to wait for events in a database the daemon never writes (it created it, empty),
    and report after 15 s that no worker had answered, exit 1, when the reload had been applied.
    """
    try:
        return config_module.loads(started_config_path(config).read_bytes(), config.path)
    except (OSError, CaError):
        return config


def signal_reload(config: Config) -> int:
    """Ask the running daemon (SIGHUP to the pid in its pid file) to reload; its pid."""
    pid_file = pid_file_path(config)
    # state_dir is read at start only: a file that already names the next one sends the command there.
    moved = f"; state_dir is read at start only: if you changed it in {config.path}, restart the daemon instead of reloading"
    if not config.state_dir.is_dir():
        raise CaError(f"no running ca-daemon found (state directory {config.state_dir} does not exist){moved}")
    unclaimed = try_lock_state_directory(config.state_dir)
    if unclaimed is not None:
        # No daemon holds the state directory: the pid file is stale (left by a killed daemon), and its pid may
        # now be another process, which SIGHUP would end.
        os.close(unclaimed)
        raise CaError(f"no running ca-daemon found (state directory {config.state_dir} is not in use; pid file {pid_file} is stale){moved}")
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        raise CaError(f"no running ca-daemon found (pid file {pid_file}){moved}") from None
    return pid


def write_pid_file(config: Config) -> Path:
    path = pid_file_path(config)
    path.write_text(f"{os.getpid()}\n")
    return path


def _serve(config: Config, after_reload: Callable[[Config | None], None]) -> int:
    """Serve until stopped; after_reload(accepted) follows each reload the daemon is asked for."""
    if config.server.workers == 1:
        asyncio.run(_serve_forever(config, primary=True, after_reload=after_reload))
        log.info("ca-daemon stopped")
        return 0
    context = multiprocessing.get_context("spawn")
    stopping = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _note_reload)
    in_force = started = _accepted_text(config)
    _hand_to_workers(config, in_force.encode())
    # Worker 0 is the primary: the one process that publishes CRLs and serves HTTP.
    cpus = worker_cpus(config.server.cpu_affinity, config.server.workers, os.sched_getaffinity(0))
    secrets = config_module.withdrawn_secrets()
    workers = [
        context.Process(target=worker_main, args=(str(config.path), index == 0, cpus[index], secrets, in_force, started), daemon=False)
        for index in range(config.server.workers)
    ]
    for process in workers:
        process.start()
    mode = "mTLS" if config.tls.enabled else "development mode, plaintext"
    pinned = f", pinned to CPUs {', '.join(str(cpu) for cpu in cpus)}" if cpus[0] is not None else ""
    log.info("ca-daemon serving gRPC on %s with %d worker processes (%s%s)", config.server.listen, len(workers), mode, pinned)
    restarts = [_Restarts() for _ in workers]
    gave_up = False
    while not stopping:
        time.sleep(0.2)
        if _take_pending_reload():
            try:
                accepted = forward_reload(config, [p.pid for p in workers if p.is_alive() and p.pid is not None])
            except Exception:  # the supervisor outlives any reload: its workers would be left unsupervised
                log.exception("reload failed; the previous configuration stays in force")
                accepted = None
            if accepted is not None:
                in_force = accepted[0]
            after_reload(accepted[1] if accepted is not None else None)
        for index, process in enumerate(workers):
            if process.is_alive() or stopping:
                continue
            if process.exitcode == WORKER_CANNOT_START:
                log.error(
                    "worker %d cannot start (a wrong or locked PIN, or the configuration: see the line above); stopping, "
                    "as restarting it would only try again (a real HSM locks its PIN after a few wrong logins)",
                    process.pid,
                )
                stopping = gave_up = True
                break
            if not restarts[index].due(process):
                continue
            if process.pid is not None:
                metrics.mark_dead(process.pid)
            workers[index] = context.Process(
                target=worker_main, args=(str(config.path), index == 0, cpus[index], secrets, in_force, started), daemon=False
            )
            workers[index].start()
            restarts[index].started()
    log.info("ca-daemon stopping: its workers finish the calls they have")
    for process in workers:
        if process.is_alive():
            process.terminate()
    for process in workers:
        process.join(timeout=15)
        if process.exitcode is None:
            log.error("worker %d did not stop within 15 s; killing it", process.pid)
            process.kill()
            process.join()
    log.info("ca-daemon stopped")
    return 1 if gave_up else 0


# A worker's exit status when retrying cannot help: a PIN the token refused, a configuration error.
WORKER_CANNOT_START = 78  # EX_CONFIG
_RESTART_FIRST_S = 0.5
_RESTART_MAX_S = 30.0
# A worker that ran this long before it exited is restarted at once again: its exit was not a start that keeps failing.
_RESTART_SETTLED_S = 60.0


class _Restarts:
    """When a worker slot's exited process is started again: at once, then after 0.5, 1, 2, ... s, up to 30 s.

    The supervisor used to give up after ten exits per worker in the daemon's lifetime: a token away for
    half a minute, with one worker crashing meanwhile, stopped the whole daemon, where it should resume
    once the token is back. Now it keeps trying, at most twice a minute, for as long as the cause lasts.
    """

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._failures = 0
        self._due: float | None = None

    def due(self, process: multiprocessing.process.BaseProcess) -> bool:
        """Whether to start the slot's worker now; the first call after an exit logs it and sets the delay."""
        now = time.monotonic()
        if self._due is None:
            self._failures = 0 if now - self._started >= _RESTART_SETTLED_S else self._failures + 1
            delay = 0.0 if self._failures == 0 else min(_RESTART_MAX_S, _RESTART_FIRST_S * 2 ** (self._failures - 1))
            self._due = now + delay
            log.warning("worker %d exited with %s; restarting it%s", process.pid, process.exitcode, f" in {delay:g} s" if delay else "")
        return now >= self._due

    def started(self) -> None:
        self._started, self._due = time.monotonic(), None


def forward_reload(running: Config, pids: list[int]) -> tuple[str, Config] | None:
    """Check the new configuration, then have every worker reload it (each re-checks it too).

    The workers are handed the text checked here (reload_text_path), not sent to read the file again:
    each read it when the signal reached it, and one busy for a moment read the operator's next save,
    half-written or not, so the workers could differ. The text, once it passed every check a worker
    runs (the TLS files and each profile's template lint too), and its configuration, for the parent's
    part of the reload (the metrics endpoint) and for workers restarted later; None if the workers keep
    the previous configuration.
    """
    digest = b""
    try:
        data = _read_config(running.path)
        digest = hashlib.sha256(data).digest()
        new = config_module.loads(data, running.path)  # a file not UTF-8 is a ConfigError too (it ended the supervisor)
        _hand_to_workers(running, data)
    except CaError as exc:
        _refused_by_daemon(running, exc.message, digest)
        return None
    text = data.decode("utf-8")
    log.info("reloading the configuration in %d worker(s)", len(pids))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
    try:
        _check_like_a_worker(new, running)
    except CaError as exc:  # each worker refuses it too and logs the whole reason
        log.error(
            "reload: %s is refused by the workers; the metrics endpoint keeps its TLS credentials and roles, "
            "and a worker restarted later the configuration in force",
            exc.message.split(": ", 1)[0],
        )
        return None
    return text, new


def _hand_to_workers(running: Config, data: bytes) -> None:
    """Put the text for the workers' next reload in reload_text_path, whole (written beside it, then renamed), mode 0600."""
    path = reload_text_path(running)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        files.write_atomically(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot hand the configuration to the workers in {path}: {exc.strerror}") from None


def _accepted_text(config: Config) -> str:
    """The configuration file's text as the daemon starts (what a restarted worker reads), checked like config."""
    text = config.path.read_text()
    config_module.parse(tomllib.loads(text), config.path)
    return text


def _refused_by_daemon(running: Config, reason: str, digest: bytes = b"") -> None:
    """A file the daemon refuses before any worker sees it: logged, and audited so `ca-daemon reload` can say why.

    The event is written on a thread of its own: the store may be slow or away, and the
    supervising loop must go on restarting workers and answering SIGTERM meanwhile.
    """
    log.error("reload refused, the previous configuration stays in force: %s", reason)
    pid = os.getpid()

    def record() -> None:
        try:
            store = open_store(running.store.url, sqlite_synchronous=running.store.sqlite_synchronous, migrate=False)
            try:
                _audit_reload(store, running.path, digest, running, "refused", reason, by_daemon=True, daemon_pid=pid)
            finally:
                store.close()
        except Exception as exc:  # CaError, a driver's error: the refusal is logged above either way
            log.error("could not record the refused reload in the audit log: %s", getattr(exc, "message", exc))

    threading.Thread(target=record, name="reload-refusal", daemon=True).start()


def _check_like_a_worker(new: Config, running: Config) -> None:
    """ConfigError where a worker's reload_worker would refuse new: TLS files, client CRL, each profile's template lint."""
    if new.tls.enabled and running.tls.enabled:
        tls.server_context(new)
        _reloaded_authenticator(new)
    store = connect_store(running)
    try:
        check_policy(new, store)
    finally:
        store.close()


def configure_logging() -> None:
    """One JSON object per line on stderr (see logs.py)."""
    logs.configure()
