"""The schedule for full and delta CRLs, run by exactly one process of the daemon.

Every `check_interval` the scheduler looks at each issuer and publishes:
- a full (base) CRL when there is none or the last one is `full_interval` old, then at
  once a delta on it, so the Freshest CRL pointer never names a delta on an older base;
- a delta CRL when the last one is `delta_interval` old, or, with `publish_on_revoke`,
  as soon as the store holds a revocation newer than the last delta (revocations can be
  made by any worker process, so the store is the signal, not a message).

A failed publication is logged, recorded in the store (so every worker's health shows
it under CRL_HEALTH_SERVICE) and retried after a back-off; the last good CRL stays
published. After each publication the bytes are handed to the HTTP server and written
atomically to `crl.directory`. When a key retires, its final full CRL is handed out and its
last delta withdrawn (HTTP and file): no delta follows a final CRL, and the last one would
only go stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2

from ca_daemon.config import Config
from ca_daemon.errors import CaError, ConfigError
from ca_daemon.files import fsync_path, write_atomically
from ca_daemon.hsm import Hsm
from ca_daemon.http import CRL_CONTENT_TYPE, DistributionServer, Resource, url_path
from ca_daemon.logs import RetryLog
from ca_daemon.model import KeyStatus, PublishedCrl, certified_key_id
from ca_daemon.revocation import CrlIssuer, CrlPublisher
from ca_daemon.store import SqlStore
from ca_daemon.store.locks import Leadership
from ca_daemon.store.rotation_store import RotationStore

log = logging.getLogger(__name__)

# The gRPC health service name that reports CRL publication: NOT_SERVING while the last
# attempt of any issuer failed (e.g. its self-check), SERVING otherwise. The overall ("")
# status is not affected: signing still works while a CRL is late.
CRL_HEALTH_SERVICE = "ca_daemon.v1.CRLPublisher"
_RETRY_AFTER = timedelta(seconds=10)
_HEALTH_INTERVAL_S = 1.0


class CrlListener(Protocol):
    """Where published CRLs go besides the store (the HTTP server, files)."""

    def published(self, issuer: CrlIssuer, crl: PublishedCrl) -> None:
        """Hand out crl from now on."""

    def delta_withdrawn(self, issuer: CrlIssuer, last: PublishedCrl | None) -> None:
        """The issuer retired: stop handing out its delta CRL (last, when this process handed one out)."""


class CrlScheduler:
    """Publishes each issuer's CRLs on the configured schedule; keeps the last published in memory."""

    def __init__(self, config: Config, publisher: CrlPublisher, store: SqlStore, leadership: Leadership | None = None) -> None:
        self._config = config
        self._publisher = publisher
        self._store = store
        # With several replicas only the holder of the database's leadership lock publishes;
        # the others follow: they hand out what the leader stored (see run_once).
        self._leadership = leadership
        self._listeners: list[CrlListener] = []
        self._retry_at: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.last: dict[tuple[str, bool], PublishedCrl] = {}
        self._final: set[tuple[str, bool]] = set()
        self._failures = RetryLog(log, "CRL schedule check")

    def subscribe(self, listener: CrlListener) -> None:
        """Tell listener (on the event loop) of every CRL published from now on, and of the latest ones at start."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Hand out what the store already holds (a crash may have come between commit and file write), then run.

        With deltas off, a delta the store holds from when they were on is withdrawn instead (its file removed): it was
        served, written again and never replaced, stale within delta_validity.
        """
        now = datetime.now(UTC)
        for issuer in await asyncio.to_thread(self._publisher.issuers, now):
            for delta in self._kinds():
                crl = await asyncio.to_thread(self._store.latest_crl, issuer.key_id, delta=delta)
                if crl is not None:
                    self._announce(issuer, crl)
            if not self._config.crl.delta:
                self._withdraw_delta(issuer)
        await self.run_once()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="crl-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Check now rather than at the next interval (e.g. after a revocation in this process)."""
        self._wake.set()

    async def _loop(self) -> None:
        interval = self._config.crl.check_interval.total_seconds()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            try:
                await self.run_once()
                self._failures.succeeded()
            except CaError as exc:  # the store (or token) is unavailable: said once, not every round
                self._failures.failed(exc.message)
            except Exception:
                log.exception("CRL schedule check failed; retrying")

    async def run_once(self, now: datetime | None = None) -> list[PublishedCrl]:
        """Publish whatever is due for every issuer; return what was published."""
        now = now or datetime.now(UTC)
        published: list[PublishedCrl] = []
        if self._leadership is not None and not await asyncio.to_thread(self._leadership.poll):
            await self._follow(now)
            return published
        await self._adopt_final_crls(now)
        for issuer in await asyncio.to_thread(self._publisher.issuers, now):
            retry_at = self._retry_at.get(issuer.key_id)
            if retry_at is not None and now < retry_at:
                continue
            try:
                published += await self._publish_due(issuer, now)
                self._retry_at.pop(issuer.key_id, None)
            except CaError:
                self._retry_at[issuer.key_id] = now + _RETRY_AFTER  # logged and recorded by the publisher
        return published

    async def _publish_due(self, issuer: CrlIssuer, now: datetime) -> list[PublishedCrl]:
        cfg = self._config.crl
        published: list[PublishedCrl] = []
        full = await asyncio.to_thread(lambda: self._store.latest_crl(issuer.key_id, delta=False, with_der=False))
        rescoped = issuer.key_id in self._publisher.rescoped
        if full is None or now >= full.this_update + cfg.full_interval or rescoped:
            self._publisher.rescoped.discard(issuer.key_id)  # a new base in the new scope, then a delta on it
            full = await self._publish(issuer, delta=False)
            published.append(full)
        else:
            await self._adopt(issuer, full)
        if not cfg.delta:
            return published
        last_delta = await asyncio.to_thread(lambda: self._store.latest_crl(issuer.key_id, delta=True, with_der=False))
        if last_delta is not None:
            await self._adopt(issuer, last_delta)
        due = last_delta is None or last_delta.base_crl_number != full.crl_number or now >= last_delta.this_update + cfg.delta_interval
        if not due and cfg.publish_on_revoke and last_delta is not None:
            newest_change = await asyncio.to_thread(self._store.max_change_seq, issuer.key_id)
            due = newest_change > last_delta.change_seq
        if due:
            published.append(await self._publish(issuer, delta=True))
        return published

    async def _adopt_final_crls(self, now: datetime) -> None:
        """Hand out the final CRL of each retired key (published by the key ceremony, in any process)."""
        for issuer in await asyncio.to_thread(self._publisher.retired, now):
            if (issuer.key_id, False) in self._final:
                continue
            stored = await asyncio.to_thread(functools.partial(self._store.latest_crl, issuer.key_id, delta=False, with_der=False))
            if stored is not None:
                await self._adopt(issuer, stored)
                self._final.add((issuer.key_id, False))
                self._withdraw_delta(issuer)

    async def _follow(self, now: datetime) -> None:
        """Not the leader: serve the newest CRLs the leader stored, checked every check_interval."""
        await self._adopt_final_crls(now)
        for issuer in await asyncio.to_thread(self._publisher.issuers, now):
            for delta in self._kinds():
                stored = await asyncio.to_thread(functools.partial(self._store.latest_crl, issuer.key_id, delta=delta, with_der=False))
                if stored is not None:
                    await self._adopt(issuer, stored)

    async def _adopt(self, issuer: CrlIssuer, stored: PublishedCrl) -> None:
        """Hand out a CRL another process published (`ca-daemon crl publish`, another replica).

        Without this the HTTP server would keep the older base while serving a delta on the
        newer one, and a relying party could not combine them.
        """
        known = self.last.get((issuer.key_id, stored.is_delta))
        if known is not None and known.crl_number >= stored.crl_number:
            return
        crl = await asyncio.to_thread(lambda: self._store.latest_crl(issuer.key_id, delta=stored.is_delta))
        if crl is not None:
            self._announce(issuer, crl)

    async def _publish(self, issuer: CrlIssuer, *, delta: bool) -> PublishedCrl:
        crl = await asyncio.to_thread(lambda: self._publisher.publish(issuer, delta=delta))
        self._announce(issuer, crl)
        return crl

    def _announce(self, issuer: CrlIssuer, crl: PublishedCrl) -> None:
        self.last[(issuer.key_id, crl.is_delta)] = crl
        for listener in self._listeners:
            try:
                listener.published(issuer, crl)
            except Exception:
                log.exception("a CRL listener failed for CRL %d of %s", crl.crl_number, issuer.key_id)

    def _kinds(self) -> tuple[bool, ...]:
        """The kinds of CRL handed out (is_delta): the full one, and the delta unless `[crl] delta = false`."""
        return (False, True) if self._config.crl.delta else (False,)

    def _withdraw_delta(self, issuer: CrlIssuer) -> None:
        last = self.last.pop((issuer.key_id, True), None)
        for listener in self._listeners:
            try:
                listener.delta_withdrawn(issuer, last)
            except Exception:
                log.exception("a CRL listener failed to withdraw the delta CRL of %s", issuer.key_id)


