"""The revocation use cases: revoke, lift a hold, revoke in bulk, and build, sign, check and record CRLs.

Kept beside authority.py (same layer: it uses issuer-level encoding, the HSM and the
store) so the issuance path and the revocation path can change independently.

A revocation is one short transaction: the certificate's revokedCertificate entry is
DER-encoded once, here, and stored with the row, so revoking costs the same with ten or
ten million revocations, and a full CRL is a concatenation of stored entries
(see crl_der.py). CRLs are built from the store only by `CrlPublisher`, which runs in the
one process that schedules them (crl.py); every other process reads the last published
bytes from the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from ca_daemon import crl_der
from ca_daemon.access import authorize_revocation
from ca_daemon.audit import EventRecorder, is_refusal, refusal_event
from ca_daemon.config import Config
from ca_daemon.errors import CaError, FailedPrecondition, InvalidRequest, LintFailure, NotFound, echo
from ca_daemon.hsm import Hsm, Pkcs11Uri
from ca_daemon.http_paths import rename_in_path
from ca_daemon.model import AuditEvent, CaKey, KeyStatus, PublishedCrl, Revocation, RevocationReason
from ca_daemon.policy import parse_serial
from ca_daemon.store import SqlStore
from ca_daemon.store.locks import LEADER_FENCE, Leadership
from ca_daemon.store.sql import CRL_NUMBER_TAKEN, CRL_THIS_UPDATE_BEHIND, ISSUER_FINAL_CRL

log = logging.getLogger(__name__)

# An invalidity date a little ahead of our clock is the caller's clock skew, not a prediction.
_CLOCK_SKEW = timedelta(minutes=5)
# Serials per RevokeBulk call. The receive limit must fit such a request (about 0.7 MB, see below),
# and gRPC decodes a request before it is authorised; a recall of more devices takes several calls.
# The answer (one revocation per serial) stays far below a client's default 4 MiB receive limit.
MAX_BULK_SERIALS = 10_000

# An invalidity date as the caller gave it: none, a time, or the refusal of one that did not convert (a Timestamp out
# of range). The refusal is raised inside revoke, so it is audited as every other refused revocation is.
InvalidityDate = datetime | InvalidRequest | None


def _given(invalidity_date: InvalidityDate) -> datetime | None:
    if isinstance(invalidity_date, InvalidRequest):
        raise invalidity_date
    return invalidity_date


# The longest serial text a RevokeBulk caller may send for one serial: 20 bytes as colon-separated hex
# pairs ("0A:1B:...") are 59 characters; 64 leaves room for a "0x" prefix or spaces around it.
MAX_SERIAL_TEXT = 64
# A RevokeBulkRequest of MAX_BULK_SERIALS such serials: each is a repeated-string element of a 1-byte
# tag, a 1-byte length and the text. The server must accept a request this large (app.py).
MAX_BULK_REQUEST_BYTES = MAX_BULK_SERIALS * (2 + MAX_SERIAL_TEXT)
_ONE_SECOND = timedelta(seconds=1)
# A CRL of a replica whose clock runs ahead is not waited for longer than this; further behind, nothing is published.
_MAX_CLOCK_WAIT = timedelta(seconds=2)
# The rule of a CRL not published because the clock is behind the thisUpdate of the issuer's last CRL.
CRL_CLOCK_BEHIND = "crl-clock-behind"
# X.509 time starts in 1950 (RFC 5280 4.1.2.5); an earlier invalidity date can only be a mistake.
_EARLIEST_INVALIDITY_DATE = datetime(1950, 1, 1, tzinfo=UTC)


def parse_reason(value: int) -> RevocationReason:
    """A CRLReason the caller may ask for: RFC 5280 codes 0-6 and 9 (7 is unused, 8 is delta-only)."""
    try:
        return RevocationReason(value)
    except ValueError:
        raise InvalidRequest(
            f"revocation reason {value} is not one of the RFC 5280 reasons a caller may use",
            rule="reason",
            field="reason",
            expected=", ".join(f"{r.value} ({r.name.lower()})" for r in RevocationReason),
        ) from None


def _reason_label(value: int) -> str:
    """A requested reason as revocation events name it (key_compromise), or its number when it is none."""
    try:
        return RevocationReason(value).name.lower()
    except ValueError:
        return str(value)


def check_invalidity_date(value: datetime | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    if value < _EARLIEST_INVALIDITY_DATE:
        raise InvalidRequest(
            f"invalidity_date {value.isoformat()} is before {_EARLIEST_INVALIDITY_DATE.year}; "
            "it says when the key was (suspected) compromised",
            rule="invalidity-date",
            field="invalidity_date",
            expected=f"a time from {_EARLIEST_INVALIDITY_DATE.date().isoformat()} on, not after now",
        )
    if value > now + _CLOCK_SKEW:
        raise InvalidRequest(
            f"invalidity_date {value.isoformat()} is in the future; it says when the key was (suspected) compromised",
            rule="invalidity-date",
            field="invalidity_date",
            expected=f"a time from {_EARLIEST_INVALIDITY_DATE.date().isoformat()} on, not after now",
        )
    return value.replace(microsecond=0)


def encode_entry(serial: int, revoked_at: datetime, reason: int, invalidity_date: datetime | None) -> bytes:
    """The entry's DER, stored once and copied into every CRL until it leaves them.

    It is read back and compared before it is stored: a malformed entry would make every
    later CRL of its issuer unreadable, and the CRL self-check does not read the entries.
    """
    der = crl_der.revoked_entry(serial, revoked_at, reason, invalidity_date)
    try:
        read = _read_entry(der)
    except (ValueError, KeyError) as exc:
        raise LintFailure(f"the CRL entry of serial {serial:x} does not read back: {exc}", rule="crl-entry") from None
    whole_seconds = (serial, revoked_at.replace(microsecond=0), reason, invalidity_date and invalidity_date.replace(microsecond=0))
    if read != whole_seconds:
        raise LintFailure(f"the CRL entry of serial {serial:x} reads back as {read}, not as it was built", rule="crl-entry")
    return der


_REASON_CODES = {x509.ReasonFlags[reason.name.lower()]: reason.value for reason in RevocationReason} | {
    x509.ReasonFlags.remove_from_crl: crl_der.REMOVE_FROM_CRL
}


def _read_entry(der: bytes) -> tuple[int, datetime, int, datetime | None]:
    """Serial, revocation date, reason code and invalidity date, as cryptography reads them."""
    entry = crl_der.read_entry(der)
    extensions = {extension.oid: extension.value for extension in entry.extensions}
    reason = extensions.get(x509.CRLReason.oid)
    invalidity = extensions.get(x509.InvalidityDate.oid)
    return (
        entry.serial_number,
        entry.revocation_date_utc,
        _REASON_CODES[reason.reason] if isinstance(reason, x509.CRLReason) else RevocationReason.UNSPECIFIED,
        invalidity.invalidity_date_utc if isinstance(invalidity, x509.InvalidityDate) else None,
    )


# How often a CRL is built again when another process stored its number first.
_NUMBER_ATTEMPTS = 3


@dataclass(frozen=True)
class CrlAnswer:
    """GetCRL's answer: the last published CRL, or only its metadata when the caller has it."""

    crl: PublishedCrl
    not_modified: bool


