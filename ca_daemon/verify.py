"""The relying party's side: the five checks a cloud service makes before it trusts a device.

    verifier = DeviceVerifier(trusted=[root], identity=IdentityRule())
    challenge = verifier.challenge()                       # sent to the device
    signature = sign_challenge(device_key, challenge)      # computed on the device
    decision = verifier.verify(leaf, intermediates, challenge, signature)
    if not decision.granted: print(decision.step, decision.reason)

1. possession: the certificate is valid now and the device signed, with its key, a challenge this
   verifier issued, unused and not expired (each challenge is good for one verify, used or refused);
2. chain: the certificate chains to a trusted CA certificate (cryptography's X.509 path
   validation, `PolicyBuilder(...).build_client_verifier()`: RFC 5280 and CA/B-style profile
   checks, EKU clientAuth, path building through the given intermediates);
3. revocation: it is not on the issuing CA's CRL, base plus delta, fetched over HTTP from the
   certificate's CRL distribution point and cached by CRL number; nor is any intermediate CA
   certificate of the chain that names a CRL distribution point (an outside parent's CRL for
   our intermediate, an older root's CRL for a rotation's link certificate) on its issuer's;
4. identity: the device ID is read from the SAN URI (or the subject CN) as the profile puts it;
5. decision: grant, or refuse naming the step and the reason.

Why step 3 is written by hand: cryptography's verifier does path validation only; it has no
revocation checking at all (no CRL, no OCSP, no delta CRLs), so fetching, authenticating,
caching and merging base and delta CRLs is done here, with cryptography parsing the CRLs and
checking their signatures. The leaf must name a CRL distribution point; an intermediate that
names none is not checked, because nothing says where its status is published.

A leaf module for users: no server-side imports.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtensionOID

# The device signs this prefix plus the challenge, never a bare server-chosen value, so a
# challenge cannot be used to make a device sign something that means anything elsewhere.
CHALLENGE_CONTEXT = b"ca-daemon device possession challenge v1\x00"
CHALLENGE_BYTES = 32
REMOVE_FROM_CRL = x509.ReasonFlags.remove_from_crl
DEFAULT_URI_TEMPLATE = "urn:dev:ops:{device_id}"
DEFAULT_DEVICE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"

STEPS = ("possession", "chain", "revocation", "identity", "decision")


class Refused(Exception):
    """One step said no; carries the step name and the reason."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class Decision:
    """Step 5: grant or refuse, and why."""

    granted: bool
    step: str
    reason: str
    device_id: str = ""
    serial: int | None = None
    # The CRL numbers consulted (full, delta or None), for logs.
    crl_numbers: tuple[int | None, int | None] = (None, None)

    def __str__(self) -> str:
        if self.granted:
            return f"GRANTED device {self.device_id} (serial {self.serial:x})" if self.serial is not None else "GRANTED"
        return f"REFUSED at step {self.step}: {self.reason}"


# -- step 1: possession ------------------------------------------------------------------


def sign_challenge(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey, challenge: bytes) -> bytes:
    """What the device computes: a signature over CHALLENGE_CONTEXT + challenge with its own key."""
    message = CHALLENGE_CONTEXT + challenge
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(_hash_for(key.curve)))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256())


def check_possession(certificate: x509.Certificate, challenge: bytes, signature: bytes) -> None:
    message = CHALLENGE_CONTEXT + challenge
    try:
        # Read before the chain is checked, so the key is anyone's bytes: cryptography reads it on first use.
        public = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise Refused("possession", f"the certificate's public key cannot be read: {exc}") from None
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(_hash_for(public.curve)))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, message)
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO), hashes.SHA256())
        else:
            raise Refused("possession", f"unsupported device key type {type(public).__name__}")
    except InvalidSignature:
        raise Refused("possession", "the challenge signature does not verify with the certificate's public key") from None


