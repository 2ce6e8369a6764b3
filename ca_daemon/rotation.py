"""CA key rotation: the security officers' key ceremony, under dual control.

Same layer as authority.py. The steps and who may take them:

- one officer: generate a key in the token (`pending`), self-sign it as a root (with the two
  link certificates when the active key is a self-signed root too) or write a CSR for the
  parent and install the parent's answer. Installing the certificate publishes the key
  (GetCACertificates, HTTP /ca/KEY.der) and starts its pre-publication period.
- two distinct officers within `[rotation] approval_window_seconds`, each calling `approve`:
  `activate` (the key signs new certificates; the old active key is `superseded` and keeps
  signing its CRLs), `retire` (final CRL, then no more signatures), `destroy` (delete a
  retired key from the token) and `emergency` (revoke everything a compromised key signed
  and everything that certifies it, and activate the successor at once). The first
  approval is recorded and audited and changes nothing else.

Every worker notices a new active key within `[rotation] poll_interval_ms`
(Authority.follow_active_key) and opens it in its own Hsm: no restart. Until then the group
commit refuses what it signs with the old key (CaKeyChanged, UNAVAILABLE), and the worker
follows at once. An emergency halts the compromised key before it revokes anything: from
then on until the successor is active, the group commit refuses what it signs too.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon import authority, issuer
from ca_daemon.audit import is_refusal, refusal_event
from ca_daemon.config import Config
from ca_daemon.errors import CaError, FailedPrecondition, InvalidRequest, NotFound, PermissionDenied, echo
from ca_daemon.hsm import Hsm, Pkcs11Uri
from ca_daemon.model import AuditEvent, CaKey, IssuedCertificate, KeySpec, KeyStatus, RevocationReason
from ca_daemon.revocation import CrlPublisher, encode_entry
from ca_daemon.store import SqlStore
from ca_daemon.store.rotation_store import KEY_HALTED, LINK_PROFILE, Lifecycle, RotationStore, StatusChange, link_device_id

log = logging.getLogger(__name__)
T = TypeVar("T")

ACTIONS = ("activate", "retire", "destroy", "emergency")
# An emergency's revocation passes commit this many revocations a transaction (see KeyCeremony._revoke).
_REVOCATIONS_PER_TRANSACTION = 10_000
REQUIRED_APPROVALS = 2
DEFAULT_ROOT_VALIDITY_DAYS = 3650
MAX_ROOT_VALIDITY_DAYS = 36500
_LAST_NOT_AFTER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # the last time an X.509 GeneralizedTime can say


@dataclass(frozen=True)
class ApprovalResult:
    """What one approval did: recorded only, or recorded and executed (with the approving officers)."""

    action: str
    key_id: str
    successor_key_id: str
    officers: tuple[str, ...]
    executed: bool
    message: str


@dataclass(frozen=True)
class KeyInfo:
    key: CaKey
    lifecycle: Lifecycle
    # When the key may be activated (published_at + pre-publication); None before publication.
    activatable_at: datetime | None
    # An emergency halted the key and has not switched yet: the successor its approvals name ("" if none); else None.
    emergency_successor: str | None = None


@dataclass(frozen=True)
class SelfSigned:
    key: CaKey
    links: tuple[IssuedCertificate, ...]


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def root_validity(days: int) -> timedelta:
    """SelfSignKey's validity_days (a uint32, 0: DEFAULT_ROOT_VALIDITY_DAYS) as a timedelta.

    Range-checked as an integer first: timedelta(days=2**32 - 1) overflows before self_sign could refuse it.
    """
    if days > MAX_ROOT_VALIDITY_DAYS:
        raise _root_validity_out_of_range(f"{days} days")
    return timedelta(days=days or DEFAULT_ROOT_VALIDITY_DAYS)


def _check_root_validity(validity: timedelta, now: datetime) -> None:
    if not timedelta(days=1) <= validity <= timedelta(days=MAX_ROOT_VALIDITY_DAYS) or validity > _LAST_NOT_AFTER - now:
        raise _root_validity_out_of_range(f"{validity.days} days")


def _root_validity_out_of_range(shown: str) -> InvalidRequest:
    return InvalidRequest(
        f"root validity {shown} is out of range",
        rule="root-validity",
        field="validity_days",
        expected=f"between 1 and {MAX_ROOT_VALIDITY_DAYS} days (0: {DEFAULT_ROOT_VALIDITY_DAYS}), ending by 9999-12-31",
    )


class KeyCeremony:
    """The officers' use cases. Blocking (token and store): call from a thread, not the event loop."""

    def __init__(self, config: Config, hsm: Hsm, store: SqlStore, policy_in_force: Callable[[], Config] | None = None) -> None:
        """policy_in_force: the configuration whose profiles are in force (a worker's, reloads included); else config's."""
        self._config = config
        self._policy_in_force = policy_in_force or (lambda: config)
        self._hsm = hsm
        self._store = store
        self._rotation = RotationStore(store)

    # -- one officer ---------------------------------------------------------

    def generate(self, officer: str, spec: KeySpec, label: str) -> CaKey:
        def run() -> CaKey:
            _check_officer(officer)
            return authority.create_ca_key(self._config, self._hsm, self._store, spec, label, actor=officer)

        return self._audited("key.generate", officer, label, {"spec": spec.value}, run)

    def self_sign(self, officer: str, key_id: str, subject: x509.Name, validity: timedelta) -> SelfSigned:
        """Make a pending key a self-signed root; link it with the active root both ways; publish it."""
        details = {"kind": "self-signed root", "subject": subject.rfc4514_string()[:256]}
        return self._audited("key.certificate", officer, key_id, details, lambda: self._self_sign(officer, key_id, subject, validity))

    def _self_sign(self, officer: str, key_id: str, subject: x509.Name, validity: timedelta) -> SelfSigned:
        _check_officer(officer)
        _check_root_validity(validity, _now())
        key = self._pending_without_certificate(key_id)
        private = self._hsm.private_key(Pkcs11Uri.parse(key.pkcs11_uri))
        now = _now()
        builder = issuer.build_root(subject, private.public_key(), now, validity)  # type: ignore[attr-defined]
        certificate = builder.sign(private, issuer.signature_hash(private))  # type: ignore[arg-type]
        installed = CaKey(**{**key.__dict__, "certificate_der": certificate.public_bytes(serialization.Encoding.DER), "chain_der": ()})
        details = {"subject": certificate.subject.rfc4514_string(), "kind": "self-signed root"}
        self._store.save_ca_key(
            installed, authority.key_event(installed, "key.certificate", "installed", officer, details), install_once=True
        )
        links: list[IssuedCertificate] = []
        current = self._active()
        if current is not None and current.halted_at is not None:
            # A key emergency is under way: no link may chain the compromised key's certificates to the new root.
            log.warning("CA key %s is halted by a key emergency: %s is installed with no link certificates", current.key_id, key_id)
        elif current is not None and current.certificate_der is not None and not current.chain_der:
            old_certificate = x509.load_der_x509_certificate(current.certificate_der)
            # Not with an expired root: a link ends when the earlier root does, so it would be born expired.
            if old_certificate.issuer == old_certificate.subject and old_certificate.not_valid_after_utc > now:
                try:
                    links.append(
                        self._link(officer, subject_key=installed, subject_cert=certificate, signer=current, signer_cert=old_certificate)
                    )
                    links.append(
                        self._link(officer, subject_key=current, subject_cert=old_certificate, signer=installed, signer_cert=certificate)
                    )
                except FailedPrecondition as refused:
                    if refused.rule != KEY_HALTED:
                        raise
                    # Halted meanwhile: a link it signed before is the emergency's to revoke (certificates it signed).
                    log.warning("%s; %s is installed with %d link certificate(s)", refused.message, key_id, len(links))
        self._rotation.mark_published(key_id, now)
        return SelfSigned(installed, tuple(links))

    def csr(self, officer: str, key_id: str, subject: x509.Name) -> bytes:
        def run() -> bytes:
            _check_officer(officer)
            return authority.ca_csr(self._hsm, self._pending_without_certificate(key_id), subject)

        return self._audited("key.csr", officer, key_id, {"subject": subject.rfc4514_string()[:256]}, run)

    def install(self, officer: str, key_id: str, certificate: x509.Certificate, parents: list[x509.Certificate]) -> CaKey:
        """Install the parent's answer to `csr` (checked against the token key) and publish the key."""

        def run() -> CaKey:
            _check_officer(officer)
            key = self._pending_without_certificate(key_id)
            installed = authority.import_ca_certificate(
                self._store,
                key,
                certificate,
                parents,
                actor=officer,
                policy_config=self._policy_in_force(),
                install_once=True,
            )
            self._rotation.mark_published(key_id, _now())
            return installed

        return self._audited("key.certificate", officer, key_id, {"kind": "parent-signed"}, run)

    def list_keys(self) -> list[KeyInfo]:
        found = []
        for key in self._store.list_ca_keys():
            lifecycle = self._rotation.lifecycle(key.key_id)
            published = lifecycle.get("published_at")
            activatable = published + self._config.rotation.prepublication if published else None
            found.append(KeyInfo(key, lifecycle, activatable, self._rotation.unfinished_emergency(key)))
        return found

    def links(self) -> list[IssuedCertificate]:
        return self._rotation.links()

    # -- two officers --------------------------------------------------------

    def approve(self, officer: str, action: str, key_id: str, successor_key_id: str = "") -> ApprovalResult:
        """Record one officer's approval; when it is the second distinct officer's, execute the action."""
        details = {"action": action[:64], "successor_key_id": successor_key_id[:128]}
        return self._audited("key.approve", officer, key_id, details, lambda: self._approve(officer, action, key_id, successor_key_id))

    def refused(self, action: str, officer: str, key_id: str, refusal: CaError) -> None:
        """Audit a refusal found before a use case ran (the servicer's conversion of the request)."""
        if is_refusal(refusal):
            event = refusal_event(action, officer or "-", refusal)
            self._store.append_audit([replace(event, key_id=key_id[:128])])

    def _audited(self, action: str, officer: str, key_id: str, details: dict[str, str], run: Callable[[], T]) -> T:
        """run(), and a refusal of it audited (outcome refused, the rule as reason) like Sign's and Revoke's."""
        try:
            return run()
        except CaError as refusal:
            if is_refusal(refusal):
                event = refusal_event(action, officer or "-", refusal, details=details)
                self._store.append_audit([replace(event, key_id=key_id[:128])])
            raise

    def _approve(self, officer: str, action: str, key_id: str, successor_key_id: str) -> ApprovalResult:
        _check_officer(officer)
        if action not in ACTIONS:
            raise InvalidRequest(f"unknown key action {echo(action)}", rule="action", field="action", expected=", ".join(ACTIONS))
        if action == "emergency" and not successor_key_id:
            raise InvalidRequest("an emergency switch names the successor key", rule="successor", field="successor_key_id")
        if action != "emergency" and successor_key_id:
            raise InvalidRequest(f"{action} takes no successor key", rule="successor", field="successor_key_id")
        now = _now()
        self._precheck(action, key_id, successor_key_id, now)  # refuse before recording an approval that could never run
        window = self._config.rotation.approval_window
        event = AuditEvent(
            time=now,
            actor=officer,
            action="key.approve",
            outcome="approved",
            key_id=key_id,
            details={"action": action, "successor_key_id": successor_key_id, "window_seconds": str(int(window.total_seconds()))},
        )
        officers = self._rotation.approve(action, key_id, successor_key_id, officer, now, window, event)
        if len(officers) < REQUIRED_APPROVALS:
            message = (
                f"approval of {action} {key_id} recorded ({len(officers)} of {REQUIRED_APPROVALS} distinct officers); nothing changed yet"
            )
            log.info("%s (by %s)", message, officer)
            return ApprovalResult(action, key_id, successor_key_id, tuple(officers), False, message)
        try:
            message = self._execute(officer, action, key_id, successor_key_id, officers, now)
        except FailedPrecondition:
            # Two officers' approvals completed it at the same moment (a third officer's and a second one's, in two
            # workers): the other call executed it and consumed ours, and this one was refused with "live: 0".
            done = self._done_meanwhile(action, key_id, successor_key_id)
            if done is None:
                raise
            log.info("%s (approval by %s)", done, officer)
            return ApprovalResult(action, key_id, successor_key_id, tuple(officers), False, done)
        log.warning("%s (approved by %s)", message, ", ".join(officers))
        return ApprovalResult(action, key_id, successor_key_id, tuple(officers), True, message)

    def _done_meanwhile(self, action: str, key_id: str, successor_key_id: str) -> str | None:
        """What another call's execution of this action did since our precheck passed, or None if it did not happen.

        The precheck found the key in the state the action starts from, so the state it ends in was reached since.
        """
        key = self._key(key_id)
        if action == "emergency":
            successor = self._key(successor_key_id)
            done = successor.status == KeyStatus.ACTIVE and self._rotation.lifecycle(key_id).get("compromised_at") is not None
        else:
            done = key.status == {"activate": KeyStatus.ACTIVE, "retire": KeyStatus.RETIRED, "destroy": KeyStatus.DESTROYED}[action]
        if not done:
            return None
        return f"approval of {action} {key_id} recorded; a concurrent approval executed it at the same moment: " + (
            f"{successor_key_id} is active" if action == "emergency" else f"CA key {key_id} is {key.status.value}"
        )

    def _precheck(self, action: str, key_id: str, successor_key_id: str, now: datetime) -> None:
        key = self._key(key_id)
        if action == "activate":
            self._check_activatable(key, now, emergency=False)
        elif action == "emergency":
            if key.status not in (KeyStatus.ACTIVE, KeyStatus.SUPERSEDED):
                raise FailedPrecondition(
                    f"CA key {key_id} is {key.status.value}; only an active or superseded key's generation can be revoked"
                )
            if successor_key_id == key_id:
                raise InvalidRequest("the successor must be another key", rule="successor", field="successor_key_id")
            self._check_activatable(self._key(successor_key_id, field="successor_key_id"), now, emergency=True)
        elif action == "retire":
            if key.status == KeyStatus.ACTIVE:
                raise FailedPrecondition(f"CA key {key_id} is the active key; activate its successor first", rule="key-status")
            if key.status not in (KeyStatus.SUPERSEDED, KeyStatus.PENDING):
                raise FailedPrecondition(
                    f"CA key {key_id} is {key.status.value}; only a superseded or pending key can be retired", rule="key-status"
                )
            live = self._rotation.unexpired_unrevoked(key_id, now)
            if live:
                raise FailedPrecondition(
                    f"CA key {key_id} still has {len(live)} valid unrevoked certificate(s); it keeps signing its CRLs until the last "
                    "one expires (or revoke them)",
                    rule="unexpired-certificates",
                )
            held = self._rotation.unexpired_on_hold(key_id, now)
            if held:
                # A hold is reversible, but no CRL of a retired key could ever say it was lifted.
                raise FailedPrecondition(
                    f"CA key {key_id} still has {len(held)} valid certificate(s) on hold (e.g. {held[0]:x}); lift the hold or "
                    "revoke them for good before it retires",
                    rule="certificates-on-hold",
                )
        elif action == "destroy" and key.status != KeyStatus.RETIRED:
            raise FailedPrecondition(f"CA key {key_id} is {key.status.value}; only a retired key can be destroyed", rule="key-status")

    def _check_activatable(self, key: CaKey, now: datetime, *, emergency: bool) -> None:
        if key.status != KeyStatus.PENDING or key.certificate_der is None:
            raise FailedPrecondition(
                f"CA key {key.key_id} is {key.status.value}"
                + ("" if key.certificate_der else " without a certificate")
                + "; only a pending key with an installed certificate can be activated",
                rule="key-status",
            )
        certificate = x509.load_der_x509_certificate(key.certificate_der)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            # Every certificate it signed would chain to a CA certificate relying parties reject: no issuance would validate.
            raise FailedPrecondition(
                f"the CA certificate of key {key.key_id} is valid from {certificate.not_valid_before_utc.isoformat()} to "
                f"{certificate.not_valid_after_utc.isoformat()}, not now ({now.isoformat()}); it cannot become the signing key",
                rule="ca-certificate-validity",
            )
        authority.check_parents_valid(key, now, early_action="activate it after")  # the leaves' chains would fail there
        self._check_in_token(key, certificate)
        published = self._rotation.lifecycle(key.key_id).get("published_at")
        if published is None:
            raise FailedPrecondition(
                f"CA key {key.key_id} was never published; install its certificate with the key ceremony", rule="prepublication"
            )
        ready = published + self._config.rotation.prepublication
        if not emergency and now < ready:
            raise FailedPrecondition(
                f"CA key {key.key_id} is pre-published until {ready.isoformat()} so relying parties can add it; activate it after that",
                rule="prepublication",
            )
        current = self._active()
        if emergency or current is None or current.certificate_der is None:
            return
        new_cert = certificate
        old_cert = x509.load_der_x509_certificate(current.certificate_der)
        both_roots = new_cert.issuer == new_cert.subject and old_cert.issuer == old_cert.subject
        # Links with an expired root help no relying party (and self_sign makes none): its own certificate validates nothing.
        if both_roots and old_cert.not_valid_after_utc > now:
            # The links between these two roots, each way: a link with some third root does not let a relying party that
            # trusts only the current root validate the new one's certificates (or the other way round).
            live = {
                (c.issuer_key_id, c.device_id)
                for c in self._rotation.links([current, key])
                if c.not_after > now and self._store.get_revocation(c.serial) is None
            }
            if (current.key_id, link_device_id(key.key_id)) not in live or (key.key_id, link_device_id(current.key_id)) not in live:
                raise FailedPrecondition(
                    f"the link certificates between {current.key_id} and {key.key_id} (each certifying the other, unrevoked) are "
                    f"missing; only a root self-signed while {current.key_id} is active gets both: generate and self-sign a new key",
                    rule="link-certificates",
                )

    def _execute(self, officer: str, action: str, key_id: str, successor_key_id: str, officers: list[str], now: datetime) -> str:
        """Run an approved action; its audit event names the officer whose approval completed it (and all approvers)."""
        window = self._config.rotation.approval_window
        details = {"officers": ",".join(officers), "successor_key_id": successor_key_id}
        self._precheck(action, key_id, successor_key_id, now)
        if action == "activate":
            current = self._active()
            changes = [StatusChange(key_id, (KeyStatus.PENDING,), KeyStatus.ACTIVE, "activated_at")]
            if current is not None:
                changes.insert(0, StatusChange(current.key_id, (KeyStatus.ACTIVE,), KeyStatus.SUPERSEDED, "superseded_at"))
                details["superseded_key_id"] = current.key_id
            event = AuditEvent(time=now, actor=officer, action="key.activate", outcome="executed", key_id=key_id, details=details)
            self._rotation.execute(action, key_id, successor_key_id, now, window, changes, event)
            return f"CA key {key_id} is active" + (f"; {current.key_id} is superseded and keeps signing its CRLs" if current else "")
        if action == "retire":
            key = self._key(key_id)
            as_of = None
            if key.certificate_der is not None:  # superseded, or pending with a certificate (and links) already
                # What is still valid now can only be a link certificate (the precheck found no leaves). A
                # retired key can never revoke it, so it is withdrawn now, on the final CRL: otherwise whoever
                # trusts only this root would accept the successor's chain with no way to learn of its compromise.
                links = self._rotation.unexpired_unrevoked(key_id, now, leaves_only=False)
                details["revoked_link_certificates"] = str(self._revoke(links, RevocationReason.CESSATION_OF_OPERATION, officer))
                # And the links other keys issued for it: a key that signs nothing more needs no certificate, and one
                # left valid would let a compromise of it, before it is destroyed, pass as a chain to their roots.
                certifying = self._links_to_withdraw(key_id, now)
                details["revoked_links_certifying_it"] = str(self._revoke(certifying, RevocationReason.CESSATION_OF_OPERATION, officer))
                publisher = CrlPublisher(self._config, self._hsm, self._store)
                final = publisher.publish_final(publisher.issuer_of(key), now)
                details["final_crl_number"] = str(final.crl_number)
                as_of = final.change_seq
            change = StatusChange(key_id, (KeyStatus.SUPERSEDED, KeyStatus.PENDING), KeyStatus.RETIRED, "retired_at")
            event = AuditEvent(time=now, actor=officer, action="key.retire", outcome="executed", key_id=key_id, details=details)
            self._rotation.execute(action, key_id, successor_key_id, now, window, [change], event, revocations_as_of=as_of)
            return f"CA key {key_id} is retired" + (f" (final CRL {details['final_crl_number']})" if "final_crl_number" in details else "")
        if action == "destroy":
            if len(self._rotation.live_officers(action, key_id, successor_key_id, now, window)) < REQUIRED_APPROVALS:
                raise FailedPrecondition("the approvals lapsed before the key was destroyed", rule="dual-control")
            key = self._key(key_id)
            self._hsm.destroy_key(Pkcs11Uri.parse(key.pkcs11_uri))
            details["uri"] = key.pkcs11_uri
            change = StatusChange(key_id, (KeyStatus.RETIRED,), KeyStatus.DESTROYED, "destroyed_at")
            event = AuditEvent(time=now, actor=officer, action="key.destroy", outcome="executed", key_id=key_id, details=details)
            self._rotation.execute(action, key_id, successor_key_id, now, window, [change], event)
            return f"CA key {key_id} is destroyed: deleted from the token"
        return self._emergency(officer, key_id, successor_key_id, now, details)

    def _emergency(self, actor: str, key_id: str, successor_key_id: str, now: datetime, details: dict[str, str]) -> str:
        """Halt the compromised key, revoke its generation, then switch to the successor.

        1. Halt (its own transaction; the approvals stay live): from its commit on, the group
           commit stores nothing the key signs (a worker's Sign is answered UNAVAILABLE, "the
           key is compromised ... issuance resumes once the successor is active"). On PostgreSQL
           it waits for the commits that read the key's status FOR SHARE, so pass 1 finds
           their certificates. Before, certificates committed while pass 1 ran (long on a big
           store) were handed out and revoked by the second pass moments later.
        2. Pass 1: revoke every unrevoked certificate of the key and the links certifying it.
        3. The switch, which consumes the approvals. A crash before it leaves them live (and the
           key halted), so the officers' retry completes the emergency; switching first would
           not (a retry is refused once the successor is active).
        4. Pass 2, two poll intervals on: defence in depth; nothing should be left.

        Both passes skip serials revoked meanwhile (skip_revoked), so two executions at once
        (a third officer's approval while this one runs) do not fail on each other's
        revocations: each halts (idempotent) and revokes what is left, one switches, and
        the other is refused at the switch and told that a concurrent approval executed it
        (_approve, _done_meanwhile). The one that switches states (answer, log, `executed` audit event) what the
        emergency revoked as a whole, whichever execution revoked it: it may have found everything revoked already.
        """
        window = self._config.rotation.approval_window
        halt = AuditEvent(
            time=now, actor=actor, action="key.emergency", outcome="halted", key_id=key_id, details={**details, "step": "halt"}
        )
        self._rotation.halt(key_id, successor_key_id, now, window, halt)
        issued = self._rotation.unexpired_unrevoked(key_id, now, leaves_only=False)
        revoked = self._revoke(issued, RevocationReason.CA_COMPROMISE, actor)
        # Where we are the parent: the link certificates that certify the compromised key, on their issuers' CRLs.
        certifying = [c.serial for c in self._rotation.links_certifying(key_id)]
        live = [s for s in certifying if s in set(self._rotation_unrevoked(certifying))]
        revoked_links = self._revoke(live, RevocationReason.KEY_COMPROMISE, actor)
        details |= {"revoked_certificates": str(revoked), "revoked_link_certificates": str(revoked_links)}
        # What this pass listed and another call (a concurrent execution, a Revoke) revoked first: revoked all the same.
        details["revoked_meanwhile"] = str(len(issued) - revoked + len(live) - revoked_links)
        # The emergency as a whole: what another execution revoked before this one listed it is in neither count above.
        total_signed, total_certifying = self._rotation.compromise_revocations(key_id)
        details |= {"total_revoked_certificates": str(total_signed), "total_revoked_link_certificates": str(total_certifying)}
        key = self._key(key_id)
        changes = [
            StatusChange(key_id, (KeyStatus.ACTIVE, KeyStatus.SUPERSEDED), KeyStatus.SUPERSEDED, "compromised_at"),
            StatusChange(successor_key_id, (KeyStatus.PENDING,), KeyStatus.ACTIVE, "activated_at"),
        ]
        if key.status == KeyStatus.SUPERSEDED:  # the active key is another one: it is superseded by the successor too
            current = self._active()
            if current is not None and current.key_id != successor_key_id:
                changes.insert(0, StatusChange(current.key_id, (KeyStatus.ACTIVE,), KeyStatus.SUPERSEDED, "superseded_at"))
        event = AuditEvent(time=now, actor=actor, action="key.emergency", outcome="executed", key_id=key_id, details=details)
        self._rotation.execute("emergency", key_id, successor_key_id, now, window, changes, event)
        time.sleep(2 * self._config.rotation.poll_interval.total_seconds() + 0.5)
        revoked += self._revoke(
            self._rotation.unexpired_unrevoked(key_id, _now(), leaves_only=False), RevocationReason.CA_COMPROMISE, actor
        )
        # The officer is told what the emergency did, not what this execution did: when two approvals execute it at once,
        # the one that switches may find the other's revocations done before it listed anything.
        total_signed, total_certifying = self._rotation.compromise_revocations(key_id)
        by_others = ""
        if (total_signed, total_certifying) != (revoked, revoked_links):
            by_others = (
                f" ({total_signed - revoked} and {total_certifying - revoked_links} of them by another execution of this "
                "emergency or a Revoke)"
            )
        return (
            f"CA key {key_id} is compromised: {total_signed} certificate(s) it signed and {total_certifying} link certificate(s) "
            f"certifying it are revoked{by_others}; {successor_key_id} is active"
        )

    def _rotation_unrevoked(self, serials: list[int]) -> list[int]:
        return [s for s in serials if self._store.get_revocation(s) is None]

    def _check_in_token(self, key: CaKey, certificate: x509.Certificate) -> None:
        """The token still holds the key pair its certificate names (both halves).

        Activated without it, a key whose private half was deleted stopped all issuance, and one whose pair was
        replaced under its label left every worker signing with the superseded key (each refused to switch).
        """
        uri = Pkcs11Uri.parse(key.pkcs11_uri)
        try:
            in_token = self._hsm.public_key_der(uri)
            self._hsm.private_key_attributes(uri)
        except NotFound:
            raise FailedPrecondition(
                f"the token no longer holds CA key {key.key_id} ({key.pkcs11_uri}); it cannot become the signing key",
                rule="key-in-token",
            ) from None
        spki = certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if in_token != spki:
            raise FailedPrecondition(
                f"the certificate of CA key {key.key_id} does not match the key pair the token holds under {key.pkcs11_uri}; "
                "it cannot become the signing key",
                rule="key-in-token",
            )

    def _links_to_withdraw(self, key_id: str, now: datetime) -> list[int]:
        """Serials of the unexpired, unrevoked links certifying key_id whose issuer still signs CRLs."""
        signing = {k.key_id for k in self._store.list_ca_keys() if k.status in (KeyStatus.ACTIVE, KeyStatus.SUPERSEDED, KeyStatus.PENDING)}
        return [
            link.serial
            for link in self._rotation.links_certifying(key_id)
            if link.issuer_key_id in signing and link.not_after > now and self._store.get_revocation(link.serial) is None  # none in force
        ]

    def _revoke(self, serials: list[int], reason: RevocationReason, actor: str) -> int:
        """Revoke serials, _REVOCATIONS_PER_TRANSACTION a transaction: a key of a million devices in one transaction held
        every row and audit event of it in memory at once. Each part is durable on its own; a retry after a crash
        skips what an earlier part revoked."""
        revoked = 0
        for start in range(0, len(serials), _REVOCATIONS_PER_TRANSACTION):
            revoked += len(
                self._store.record_revocations(
                    serials=serials[start : start + _REVOCATIONS_PER_TRANSACTION],
                    device_id="",
                    reason=reason,
                    revoked_at=_now(),
                    invalidity_date=None,
                    actor=actor,
                    encode_entry=encode_entry,
                    skip_revoked=True,  # revoked since it was listed (another execution, an operator's Revoke): done already
                )
            )
        return revoked

    # -- helpers -------------------------------------------------------------

    def _key(self, key_id: str, field: str = "key_id") -> CaKey:
        """The key named by the request's field key_id (or field: successor_key_id, which the refusal then names)."""
        key = self._store.get_ca_key(key_id)
        if key is None:
            named = "" if field == "key_id" else f" ({field})"
            raise NotFound(f"no CA key {echo(key_id)}{named}; `ca-daemon key list` shows the known keys", rule="key", field=field)
        return key

    def _pending_without_certificate(self, key_id: str) -> CaKey:
        key = self._key(key_id)
        if key.status != KeyStatus.PENDING or key.certificate_der is not None:
            raise FailedPrecondition(
                f"CA key {key_id} is {key.status.value}"
                + (" with a certificate" if key.certificate_der else "")
                + "; a certificate is installed once, on a pending key",
                rule="key-status",
            )
        return key

    def _active(self) -> CaKey | None:
        active_id = self._store.active_key_id()
        return self._store.get_ca_key(active_id) if active_id else None

    def _link(
        self, officer: str, *, subject_key: CaKey, subject_cert: x509.Certificate, signer: CaKey, signer_cert: x509.Certificate
    ) -> IssuedCertificate:
        now = _now()
        private = self._hsm.private_key(Pkcs11Uri.parse(signer.pkcs11_uri))
        crl_urls = authority.rename_urls(self._config, self._config.ca.crl_distribution_points, signer.key_id)
        authority.record_key_urls(self._store, signer.key_id, issuer.LeafUrls(crl_urls))  # served for the link's life
        builder = issuer.build_link(subject_cert, signer_cert, now, crl_urls)
        certificate = builder.sign(private, issuer.signature_hash(private))  # type: ignore[arg-type]
        certificate.verify_directly_issued_by(signer_cert)
        der = certificate.public_bytes(serialization.Encoding.DER)
        link = IssuedCertificate(
            serial=certificate.serial_number,
            issuer_key_id=signer.key_id,
            device_id=link_device_id(subject_key.key_id),
            profile=LINK_PROFILE,
            subject=certificate.subject.rfc4514_string(),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            der=der,
            csr_sha256=b"",
            public_key_sha256=hashlib.sha256(subject_key.public_key_der).digest(),
            request_id=f"ca-link:{signer.key_id}:{subject_key.key_id}",
            created_at=now,
        )
        event = AuditEvent(
            time=now,
            actor=officer,
            action="key.link",
            outcome="issued",
            serial=link.serial,
            key_id=signer.key_id,
            device_id=link.device_id,
            details={"subject_key_id": subject_key.key_id, "issuer_key_id": signer.key_id},
        )
        self._rotation.record_link(link, event)
        return link


def _check_officer(officer: str) -> None:
    if not officer or officer == "-":
        raise PermissionDenied("key ceremony steps need an authenticated officer identity", rule="role", expected="officer")


__all__ = ["ACTIONS", "ApprovalResult", "KeyCeremony", "KeyInfo", "SelfSigned", "root_validity"]