class Revocations:
    """Revoke and unrevoke certificates; answer GetCRL from the last published CRLs."""

    def __init__(
        self,
        store: SqlStore,
        active_key_id: str | Callable[[], str],
        *,
        reissue_profiles: Callable[[], Collection[str]],
        caller_profiles: Callable[[str], Collection[str]],
        record_refusal: EventRecorder | None = None,
        deltas: bool = True,
    ) -> None:
        self._store = store
        # `[crl] delta`: with false GetCRL hands out no delta, not even one the store holds from when they were on.
        self._deltas = deltas
        # Appends a refused call's event, as Sign's are (app.py: Authority.refusals.record); None records nothing
        # (tests of the use case alone). A refused call changes nothing else, so the event is all that is left of it.
        self._record_refusal = record_refusal
        # The profiles in force that allow re-issue (Authority.reissue_profiles, which follows a reload): lifting
        # a hold of any other profile's certificate is refused while its device has another active one.
        self._reissue_profiles = reissue_profiles
        # The profiles a caller may ask Sign for, as reloaded (Authority.caller_profiles): a programmer revokes those only.
        self._caller_profiles = caller_profiles
        # A callable follows key rotation: the worker's current signing key (Authority.active).
        self._active_key_id = active_key_id if callable(active_key_id) else (lambda: active_key_id)
        self._cache: dict[tuple[str, bool], PublishedCrl] = {}

    async def revoke(
        self, serial_text: str, reason: int, invalidity_date: InvalidityDate, actor: str, *, roles: Collection[str]
    ) -> Revocation:
        """Revoke one certificate; durable when this returns. A refusal is audited (certificate.revoke, refused).

        roles are the caller's: they and what the certificate is decide who may revoke it (access.authorize_revocation).
        """
        serial: int | None = None
        try:
            serial = parse_serial(serial_text)
            await self._authorize(serial, actor, roles)
            revoked = await self._record([serial], "", reason, _given(invalidity_date), actor)
        except CaError as refusal:
            await self._refused("certificate.revoke", actor, refusal, serial=serial, details={"requested_reason": _reason_label(reason)})
            raise
        return revoked[0]

    async def _authorize(self, serial: int, actor: str, roles: Collection[str]) -> None:
        """PermissionDenied unless the caller may revoke this certificate; an unknown serial is left to _record (NotFound)."""
        certificate = await asyncio.to_thread(self._store.get_certificate, serial)
        if certificate is not None:
            authorize_revocation(actor, roles, certificate, self._caller_profiles(actor))

    async def revoke_bulk(
        self, serial_texts: list[str], device_id: str, reason: int, invalidity_date: InvalidityDate, actor: str
    ) -> list[Revocation]:
        """Revoke every listed serial and every unrevoked certificate of device_id in one transaction.

        A refusal is one certificate.revoke event (refused, details bulk): the call revoked nothing.
        """
        try:
            return await self._revoke_bulk(serial_texts, device_id, reason, _given(invalidity_date), actor)
        except CaError as refusal:
            details = {"bulk": "true", "serials": str(len(serial_texts)), "requested_reason": _reason_label(reason)}
            await self._refused("certificate.revoke", actor, refusal, device_id=device_id, details=details)
            raise

    async def _revoke_bulk(
        self, serial_texts: list[str], device_id: str, reason: int, invalidity_date: datetime | None, actor: str
    ) -> list[Revocation]:
        if not serial_texts and not device_id:
            raise InvalidRequest(
                "name the certificates to revoke: serials, device_id or both", rule="bulk", field="serials", expected="at least one"
            )
        if len(serial_texts) > MAX_BULK_SERIALS:
            raise InvalidRequest(
                f"{len(serial_texts)} serials in one request; split it",
                rule="bulk",
                field="serials",
                expected=f"at most {MAX_BULK_SERIALS}",
            )
        serials = list(dict.fromkeys(parse_serial(s) for s in serial_texts))
        return await self._record(serials, device_id, reason, invalidity_date, actor)

    async def _record(
        self, serials: list[int], device_id: str, reason: int, invalidity_date: datetime | None, actor: str
    ) -> list[Revocation]:
        checked_reason = parse_reason(reason)
        now = datetime.now(UTC).replace(microsecond=0)
        checked_date = check_invalidity_date(invalidity_date, now)
        return await asyncio.to_thread(
            lambda: self._store.record_revocations(
                serials=serials,
                device_id=device_id,
                reason=checked_reason,
                revoked_at=now,
                invalidity_date=checked_date,
                actor=actor,
                encode_entry=encode_entry,
            )
        )

    async def unrevoke(self, serial_text: str, actor: str) -> Revocation:
        """Lift a certificateHold; the next delta CRL lists the certificate as removeFromCRL.

        Refused (device-unique) while the certificate's device has another active certificate,
        unless its profile allows re-issue: a lift must not give a device two where issuance would not.
        """
        serial: int | None = None
        try:
            serial = parsed = parse_serial(serial_text)
            now = datetime.now(UTC).replace(microsecond=0)
            reissue = self._reissue_profiles()
            return await asyncio.to_thread(
                lambda: self._store.lift_hold(parsed, lifted_at=now, actor=actor, encode_entry=encode_entry, reissue_profiles=reissue)
            )
        except CaError as refusal:
            await self._refused("certificate.unrevoke", actor, refusal, serial=serial)
            raise

    async def _refused(
        self,
        action: str,
        actor: str,
        refusal: CaError,
        *,
        serial: int | None = None,
        device_id: str = "",
        details: dict[str, str] | None = None,
    ) -> None:
        """Record a refused call in the audit log, shaped as Sign's refusals (audit.refusal_event)."""
        if self._record_refusal is not None and is_refusal(refusal):
            await self._record_refusal(refusal_event(action, actor, refusal, serial=serial, device_id=device_id, details=details))

    async def revocation_of(self, serial: int) -> Revocation | None:
        return await asyncio.to_thread(self._store.get_revocation, serial)

    async def get_crl(self, *, delta: bool, issuer_key_id: str, if_newer_than: int) -> CrlAnswer:
        """The last published CRL of a kind; only its metadata when if_newer_than is not older."""
        issuer = issuer_key_id or self._active_key_id()
        if delta and not self._deltas:
            raise NotFound(
                "delta CRLs are off ([crl] delta = false): none is published, and the full CRL lists every revocation; "
                "ask for the full CRL",
                rule="crl",
                field="kind",
            )
        if delta:
            await asyncio.to_thread(self._refuse_delta_of_retired_key, issuer)
        meta = await asyncio.to_thread(lambda: self._store.latest_crl(issuer, delta=delta, with_der=False))
        if meta is None:
            known = await asyncio.to_thread(self._store.get_ca_key, issuer)
            if known is None:
                raise NotFound(f"no CA key {echo(issuer)}", rule="issuer", field="issuer_key_id")
            kind = "delta" if delta else "full"
            raise NotFound(f"no {kind} CRL of CA key {issuer} has been published yet", rule="crl", field="kind")
        if if_newer_than and meta.crl_number <= if_newer_than:
            return CrlAnswer(meta, not_modified=True)
        cached = self._cache.get((issuer, delta))
        if cached is None or cached.crl_number != meta.crl_number:
            fresh = await asyncio.to_thread(lambda: self._store.latest_crl(issuer, delta=delta, with_der=True))
            assert fresh is not None  # CRLs are only pruned below the newest
            cached = self._cache[(issuer, delta)] = fresh
        return CrlAnswer(cached, not_modified=False)

    def _refuse_delta_of_retired_key(self, key_id: str) -> None:
        """A retired key's last delta is stale from its final CRL on: no delta follows that CRL, so none is handed out."""
        key = self._store.get_ca_key(key_id)
        if key is not None and key.status in (KeyStatus.RETIRED, KeyStatus.DESTROYED):
            raise NotFound(
                f"CA key {key_id} is {key.status.value}: its final full CRL replaced its delta CRLs and no delta follows it; "
                "ask for the full CRL",
                rule="crl",
                field="kind",
            )


