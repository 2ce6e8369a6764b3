"""The use cases: policy -> issuer -> hsm -> store, each ending in one transaction.

`Authority` serves requests; the functions below it are the security officer's set-up
steps (create a CA key, self-sign a root, make a CSR for a parent, import its answer).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificateIssuerPublicKeyTypes

from ca_daemon import issuer, name_constraints, policy
from ca_daemon.audit import AuditLog, refusal_event
from ca_daemon.config import Config
from ca_daemon.errors import (
    AlreadyExists,
    CaError,
    CaKeyChanged,
    ConfigError,
    FailedPrecondition,
    InvalidRequest,
    LintFailure,
    NotFound,
    PermissionDenied,
    PolicyViolation,
    QuotaExceeded,
    StoreUnavailable,
    capped,
    echo,
)
from ca_daemon.hsm import Hsm, HsmPrivateKey, Pkcs11Uri
from ca_daemon.http_paths import rename_in_path, request_path
from ca_daemon.lint import Linter
from ca_daemon.model import AuditEvent, CaKey, CertificateRequest, IssuedCertificate, KeySpec, KeyStatus, certified_key_id
from ca_daemon.store import IssuanceItem, IssuanceOutcome, SignReads, SqlStore, serial_hex
from ca_daemon.store.group_commit import GroupCommitter, resolve_all
from ca_daemon.store.rotation_store import RotationStore
from ca_daemon.store.sql import replay_or_conflict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignResult:
    certificate: IssuedCertificate
    chain_pem: str
    replayed: bool

    @property
    def certificate_pem(self) -> str:
        return x509.load_der_x509_certificate(self.certificate.der).public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class ActiveCa:
    """The CA key that signs new certificates, loaded once at start-up."""

    key: CaKey
    certificate: x509.Certificate
    private_key: HsmPrivateKey
    chain_pem: str
    # The CA certificate's validity, read once (each property read builds a datetime).
    valid_from: datetime = field(init=False)
    valid_until: datetime = field(init=False)
    # The earliest notAfter of the chain: the CA certificate's and its parents' as stored (import-cert). Nothing this
    # key signs may outlive it, as a relying party rejects a leaf whose chain has a certificate expired; read once
    # here (at start-up and at a key switch), not per Sign.
    chain_valid_until: datetime = field(init=False)
    # The nameConstraints of the CA certificate and its parents, which every leaf's names must fit; None (nothing to
    # check per Sign) when the chain has none, as a self-signed root of this daemon.
    chain_name_constraints: name_constraints.ChainConstraints | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "valid_from", self.certificate.not_valid_before_utc)
        object.__setattr__(self, "valid_until", self.certificate.not_valid_after_utc)
        parents = [x509.load_der_x509_certificate(der) for der in self.key.chain_der]
        object.__setattr__(self, "chain_valid_until", min([self.valid_until, *(p.not_valid_after_utc for p in parents)]))
        object.__setattr__(self, "chain_name_constraints", name_constraints.from_chain([self.certificate, *parents]))

    def check_names(self, subject: x509.Name, sans: Sequence[x509.GeneralName]) -> None:
        """Refuse a leaf whose names break the chain's nameConstraints: every relying party would reject it
        ("permitted subtree violation"), so it is never signed."""
        if self.chain_name_constraints is None:
            return
        violation = self.chain_name_constraints.violation(subject, sans)
        if violation is not None:
            raise PolicyViolation(
                f"{violation.message}; relying parties would reject the certificate, so CA key {self.key.key_id} does not issue it",
                rule="name-constraints",
                field=violation.field,
                expected="names within the nameConstraints of the CA certificate and its parents",
            )

    def check_valid(self, now: datetime) -> None:
        """Refuse to sign outside the CA certificate's validity or once a parent expired: relying parties would reject
        every certificate signed."""
        if not self.valid_from <= now < self.valid_until:
            raise _ca_validity_refusal(self.key.key_id, self.valid_from, self.valid_until, now)
        if now >= self.chain_valid_until:
            raise FailedPrecondition(
                f"a parent certificate in the chain of CA key {self.key.key_id} expired at {self.chain_valid_until.isoformat()} "
                f"(now {now.isoformat()}): no certificate it signed would validate; rotate to a new CA key (README: Key rotation)",
                rule="ca-certificate-validity",
            )


# How long a health probe waits for the store's answer before it reports this worker down.
_STORE_PROBE_S = 2.0


def _ca_validity_refusal(key_id: str, valid_from: datetime, valid_until: datetime, now: datetime) -> FailedPrecondition:
    action = "rotate to a new CA key (README: Key rotation)" if now >= valid_until else f"start it after {valid_from.isoformat()}"
    return FailedPrecondition(
        f"the CA certificate of key {key_id} is valid from {valid_from.isoformat()} to {valid_until.isoformat()}, "
        f"not now ({now.isoformat()}): no certificate it signed would validate; {action}",
        rule="ca-certificate-validity",
    )


def key_id_for(uri: Pkcs11Uri) -> str:
    """The store's name for a token key: its label, or its CKA_ID in hex."""
    return uri.label or uri.key_id.hex()


def chain_pem(certificate_der: bytes, parents: tuple[bytes, ...]) -> str:
    return "".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode() for der in (certificate_der, *parents)
    )


def profiles_from_config(config: Config) -> dict[str, policy.Profile]:
    return {name: policy.build_profile(p) for name, p in config.profiles.items()}


# The sections a reload does not apply (each worker reads them at start only): a change is logged as needing a restart.
RESTART_ONLY_SECTIONS = ("server", "hsm", "ca", "store", "crl", "audit", "metrics", "rotation")


def restart_only_changes(new: Config, running: Config) -> list[str]:
    """What a reload to new changes that is read at start only, named as in the file ("[crl]", "tls.ca_key").

    Logged by each worker at a reload and recorded in its config.reload audit event, from
    which `ca-daemon reload` tells the operator.
    """
    changed = ["state_dir"] if new.state_dir != running.state_dir else []
    changed += [f"[{section}]" for section in RESTART_ONLY_SECTIONS if getattr(new, section) != getattr(running, section)]
    if new.tls.enabled != running.tls.enabled:
        changed.append("[tls] mTLS or development mode")
    if new.tls.ca_key_uri != running.tls.ca_key_uri:
        changed.append("tls.ca_key")
    if new.tls.client_crl_refresh != running.tls.client_crl_refresh:
        changed.append("tls.client_crl_refresh_days")
    return changed


def reloadable_part(accepted: Config, start: Config) -> Config:
    """What a worker serves once a reload put accepted in force: its reloadable settings, and start's read at start only.

    The other workers apply only that much of a reload (restart_only_changes names the rest), so a worker
    restarted after a crash must too: started on the whole accepted file, it listened on a new server.listen,
    opened a new [store] url or CA key, or served in the other mode, while its siblings went on as they started.
    """
    kept = {section: getattr(start, section) for section in RESTART_ONLY_SECTIONS}
    if accepted.tls.enabled != start.tls.enabled:  # the workers keep their TLS files and [roles] until the restart
        tls, roles = start.tls, start.roles
    else:
        tls = replace(accepted.tls, ca_key_uri=start.tls.ca_key_uri, client_crl_refresh=start.tls.client_crl_refresh)
        roles = accepted.roles
    return replace(accepted, state_dir=start.state_dir, tls=tls, roles=roles, **kept)


@dataclass(frozen=True)
class PolicySet:
    """The reloadable part of the configuration, as the authority applies it.

    Replaced as a whole on reload (one attribute assignment), so a request sees either
    the old set or the new one, never a mixture.
    """

    profiles: dict[str, policy.Profile]
    default_profile: str
    callers: dict[str, tuple[str, ...]]
    linter: Linter
    source: Config
    # Caller identity -> certificates per hour (config `max_certificates_per_hour`); absent: no quota.
    caller_quotas: dict[str, int]

    def profile_for(self, caller: str, name: str) -> policy.Profile:
        """The profile a caller asked for (empty: the default), or PermissionDenied."""
        chosen = name or self.default_profile
        policy.authorize(caller, chosen, self.callers)
        profile = self.profiles.get(chosen)
        if profile is None:  # config.parse guarantees callers name existing profiles
            raise PermissionDenied(f"profile {echo(chosen)} does not exist", rule="caller-profiles", field="profile")
        return profile