def _hash_for(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return hashes.SHA384() if curve.key_size >= 384 else hashes.SHA256()


# -- step 3: CRLs over HTTP, cached by number ----------------------------------------------


@dataclass
class _Cached:
    crl: x509.CertificateRevocationList
    number: int
    etag: str
    checked_at: float


@dataclass
class CrlStats:
    downloads: int = 0
    not_modified: int = 0
    cache_hits: int = 0
    rollbacks_refused: int = 0


Fetcher = Callable[[str, str], tuple[int, bytes, str]]


# A whole CRL download, not each read, is bounded in time and size: a server sending a byte every few
# seconds held a fetch for a quarter of an hour, and a 300 MiB answer was read whole before it was refused.
FETCH_DEADLINE_S = 30.0
MAX_CRL_BYTES = 128 * 1024 * 1024  # a full CRL of 1,000,000 entries is about 54 MB


def http_fetch(
    url: str, etag: str, timeout: float = 5.0, *, deadline: float = FETCH_DEADLINE_S, max_bytes: int = MAX_CRL_BYTES
) -> tuple[int, bytes, str]:
    """GET url (with If-None-Match when we hold a copy); returns (status, body, ETag).

    ValueError when the answer (status line, headers and body, across redirects) takes longer than deadline
    seconds or its body exceeds max_bytes, or when it redirects to a URL that is not http(s).
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"CRL URL {url!r} is not http(s)")
    request = urllib.request.Request(url, headers={"If-None-Match": etag} if etag else {})  # noqa: S310 - scheme checked above
    started = time.monotonic()
    watch = _Deadline(deadline)
    opener = urllib.request.build_opener(_WatchedHTTPHandler(watch), _WatchedHTTPSHandler(watch), _HttpRedirectsOnly())
    too_slow = f"the download took longer than {deadline:g} s"
    try:
        with opener.open(request, timeout=timeout) as response:
            body = bytearray()
            while chunk := response.read1(1 << 20):
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError(f"the answer is larger than {max_bytes} bytes")
                if time.monotonic() - started > deadline:
                    raise ValueError(too_slow)
            if watch.passed:  # the socket was shut down mid-body: what was read is a part
                raise ValueError(too_slow)
            return int(response.status), bytes(body), response.headers.get("ETag", "")
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return 304, b"", etag
        raise
    except (OSError, http.client.HTTPException):
        if watch.passed:
            raise ValueError(too_slow) from None
        raise
    finally:
        watch.cancel()


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follows a redirect to http(s) only. urllib's own follows ftp:// too: a CRL server (or whoever answers its plain
    HTTP) could send the fetch to log in to any FTP server, outside the deadline, and the answer had no HTTP status."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if not newurl.lower().startswith(("http://", "https://")):
            fp.close()
            raise ValueError(f"redirected (HTTP {code}) to {newurl!r}, which is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """Shuts down the sockets of one fetch once its deadline has passed.

    A per-read timeout does not bound a server that sends its status line and headers a byte at a time
    (http.client takes 100 header lines of 64 KiB each): a read blocked in there returns at once.
    """

    def __init__(self, seconds: float) -> None:
        self.passed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
        if self.passed:
            self._expire()

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # closed meanwhile
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: a TLS one's would drop its state


class _WatchedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, http.client.HTTPSConnection):
    """The same watch on an HTTPS connection: its connect (HTTPSConnection's, by the method order) wraps the socket first."""


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPConnection, req, deadline=self._deadline)  # type: ignore[arg-type]


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context, deadline=self._deadline)  # type: ignore[arg-type,attr-defined]