def crl_file_name(key_id: str, *, delta: bool) -> str:
    return f"{key_id}-delta.crl" if delta else f"{key_id}.crl"


class CrlFileWriter:
    """Writes each published CRL to `directory` atomically: temporary file, fsync, rename, fsync the directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a traceback, and the worker restarted for ever, before
            raise ConfigError(f"crl.directory = {str(directory)!r}: cannot create it: {exc.strerror}") from None

    def published(self, issuer: CrlIssuer, crl: PublishedCrl) -> None:
        write_atomically(self.directory / crl_file_name(issuer.key_id, delta=crl.is_delta), crl.der)

    def delta_withdrawn(self, issuer: CrlIssuer, last: PublishedCrl | None) -> None:
        path = self.directory / crl_file_name(issuer.key_id, delta=True)
        if path.exists():
            path.unlink()
            fsync_path(path.parent)
            log.info("removed %s: CA key %s publishes no more delta CRLs (retired, or [crl] delta = false)", path, issuer.key_id)


def http_routes(config: Config, issuer: CrlIssuer, crl: PublishedCrl) -> list[tuple[str, Resource]]:
    """Where a CRL is served: the URL paths its key's certificates carry (now and before) and /crl/KEY[-delta].crl."""
    urls = issuer.scope.delta_urls if crl.is_delta else issuer.scope.distribution_points
    paths = {url_path(u) for u in urls} | {"/crl/" + crl_file_name(issuer.key_id, delta=crl.is_delta)}
    interval = config.crl.delta_interval if crl.is_delta else config.crl.full_interval
    # Until the next publication, and never past nextUpdate (the server counts that down at each request).
    etag = f'"{issuer.key_id}-{crl.crl_number}"'
    resource = Resource(crl.der, CRL_CONTENT_TYPE, etag, crl.this_update, int(interval.total_seconds()), expires=crl.next_update)
    return [(path, resource) for path in sorted(paths)]