def build_policy_set(
    config: Config,
    ca_certificate: x509.Certificate,
    draft_key: CertificateIssuerPrivateKeyTypes,
    parents: Sequence[bytes] | None = None,
) -> PolicySet:
    """Profiles, callers and linter from config; each profile's template is linted in full first.

    A profile whose certificate would fail the lint is a configuration error: it is
    refused at start-up or reload, before any request could reach it. So is, given the
    parents (DER) of ca_certificate, an extendedKeyUsage the chain excludes (see
    _check_usages_fit_chain); a key switch passes none: its chain was checked at import.
    """
    linter = Linter(config.lint.mode)
    profiles = profiles_from_config(config)
    if parents is not None:
        chain = [ca_certificate, *(x509.load_der_x509_certificate(der) for der in parents)]
        _check_usages_fit_chain(config, chain)
        _check_templates_fit_names(profiles, chain)
    if linter.mode != "off":
        template_linter = Linter("full")
        for profile in profiles.values():
            decision = _template_decision(profile, draft_key)
            builder = issuer.build_leaf(
                decision, ca_certificate, issuer.new_serial(), datetime.now(UTC), config.ca.backdate, leaf_urls(config, "")
            )
            try:
                issuer.sign_linted(builder, draft_key, draft_key, template_linter)
            except LintFailure as exc:
                raise ConfigError(f"profiles.{profile.name}: its certificates would fail the pre-issuance lint: {exc.message}") from None
    return PolicySet(profiles, config.default_profile, dict(config.callers), linter, config, dict(config.caller_quotas))


def check_policy(config: Config, store: SqlStore) -> None:
    """ConfigError where Authority.reload would refuse config's policy (each profile's template lint), without the token.

    For a process that holds no CA key (the daemon's parent): the lint runs with a draft key made from the
    active CA certificate's public key, as the workers' draft keys are made from the token key's.
    """
    active_id = store.active_key_id()
    key = store.get_ca_key(active_id) if active_id is not None else None
    if key is None or key.certificate_der is None:
        return
    certificate = x509.load_der_x509_certificate(key.certificate_der)
    build_policy_set(config, certificate, issuer.draft_key_like(certificate.public_key()), key.chain_der)  # type: ignore[arg-type]


def _check_usages_fit_chain(config: Config, chain: Sequence[x509.Certificate]) -> None:
    """ConfigError if a profile issues an extendedKeyUsage that a certificate of the active CA's chain excludes.

    import-cert refuses such a chain for the profiles of its day; a profile given the usage later (a reload, a
    restart with another file) made every certificate of it fail relying parties that check the purpose along
    the chain (openssl verify -purpose sslserver for serverAuth), though each was issued as usual.
    """
    issued = issued_extended_key_usages(config)
    for certificate in chain:
        try:
            _check_extended_key_usage(certificate, "profiles", issued)
        except InvalidRequest as refused:
            raise ConfigError(
                f"the profiles' extended_key_usage does not fit the active CA key's chain: {refused.message}; "
                "or take the usage out of the profile"
            ) from None


def _check_templates_fit_names(profiles: dict[str, policy.Profile], chain: Sequence[x509.Certificate]) -> None:
    """ConfigError if a profile's san_templates make names the chain's nameConstraints forbid: Sign would refuse every
    request of that profile (a URN, for one, under any URI constraint), so the profile is refused at start and reload."""
    refused = _templates_breaking_names(profiles, chain)
    if refused is not None:
        raise ConfigError(
            f"{refused}; Sign would refuse every certificate of this profile: change the templates, or ask the parent CA "
            "for a certificate whose constraints allow them"
        )


def _templates_breaking_names(profiles: dict[str, policy.Profile], chain: Sequence[x509.Certificate]) -> str | None:
    """The first profile whose san_templates break the chain's nameConstraints, as 'profiles.NAME.san_templates: why'."""
    constraints = name_constraints.from_chain(chain)
    if constraints is None:
        return None
    for profile in profiles.values():
        violation = constraints.violation(x509.Name([]), _template_sans(profile))
        if violation is not None:
            return f"profiles.{profile.name}.san_templates: {violation.message}"
    return None


def _template_sans(profile: policy.Profile, device_id: str = "lint-template-device") -> tuple[x509.GeneralName, ...]:
    return tuple(x509.UniformResourceIdentifier(t.replace("{device_id}", device_id)) for t in profile.san_templates)


def _template_decision(profile: policy.Profile, key: CertificateIssuerPrivateKeyTypes) -> policy.Decision:
    device_id = "lint-template-device"
    spki = _template_subject_key(profile, key).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return policy.Decision(
        device_id=device_id,
        profile=profile.name,
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)]),
        public_key_der=spki,
        validity=profile.validity,
        csr_sha256=b"",
        public_key_sha256=b"",
        sans=_template_sans(profile, device_id),
        key_usage=profile.key_usage,
        extended_key_usage=profile.extended_key_usage,
    )


_TEMPLATE_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
    "secp256k1": ec.SECP256K1(),
}


def _template_subject_key(profile: policy.Profile, key: CertificateIssuerPrivateKeyTypes) -> CertificateIssuerPublicKeyTypes:
    """The public key a profile's template certifies: the CA key's when the profile allows its type, else one it allows.

    The CA key's alone had a profile for RSA device keys with keyEncipherment, under an EC CA key, refused at start
    (pkix.key_usage_value_prohibited_for_ec) for a key type it never issues to.
    """
    public = key.public_key()
    rule = profile.key_types
    if rule is None or _allows(rule, public):
        return public
    if rule.ec_curves:
        return _throwaway_key("ec", rule.ec_curves[0])
    if rule.ed25519:
        return _throwaway_key("ed25519", "")
    if rule.rsa_max_bits:
        return _throwaway_key("rsa", str(rule.rsa_min_bits))
    return public  # the profile allows no key type: it refuses every request anyway


def _allows(rule: policy.AllowedKeyTypes, public: CertificateIssuerPublicKeyTypes) -> bool:
    try:
        rule.check_key(public)
    except PolicyViolation:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _throwaway_key(family: str, parameter: str) -> CertificateIssuerPublicKeyTypes:
    """A public key of that type, made once per process (an RSA key of some thousand bits takes seconds)."""
    if family == "ec":
        return ec.generate_private_key(_TEMPLATE_CURVES[parameter]).public_key()
    if family == "ed25519":
        return ed25519.Ed25519PrivateKey.generate().public_key()
    return rsa.generate_private_key(65537, int(parameter)).public_key()


def leaf_urls(config: Config, key_id: str = "") -> issuer.LeafUrls:
    """The CRL and caIssuers URLs a leaf of key_id carries.

    The configured URLs name the configured (first) key by its label; every other key's CRL
    and certificate are published beside them under its own name (see revocation.CrlPublisher).
    """
    return issuer.LeafUrls(
        rename_urls(config, config.ca.crl_distribution_points, key_id), rename_urls(config, config.ca.ca_issuers_urls, key_id)
    )


def rename_urls(config: Config, urls: tuple[str, ...], key_id: str) -> tuple[str, ...]:
    label = Pkcs11Uri.parse(config.ca.key_uri).label
    if not key_id or not label or key_id == label:
        return urls
    return tuple(rename_in_path(u, label, key_id) for u in urls)


# The settings whose URLs name the configured key by its label (rename_urls, CrlPublisher._load), each with the path
# where the daemon serves a key's resource whatever the URLs say (crl.http_routes, crl.ca_routes): the path to suggest.
_KEY_URL_SETTINGS: tuple[tuple[str, Callable[[Config], tuple[str, ...]], str], ...] = (
    ("ca.crl_distribution_points", lambda c: c.ca.crl_distribution_points, "/crl/{}.crl"),
    ("ca.ca_issuers_urls", lambda c: c.ca.ca_issuers_urls, "/ca/{}.der"),
    ("crl.delta_distribution_points", lambda c: c.crl.delta_distribution_points if c.crl.delta else (), "/crl/{}-delta.crl"),
)
KEY_URLS_RULE = "key-urls"


def shared_key_urls(config: Config, key_id: str, other_id: str) -> list[tuple[str, str]]:
    """The configured URLs, as (setting, URL), that give keys key_id and other_id one URL.

    Compared by the decoded path, which the HTTP server routes by: both keys' CRLs (or certificates) would be served
    there, each replacing the other, and the certificates of one would point relying parties at the other's.
    """
    shared = []
    for setting, urls, _ in _KEY_URL_SETTINGS:
        for url in urls(config):
            mine, theirs = rename_urls(config, (url,), key_id)[0], rename_urls(config, (url,), other_id)[0]
            if request_path(mine) == request_path(theirs):
                shared.append((setting, url))
    return shared


