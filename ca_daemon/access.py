"""Who is calling, and may they: the relying-party steps for mTLS clients, and the role rules.

The TLS handshake (tls_front.py: TLS 1.3 only, a client certificate asked for but not
required) did step 1 and the signature half of step 2: the client proved possession of its
key and its certificate chains to a configured client CA. The handshake does not check
dates, so that a caller without a certificate or with an expired one reaches us and gets
UNAUTHENTICATED with the reason instead of a cut connection; here we check that a
certificate was presented, that it and the client CAs it chains to are valid now, step 3
("not on that CA's CRL", from the configured CRL file, re-read when it changes, its
signature checked against the client CA bundle), step 4 (the identity from the subject CN,
else the first SAN URI, else the first DNS name) and step 5 (roles from `[roles]` and the
method's rule). The negotiated protocol is checked again: anything but TLS 1.3 is refused.

Pure except for reading the CRL file; no gRPC types: the interceptor passes the auth context
as a plain dict.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_daemon.config import ROLES, Config, RoleGrant
from ca_daemon.errors import ConfigError, PermissionDenied, Unauthenticated
from ca_daemon.model import LINK_PROFILE, AuditEvent, IssuedCertificate, certified_key_id

log = logging.getLogger(__name__)

SERVICE = "/ca_daemon.v1.CertificateAuthority/"
KEY_CEREMONY = "/ca_daemon.v1.KeyCeremony/"
# The Prometheus endpoint ([metrics] listen), judged by the same steps as an RPC.
METRICS = "/metrics"
ANY_ROLE = frozenset(ROLES)
# Every RPC's rule: the roles that may call it. A method not listed is refused to everyone.
RULES: dict[str, frozenset[str]] = {
    SERVICE + "Sign": frozenset({"programmer"}),
    SERVICE + "Revoke": frozenset({"programmer", "officer"}),
    SERVICE + "Unrevoke": frozenset({"officer"}),
    SERVICE + "RevokeBulk": frozenset({"officer"}),
    SERVICE + "GetCertificate": frozenset({"programmer", "officer", "auditor", "admin"}),
    SERVICE + "GetCACertificates": ANY_ROLE,
    SERVICE + "GetCRL": ANY_ROLE,
    SERVICE + "ListProfiles": frozenset({"programmer", "officer", "admin"}),
    SERVICE + "IssueVerificationCertificate": frozenset({"officer"}),
    SERVICE + "StreamAuditEvents": frozenset({"auditor"}),
    SERVICE + "ListAuditCheckpoints": frozenset({"auditor"}),
    # Key rotation (rotation.py): officers; dual control is enforced by the use case, not here.
    KEY_CEREMONY + "GenerateKey": frozenset({"officer"}),
    KEY_CEREMONY + "SelfSignKey": frozenset({"officer"}),
    KEY_CEREMONY + "GetKeyCSR": frozenset({"officer"}),
    KEY_CEREMONY + "InstallKeyCertificate": frozenset({"officer"}),
    KEY_CEREMONY + "ApproveKeyAction": frozenset({"officer"}),
    METRICS: frozenset({"auditor", "admin"}),
    KEY_CEREMONY + "ListKeys": frozenset({"officer", "auditor", "admin"}),
}
# Infrastructure any authenticated caller may use (health for load balancers, reflection for grpcurl).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its identity, roles and the certificate it used."""

    identity: str
    roles: frozenset[str]
    serial: str = ""
    uris: tuple[str, ...] = ()
    ous: tuple[str, ...] = ()