# ---------------------------------------------------------------------------
# Building and publishing CRLs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CrlIssuer:
    """One CA key that signs CRLs: its certificate, its key in the token and what its CRLs say."""

    key_id: str
    certificate: x509.Certificate
    # None for a retired key: its final CRL is only handed out, never re-signed.
    private_key: CertificateIssuerPrivateKeyTypes | None
    scope: crl_der.CrlScope
    # The AIA caIssuers URLs its certificates carry, now and before (store key_urls): where its certificate is served.
    certificate_urls: tuple[str, ...] = ()


def _with_recorded_urls(issuer: CrlIssuer, recorded: list[tuple[str, str, str]]) -> CrlIssuer:
    """issuer, also routed to every URL its certificates were given before (store key_urls, authority.record_key_urls).

    Certificates keep their CRL Distribution Point and caIssuers URLs for life; the configured ones may have moved since.
    """
    crl = tuple(url for key_id, kind, url in recorded if key_id == issuer.key_id and kind == "crl")
    ca_issuers = tuple(url for key_id, kind, url in recorded if key_id == issuer.key_id and kind == "ca_issuers")
    points = tuple(dict.fromkeys(issuer.scope.distribution_points + crl))
    certificate_urls = tuple(dict.fromkeys(issuer.certificate_urls + ca_issuers))
    if points == issuer.scope.distribution_points and certificate_urls == issuer.certificate_urls:
        return issuer
    scope = dataclasses.replace(issuer.scope, distribution_points=points)
    return dataclasses.replace(issuer, scope=scope, certificate_urls=certificate_urls)