def unnamed_key_urls(config: Config) -> list[tuple[str, str]]:
    """The configured URLs that would give any other CA key the configured key's URL (empty: each key has its own)."""
    configured = key_id_for(Pkcs11Uri.parse(config.ca.key_uri))
    return shared_key_urls(config, configured + "-next", configured)


def key_urls_advice(config: Config, shared: list[tuple[str, str]]) -> str:
    """Which of the configured URLs do not name the configured key, and what to write instead."""
    uri = Pkcs11Uri.parse(config.ca.key_uri)
    if not uri.label:
        return (
            f"ca.key {config.ca.key_uri!r} names the key by its id= alone, so no URL names it by a label that another key's "
            "could replace: add object=LABEL to ca.key and put LABEL in the path of the CRL and CA URLs "
            "(e.g. /crl/LABEL.crl, /ca/LABEL.der)"
        )
    label = uri.label
    paths = {setting: path for setting, _, path in _KEY_URL_SETTINGS}
    lines = []
    for setting, url in shared:
        encoded = label in request_path(url)  # the server decodes the path; the label is replaced as written
        why = f"has {label} only percent-encoded in its path" if encoded else f"does not have the key's label {label} in its path"
        suggested = urlunsplit(urlsplit(url)._replace(path=paths[setting].format(label)))
        lines.append(f"{setting} URL {url!r} {why}: write {suggested!r}")
    advice = "; ".join(lines) + (
        f". The URLs of every other key are the configured ones with its label in place of {label}'s, in the path as written "
        "(not percent-encoded, not in the host or query)"
    )
    if any(request_path(url) != paths[setting].format(label) for setting, url in shared):  # the daemon stops serving it
        advice += (
            ". Certificates issued so far keep the old URLs, which the daemon goes on serving to them once it has recorded them "
            "(any start with them configured does: start it once before changing them); one that only an earlier version "
            "served, keep served in front (a copy or redirect) until they expire"
        )
    return advice


# The kinds of URL recorded for each key (store key_urls), and the setting each comes from, for messages.
_RECORDED_KINDS = (("crl", "ca.crl_distribution_points"), ("ca_issuers", "ca.ca_issuers_urls"))


def _url_pairs(urls: issuer.LeafUrls) -> list[tuple[str, str]]:
    """(kind, url) of each URL a key's certificates carry, the kinds as store key_urls records them."""
    return [("crl", url) for url in urls.crl_distribution_points] + [("ca_issuers", url) for url in urls.ca_issuers]


def check_key_urls(store: SqlStore, key_id: str, urls: issuer.LeafUrls) -> list[tuple[str, str]]:
    """FailedPrecondition (rule key-urls) if a URL key_id's certificates would carry has the path of one recorded for another.

    The publisher serves every URL recorded (store key_urls) for as long as the certificates carrying it last: serving
    this key's CRL or certificate at one of those paths would point them at the wrong one, which relying parties reject.
    Checked at start (app.check_ready, check-config), and again when the URLs are recorded. Returns the (kind, url)
    pairs not recorded yet for key_id.
    """
    recorded = store.key_urls()
    settings = dict(_RECORDED_KINDS)
    pairs = _url_pairs(urls)
    for kind, url in pairs:
        for other_key, other_kind, other_url in recorded:
            if (other_key, other_kind) != (key_id, kind) and request_path(other_url) == request_path(url):
                given = "CRL Distribution Point" if other_kind == "crl" else "caIssuers URL"
                raise FailedPrecondition(
                    f"{settings[kind]} URL {url!r} for CA key {key_id} has the path of {other_url!r}, the {given} that "
                    f"certificates of CA key {other_key} carry; the daemon serves that path to them for as long as they "
                    "last, so give this key a URL with another path (e.g. with its label in it) and start again",
                    rule=KEY_URLS_RULE,
                )
    known = {(kind, url) for other_key, kind, url in recorded if other_key == key_id}
    return [pair for pair in pairs if pair not in known]


def record_key_urls(store: SqlStore, key_id: str, urls: issuer.LeafUrls, now: datetime | None = None) -> None:
    """Record the URLs key_id's certificates will carry, before it signs the first: the publisher serves every one recorded.

    FailedPrecondition (rule key-urls) as check_key_urls. Only URLs not recorded yet are written, in one transaction (none
    at all at a start with the URLs unchanged); one recorded before keeps its first date.
    """
    if missing := check_key_urls(store, key_id, urls):
        store.record_key_urls(key_id, missing, now or datetime.now(UTC))


def check_new_key_urls(config: Config, store: SqlStore, label: str) -> None:
    """Refuse (FailedPrecondition, rule key-urls) a new CA key that the configured URLs would give another key's URLs.

    A single key works with URLs that do not name it, so they are not refused when loaded; a second key would share them:
    both keys' CRLs served at one path, each replacing the other, and the old key's devices pointed at the new key's CRL,
    which relying parties reject (wrong issuer). The first `init` (no other key) passes.
    """
    configured = key_id_for(Pkcs11Uri.parse(config.ca.key_uri))
    for other in sorted({configured, *(key.key_id for key in store.list_ca_keys())} - {label}):
        if shared := shared_key_urls(config, label, other):
            raise FailedPrecondition(
                f"CA key {label} would get the CRL and CA URLs of CA key {other}, so it was not created: "
                + key_urls_advice(config, shared)
                + "; then restart the daemon ([ca] and [crl] are read at start) and create the key again",
                rule=KEY_URLS_RULE,
            )


class _Refusal(Exception):
    """Carries a refusal out of the issuance thread with what its audit event needs."""

    def __init__(self, error: CaError, device_id: str, digest: bytes) -> None:
        super().__init__(error.message)
        self.error = error
        self.device_id = device_id
        self.digest = digest


@dataclass(frozen=True)
class _Parsed:
    """A request whose caller, profile and CSR passed the checks that need no store."""

    request: CertificateRequest
    rules: PolicySet
    profile: policy.Profile
    csr: policy.ParsedRequest
    device_id: str

    def refusal(self, error: CaError) -> _Refusal:
        return _Refusal(error, self.device_id, self.csr.sha256)


@dataclass(frozen=True)
class _Draft:
    """A request that passed every check: its certificate drafted and linted, not yet signed by the CA."""

    request: CertificateRequest
    decision: policy.Decision
    draft: x509.Certificate
    active: ActiveCa  # the key it was built for (its issuer name and AKI); it signs with this key
    created_at: datetime
    quota: int  # the caller's hourly quota, 0 for none; the group commit checks it again


_In = TypeVar("_In")
_Out = TypeVar("_Out")


# A Sign request waiting for the token's thread: the request, the policy it is judged by, and its answer.
_Waiting = tuple[CertificateRequest, "PolicySet", "asyncio.Future[Any]"]