def required_roles(method: str) -> frozenset[str] | None:
    """The roles that may call method; None for infrastructure methods any authenticated caller may use."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return RULES.get(method, frozenset())


def authorize(principal: Principal, method: str) -> None:
    """Step 5: PermissionDenied naming the role the method needs, unless the principal holds one."""
    needed = required_roles(method)
    if needed is None or principal.roles & needed:
        return
    names = " or ".join(r for r in ROLES if r in needed) or "no role (the method is not callable)"
    held = ", ".join(sorted(principal.roles)) or "none"
    raise PermissionDenied(
        f"{method.rsplit('/', 1)[-1]} needs role {names}; caller {principal.identity!r} has roles: {held}",
        rule="role",
        field="role",
        expected=names,
    )


# The rules of a Revoke refused for what it names, not for the method (RULES lets programmers call Revoke).
REVOKE_CA_LINK = "revoke-ca-link"
REVOKE_PROFILE = "revoke-profile"


def authorize_revocation(identity: str, roles: Collection[str], certificate: IssuedCertificate, profiles: Collection[str]) -> None:
    """Revoke's rule for the certificate it names: an officer revokes any; a programmer, device certificates of its profiles.

    profiles are those the caller may ask Sign for (`[callers."IDENTITY"] profiles`, as reloaded). A programming
    service revokes what it could have had issued, as EJBCA scopes revocation by end-entity profile: a
    credential of one line cannot take another line's fleet off the network. A CA link certificate
    (rotation.py: one root generation certifying the other's key) is a chain alternative for every device of
    both roots, so revoking it is an officer's decision, taken as the key ceremony's steps are; RULES lets a
    programmer call Revoke, so the method's rule cannot say either.
    """
    if "officer" in roles:
        return
    serial = format(certificate.serial, "x")
    held = ", ".join(r for r in ROLES if r in roles) or "none"
    officer_command = f"`ca-daemon client revoke --serial {serial} --reason REASON` with an officer's --tls-cert and --tls-key"
    if certificate.profile == LINK_PROFILE:
        subject = certified_key_id(certificate)
        raise PermissionDenied(
            f"Revoke of certificate {serial} needs role officer: it is a CA link certificate (CA key "
            f"{certificate.issuer_key_id} certifies CA key {subject}, a chain devices of both roots may validate through), "
            f"not a device certificate; caller {identity!r} has roles: {held}. Ask a security officer to revoke it: {officer_command}",
            rule=REVOKE_CA_LINK,
            field="serial",
            expected="officer",
        )
    if certificate.profile in profiles:
        return
    allowed = ", ".join(sorted(profiles)) or "none"
    raise PermissionDenied(
        f"Revoke of certificate {serial} (device {certificate.device_id!r}) needs profile {certificate.profile!r}, "
        f"which caller {identity!r} may not ask for (its [callers] profiles: {allowed}; roles: {held}): a programmer "
        f"revokes only certificates of the profiles it may have issued. Ask a security officer to revoke it: "
        f'{officer_command}; or have an administrator add {certificate.profile!r} to [callers."{identity}"] profiles '
        "and run `ca-daemon reload`",
        rule=REVOKE_PROFILE,
        field="serial",
        expected=f"a certificate of profile {' or '.join(sorted(profiles)) or 'none'}, or role officer",
    )


# The rule of a call with no client certificate at all: anyone who reaches the port can make one, so it is
# counted and logged in summary (service.ErrorInterceptor), not an audit event: the unauthenticated cannot grow the log.
NO_CLIENT_CERTIFICATE = "no-client-certificate"


def denial_event(actor: str, method: str, refusal: Unauthenticated | PermissionDenied) -> AuditEvent:
    """The access.deny audit event of a refused caller; its outcome ("unauthenticated" or "permission-denied") is the refusal's kind."""
    return AuditEvent(
        time=datetime.now(UTC),
        actor=actor[:256],
        action="access.deny",
        outcome="unauthenticated" if isinstance(refusal, Unauthenticated) else "permission-denied",
        reason=refusal.rule,
        details={"method": method, "needed": refusal.expected, "message": refusal.message[:512]},
    )


class RoleMap:
    """`[roles]` as a function of identity, SAN URIs and OUs."""

    def __init__(self, grants: Sequence[RoleGrant]) -> None:
        self._count = len(grants)
        self._exact: dict[str, set[str]] = {}
        self._patterns: list[tuple[str, str, re.Pattern[str]]] = []
        for grant in grants:
            if grant.kind == "identity":
                self._exact.setdefault(grant.value, set()).add(grant.role)
            else:
                self._patterns.append((grant.role, grant.kind, re.compile(grant.value)))

    def __len__(self) -> int:
        return self._count

    def roles_of(self, identity: str, uris: Sequence[str], ous: Sequence[str]) -> frozenset[str]:
        roles = set(self._exact.get(identity, ()))
        for role, kind, pattern in self._patterns:
            values = uris if kind == "uri" else ous
            if any(pattern.fullmatch(v) for v in values):
                roles.add(role)
        return frozenset(roles)


@dataclass(frozen=True)
class IssuedBy:
    """A certificate as a CRL names it: its issuer and serial (a serial is unique only within its CA)."""

    issuer_der: bytes
    issuer_text: str
    serial: int

    @classmethod
    def of(cls, certificate: x509.Certificate) -> IssuedBy:
        return cls(certificate.issuer.public_bytes(), certificate.issuer.rfc4514_string(), certificate.serial_number)


class ClientCrl:
    """The revoked certificates of the client CAs, from the configured CRL file(s) (PEM or DER).

    Every CRL must be signed by one of the client CAs and not be past its nextUpdate;
    otherwise nobody is let in (fail closed) and the reason is logged and reported. A client
    CA with no CRL in the file has its certificates refused: their revocation cannot be
    checked. Revocations are kept per issuer, as a serial is unique only within its CA.
    The file is re-read when its mtime or size changes (checked at most once a second).
    """

    def __init__(self, crl_file: Path, client_ca_file: Path) -> None:
        self._crl_file = crl_file
        self._cas = x509.load_pem_x509_certificates(client_ca_file.read_bytes())
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        self._revoked: frozenset[tuple[bytes, int]] = frozenset()  # (issuer name DER, serial)
        self._covered: frozenset[bytes] = frozenset()  # the names (DER) of the CAs that have a CRL
        self._next_update: datetime | None = None
        self._problem = ""
        self.generation = 0
        self._load()

    @property
    def cas(self) -> tuple[x509.Certificate, ...]:
        """The client CAs (tls.client_ca), as read at start-up."""
        return tuple(self._cas)

    def problem(self, now: datetime) -> str:
        """Why no client could be let in with these CRLs now (unreadable, not verifying, expired); empty if none.

        A reload is refused for it: a CRL file that fails at reload would refuse every caller.
        """
        if self._problem:
            return self._problem
        if self._next_update is not None and now > self._next_update:
            return f"the client CA CRL {self._crl_file} expired at {self._next_update.isoformat()}"
        return ""

    def check(self, certificate: IssuedBy, now: datetime | None = None) -> None:
        """Unauthenticated if the CRLs are unusable, its issuer has none, or its issuer's lists it."""
        self._refresh()
        now = now or datetime.now(UTC)
        if self._problem:
            raise Unauthenticated(f"client certificates cannot be checked: {self._problem}", rule="client-crl")
        if self._next_update is not None and now > self._next_update:
            raise Unauthenticated(
                f"the client CA CRL {self._crl_file} expired at {self._next_update.isoformat()}; "
                "refresh it (`ca-daemon mtls crl` for the internal CA)",
                rule="client-crl",
            )
        if certificate.issuer_der not in self._covered:
            raise Unauthenticated(
                f"certificate {certificate.serial:x} is issued by client CA {certificate.issuer_text!r}, which has no CRL in "
                f"{self._crl_file}; add its CRL there: a certificate whose revocation cannot be checked is refused",
                rule="client-crl",
            )
        if (certificate.issuer_der, certificate.serial) in self._revoked:
            raise Unauthenticated(
                f"certificate {certificate.serial:x} is revoked (on the CRL of client CA {certificate.issuer_text!r})",
                rule="client-revoked",
            )

    def _refresh(self) -> None:
        now = _monotonic()
        if now - self._checked_at < 1.0:
            return
        self._checked_at = now
        self._load()

    def _load(self) -> None:
        with self._lock:
            try:
                st = os.stat(self._crl_file)
            except OSError as exc:
                self._problem = f"cannot read the client CA CRL {self._crl_file}: {exc.strerror}"
                self._stamp = None
                return
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._stamp:
                return
            try:
                revoked, covered, next_update = _read_crls(self._crl_file.read_bytes(), self._cas)
            except ValueError as exc:
                self._problem = f"client CA CRL {self._crl_file}: {exc}"
                log.error("%s; refusing every client until it is fixed", self._problem)
                self._stamp = stamp
                return
            self._revoked, self._covered, self._next_update, self._problem, self._stamp = revoked, covered, next_update, "", stamp
            uncovered = [ca.subject.rfc4514_string() for ca in self._cas if ca.subject.public_bytes() not in covered]
            if uncovered:
                log.warning("client CA CRL %s has no CRL of %s; their certificates are refused", self._crl_file, "; ".join(uncovered))
            self.generation += 1
            log.info("client CA CRL %s loaded: %d revoked certificate(s)", self._crl_file, len(revoked))


def _monotonic() -> float:
    import time

    return time.monotonic()


def _read_crls(data: bytes, cas: Sequence[x509.Certificate]) -> tuple[frozenset[tuple[bytes, int]], frozenset[bytes], datetime | None]:
    """The revoked (issuer, serial) pairs, the issuers that have a CRL, and the earliest nextUpdate."""
    if b"-----BEGIN X509 CRL-----" in data:
        blocks = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S)
        crls = [x509.load_pem_x509_crl(b) for b in blocks]
    else:
        crls = [x509.load_der_x509_crl(data)]
    revoked: set[tuple[bytes, int]] = set()
    covered: set[bytes] = set()
    next_update: datetime | None = None
    for crl in crls:
        issuer = next((ca for ca in cas if ca.subject == crl.issuer), None)
        if issuer is None:
            raise ValueError(f"a CRL is issued by {crl.issuer.rfc4514_string()}, which is not one of the client CAs")
        public = issuer.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or not crl.is_signature_valid(public):
            raise ValueError(f"the CRL of {crl.issuer.rfc4514_string()} does not verify with that CA's key")
        name = crl.issuer.public_bytes()
        covered.add(name)
        revoked |= {(name, entry.serial_number) for entry in crl}
        if crl.next_update_utc is not None and (next_update is None or crl.next_update_utc < next_update):
            next_update = crl.next_update_utc
    return frozenset(revoked), frozenset(covered), next_update