class CrlCache:
    """CRLs by URL. An entry is revalidated (conditional GET) once it is max_age seconds old or
    past its nextUpdate; a downloaded CRL replaces the cached one only if its CRL number is
    higher, so a stale mirror or a replayed old CRL can never un-revoke a certificate.
    """

    def __init__(self, *, max_age: float = 60.0, fetch: Fetcher | None = None) -> None:
        self._max_age = max_age
        self._fetch = fetch or http_fetch
        # By URL and issuing CA: a CRL is authenticated against the issuer it was fetched for, and another CA's
        # certificate naming the same URL was checked against that CA's cached CRL, unauthenticated for it.
        self._entries: dict[tuple[str, bytes], _Cached] = {}
        # One lock per entry: a slow CRL server holds up the verifications that need its CRL, not all of them.
        self._locks: dict[tuple[str, bytes], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.stats = CrlStats()

    def get(self, url: str, issuer: x509.Certificate, now: datetime, *, refresh: bool = False) -> x509.CertificateRevocationList:
        """The CRL at url; refresh revalidates it now, whatever its age (a delta names a newer base than the one held)."""
        key = (url, issuer.fingerprint(hashes.SHA256()))
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            cached = self._entries.get(key)
            fresh = cached is not None and time.monotonic() - cached.checked_at < self._max_age
            if cached is not None and fresh and not refresh and _current(cached.crl, now):
                self.stats.cache_hits += 1
                return cached.crl
            try:
                status, body, etag = self._fetch(url, cached.etag if cached else "")
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if cached is not None and _current(cached.crl, now):
                    return cached.crl  # the server is down but our copy is still within its validity
                raise Refused("revocation", f"cannot fetch the CRL at {url}: {exc}") from None
            if status == 304 and cached is not None:
                self.stats.not_modified += 1
                cached.checked_at = time.monotonic()
                return cached.crl
            if status != 200:
                raise Refused("revocation", f"the CRL at {url} answered HTTP {status}")
            self.stats.downloads += 1
            crl = _authenticated_crl(body, issuer, url)
            number = crl_number(crl)
            if cached is not None and number < cached.number:
                self.stats.rollbacks_refused += 1
                cached.checked_at = time.monotonic()
                return cached.crl
            self._entries[key] = _Cached(crl, number, etag, time.monotonic())
            return crl


def _current(crl: x509.CertificateRevocationList, now: datetime) -> bool:
    next_update = crl.next_update_utc
    return crl.last_update_utc <= now and (next_update is None or now < next_update)


def _authenticated_crl(body: bytes, issuer: x509.Certificate, url: str) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(body) if body.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl(body)
        crl_issuer = crl.issuer  # read on first use, and whoever answers the URL wrote it: not yet authenticated
    except ValueError as exc:
        raise Refused("revocation", f"the CRL at {url} does not parse: {exc}") from None
    if crl_issuer != issuer.subject:
        raise Refused("revocation", f"the CRL at {url} is issued by {crl_issuer.rfc4514_string()}, not by the certificate's issuer")
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise Refused("revocation", f"the CRL at {url} is not signed by the issuing CA")
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """Its CRL Number extension; -1 if it has none (below every numbered CRL)."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return -1


def delta_base(crl: x509.CertificateRevocationList) -> int | None:
    """The number of the full CRL a delta CRL is on (its Delta CRL Indicator); None for a full CRL."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number)
    except x509.ExtensionNotFound:
        return None


def _uris(names: Sequence[x509.DistributionPoint]) -> list[str]:
    return [n.value for dp in names for n in (dp.full_name or []) if isinstance(n, x509.UniformResourceIdentifier)]


def _extension_uris(holder: x509.Certificate | x509.CertificateRevocationList, kind: type[x509.ExtensionType]) -> list[str]:
    try:
        value = holder.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return []
    return _uris(list(value))  # type: ignore[call-overload]


def _http_only(urls: list[str]) -> list[str]:
    """The URLs this verifier can fetch: a parent CA may list an ldap:// distribution point before its http:// one."""
    return [url for url in urls if url.lower().startswith(("http://", "https://"))]


# -- step 4: identity -----------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityRule:
    """Where the device ID is, as the issuing profile puts it.

    source "san-uri": the SAN URI matching uri_template (e.g. urn:dev:ops:{device_id}); if the
    subject has a CN it must be the same ID. source "cn": the subject CN. Either way a subject
    with more than one CN is refused, and the ID must match device_id_pattern.
    """

    source: str = "san-uri"
    uri_template: str = DEFAULT_URI_TEMPLATE
    device_id_pattern: str = DEFAULT_DEVICE_ID_PATTERN

    def __post_init__(self) -> None:
        if self.source not in ("san-uri", "cn"):
            raise ValueError(f"identity source {self.source!r}: use san-uri or cn")
        if self.source == "san-uri" and "{device_id}" not in self.uri_template:
            raise ValueError(f"URI template {self.uri_template!r} has no {{device_id}}")
        re.compile(self.device_id_pattern)

    def device_id(self, certificate: x509.Certificate) -> str:
        cns = [str(a.value) for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if len(cns) > 1:
            # A consumer that reads "the" CN (a broker's use_identity_as_username) may take either one.
            raise Refused("identity", f"the subject has {len(cns)} CNs ({', '.join(map(repr, cns))}); at most one is allowed")
        cn = cns[0] if cns else None
        if self.source == "cn":
            if cn is None:
                raise Refused("identity", "the subject has no CN, where this identity rule reads the device ID")
            device_id = cn
        else:
            prefix, _, suffix = self.uri_template.partition("{device_id}")
            pattern = re.compile(re.escape(prefix) + "(.+)" + re.escape(suffix))
            found = [m.group(1) for uri in _san_uris(certificate) if (m := pattern.fullmatch(uri))]
            if len(found) != 1:
                raise Refused("identity", f"expected exactly one SAN URI like {self.uri_template}, found {len(found)}")
            device_id = found[0]
            if cn is not None and cn != device_id:
                raise Refused("identity", f"the subject CN {cn!r} and the SAN device ID {device_id!r} disagree")
        if not re.fullmatch(self.device_id_pattern, device_id):  # as the daemon's profile rule reads it (policy.py)
            raise Refused("identity", f"device ID {device_id!r} does not match {self.device_id_pattern}")
        return device_id


def _san_uris(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


# -- the verifier ----------------------------------------------------------------------------


# The Web PKI defaults, except that a leaf need not carry a subjectAltName (cryptography's client
# verifier requires one by default): a profile without SAN templates identifies the device by its
# CN alone (IdentityRule(source="cn")). When the identity rule reads a SAN, step 4 refuses a leaf
# without one.
_CA_EXTENSIONS = verification.ExtensionPolicy.webpki_defaults_ca()
# EKU required: the client verifier checks clientAuth only when the extension is there, and a leaf without it
# (usable for any purpose) was granted.
_LEAF_EXTENSIONS = (
    verification.ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    .require_present(x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, None)
)


@dataclass
class DeviceVerifier:
    """A cloud service's trust decision about a device certificate.

    trusted: the CA certificates (roots, or an intermediate registered as a trust anchor).
    check_revocation False skips step 3 (only for a CA that publishes no CRLs).
    challenge_ttl: how long a challenge from challenge() may be answered. max_challenges: how many
    issued challenges are remembered; beyond that the oldest is forgotten (its answer is refused),
    so memory stays bounded whatever the callers do.
    """

    trusted: Sequence[x509.Certificate]
    identity: IdentityRule = field(default_factory=IdentityRule)
    crls: CrlCache = field(default_factory=CrlCache)
    check_revocation: bool = True
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    challenge_ttl: timedelta = timedelta(minutes=5)
    max_challenges: int = 100_000

    def __post_init__(self) -> None:
        if not self.trusted:
            raise ValueError("a verifier needs at least one trusted CA certificate")
        if self.challenge_ttl <= timedelta(0):
            raise ValueError(f"challenge_ttl {self.challenge_ttl} must be positive")
        if self.max_challenges < 1:
            raise ValueError(f"max_challenges {self.max_challenges} must be at least 1")
        self._store = verification.Store(list(self.trusted))
        # Issued challenges, oldest first: when issued, and whether verify() has taken them.
        self._challenges: OrderedDict[bytes, _Issued] = OrderedDict()
        self._challenges_lock = threading.Lock()

    def challenge(self) -> bytes:
        """A fresh random challenge for the device to sign; verify() accepts it once, within challenge_ttl."""
        challenge = os.urandom(CHALLENGE_BYTES)
        self._remember(challenge)
        return challenge

    def adopt_challenge(self, challenge: bytes) -> None:
        """Count a challenge issued elsewhere as issued by this verifier now, for one verify().

        For a one-shot check (`ca-daemon verify-device --challenge`): the service that sent the
        challenge to the device is then the one that keeps it fresh and to one use.
        """
        if len(challenge) != CHALLENGE_BYTES:
            raise ValueError(f"a challenge is {CHALLENGE_BYTES} bytes ({2 * CHALLENGE_BYTES} hex digits), got {len(challenge)}")
        self._remember(challenge)

    def _remember(self, challenge: bytes) -> None:
        now = self.clock()
        with self._challenges_lock:
            # Forget the expired, then the oldest beyond the cap; both are refused as not issued if answered.
            while self._challenges:
                oldest = next(iter(self._challenges.values()))
                if now - oldest.issued_at <= self.challenge_ttl and len(self._challenges) < self.max_challenges:
                    break
                self._challenges.popitem(last=False)
            if challenge in self._challenges:
                raise ValueError("this challenge was already issued to (or adopted by) this verifier")
            self._challenges[challenge] = _Issued(now)

    def _redeem(self, challenge: bytes, now: datetime) -> None:
        """Step 1's freshness: the challenge was issued here, is taken now (whatever the outcome) and is not expired."""
        with self._challenges_lock:
            issued = self._challenges.get(challenge)
            if issued is None:
                raise Refused(
                    "possession",
                    f"the challenge is not one this verifier issued, or it was forgotten (challenges expire after "
                    f"{_seconds(self.challenge_ttl)}; at most {self.max_challenges} are kept): answer a fresh one from challenge()",
                )
            if issued.used:
                raise Refused("possession", "the challenge was already used: each challenge proves possession once (a replayed answer?)")
            issued.used = True
        age = now - issued.issued_at
        if age > self.challenge_ttl:
            raise Refused("possession", f"the challenge expired: issued {_seconds(age)} ago, valid for {_seconds(self.challenge_ttl)}")

    def verify(
        self, certificate: x509.Certificate, intermediates: Sequence[x509.Certificate], challenge: bytes, signature: bytes
    ) -> Decision:
        """Run the five steps; never raises for a bad device, returns a refusal naming the step."""
        now = self.clock()
        numbers: tuple[int | None, int | None] = (None, None)
        try:
            # 1. a challenge we issued, valid now, and possession of the key
            self._redeem(challenge, now)
            if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
                raise Refused(
                    "possession",
                    f"the certificate is valid from {certificate.not_valid_before_utc.isoformat()} "
                    f"to {certificate.not_valid_after_utc.isoformat()}, not now ({now.isoformat()})",
                )
            check_possession(certificate, challenge, signature)
            # 2. chains to a trusted CA
            chain = self._chain(certificate, intermediates, now)
            # 3. not revoked (base + delta CRL of the issuing CA), nor any intermediate on its issuer's
            if self.check_revocation:
                numbers = self._check_revocation(certificate, chain[1], now)
                self._check_intermediates(chain, now)
            # 4. identity
            device_id = self.identity.device_id(certificate)
        except Refused as refusal:
            return Decision(False, refusal.step, refusal.reason, serial=certificate.serial_number, crl_numbers=numbers)
        # 5. decision
        return Decision(True, "decision", "all checks passed", device_id, certificate.serial_number, numbers)

    def _chain(self, certificate: x509.Certificate, intermediates: Sequence[x509.Certificate], now: datetime) -> list[x509.Certificate]:
        verifier = (
            verification.PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(ca_policy=_CA_EXTENSIONS, ee_policy=_LEAF_EXTENSIONS)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(certificate, list(intermediates))
        except verification.VerificationError as exc:
            raise Refused("chain", f"does not chain to a trusted CA: {exc}") from None
        if len(verified.chain) < 2:
            raise Refused("chain", "the certificate is itself a trust anchor, not a device certificate")
        return list(verified.chain)

    def _check_intermediates(self, chain: Sequence[x509.Certificate], now: datetime) -> None:
        """Each CA certificate between the leaf and the trust anchor that names a CRL distribution point, on its issuer's CRL."""
        for certificate, issuer in itertools.pairwise(chain[1:]):
            if _extension_uris(certificate, x509.CRLDistributionPoints):
                name = certificate.subject.rfc4514_string()
                self._check_revocation(
                    certificate, issuer, now, f"the intermediate CA certificate {name!r} (serial {certificate.serial_number:x})"
                )

    def _full_crl(
        self, url: str, issuer: x509.Certificate, now: datetime, *, refresh: bool = False
    ) -> tuple[x509.CertificateRevocationList, int]:
        base = self.crls.get(url, issuer, now, refresh=refresh)
        if delta_base(base) is not None:
            raise Refused("revocation", f"the CRL at {url} is a delta CRL, expected a full one")
        if not _current(base, now):
            raise Refused("revocation", f"the CRL at {url} is not current (nextUpdate {base.next_update_utc})")
        return base, crl_number(base)

    def _check_revocation(
        self, certificate: x509.Certificate, issuer: x509.Certificate, now: datetime, what: str = ""
    ) -> tuple[int | None, int | None]:
        """The certificate against its issuer's base and delta CRLs; what names it in a refusal (default: the leaf by serial)."""
        named = _extension_uris(certificate, x509.CRLDistributionPoints)
        if not named:
            raise Refused("revocation", "the certificate names no CRL distribution point, so its status cannot be checked")
        urls = _http_only(named)
        if not urls:
            raise Refused("revocation", f"{what or 'the certificate'} names no http(s) CRL distribution point ({', '.join(named)})")
        base, base_number = self._full_crl(urls[0], issuer, now)
        applicable: x509.CertificateRevocationList | None = None
        delta_urls = _http_only(_extension_uris(base, x509.FreshestCRL) or _extension_uris(certificate, x509.FreshestCRL))
        if delta_urls:
            delta = self.crls.get(delta_urls[0], issuer, now)
            delta_of = delta_base(delta)
            if delta_of is None:
                raise Refused("revocation", f"the CRL at {delta_urls[0]} is not a delta CRL")
            if not _current(delta, now):
                raise Refused("revocation", f"the delta CRL at {delta_urls[0]} is not current (nextUpdate {delta.next_update_utc})")
            if delta_of > base_number:
                # The delta is on a newer full CRL than ours (our cache, or a caching mirror, held the old one):
                # without the entries of that newer base, a revocation it carries would be missed.
                base, base_number = self._full_crl(urls[0], issuer, now, refresh=True)
                if delta_of > base_number:
                    raise Refused(
                        "revocation",
                        f"the delta CRL at {delta_urls[0]} (number {crl_number(delta)}) is on full CRL {delta_of}, but the full "
                        f"CRL at {urls[0]} is still number {base_number} (a stale mirror or cache?); the status cannot be known",
                    )
            # RFC 5280 5.2.4: a delta applies to a complete CRL numbered at least its base and older than itself.
            if delta_of <= base_number < crl_number(delta):
                applicable = delta
        _check_scope(base, certificate, urls[0], what)
        if applicable is not None:
            _check_scope(applicable, certificate, delta_urls[0], what)
            if _issuing_distribution_point(applicable) != _issuing_distribution_point(base):
                raise Refused(
                    "revocation",
                    f"the delta CRL at {delta_urls[0]} has another scope (Issuing Distribution Point) than the full CRL at {urls[0]}",
                )
        status = _entry_status(base, certificate.serial_number)
        delta_number: int | None = None
        if applicable is not None:
            delta_number = crl_number(applicable)
            delta_status = _entry_status(applicable, certificate.serial_number)
            if delta_status == REMOVE_FROM_CRL:
                status = None
            elif delta_status is not None:
                status = delta_status
        if status is not None:
            raise Refused("revocation", f"{what or f'certificate {certificate.serial_number:x}'} is revoked ({status.name})")
        return base_number, delta_number


@dataclass
class _Issued:
    issued_at: datetime
    used: bool = False


def _seconds(duration: timedelta) -> str:
    return f"{duration.total_seconds():g} s"


# The CRL extensions step 3 reads. RFC 5280 5.2: a CRL with a critical extension the relying party does not process
# must not be used to decide any certificate's status.
_PROCESSED_CRL_EXTENSIONS = frozenset(
    {
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.CRL_NUMBER,
        ExtensionOID.DELTA_CRL_INDICATOR,
        ExtensionOID.FRESHEST_CRL,
        ExtensionOID.ISSUING_DISTRIBUTION_POINT,
    }
)


def _issuing_distribution_point(crl: x509.CertificateRevocationList) -> x509.IssuingDistributionPoint | None:
    try:
        return crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return None


def _check_scope(crl: x509.CertificateRevocationList, certificate: x509.Certificate, url: str, what: str) -> None:
    """Whether crl may decide certificate's status (RFC 5280 5.2 and 6.3.3 (b)(2)), else a refusal.

    A CA signs CRLs of several scopes with one key (a CRL of CA certificates only, partitions by distribution point);
    any of them, served at the certificate's URL by whoever answers it, authenticates, and one of another scope does not
    list the certificate, revoked or not.
    """
    for extension in crl.extensions:
        if extension.critical and extension.oid not in _PROCESSED_CRL_EXTENSIONS:
            raise Refused(
                "revocation",
                f"the CRL at {url} has a critical extension this verifier does not process ({extension.oid.dotted_string}); "
                "RFC 5280 5.2: it must not be used",
            )
    idp = _issuing_distribution_point(crl)
    if idp is None:
        return
    who = what or "the certificate"
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    points = list(certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value)
    names = {name for point in points for name in point.full_name or []}
    if idp.indirect_crl:
        problem = "is an indirect CRL, which this verifier does not read"
    elif idp.only_some_reasons:
        problem = f"covers only some reasons ({', '.join(sorted(r.name for r in idp.only_some_reasons))})"
    elif idp.only_contains_attribute_certs:
        problem = "covers attribute certificates only"
    elif idp.only_contains_ca_certs and not is_ca:
        problem = f"covers CA certificates only, and {who} is not one"
    elif idp.only_contains_user_certs and is_ca:
        problem = f"covers end-entity certificates only, and {who} is a CA certificate"
    elif idp.full_name is not None and not names.intersection(idp.full_name):
        problem = f"is for distribution point {', '.join(str(n.value) for n in idp.full_name)}, not one {who} names"
    elif idp.relative_name is not None and all(point.relative_name != idp.relative_name for point in points):
        problem = f"is for distribution point {idp.relative_name.rfc4514_string()} (relative to its issuer), not one {who} names"
    else:
        return
    raise Refused("revocation", f"the CRL at {url} {problem} (its Issuing Distribution Point), so it cannot say {who}'s status")


def _entry_status(crl: x509.CertificateRevocationList, serial: int) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    if entry is None:
        return None
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return x509.ReasonFlags.unspecified


__all__ = [
    "CHALLENGE_BYTES",
    "CHALLENGE_CONTEXT",
    "CrlCache",
    "Decision",
    "DeviceVerifier",
    "IdentityRule",
    "Refused",
    "check_possession",
    "http_fetch",
    "sign_challenge",
]