class Authority:
    """Signs device CSRs with the active CA key and records every issuance."""

    def __init__(self, config: Config, hsm: Hsm, store: SqlStore, active: ActiveCa) -> None:
        self._config = config
        self._hsm = hsm
        self._store = store
        self.active = active
        self._urls = leaf_urls(config, active.key.key_id)
        record_key_urls(store, active.key.key_id, self._urls)
        self._url_refusal: tuple[str, str] | None = None  # the last key switch refused for its URLs (logged once)
        # Lint-before-sign builds each certificate first with this stand-in for the CA key (see issuer.draft_key_like).
        self._draft_key = issuer.draft_key_like(active.private_key)  # type: ignore[arg-type]
        self.policy = build_policy_set(config, active.certificate, self._draft_key, active.key.chain_der)
        # Held while a policy set is built and put in force: a reload (the loop's thread) and a key switch
        # (the token's thread, which rebuilds the policy in force for the new certificate) each build from
        # what the other put in force, so neither undoes the other.
        self._policy_lock = threading.Lock()
        self._store_probe: asyncio.Future[bool] | None = None  # see probe_health
        self._following: asyncio.Future[None] | None = None  # see _follow_now
        # When an emergency halted the active key, as the last poll read it (None: not halted); see halted_notice.
        self.active_halted_at: datetime | None = None
        self._committer: GroupCommitter[IssuanceItem, IssuanceOutcome] = GroupCommitter(
            store.record_unique_issuances, config.store.commit_batch_max, config.store.commit_linger_ms / 1000
        )
        # Every refused request of this worker, Sign's and those of revocation.py and registration.py (app.py gives them
        # its record), is appended here: group-committed on a thread of its own, so a flood of bad requests stays cheap.
        self.refusals = AuditLog(store, config.store.commit_batch_max, name="audit-refusals")
        # Requests waiting for the token's thread, and whether a batch of them is on it now (see sign()).
        self._waiting: list[_Waiting] = []
        self._preparing = False
        self._batch_max = min(64, config.store.commit_batch_max)

    @classmethod
    def load(cls, config: Config, hsm: Hsm, store: SqlStore) -> Authority:
        return cls(config, hsm, store, load_active_ca(config, hsm, store))

    def close(self) -> None:
        self._committer.close()
        self.refusals.close()

    @property
    def config(self) -> Config:
        """The configuration this worker started with; a reload's restart-only sections are compared with it."""
        return self._config

    @property
    def profiles(self) -> dict[str, policy.Profile]:
        return self.policy.profiles

    def caller_profiles(self, caller: str) -> tuple[str, ...]:
        """The profiles in force that this caller may ask for (`[callers]`, as reloaded); none for a caller not listed."""
        return self.policy.callers.get(caller, ())

    def reissue_profiles(self) -> frozenset[str]:
        """The profiles in force that allow re-issue: a certificate of one may share its device with other active ones."""
        return frozenset(name for name, profile in self.policy.profiles.items() if profile.allow_reissue)

    def reload(self, config: Config) -> PolicySet:
        """Put new profiles, callers and lint mode in force; on ConfigError the old ones stay.

        Here only the policy is reloaded (app.reload_worker does [roles] and [tls]): listen
        address, token, CA key and store need a restart, and a change to them is logged,
        not applied.
        """
        with self._policy_lock:
            new = build_policy_set(config, self.active.certificate, self._draft_key, self.active.key.chain_der)
            self.policy = new
        for setting in restart_only_changes(config, self._config):
            log.warning("reload: %s changed; that takes effect only after a restart", setting)
        log.info("reload: %d profile(s) in force: %s; lint %s", len(new.profiles), ", ".join(sorted(new.profiles)), new.linter.mode)
        return new

    @property
    def healthy(self) -> bool:
        return self._hsm.healthy

    async def probe_health(self) -> bool:
        """Whether this worker can issue now: the token (reconnected first if it went away) and the store answer.

        app.py asks every second and reports the answer as gRPC health, so a load balancer sends
        Sign calls elsewhere while this replica has lost its token or its database (a network
        path to PostgreSQL cut for one replica only). A store probe still running from an
        earlier round (a database that accepts connections but does not answer) counts as down,
        and no second one is started beside it.
        """
        token = await self._hsm.probe()
        if self._store_probe is None or self._store_probe.done():
            self._store_probe = asyncio.ensure_future(asyncio.to_thread(self._store.reachable))
        try:
            reachable = await asyncio.wait_for(asyncio.shield(self._store_probe), timeout=_STORE_PROBE_S)
        except TimeoutError:
            reachable = False
        return token and reachable

    async def follow_active_key(self) -> bool:
        """Switch to the key the store marks active, if another one was activated (rotation.py).

        Every worker polls this (app.py): one indexed read of a few rows when nothing
        changed. The new key is opened in this process's own Hsm, and the switch runs as a
        job on the token's thread, the thread every issuance runs on, so one certificate is
        built, signed and attributed with one key: the old one or the new one.
        """
        state = await asyncio.to_thread(self._store.active_key_halted)
        if state is None:
            return False
        active_id, self.active_halted_at = state
        if active_id == self.active.key.key_id:
            return False
        await self._hsm.run_async(lambda: self._switch(active_id))
        return True

    def halted_notice(self) -> str | None:
        """The warning for the log while the active key is halted by an emergency that has not switched yet, else None.

        The emergency halts the key before it revokes and switches; a process that died in between leaves the key
        active and halted, every Sign refused, until the officers retry the approval.
        """
        active_id = self._store.active_key_id()
        key = self._store.get_ca_key(active_id) if active_id is not None else None
        successor = RotationStore(self._store).unfinished_emergency(key) if key is not None else None
        if key is None or key.halted_at is None or successor is None:
            return None
        return f"CA key {key.key_id} is halted " + unfinished_emergency_notice(key.key_id, key.halted_at, successor, active=True)

    async def _follow_now(self) -> None:
        """follow_active_key once for all the requests one commit refused (CaKeyChanged); a failure is logged only."""
        if self._following is None or self._following.done():
            self._following = asyncio.ensure_future(self._follow_logged())
        await asyncio.shield(self._following)

    async def _follow_logged(self) -> None:
        try:
            await self.follow_active_key()
        except Exception:  # the poll (app.py) tries again
            log.exception("could not switch to the newly activated CA key after a commit refused the old one's certificate")

    def _switch(self, key_id: str) -> None:
        if key_id == self.active.key.key_id:
            return  # switched meanwhile (a poll and a refused commit both asked)
        key = self._store.get_ca_key(key_id)
        if key is None or key.status != KeyStatus.ACTIVE or key.certificate_der is None:
            return  # changed again meanwhile; the next poll sees the new state
        certificate = x509.load_der_x509_certificate(key.certificate_der)
        private = self._hsm.private_key(Pkcs11Uri.parse(key.pkcs11_uri))
        if _spki(certificate) != self._hsm.public_key_der(Pkcs11Uri.parse(key.pkcs11_uri)):
            log.error("CA key %s is active in the store but its certificate does not match the token key; not switching", key_id)
            return
        draft_key = issuer.draft_key_like(private)  # type: ignore[arg-type]
        urls = leaf_urls(self._config, key.key_id)
        try:
            record_key_urls(self._store, key_id, urls)
        except CaError as refusal:  # each poll tries again, logged once: the configuration needs a change and a restart
            if self._url_refusal != (key_id, refusal.message):
                self._url_refusal = (key_id, refusal.message)
                log.error("not switching the signing CA key to %s: %s", key_id, refusal.message)
            return
        previous = self.active.key.key_id
        with self._policy_lock:
            policy_set = build_policy_set(self.policy.source, certificate, draft_key)
            self.active = ActiveCa(key, certificate, private, chain_pem(key.certificate_der, key.chain_der))
            self._draft_key = draft_key
            self._urls = urls
            self.policy = policy_set
        log.info("switched the signing CA key from %s to %s", previous, key_id)

    async def sign(self, request: CertificateRequest) -> SignResult:
        """Check, sign and durably record one CSR; replay the first answer for a repeated request_id.

        Order: caller and profile, CSR parsing and the profile's rules (pure, no I/O),
        then one store read for the request_id and the uniqueness facts, the fact rules,
        lint-before-sign, and a group commit that re-checks uniqueness. Everything before
        the commit runs on the token's thread, in batches: the requests that arrive while
        one batch is being signed go together as the next one, and its certificates go to
        the group commit together. So under load a request costs a fraction of a thread hop
        instead of four (there and back, twice), and the threads, which share one GIL,
        hand it over far less often. Every refusal is recorded as an audit event before it
        is returned.
        """
        future: asyncio.Future[SignResult | IssuanceOutcome | AlreadyExists] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, self.policy, future))  # one request sees one configuration, even across a reload
        if not self._preparing:
            self._prepare_next_batch()
        try:
            outcome = await future
        except _Refusal as refused:
            await self._record_refusal(request, refused.error, refused.device_id, refused.digest)
            raise refused.error from None
        except AlreadyExists as conflict:  # its request_id answered another CSR before
            await self._record_conflict(request, conflict)
            raise
        except CaKeyChanged:
            # Signed with a key the store no longer has active (discarded and audited by the commit): follow the switch
            # now, not at the next poll, so that the caller's retry (same request_id) is signed with the new key.
            await self._follow_now()
            raise
        if isinstance(outcome, AlreadyExists):
            await self._record_conflict(request, outcome)
            raise outcome
        if isinstance(outcome, SignResult):
            return outcome
        if isinstance(outcome, IssuanceOutcome) and outcome.certificate.issuer_key_id != self.active.key.key_id:
            # Signed by the key active a moment ago (a switch happened meanwhile): its chain is read from the store.
            return await asyncio.to_thread(self._result, outcome)
        return self._result(outcome)

    def _prepare_next_batch(self) -> None:
        """On the loop: send the waiting requests to the token's thread as one job."""
        batch, self._waiting = self._waiting[: self._batch_max], self._waiting[self._batch_max :]
        loop = asyncio.get_running_loop()
        try:
            job = self._hsm.run_async(lambda: self._prepare_batch(batch, loop))
        except CaError as exc:  # the token connection is closed
            resolve_all([(future, exc) for _, _, future in batch])
            return
        self._preparing = True
        job.add_done_callback(lambda done: self._batch_prepared(batch, done))

    def _batch_prepared(self, batch: list[_Waiting], job: asyncio.Future[list[tuple[asyncio.Future[Any], Any]]]) -> None:
        self._preparing = False
        if job.cancelled() or job.exception() is not None:
            error = StoreUnavailable("the signing job failed; retry") if job.cancelled() else job.exception()
            resolve_all([(future, error) for _, _, future in batch])
        else:
            resolve_all(job.result())
        if self._waiting:
            self._prepare_next_batch()

    def _prepare_batch(self, batch: list[_Waiting], loop: asyncio.AbstractEventLoop) -> list[tuple[asyncio.Future[Any], Any]]:
        """On the token's thread: take the batch through each stage in turn, then to the group commit.

        Stage by stage rather than request by request: parse every CSR, then look each up in
        the store, then build and lint every draft, then let the CA key sign them back to
        back. Each stage's code and data stay in the CPU caches for the whole batch; measured
        here, a SoftHSM ECDSA signature took 46 us in a run of signatures and 131 us between
        one certificate's parsing, building and linting and the next, and the whole pipeline
        took 545 us per request in batches of 16 against 850 us one request at a time.
        Returns the answers known now (replays, refusals, failures), for the loop to deliver.
        """
        settled: list[tuple[asyncio.Future[Any], Any]] = []
        live = [(future, (request, rules)) for request, rules, future in batch if not future.done()]  # done: caller went away
        parsed = _each(live, lambda item: self._parse(*item), settled)
        with self._store.sign_reads() as reads:
            judged = _each(parsed, lambda item: self._judge(item, reads), settled)
        drafts = _each(judged, lambda item: self._draft(*item), settled)
        signed = _each(drafts, self._sign, settled)
        if signed:
            # More requests waiting for this thread means more certificates soon: the commit may wait for them.
            items: list[IssuanceItem] = [
                (cert, _issue_event(draft.request, cert), draft.decision.allow_reissue, draft.quota) for _, (draft, cert) in signed
            ]
            self._committer.enqueue(items, [future for future, _ in signed], loop, more_coming=bool(self._waiting))
        return settled

    def prepare_one(self, request: CertificateRequest, rules: PolicySet) -> SignResult | IssuedCertificate:
        """One request through every stage before the commit, unbatched (the benchmark's one-thread ceiling)."""
        parsed = self._parse(request, rules)
        if isinstance(parsed, SignResult):
            return parsed
        with self._store.sign_reads() as reads:
            judged = self._judge(parsed, reads)
        return judged if isinstance(judged, SignResult) else self._sign(self._draft(*judged))[1]

    def _parse(self, request: CertificateRequest, rules: PolicySet) -> SignResult | _Parsed:
        """Caller, profile, CSR and the profile's rules (pure, no store); a refused retry is answered by its replay."""
        max_bytes = self._config.server.max_csr_bytes
        parsed: policy.ParsedRequest | None = None
        try:
            policy.check_request_fields(request)
            profile = rules.profile_for(request.caller, request.profile)
            parsed = policy.parse_csr(request.csr, max_bytes, profile.key_types)
            return _Parsed(request, rules, profile, parsed, policy.check_rules(parsed, profile))
        except CaError as refusal:
            if not isinstance(refusal, PermissionDenied):  # a retry of a request answered before this policy was in force
                answered = self._answer_if_answered(request, lambda: _csr_digest_or_raw(request.csr, max_bytes))
                if answered is not None:
                    return answered
            if parsed is not None:  # refused by a profile rule: audited with the device ID and digest issuance would use
                raise _Refusal(refusal, policy.device_id_of(parsed), parsed.sha256) from None
            raise _Refusal(refusal, "", hashlib.sha256(request.csr).digest()) from None

    def _judge(self, parsed: _Parsed, reads: SignReads) -> SignResult | tuple[_Parsed, policy.Decision, int]:
        """The store's facts: the request_id's earlier answer (replayed even past a quota), else the decision and quota."""
        request = parsed.request
        existing, active, others = reads.precheck(request.request_id, parsed.device_id, parsed.csr.public_key_sha256, datetime.now(UTC))
        if existing is not None:
            return self._result(replay_or_conflict(existing, parsed.csr.sha256, request.caller))
        facts = policy.IssuanceFacts(active_serials_for_device=active, devices_with_public_key=others)
        quota = parsed.rules.caller_quotas.get(request.caller, 0)
        try:
            if quota:
                issued = reads.issued_last_hour(request.caller, datetime.now(UTC))
                if issued + 1 > quota:
                    raise QuotaExceeded.for_caller(request.caller, quota, issued)
            return parsed, policy.settle(parsed.csr, parsed.profile, parsed.device_id, facts), quota
        except (PolicyViolation, AlreadyExists, QuotaExceeded) as refusal:
            # The look-ups each see what is committed when they run: this very request's certificate, committed after
            # its request_id was read, counts against the quota or as the device's active certificate. A retry is
            # answered, not refused, so the request_id is read again (on refusals only).
            answered = self._answer_if_answered(request, lambda: parsed.csr.sha256)
            if answered is not None:
                return answered
            raise parsed.refusal(refusal) from None

    def _answer_if_answered(self, request: CertificateRequest, digest: Callable[[], bytes]) -> SignResult | None:
        """A refused request whose request_id has a certificate is answered as its retry (or conflict); else None.

        digest: the CSR's SHA-256, computed only when there is a certificate to compare it with.
        """
        existing = self._store.find_by_request_id(request.request_id) if request.request_id else None
        return None if existing is None else self._result(replay_or_conflict(existing, digest(), request.caller))

    async def _record_conflict(self, request: CertificateRequest, conflict: AlreadyExists) -> None:
        """A reused request_id is a refusal too, recorded like the others (it was not audited)."""
        digest = await asyncio.to_thread(_csr_digest_or_raw, request.csr, self._config.server.max_csr_bytes)
        await self._record_refusal(request, conflict, "", digest)

    async def _record_refusal(self, request: CertificateRequest, refusal: CaError, device_id: str, digest: bytes) -> None:
        """Append the refusal to the audit log (group-committed); a store failure is logged, not raised."""
        if isinstance(refusal, LintFailure):
            log.error(
                "pre-issuance lint refused a certificate for device %r (profile %r, request %r): %s",
                device_id,
                request.profile,
                request.request_id,
                refusal.message,
            )
        details = {"profile": request.profile[:128], "request_id": request.request_id[:256]}
        event = refusal_event("certificate.issue", request.caller, refusal, device_id=device_id, request_digest=digest, details=details)
        await self.refusals.record(event)

    def _draft(self, parsed: _Parsed, decision: policy.Decision, quota: int) -> _Draft:
        """Build with the draft key and lint: CPU work, run on the token's thread."""
        now = datetime.now(UTC).replace(microsecond=0)
        active = self.active  # read once: a key switch (follow_active_key) runs on this same thread
        try:
            active.check_valid(now)
            active.check_names(decision.subject, decision.sans)
        except (FailedPrecondition, PolicyViolation) as refusal:
            raise parsed.refusal(refusal) from None
        builder = issuer.build_leaf(
            decision,
            active.certificate,
            issuer.new_serial(),
            now,
            self._config.ca.backdate,
            self._urls,
            not_after_limit=active.chain_valid_until,
        )
        try:
            draft = issuer.draft_linted(builder, self._draft_key, parsed.rules.linter)
        except LintFailure as refusal:
            raise parsed.refusal(refusal) from None
        return _Draft(parsed.request, decision, draft, active, now, quota)

    def _sign(self, draft: _Draft) -> tuple[_Draft, IssuedCertificate]:
        """Sign the linted draft with the CA key in the token; the certificate as the store records it."""
        decision = draft.decision
        try:
            cert = issuer.sign_draft(draft.draft, draft.active.private_key)  # type: ignore[arg-type]
        except LintFailure as refusal:
            raise _Refusal(refusal, decision.device_id, decision.csr_sha256) from None
        return draft, IssuedCertificate(
            serial=cert.serial_number,
            issuer_key_id=draft.active.key.key_id,
            device_id=decision.device_id,
            profile=decision.profile,
            subject=cert.subject.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            der=cert.public_bytes(serialization.Encoding.DER),
            csr_sha256=decision.csr_sha256,
            public_key_sha256=decision.public_key_sha256,
            request_id=draft.request.request_id,
            created_at=draft.created_at,
            caller=draft.request.caller,
        )

    def _result(self, outcome: IssuanceOutcome | AlreadyExists | QuotaExceeded) -> SignResult:
        if isinstance(outcome, AlreadyExists | QuotaExceeded):
            raise outcome
        cert = outcome.certificate
        if cert.issuer_key_id == self.active.key.key_id:
            return SignResult(cert, self.active.chain_pem, replayed=not outcome.created)
        key = self._store.get_ca_key(cert.issuer_key_id)
        if key is None or key.certificate_der is None:
            raise FailedPrecondition(f"CA key {cert.issuer_key_id} of certificate {serial_hex(cert.serial)} has no certificate")
        return SignResult(cert, chain_pem(key.certificate_der, key.chain_der), replayed=not outcome.created)

    async def get_certificate(self, serial_text: str) -> IssuedCertificate:
        serial = policy.parse_serial(serial_text)
        cert = await asyncio.to_thread(self._store.get_certificate, serial)
        if cert is None:
            raise NotFound.no_certificate(serial_hex(serial))
        return cert

    async def ca_certificates(self) -> list[CaKey]:
        """Every CA certificate a relying party may meet: pre-published (pending), active, superseded, retired."""
        keys = await asyncio.to_thread(self._store.list_ca_keys)
        return [k for k in keys if k.certificate_der is not None and k.status != KeyStatus.DESTROYED]

    async def link_certificates(self) -> dict[str, list[bytes]]:
        """Link certificates (DER) by the key they certify: chain alternatives after a root roll-over."""
        links = await asyncio.to_thread(RotationStore(self._store).links)
        found: dict[str, list[bytes]] = {}
        for link in links:
            if link.not_after > datetime.now(UTC):
                found.setdefault(certified_key_id(link), []).append(link.der)
        return found