class Authenticator:
    """Turns a call's auth context into a Principal (steps 3-4 and the role lookup), with a small cache.

    The cache is keyed by the peer certificate PEM and cleared whenever the CRL changes, so
    a revocation takes effect within a second of the CRL file being replaced.
    """

    def __init__(
        self,
        roles: RoleMap,
        crl: ClientCrl | None,
        *,
        client_cas: Sequence[x509.Certificate] = (),
        local_identity: str = "",
        require_tls13: bool = True,
    ) -> None:
        self._roles = roles
        self._crl = crl
        self._client_cas = tuple(client_cas)
        self._local = Principal(local_identity, ANY_ROLE) if local_identity else None
        self._require_tls13 = require_tls13
        # Per certificate PEM: CRL generation, principal, valid until, and what the CRLs must not list.
        self._cache: OrderedDict[bytes, tuple[int, Principal, datetime, tuple[IssuedBy, ...]]] = OrderedDict()

    @classmethod
    def from_config(cls, config: Config) -> Authenticator:
        if not config.tls.enabled:
            # Development mode: plaintext on loopback, one local caller with every role.
            return cls(RoleMap(()), None, local_identity=config.server.local_identity)
        tls = config.tls
        assert tls.client_crl_file is not None and tls.client_ca_file is not None
        try:
            crl = ClientCrl(tls.client_crl_file, tls.client_ca_file)
        except OSError as exc:
            raise ConfigError(f"[tls]: cannot read {exc.filename}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"tls.client_ca {tls.client_ca_file} is not a PEM certificate bundle: {exc}") from None
        return cls(RoleMap(config.roles), crl, client_cas=crl.cas)

    def unusable(self, now: datetime | None = None) -> str:
        """Why this authenticator would refuse every client now (its client CRL file); empty if it would not."""
        return self._crl.problem(now or datetime.now(UTC)) if self._crl is not None else ""

    def adopt(self, reloaded: Authenticator) -> None:
        """Put a reloaded configuration's roles, client CAs and client CRL file in force for the next call.

        reloaded is built (and its files checked) before anything is replaced, so a bad
        reload changes nothing; here the swap cannot fail.
        """
        if self._local is not None or reloaded._local is not None:
            return  # switching between development mode and mTLS needs a restart (app.reload_worker says so)
        self._roles, self._crl, self._client_cas = reloaded._roles, reloaded._crl, reloaded._client_cas
        self._cache.clear()  # the cached principals carry the old roles
        log.info("reload: %d role rule(s) and %d client CA(s) in force", len(self._roles), len(self._client_cas))

    def authenticate(self, auth_context: Mapping[str, Iterable[bytes]], now: datetime | None = None) -> Principal:
        if self._local is not None:
            return self._local
        if self._require_tls13:
            version = b"".join(auth_context.get("ssl_tls_version", ())).decode(errors="replace")
            if version != "TLSv1.3":
                raise Unauthenticated(f"TLS 1.3 is required; this connection uses {version or 'no TLS'}", rule="tls-version")
        pems = list(auth_context.get("x509_pem_cert", ()))
        if not pems:
            raise Unauthenticated("a client certificate is required (mTLS); none was presented", rule=NO_CLIENT_CERTIFICATE)
        pem = pems[0]
        now = now or datetime.now(UTC)
        generation = self._crl.generation if self._crl is not None else 0
        cached = self._cache.get(pem)
        if cached is not None and cached[0] == generation and now <= cached[2]:
            principal, checked = cached[1], cached[3]
            if self._crl is not None:
                for item in checked:
                    self._crl.check(item, now)
            return principal
        certificate = _readable(pem)
        _check_dates(certificate, "client certificate", now)
        issuers = self._issuers_of(certificate, now)
        valid_until = min([certificate.not_valid_after_utc, *(ca.not_valid_after_utc for ca in issuers)])
        # The client certificate and every intermediate CA above it, each on its issuer's CRL: a revoked
        # intermediate revokes whatever it signed. The self-signed root is the trust anchor.
        checked = tuple(IssuedBy.of(c) for c in [certificate, *issuers] if c.issuer != c.subject)
        if self._crl is not None:
            for item in checked:
                self._crl.check(item, now)
        principal = principal_of(certificate, self._roles)
        self._cache[pem] = (self._crl.generation if self._crl is not None else 0, principal, valid_until, checked)
        while len(self._cache) > 1024:
            self._cache.popitem(last=False)
        return principal

    def _issuers_of(self, certificate: x509.Certificate, now: datetime) -> list[x509.Certificate]:
        """The client CAs from certificate up to a self-signed one, each checked to be valid now.

        The handshake verified the chain without dates; here every CA on it must come from the
        configured bundle (so that we can check its dates) and be valid now.
        """
        if not self._client_cas:
            return []
        chain: list[x509.Certificate] = []
        current = certificate
        while len(chain) < 8:
            issuer = next((ca for ca in self._client_cas if ca.subject == current.issuer and issued_by(current, ca)), None)
            if issuer is None:
                raise Unauthenticated(
                    f"client certificate {certificate.serial_number:x} is not issued by a CA in tls.client_ca "
                    f"(issuer {current.issuer.rfc4514_string()}); put every intermediate CA in that bundle",
                    rule="client-certificate",
                )
            _check_dates(issuer, f"client CA {issuer.subject.rfc4514_string()!r}", now)
            chain.append(issuer)
            if issuer.subject == issuer.issuer:
                break
            current = issuer
        return chain


def _readable(pem: bytes) -> x509.Certificate:
    """The client certificate, its names and extensions read; Unauthenticated (rule client-certificate) saying why not.

    The handshake's OpenSSL is lenient where cryptography is strict (a PrintableString CN with '_' or '@',
    which a client CA may well issue): its ValueError ended every call in INTERNAL, with a traceback in
    the log and no access.deny event. cryptography reads some parts only on first use, so all are read here.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise Unauthenticated(f"the client certificate cannot be read: {exc}", rule="client-certificate") from None
    parts: tuple[tuple[str, Callable[[], object]], ...] = (
        ("an unreadable subject name", lambda: certificate.subject),
        ("an unreadable issuer name", lambda: certificate.issuer),
        ("unreadable extensions", lambda: certificate.extensions),
    )
    for part, read in parts:
        try:
            read()
        except (ValueError, x509.DuplicateExtension) as exc:
            raise Unauthenticated(
                f"client certificate {certificate.serial_number:x} has {part}: {exc}", rule="client-certificate"
            ) from None
    return certificate


def issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ca's key signed certificate (and the names chain); False for any other outcome."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_dates(certificate: x509.Certificate, what: str, now: datetime) -> None:
    if now > certificate.not_valid_after_utc:
        raise Unauthenticated(
            f"{what} {certificate.serial_number:x} expired at {certificate.not_valid_after_utc.isoformat()}; ask for a new one",
            rule="client-certificate-expired",
        )
    if now < certificate.not_valid_before_utc:
        raise Unauthenticated(
            f"{what} {certificate.serial_number:x} is not valid before {certificate.not_valid_before_utc.isoformat()}",
            rule="client-certificate-not-yet-valid",
        )


def principal_of(certificate: x509.Certificate, roles: RoleMap) -> Principal:
    """Step 4: identity from the subject CN, else the first SAN URI, else the first DNS name."""
    cns = [str(a.value) for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    ous = tuple(str(a.value) for a in certificate.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME))
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris, dns = (), ()
    identity = (cns or list(uris) or list(dns) or [""])[0]
    if not identity:
        raise Unauthenticated("the client certificate names no identity (no subject CN, SAN URI or DNS name)", rule="client-identity")
    return Principal(identity, roles.roles_of(identity, uris, ous), format(certificate.serial_number, "x"), uris, ous)


__all__ = [
    "ANY_ROLE",
    "Authenticator",
    "ClientCrl",
    "METRICS",
    "Principal",
    "REVOKE_CA_LINK",
    "REVOKE_PROFILE",
    "RULES",
    "RoleMap",
    "Unauthenticated",
    "authorize",
    "authorize_revocation",
    "denial_event",
    "issued_by",
    "principal_of",
]