class CrlPublisher:
    """Builds, signs (in the HSM), self-checks and records full and delta CRLs. Blocking: run it off the event loop."""

    def __init__(self, config: Config, hsm: Hsm, store: SqlStore) -> None:
        self._config = config
        self._hsm = hsm
        self._store = store
        self._issuers: dict[str, CrlIssuer] = {}
        # Set by the scheduler of a replicated daemon: the commit is refused unless this process still leads.
        self.fence: Leadership | None = None
        # Issuers whose last full CRL has another scope than the ones now built (see issuers());
        # the scheduler publishes a new full CRL for them before a delta, as a delta must match its base.
        self.rescoped: set[str] = set()

    def issuers(self, now: datetime) -> list[CrlIssuer]:
        """Every CA key that still signs CRLs: the active one and superseded ones until they are retired.

        A pending key signs nothing before its activation (it is only pre-published); a
        retired key published its final CRL (rotation.py) and signs no more.
        """
        found: list[CrlIssuer] = []
        recorded = self._store.key_urls()  # read each time: a worker of a replica may record a key's new URLs
        for key in self._store.list_ca_keys():
            if key.status not in (KeyStatus.ACTIVE, KeyStatus.SUPERSEDED) or key.certificate_der is None:
                continue
            certificate = x509.load_der_x509_certificate(key.certificate_der)
            if certificate.not_valid_after_utc < now:
                continue
            issuer = self._issuers.get(key.key_id)
            if issuer is None:
                issuer = self._issuers[key.key_id] = self._load(key, certificate)
                if self._has_issuing_distribution_point(key.key_id):
                    self.rescoped.add(key.key_id)
            found.append(_with_recorded_urls(issuer, recorded))
        return found

    def _has_issuing_distribution_point(self, key_id: str) -> bool:
        """Whether the key's last full CRL still has the IDP that CRLs of earlier versions carried."""
        full = self._store.latest_crl(key_id, delta=False)
        if full is None:
            return False
        try:
            x509.load_der_x509_crl(full.der).extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        except x509.ExtensionNotFound:
            return False
        return True

    def retired(self, now: datetime) -> list[CrlIssuer]:
        """Retired (and destroyed) keys whose certificate is still valid: their final CRL is still handed out."""
        found: list[CrlIssuer] = []
        for key in self._store.list_ca_keys():
            if key.status not in (KeyStatus.RETIRED, KeyStatus.DESTROYED) or key.certificate_der is None:
                continue
            certificate = x509.load_der_x509_certificate(key.certificate_der)
            if certificate.not_valid_after_utc >= now:
                found.append(_with_recorded_urls(self._load(key, certificate, with_key=False), self._store.key_urls()))
        return found

    def issuer_of(self, key: CaKey) -> CrlIssuer:
        """The CRL issuer of one key, whatever its status (for its final CRL)."""
        assert key.certificate_der is not None
        return _with_recorded_urls(self._load(key, x509.load_der_x509_certificate(key.certificate_der)), self._store.key_urls())

    def publish_final(self, issuer: CrlIssuer, now: datetime | None = None) -> PublishedCrl:
        """The key's last full CRL: every entry, valid until the CA certificate expires (RFC 5280 5.1.2.5).

        No entry is dropped for expiry, so a relying party holding only this CRL still sees
        every revocation the key ever made.
        """
        issuer = dataclasses.replace(issuer, scope=dataclasses.replace(issuer.scope, delta_urls=()))  # no delta will follow

        def build(at: datetime) -> PublishedCrl:
            entries = self._store.crl_entries(issuer.key_id, after_seq=None, drop_expired=None)
            return sign_crl(
                issuer,
                number=self._store.max_crl_number(issuer.key_id) + 1,
                base_number=None,
                this_update=at,
                next_update=max(issuer.certificate.not_valid_after_utc, at + self._config.crl.full_validity),
                entries=entries.der,
                count=entries.count,
                change_seq=entries.change_seq,
            )

        def store(crl: PublishedCrl) -> None:
            self._store.store_crl(crl, _audit(crl, actor="key-ceremony", final="true"), fence=self.fence, final=True)

        crl = self._numbered(issuer, build, store, now, delta=False)
        log.info("published the final CRL %d of %s with %d entries", crl.crl_number, issuer.key_id, crl.entries)
        return crl

    def _next_second(self, key_id: str, now: datetime, *, delta: bool, clock_was_ahead: bool = False) -> datetime:
        """now, or a little later: thisUpdate never goes back, and two CRLs of one kind never share one (whole seconds).

        thisUpdate is the CRL's Last-Modified over HTTP: a client holding a CRL with a later (or the
        same) thisUpdate is told 304 for this one (If-Modified-Since), and OpenSSL, given several full
        CRLs of an issuer, takes the one with the latest thisUpdate, not the highest number. So no CRL gets a thisUpdate
        before that of the issuer's last CRL of either kind (a delta never before its base), and
        one following a CRL of its own kind in the same second waits for the next (publish_on_revoke).
        The wait is at most _MAX_CLOCK_WAIT (a replica whose clock ran a little ahead published the
        last one); a clock further behind (stepped back, a VM restored from a snapshot, a replica
        minutes off) publishes nothing: CRL_CLOCK_BEHIND, a failed publication, until the clock
        passes that thisUpdate. Unless an operator says the clock was ahead when the last CRLs were
        made (clock_was_ahead): those are dated in the future, which relying parties refuse as not
        yet valid, so CRLs dated now must replace them (`ca-daemon crl publish --clock-was-ahead`).
        """
        if clock_was_ahead:
            return now
        last = self._store.latest_crl(key_id, delta=delta, with_der=False)
        other = self._store.latest_crl(key_id, delta=not delta, with_der=False)
        bounds = [(crl, crl.this_update + (_ONE_SECOND if crl.is_delta == delta else timedelta(0))) for crl in (last, other) if crl]
        if all(now >= earliest for _, earliest in bounds):
            return now
        newest, earliest = max(bounds, key=lambda bound: bound[1])
        wait = (earliest - datetime.now(UTC)).total_seconds()
        time.sleep(min(max(wait, 0.0), _MAX_CLOCK_WAIT.total_seconds()))
        later = datetime.now(UTC).replace(microsecond=0)
        if later < earliest:
            kind = "delta" if newest.is_delta else "full"
            raise FailedPrecondition(
                f"the clock ({later.isoformat()}) is behind thisUpdate {newest.this_update.isoformat()} of {kind} CRL "
                f"{newest.crl_number} of {key_id}, published before: a CRL made now would go back in time, so relying parties "
                "and HTTP caches that keep the CRL with the latest thisUpdate would never take it, and its nextUpdate would come "
                f"early by their clocks. Check the system clock (NTP); CRLs of {key_id} are published again once the clock passes "
                f"{earliest.isoformat()}. If instead the clock was ahead when that CRL was made and is right now, relying parties "
                "refuse it as not yet valid: replace it at once with `ca-daemon crl publish --clock-was-ahead`",
                rule=CRL_CLOCK_BEHIND,
            )
        return later

    def _load(self, key: CaKey, certificate: x509.Certificate, *, with_key: bool = True) -> CrlIssuer:
        active_label = Pkcs11Uri.parse(self._config.ca.key_uri).label

        # The configured URLs name the active key; a retired key's CRLs live beside them under its own name.
        def rename(urls: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(rename_in_path(u, active_label, key.key_id) for u in urls) if active_label else urls

        # With deltas off none is published: a full CRL naming one (Freshest CRL) sent relying parties to a 404, and a
        # verifier that follows it refused every certificate.
        delta_urls = rename(self._config.crl.delta_distribution_points) if self._config.crl.delta else ()
        scope = crl_der.CrlScope.for_ca(certificate, rename(self._config.ca.crl_distribution_points), delta_urls)
        private_key = self._hsm.private_key(Pkcs11Uri.parse(key.pkcs11_uri)) if with_key else None
        return CrlIssuer(key.key_id, certificate, private_key, scope, rename(self._config.ca.ca_issuers_urls))  # type: ignore[arg-type]

    def publish(self, issuer: CrlIssuer, *, delta: bool, now: datetime | None = None, clock_was_ahead: bool = False) -> PublishedCrl:
        """Build, sign, check and record the next CRL; on any failure nothing is published and the status says why.

        clock_was_ahead: date it now even if the issuer's last CRLs are dated later (see _next_second); audited as such.
        """

        def store(crl: PublishedCrl) -> None:
            event = _audit(crl, actor="ca-daemon-cli", clock_was_ahead="true") if clock_was_ahead else _audit(crl)
            self._store.store_crl(crl, event, fence=self.fence, clock_was_ahead=clock_was_ahead)

        basis: int | None = None
        try:
            basis = self._store.max_crl_number(issuer.key_id)
            crl = self._numbered(
                issuer, lambda at: self.build(issuer, delta=delta, now=at), store, now, delta=delta, clock_was_ahead=clock_was_ahead
            )
        except CaError as exc:
            if exc.rule in (LEADER_FENCE, ISSUER_FINAL_CRL):  # not a failure: another publisher's CRL stands, and its status
                log.warning("CRL of %s not published: %s", issuer.key_id, exc.message)
                raise
            log.error("CRL of %s not published: %s", issuer.key_id, exc.message)
            self._failed(issuer.key_id, exc.message, basis)
            raise
        except Exception as exc:
            log.exception("CRL of %s not published", issuer.key_id)
            self._failed(issuer.key_id, f"{type(exc).__name__}: {exc}", basis)
            raise FailedPrecondition(f"CRL of {issuer.key_id} not published: {type(exc).__name__}") from exc
        kind = "delta" if crl.is_delta else "full"
        log.info("published %s CRL %d of %s with %d entries (%d bytes)", kind, crl.crl_number, issuer.key_id, crl.entries, len(crl.der))
        return crl

    def _numbered(
        self,
        issuer: CrlIssuer,
        build: Callable[[datetime], PublishedCrl],
        store: Callable[[PublishedCrl], None],
        now: datetime | None,
        *,
        delta: bool,
        clock_was_ahead: bool = False,
    ) -> PublishedCrl:
        """Build a CRL on the next number (thisUpdate a second after the last of its kind), check and store it.

        Another process may store that number first (the key ceremony's final CRL, the CRL leader,
        `ca-daemon crl publish`): the CRL is then built again on the new number.
        """
        for attempt in range(1, _NUMBER_ATTEMPTS + 1):
            at = self._next_second(
                issuer.key_id, (now or datetime.now(UTC)).replace(microsecond=0), delta=delta, clock_was_ahead=clock_was_ahead
            )
            crl = build(at)
            self.check(issuer, crl)
            try:
                store(crl)
                return crl
            except FailedPrecondition as taken:
                if taken.rule not in (CRL_NUMBER_TAKEN, CRL_THIS_UPDATE_BEHIND) or attempt == _NUMBER_ATTEMPTS:
                    raise
                log.info("a CRL of %s was published meanwhile by another process; building CRL %d again", issuer.key_id, crl.crl_number)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failed(self, key_id: str, message: str, basis: int | None) -> None:
        """Mark the issuer's publication failed (CRL health), unless this process no longer leads.

        Nor when another process (`ca-daemon crl publish`, the key ceremony) stored a CRL above
        basis, the number this attempt started from, while it ran: that CRL stands, and a failure
        written after its success would keep CRL health NOT_SERVING with nothing due to clear it.
        """
        try:
            if not self._store.set_crl_status(key_id, ok=False, message=message, fence=self.fence, unless_published_above=basis):
                log.warning("CRL failure of %s not recorded: a CRL of it was published meanwhile by another process", key_id)
        except FailedPrecondition as exc:
            if exc.rule != LEADER_FENCE:
                raise
            log.warning("CRL failure of %s not recorded: %s", key_id, exc.message)

    def build(self, issuer: CrlIssuer, *, delta: bool, now: datetime) -> PublishedCrl:
        """The next full or delta CRL of an issuer, signed; not yet checked or recorded."""
        cfg = self._config.crl
        number = self._store.max_crl_number(issuer.key_id) + 1
        base: PublishedCrl | None = self._store.latest_crl(issuer.key_id, delta=False, with_der=False)
        if delta:
            if base is None:
                raise FailedPrecondition(f"no full CRL of {issuer.key_id} yet, so no delta can refer to one")
            entries = self._store.crl_entries(issuer.key_id, after_seq=base.change_seq, drop_expired=None)
            validity = cfg.delta_validity
        else:
            drop = (base.this_update, base.change_seq) if base is not None else None
            entries = self._store.crl_entries(issuer.key_id, after_seq=None, drop_expired=drop)
            validity = cfg.full_validity
        return sign_crl(
            issuer,
            number=number,
            base_number=base.crl_number if delta and base is not None else None,
            this_update=now,
            next_update=now + validity,
            entries=entries.der,
            count=entries.count,
            change_seq=entries.change_seq,
        )

    def check(self, issuer: CrlIssuer, crl: PublishedCrl) -> None:
        """Parse our own CRL and verify it against the CA certificate before anyone sees it."""
        check_crl(issuer.certificate, crl)


def sign_crl(
    issuer: CrlIssuer,
    *,
    number: int,
    base_number: int | None,
    this_update: datetime,
    next_update: datetime,
    entries: bytes | bytearray,
    count: int,
    change_seq: int,
) -> PublishedCrl:
    """Assemble the TBSCertList around the entries and sign it with the issuer's key (in the HSM)."""
    if issuer.private_key is None:
        raise FailedPrecondition(f"CA key {issuer.key_id} is retired: it published its final CRL and signs no more")
    algorithm, _ = crl_der.signature_algorithm(issuer.private_key)
    kind = "delta" if base_number is not None else "full"
    tbs = crl_der.tbs_cert_list(
        issuer.scope,
        algorithm_identifier=algorithm,
        this_update=this_update,
        next_update=next_update,
        entries=entries,
        crl_number=number,
        base_crl_number=base_number,
    )
    # Audit bracket (as Boulder does): what is about to be signed, then the result (log line and audit event).
    log.info(
        "signing %s CRL %d of %s: %d entries, thisUpdate %s, TBS sha256 %s",
        kind,
        number,
        issuer.key_id,
        count,
        this_update.isoformat(),
        hashlib.sha256(tbs).hexdigest(),
    )
    der = crl_der.sign_crl(tbs, algorithm, issuer.private_key)
    del tbs
    return PublishedCrl(
        issuer_key_id=issuer.key_id,
        crl_number=number,
        base_crl_number=base_number,
        this_update=this_update,
        next_update=next_update,
        change_seq=change_seq,
        entries=count,
        der=der,
        published_at=datetime.now(UTC),
    )


def check_crl(ca_certificate: x509.Certificate, crl: PublishedCrl) -> None:
    """The self-check before publishing: it parses, the CA's key verifies it, and it says what we meant."""
    try:
        parsed = x509.load_der_x509_crl(crl.der)
    except ValueError as exc:
        raise LintFailure(f"CRL {crl.crl_number} of {crl.issuer_key_id} does not parse: {exc}", rule="crl-self-check") from None
    problems: list[str] = []
    if not parsed.is_signature_valid(ca_certificate.public_key()):  # type: ignore[arg-type]
        problems.append("its signature does not verify with the CA certificate's key")
    if parsed.issuer != ca_certificate.subject:
        problems.append("its issuer is not the CA certificate's subject")
    try:
        number = parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    if number != crl.crl_number:
        problems.append(f"its CRL number is {number}, expected {crl.crl_number}")
    try:
        base: int | None = parsed.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number
    except x509.ExtensionNotFound:
        base = None
    if base != crl.base_crl_number:
        problems.append(f"its delta CRL indicator is {base}, expected {crl.base_crl_number}")
    if parsed.next_update_utc != crl.next_update or parsed.last_update_utc != crl.this_update:
        problems.append("its thisUpdate/nextUpdate are not the ones it was built with")
    if problems:
        raise LintFailure(
            f"CRL {crl.crl_number} of {crl.issuer_key_id} failed its self-check: {'; '.join(problems)}", rule="crl-self-check"
        )


def _audit(crl: PublishedCrl, *, actor: str = "crl-scheduler", **more_details: str) -> AuditEvent:
    """The crl.publish event; a final CRL, or one dated before the last, says so in more_details."""
    return AuditEvent(
        time=crl.published_at,
        actor=actor,
        action="crl.publish",
        outcome="published",
        key_id=crl.issuer_key_id,
        details={
            "crl_number": str(crl.crl_number),
            "kind": "delta" if crl.is_delta else "full",
            "base_crl_number": str(crl.base_crl_number or ""),
            "entries": str(crl.entries),
            "this_update": crl.this_update.isoformat(),
            "next_update": crl.next_update.isoformat(),
            "sha256": hashlib.sha256(crl.der).hexdigest(),
            **more_details,
        },
    )


__all__ = [
    "CRL_CLOCK_BEHIND",
    "CrlAnswer",
    "CrlIssuer",
    "CrlPublisher",
    "Revocations",
    "check_crl",
    "encode_entry",
    "parse_reason",
    "sign_crl",
]