def _issue_event(request: CertificateRequest, certificate: IssuedCertificate) -> AuditEvent:
    """The certificate.issue event, naming the very certificate (its SHA-256): the chain then vouches for the
    certificates row a retried Sign and GetCertificate hand out (`audit verify --live` compares them)."""
    return AuditEvent(
        time=certificate.created_at,
        actor=request.caller,
        action="certificate.issue",
        outcome="issued",
        serial=certificate.serial,
        device_id=certificate.device_id,
        key_id=certificate.issuer_key_id,
        request_digest=certificate.csr_sha256,
        details={
            "profile": certificate.profile,
            "request_id": request.request_id,
            "certificate_sha256": hashlib.sha256(certificate.der).hexdigest(),
        },
    )


def _each(
    items: list[tuple[asyncio.Future[Any], _In]],
    step: Callable[[_In], SignResult | _Out],
    settled: list[tuple[asyncio.Future[Any], Any]],
) -> list[tuple[asyncio.Future[Any], _Out]]:
    """One stage of a batch: step applied to each item; an item answered (a replay) or refused there leaves the batch.

    Its answer or exception goes to settled, for the loop to deliver; the others go on to the next stage.
    """
    passed: list[tuple[asyncio.Future[Any], _Out]] = []
    for future, item in items:
        try:
            result = step(item)
        except Exception as exc:  # _Refusal, HsmUnavailable, StoreUnavailable, or a bug (logged by the interceptor)
            settled.append((future, exc))
            continue
        if isinstance(result, SignResult):
            settled.append((future, result))
        else:
            passed.append((future, result))
    return passed