def ca_routes(issuer: CrlIssuer) -> list[tuple[str, Resource]]:
    """The CA certificate at the AIA caIssuers paths its certificates carry (now and before) and at /ca/KEY.der."""
    der = issuer.certificate.public_bytes(serialization.Encoding.DER)
    resource = Resource.certificate(der, issuer.certificate.not_valid_before_utc)
    paths = {f"/ca/{issuer.key_id}.der"} | {url_path(u) for u in issuer.certificate_urls}
    return [(path, resource) for path in sorted(paths)]


class HttpCrlRoutes:
    """Serves each published CRL (and its issuer's certificate) at its URL paths."""

    def __init__(self, config: Config, server: DistributionServer) -> None:
        self._config = config
        self._server = server

    def published(self, issuer: CrlIssuer, crl: PublishedCrl) -> None:
        for path, resource in [*http_routes(self._config, issuer, crl), *ca_routes(issuer)]:
            self._server.set(path, resource)

    def delta_withdrawn(self, issuer: CrlIssuer, last: PublishedCrl | None) -> None:
        if last is None:  # this process served none
            return
        for path, _ in http_routes(self._config, issuer, last):
            # Another key's delta may be served at a shared URL path: only this one is taken down.
            self._server.remove(path, if_body=last.der)


class CrlServices:
    """What the one publishing process runs: scheduler, file writer, HTTP server and CRL health."""

    def __init__(self, config: Config, hsm: Hsm, store: SqlStore) -> None:
        # One candidate process per daemon (this one); across daemons sharing a PostgreSQL
        # database the leadership lock elects the publisher (see store/locks.py).
        self.leadership = Leadership(store.url)
        self._config = config
        self._store = store
        self._ca_task: asyncio.Task[None] | None = None
        publisher = CrlPublisher(config, hsm, store)
        publisher.fence = self.leadership
        self.scheduler = CrlScheduler(config, publisher, store, self.leadership)
        self.http = (
            DistributionServer(config.server.http_listen, max_per_client=config.server.http_connections_per_client)
            if config.server.http_listen
            else None
        )
        if config.crl.directory is not None:
            self.scheduler.subscribe(CrlFileWriter(config.crl.directory))
        if self.http is not None:
            self.scheduler.subscribe(HttpCrlRoutes(config, self.http))

    async def start(self) -> None:
        if self.http is not None:
            await self.http.start()
        await self.scheduler.start()
        if self.http is not None:
            await self._publish_ca_certificates()
            self._ca_task = asyncio.get_running_loop().create_task(self._keep_ca_certificates(), name="ca-certificates")

    async def _keep_ca_certificates(self) -> None:
        interval = self._config.crl.check_interval.total_seconds()
        failures = RetryLog(log, "publishing the CA certificates over HTTP")
        while True:
            await asyncio.sleep(interval)
            try:
                await self._publish_ca_certificates()
                failures.succeeded()
            except CaError as exc:
                failures.failed(exc.message)
            except Exception:
                log.exception("publishing the CA certificates over HTTP failed; retrying")

    async def _publish_ca_certificates(self) -> None:
        """Every CA certificate a relying party may need, at /ca/KEY.der, as soon as it is installed.

        A new key is served here from the moment its certificate is installed: its
        pre-publication (rotation.py), before it signs anything. Link certificates are at
        /ca/links/ISSUER-signs-SUBJECT.der.
        """
        assert self.http is not None
        keys = await asyncio.to_thread(self._store.list_ca_keys)
        links = await asyncio.to_thread(RotationStore(self._store).links)
        for key in keys:
            if key.certificate_der is None or key.status == KeyStatus.DESTROYED:
                continue
            not_before = x509.load_der_x509_certificate(key.certificate_der).not_valid_before_utc
            self.http.set(f"/ca/{key.key_id}.der", Resource.certificate(key.certificate_der, not_before))
        for link in links:
            subject = certified_key_id(link)
            self.http.set(f"/ca/links/{link.issuer_key_id}-signs-{subject}.der", Resource.certificate(link.der, link.not_before))

    def healthy_check(self) -> bool:
        """False while the HTTP port could not be bound (the store holds the publication outcome)."""
        return self.http is None or self.http.bound

    async def stop(self) -> None:
        if self._ca_task is not None:
            self._ca_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ca_task
        await self.scheduler.stop()
        await asyncio.to_thread(self.leadership.release)  # another replica takes over at its next check
        if self.http is not None:
            await self.http.stop()