def _csr_digest_or_raw(csr: bytes, max_bytes: int) -> bytes:
    """The digest a replayed request is compared by: the SHA-256 of the CSR's DER."""
    try:
        return policy.parse_csr(csr, max_bytes).sha256
    except InvalidRequest:
        return hashlib.sha256(csr).digest()


# ---------------------------------------------------------------------------
# Set-up use cases (security officers, via the CLI)
# ---------------------------------------------------------------------------


def unfinished_emergency_notice(key_id: str, halted_at: datetime, successor: str, *, active: bool) -> str:
    """What an operator reads about a key an emergency halted and did not switch from: "by an emergency since ..., what
    it stops and what to do" (`key list`, `key status`, the daemon's log). successor: "" when no approval names one."""
    effect = (
        "issuance is stopped until the emergency completes (every Sign is answered UNAVAILABLE, rule ca-key-compromised)"
        if active
        else "its certificates may not all be revoked yet"
    )
    return (
        f"by an emergency since {halted_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}, which has not completed: {effect}; "
        f"to complete it, retry `ca-daemon key approve emergency --key-id {key_id} --successor {successor or 'NEW'}` (one "
        "officer's approval completes it while two officers' approvals are within [rotation] approval_window_seconds; "
        "after that, two officers approve again)"
    )


def load_active_ca(config: Config, hsm: Hsm, store: SqlStore) -> ActiveCa:
    """The CA key that signs: the store's active key; on first start, the configured `[ca] key`.

    After a rotation (rotation.py) the store names the active key, and `[ca] key` only names
    the first key (and the label in the configured URLs).
    """
    active_id = store.active_key_id()
    if active_id is not None:
        stored = store.get_ca_key(active_id)
        assert stored is not None
        uri = Pkcs11Uri.parse(stored.pkcs11_uri)
        key_id = active_id
    else:
        uri = Pkcs11Uri.parse(config.ca.key_uri)
        key_id = key_id_for(uri)
    public_der = hsm.public_key_der(uri)
    key = store.get_ca_key(key_id)
    if key is None or key.certificate_der is None:
        raise FailedPrecondition(
            f"CA key {key_id} has no certificate installed; run `ca-daemon init` for a self-signed root or "
            "`ca-daemon ca csr` and `ca-daemon ca import-cert` for an intermediate"
        )
    certificate = x509.load_der_x509_certificate(key.certificate_der)
    if _spki(certificate) != public_der:
        raise FailedPrecondition(f"the installed certificate of CA key {key_id} does not match the key in the token")
    if key.status not in (KeyStatus.ACTIVE, KeyStatus.PENDING):
        raise FailedPrecondition(
            f"CA key {key_id} is {key.status.value} and no other key is active; activate a key with `ca-daemon key approve`"
        )
    if key.status != KeyStatus.ACTIVE:
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            # As the key ceremony's activation (rotation.py): a key becomes the signing key only within its certificate's validity.
            raise _ca_validity_refusal(key_id, certificate.not_valid_before_utc, certificate.not_valid_after_utc, now)
        check_parents_valid(key, now, early_action="start it after")  # and within its parents', as there
        key = CaKey(**{**key.__dict__, "status": KeyStatus.ACTIVE})
        store.save_ca_key(key, key_event(key, "key.activate", "active", "ca-daemon"))
    return ActiveCa(key, certificate, hsm.private_key(uri), chain_pem(key.certificate_der or b"", key.chain_der))


def check_parents_valid(key: CaKey, now: datetime, *, early_action: str) -> None:
    """Refuse (FailedPrecondition, rule ca-certificate-validity) a key to become the signing key while a parent in its
    chain is not valid: every certificate it signed would chain through a certificate relying parties reject.

    For the first start (load_active_ca) and the key ceremony's activation (rotation.py); early_action says what to do
    about a parent not yet valid ("start it after", "activate it after"), followed by the parent's notBefore.
    """
    for parent in map(x509.load_der_x509_certificate, key.chain_der):
        if not parent.not_valid_before_utc <= now <= parent.not_valid_after_utc:
            action = (
                f"{early_action} {parent.not_valid_before_utc.isoformat()}"
                if now < parent.not_valid_before_utc
                else "have the parent CA renew it and install the new chain (`ca-daemon ca import-cert`)"
            )
            raise FailedPrecondition(
                f"the parent certificate {echo(parent.subject.rfc4514_string())} in the chain of key {key.key_id} is valid from "
                f"{parent.not_valid_before_utc.isoformat()} to {parent.not_valid_after_utc.isoformat()}, not now "
                f"({now.isoformat()}); no certificate this key signed would validate; {action}",
                rule="ca-certificate-validity",
            )


def create_ca_key(config: Config, hsm: Hsm, store: SqlStore, spec: KeySpec, label: str, actor: str = "ca-daemon-cli") -> CaKey:
    """Generate a CA key pair in the token and record it (pending until it has a certificate).

    Refused before anything is made for a label taken or outside the alphabet, and for URLs that would not name it.
    """
    check_new_key_label(hsm, store, label)
    check_new_key_urls(config, store, label)
    if not hsm.supports(spec):
        raise FailedPrecondition(f"the token does not offer the mechanisms for {spec.value} keys")
    generated = hsm.generate_key(spec, label)
    key = CaKey(
        key_id=key_id_for(generated.uri),
        pkcs11_uri=str(generated.uri),
        spec=spec,
        public_key_der=generated.public_key_der,
        status=KeyStatus.PENDING,
        created_at=datetime.now(UTC),
    )
    try:
        store.save_ca_key(key, key_event(key, "key.generate", "generated", actor, _generation_details(key)), new=True)
    except AlreadyExists:
        # Another generation of this label (another worker, or an officer's second click) passed the check at the same
        # time and recorded its key first. Recorded too, this one overwrote that record and left a pair nobody tracks.
        hsm.destroy_key(generated.uri)  # by label and CKA_ID: only the pair generated here
        raise _label_taken(label) from None
    return key


# A key label (CKA_LABEL, also the key_id and part of the URL /ca/KEY.der): ASCII only, so no key can be named
# with a lookalike of another's name (str.isalnum() took Cyrillic and fullwidth letters). It starts with a letter or
# digit: put in a CRL or CA URL in place of the configured key's label (rename_urls), "." or ".." could make a
# dot-segment, which the HTTP server refuses and clients resolve elsewhere. It does not end in "-delta": key K's delta
# CRL is /crl/K-delta.crl (and the file K-delta.crl), where a key named K-delta had its full CRL served and written.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LABEL_RULE = "1-64 of [A-Za-z0-9-_.], starting with a letter or digit, not ending in -delta"


def _label_taken(label: str) -> FailedPrecondition:
    return FailedPrecondition(f"a CA key named {label!r} exists already; choose another label", rule="label", field="label")


def check_new_key_label(hsm: Hsm, store: SqlStore, label: str) -> None:
    """A new CA key's label: of the ASCII alphabet, and naming no key of the store or the token.

    The store records a key under its label, so a second key of one label overwrote the first
    key's record (even the active key's), and two token keys of one label make both ambiguous.
    """
    if not _LABEL.fullmatch(label) or label.endswith("-delta"):
        raise InvalidRequest(f"key label {echo(label)} is not usable: use {LABEL_RULE}", rule="label", field="label", expected=LABEL_RULE)
    if store.get_ca_key(label) is not None:
        raise _label_taken(label)
    try:  # another key (audit, mTLS CA) with that label would make both ambiguous
        hsm.public_key_der(Pkcs11Uri(token=hsm.token_label, label=label))
    except (NotFound, FailedPrecondition):
        pass
    else:
        raise FailedPrecondition(f"the token already holds a key labelled {label!r}; choose another label", rule="label", field="label")


def _generation_details(key: CaKey) -> dict[str, str]:
    """A key.generate event's details: `audit verify --live` checks the ca_keys row's public key against its SHA-256."""
    return {"spec": key.spec.value, "uri": key.pkcs11_uri, "public_key_sha256": hashlib.sha256(key.public_key_der).hexdigest()}


def key_event(key: CaKey, action: str, outcome: str, actor: str, details: dict[str, str] | None = None) -> AuditEvent:
    """The audit record of a CA key event (generation, certificate installation, activation)."""
    return AuditEvent(time=datetime.now(UTC), actor=actor, action=action, outcome=outcome, key_id=key.key_id, details=details or {})


def self_sign_root(hsm: Hsm, store: SqlStore, key: CaKey, subject: x509.Name, validity: timedelta) -> CaKey:
    """Make the key a self-signed root and install the certificate."""
    private = hsm.private_key(Pkcs11Uri.parse(key.pkcs11_uri))
    builder = issuer.build_root(subject, private.public_key(), datetime.now(UTC), validity)  # type: ignore[attr-defined]
    certificate = builder.sign(private, issuer.signature_hash(private))  # type: ignore[arg-type]
    installed = CaKey(**{**key.__dict__, "certificate_der": certificate.public_bytes(serialization.Encoding.DER), "chain_der": ()})
    details = {"subject": certificate.subject.rfc4514_string(), "kind": "self-signed root"}
    store.save_ca_key(installed, key_event(installed, "key.certificate", "installed", "ca-daemon-cli", details))
    return installed


def ca_csr(hsm: Hsm, key: CaKey, subject: x509.Name) -> bytes:
    """A PEM CSR, signed in the token, for an outside parent CA to certify this key."""
    private = hsm.private_key(Pkcs11Uri.parse(key.pkcs11_uri))
    csr = issuer.build_ca_csr(subject).sign(private, issuer.signature_hash(private))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def issued_extended_key_usages(config: Config) -> dict[x509.ObjectIdentifier, list[str]]:
    """Every extendedKeyUsage the configured profiles put in certificates, with the profiles that do."""
    issued: dict[x509.ObjectIdentifier, list[str]] = {}
    for profile in profiles_from_config(config).values():
        for usage in profile.extended_key_usage:
            issued.setdefault(usage, []).append(profile.name)
    return issued


def import_ca_certificate(
    store: SqlStore,
    key: CaKey,
    certificate: x509.Certificate,
    parents: list[x509.Certificate],
    actor: str = "ca-daemon-cli",
    *,
    policy_config: Config,
    install_once: bool = False,
) -> CaKey:
    """Install a parent-signed certificate for a CA key after checking it really certifies that key.

    policy_config: the configuration whose profiles the key will issue for: the certificate and its parents must not
    exclude their extendedKeyUsages, nor their nameConstraints the profiles' san_templates. install_once (the key
    ceremony): only while the key is still pending without a certificate (SqlStore.save_ca_key).
    """
    issued_usages = issued_extended_key_usages(policy_config)
    for position, checked in enumerate((certificate, *parents)):
        _check_names_and_key_parse(checked, position)
    if _spki(certificate) != key.public_key_der:
        raise FailedPrecondition(
            f"the certificate's public key does not match CA key {key.key_id} in the token; was it issued for another CSR?"
        )
    for checked in (certificate, *parents):
        _check_extensions_parse(checked)
        _check_no_unknown_critical_extension(checked, "certificate_pem" if checked is certificate else "chain_pem")
        _check_extended_key_usage(checked, "certificate_pem" if checked is certificate else "chain_pem", issued_usages)
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise FailedPrecondition("the certificate is not a CA certificate (BasicConstraints CA:true is missing)")
    _check_ca_key_usage(certificate)
    _check_subject_bounds(certificate)
    _check_not_expired(certificate, datetime.now(UTC))
    _check_parents(certificate, parents, datetime.now(UTC))
    refused_templates = _templates_breaking_names(profiles_from_config(policy_config), [certificate, *parents])
    if refused_templates is not None:
        raise InvalidRequest(
            f"{refused_templates}: Sign would refuse every certificate of that profile under this chain; ask the parent CA "
            "for a certificate whose nameConstraints allow the profile's names, or change the profile first",
            rule="ca-chain",
            field="certificate_pem",
            expected="a chain whose nameConstraints allow the names the profiles' san_templates make",
        )
    issuer_cert = certificate
    for parent in parents:
        try:
            issuer_cert.verify_directly_issued_by(parent)
        except (ValueError, TypeError, Exception) as exc:
            raise FailedPrecondition(
                f"chain does not link: {issuer_cert.subject.rfc4514_string()} is not signed by {parent.subject.rfc4514_string()} ({exc})"
            ) from None
        issuer_cert = parent
    installed = CaKey(
        **{
            **key.__dict__,
            "certificate_der": certificate.public_bytes(serialization.Encoding.DER),
            "chain_der": tuple(p.public_bytes(serialization.Encoding.DER) for p in parents),
        }
    )
    details = {"subject": certificate.subject.rfc4514_string(), "issuer": certificate.issuer.rfc4514_string(), "kind": "imported"}
    store.save_ca_key(installed, key_event(installed, "key.certificate", "installed", actor, details), install_once=install_once)
    return installed


def _check_ca_key_usage(certificate: x509.Certificate) -> None:
    """A KeyUsage, when present, lets the key sign certificates and its CRLs (RFC 5280 4.2.1.3): it does both."""
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    missing = [name for name, allowed in (("keyCertSign", usage.key_cert_sign), ("cRLSign", usage.crl_sign)) if not allowed]
    if missing:
        raise InvalidRequest(
            f"the CA certificate's KeyUsage lacks {' and '.join(missing)}: relying parties would reject what this key signs",
            rule="ca-key-usage",
            field="certificate_pem",
            expected="a KeyUsage with keyCertSign and cRLSign (or none)",
        )