async def await_first_crls(config: Config, store: SqlStore, key_id: str, timeout: float) -> bool:
    """Wait until the store holds CA key key_id's first full (and delta) CRL; False after timeout.

    A worker that is not the primary calls it before serving: otherwise it could report
    SERVING and answer GetCRL with NOT_FOUND while the primary is still publishing.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    kinds = (False, True) if config.crl.delta else (False,)
    while True:
        found = [await asyncio.to_thread(functools.partial(store.latest_crl, key_id, delta=delta, with_der=False)) for delta in kinds]
        if all(crl is not None for crl in found):
            return True
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def watch_health(servicer: Any, store: SqlStore, local_ok: Callable[[], bool] = lambda: True) -> None:
    """Keep CRL_HEALTH_SERVICE current in this process from the store's record of the last attempts.

    servicer is a grpc_health `health.aio.HealthServicer` (untyped package, hence Any).
    """
    last: bool | None = None
    while True:
        try:
            failures = await asyncio.to_thread(store.crl_failures)
            ok = not failures and local_ok()
        except CaError:
            ok = False
        if ok != last:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            await servicer.set(CRL_HEALTH_SERVICE, status)
            last = ok
        await asyncio.sleep(_HEALTH_INTERVAL_S)


__all__ = [
    "CRL_HEALTH_SERVICE",
    "CrlFileWriter",
    "CrlScheduler",
    "CrlServices",
    "await_first_crls",
    "crl_file_name",
    "watch_health",
    "write_atomically",
]