def _check_subject_bounds(certificate: x509.Certificate) -> None:
    """The parent may name the key otherwise than the CSR did: its subject is held to the bounds of the CA subjects
    officers give (issuer.check_ca_subject_bounds), as every certificate and CRL the key signs carries it."""
    try:
        issuer.check_ca_subject_bounds(certificate.subject)
    except ValueError as exc:
        raise InvalidRequest(
            f"{exc} (in the certificate's subject); ask the parent CA for a certificate with the subject of the CSR",
            rule="subject",
            field="certificate_pem",
            expected=f"a subject with {issuer.CA_SUBJECT_BOUNDS}",
        ) from None


def _check_not_expired(certificate: x509.Certificate, now: datetime) -> None:
    """An expired CA certificate is refused at install; one not yet valid may be pre-published (activation checks it)."""
    if certificate.not_valid_after_utc < now:
        raise InvalidRequest(
            f"the CA certificate expired at {certificate.not_valid_after_utc.isoformat()} (now {now.isoformat()})",
            rule="ca-certificate-validity",
            field="certificate_pem",
            expected="a CA certificate whose notAfter is in the future",
        )


def _check_parents(certificate: x509.Certificate, parents: list[x509.Certificate], now: datetime) -> None:
    """A parent-signed certificate comes with its chain (issued certificates are served with it), of CA certificates.

    Each parent must be able to certify what is below it, as a relying party checks it (RFC 5280 6.1.4): not
    expired, keyCertSign if it has a KeyUsage, and a pathLenConstraint that allows the CA certificates under it.
    Installed without that, the key was activated and signed leaves that `openssl verify` rejects ("certificate
    has expired", "path length constraint exceeded", "key usage does not include certificate signing").
    """
    if certificate.issuer != certificate.subject and not parents:
        raise InvalidRequest(
            f"the certificate is issued by {echo(certificate.issuer.rfc4514_string())} but no parent certificate was given",
            rule="ca-chain",
            field="chain_pem",
            expected="the parent certificates, issuer first, up to the root",
        )
    for parent in parents:
        try:
            is_ca = parent.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise InvalidRequest(
                f"the parent certificate {echo(parent.subject.rfc4514_string())} is not a CA certificate (BasicConstraints CA:true)",
                rule="ca-chain",
                field="chain_pem",
                expected="parent certificates with BasicConstraints CA:true",
            )
    for index, parent in enumerate(parents):
        name = echo(parent.subject.rfc4514_string())
        if parent.not_valid_after_utc < now:
            raise InvalidRequest(
                f"the parent certificate {name} expired at {parent.not_valid_after_utc.isoformat()} (now {now.isoformat()}): "
                "no certificate this key signs would validate",
                rule="ca-chain",
                field="chain_pem",
                expected="parent certificates whose notAfter is in the future",
            )
        try:
            usage: x509.KeyUsage | None = parent.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise InvalidRequest(
                f"the parent certificate {name} has a KeyUsage without keyCertSign: it cannot certify a CA",
                rule="ca-chain",
                field="chain_pem",
                expected="parent certificates whose KeyUsage (if any) includes keyCertSign",
            )
        path_length = parent.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
        below = sum(1 for c in [certificate, *parents[:index]] if c.issuer != c.subject)  # self-issued ones do not count
        if path_length is not None and path_length < below:
            raise InvalidRequest(
                f"the parent certificate {name} allows {path_length} CA certificate(s) below it (pathLenConstraint), "
                f"this chain puts {below} there",
                rule="ca-chain",
                field="chain_pem",
                expected="parent certificates whose pathLenConstraint allows the CA certificates under them",
            )
    _check_chain_names(certificate, parents)


def _check_chain_names(certificate: x509.Certificate, parents: list[x509.Certificate]) -> None:
    """Each CA certificate's names fit the nameConstraints of the parents above it, as relying parties check them:
    otherwise they reject every leaf below it ("permitted subtree violation"). Self-issued ones are not checked
    (RFC 5280 6.1.3, OpenSSL)."""
    chain = [certificate, *parents]
    for index, checked in enumerate(chain[:-1]):
        if checked.issuer == checked.subject:
            continue
        above = name_constraints.from_chain(chain[index + 1 :])
        try:
            sans: list[x509.GeneralName] = list(checked.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            sans = []
        violation = above.violation(checked.subject, sans, leaf=False) if above is not None else None
        if violation is not None:
            raise InvalidRequest(
                f"the certificate {echo(checked.subject.rfc4514_string())}: {violation.message}; relying parties would reject "
                "every certificate this key signs",
                rule="ca-chain",
                field="certificate_pem" if checked is certificate else "chain_pem",
                expected="a CA certificate whose names fit its parents' nameConstraints",
            )


def _check_names_and_key_parse(certificate: x509.Certificate, position: int) -> None:
    """Refuse a certificate whose subject, issuer or public key cannot be read (position 0: the key's, then its parents).

    cryptography reads them on first use: a name whose UTF8String is not UTF-8, or a key of a type it does not know,
    raised out of the checks below (INTERNAL), and a parent's issuer name, which nothing read, was installed and served
    to relying parties, who cannot read it either.
    """
    which = "the certificate" if position == 0 else f"parent certificate {position}"
    parts: tuple[tuple[str, Callable[[], object]], ...] = (
        ("subject", lambda: certificate.subject),
        ("issuer name", lambda: certificate.issuer),
        ("public key", certificate.public_key),
    )
    for part, read in parts:
        try:
            read()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidRequest(
                f"{which} has an unreadable {part}: {capped(str(exc), 200)}",
                rule="certificate",
                field="certificate_pem" if position == 0 else "chain_pem",
                expected="X.509 certificates whose names parse (RFC 5280 4.1.2.4, 4.1.2.6) and whose key is of a known type",
            ) from None


def _check_extensions_parse(certificate: x509.Certificate) -> None:
    """Refuse a certificate whose extensions cannot be read (one twice, a malformed value): every later use reads them."""
    try:
        certificate.extensions  # noqa: B018 (parsed on first access)
    except (x509.DuplicateExtension, ValueError) as exc:
        raise InvalidRequest(
            f"the certificate {echo(certificate.subject.rfc4514_string())} has unreadable extensions: {capped(str(exc), 200)}",
            rule="certificate",
            field="certificate_pem",
            expected="X.509 certificates whose extensions each appear once and parse (RFC 5280 4.2)",
        ) from None


def _check_no_unknown_critical_extension(certificate: x509.Certificate, field: str) -> None:
    """Refuse a critical extension of a type nobody here recognizes: a relying party must then reject the certificate
    (RFC 5280 4.2; openssl: "unhandled critical extension"), and with it every leaf the key signs."""
    for extension in certificate.extensions:
        if extension.critical and isinstance(extension.value, x509.UnrecognizedExtension):
            raise InvalidRequest(
                f"the certificate {echo(certificate.subject.rfc4514_string())} has a critical extension "
                f"{extension.oid.dotted_string} that relying parties do not recognize: they would reject every certificate "
                "this key signs",
                rule="ca-chain",
                field=field,
                expected="CA certificates whose critical extensions are standard ones (RFC 5280 4.2)",
            )


def _check_extended_key_usage(certificate: x509.Certificate, field: str, issued_usages: dict[x509.ObjectIdentifier, list[str]]) -> None:
    """A CA certificate's extendedKeyUsage, when it has one, names every usage the profiles issue: relying parties that
    check the purpose along the chain (openssl -purpose sslclient, which TLS servers apply to their clients; Go's and
    Java's TLS stacks) otherwise reject every certificate of those profiles it signs. anyExtendedKeyUsage does not stand
    in for them: OpenSSL 3 (the TLS stack of Mosquitto and most brokers) rejects a device certificate under a CA whose
    only usage it is ("unsuitable certificate purpose")."""
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    excluded = [usage for usage in issued_usages if usage not in usages]
    if excluded:
        has = ", ".join(policy.eku_name(usage) for usage in usages)
        issued = " and ".join(f"{policy.eku_name(u)} (issued by profile {', '.join(issued_usages[u])})" for u in excluded)
        raise InvalidRequest(
            f"the certificate {echo(certificate.subject.rfc4514_string())} has extendedKeyUsage ({has}), which excludes "
            f"{issued}: relying parties that check the purpose "
            "along the chain would reject every such certificate this key signs; ask the parent CA for certificates "
            "without extendedKeyUsage or with these usages",
            rule="ca-chain",
            field=field,
            expected="CA certificates with no extendedKeyUsage, or with every usage the profiles issue "
            f"({', '.join(policy.eku_name(u) for u in issued_usages)}); anyExtendedKeyUsage alone is not enough for OpenSSL",
        )


def _spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
