"""Registering the CA with a cloud service: the proof-of-possession ("verification") certificate.

Azure DPS / IoT Hub and AWS IoT trust an uploaded CA certificate only after the CA proves it
holds the private key: the service hands out a code, and the CA signs a certificate whose
subject CN is that code. Nothing else in it matters to the services, so the certificate's
own key pair is a throwaway made here and discarded; what counts is that the CA key in the
HSM signed it. It is a CA signature like any other, so it goes through the same steps as a
device certificate: build and lint a draft, sign it in the token, audit.

Same layer as authority.py and revocation.py (issuer-level building, the HSM, the store).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_daemon import issuer
from ca_daemon.audit import EventRecorder, is_refusal, refusal_event
from ca_daemon.authority import ActiveCa
from ca_daemon.errors import CaError, InvalidRequest
from ca_daemon.hsm import Hsm
from ca_daemon.lint import Linter
from ca_daemon.model import AuditEvent
from ca_daemon.store import SqlStore, serial_hex

log = logging.getLogger(__name__)

DEFAULT_VALIDITY = timedelta(days=1)
MAX_VALIDITY = timedelta(days=30)
AUDIT_ACTION = "ca.verification-certificate"
# RFC 5280 ub-common-name is 64; the services' codes are hex or base64-like strings well below it.
_CODE = re.compile(r"[!-~]{1,64}")


@dataclass(frozen=True)
class VerificationCertificate:
    certificate: x509.Certificate
    issuer_key_id: str

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def serial(self) -> str:
        return serial_hex(self.certificate.serial_number)


def check_code(code: str) -> str:
    """The verification code as given, or InvalidRequest saying what a code may look like."""
    if not _CODE.fullmatch(code):
        raise InvalidRequest(
            f"verification code {code[:80]!r} is not 1 to 64 printable ASCII characters without spaces",
            rule="verification-code",
            field="code",
            expected="the code exactly as the cloud service shows it, e.g. 0F3A...",
        )
    return code


def validity_of_seconds(seconds: int) -> timedelta | None:
    """A request's validity_seconds (a uint64) as a timedelta, None for 0 (the default).

    Range-checked as an integer first: timedelta(seconds=2**63) overflows before check_validity could refuse it.
    """
    if seconds > MAX_VALIDITY.total_seconds():
        raise _validity_out_of_range(f"{seconds} seconds")
    return timedelta(seconds=seconds) if seconds else None


def check_validity(validity: timedelta | None) -> timedelta:
    if validity is None or validity == timedelta(0):
        return DEFAULT_VALIDITY
    if not timedelta(minutes=5) <= validity <= MAX_VALIDITY:
        raise _validity_out_of_range(str(validity))
    return validity


def _validity_out_of_range(shown: str) -> InvalidRequest:
    return InvalidRequest(
        f"validity {shown} is out of range: from 5 minutes to {MAX_VALIDITY.days} days",
        rule="verification-validity",
        field="validity_seconds",
        expected=f"between 300 and {int(MAX_VALIDITY.total_seconds())} seconds (0: one day)",
    )


def verification_subject(code: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)])


def build_verification_certificate(
    code: str,
    ca_certificate: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    validity: timedelta,
    chain_valid_until: datetime,
) -> x509.CertificateBuilder:
    """An end-entity certificate with subject CN = code, issued by the CA; no SAN, CDP or AIA (it is never revoked).

    Valid until now + validity at most, and never past chain_valid_until (ActiveCa's: the earliest notAfter of the
    CA certificate and its parents), as a device certificate.
    """
    not_after = min(now + validity, ca_certificate.not_valid_after_utc, chain_valid_until)
    return (
        x509.CertificateBuilder()
        .subject_name(verification_subject(code))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(issuer.new_serial())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(ca_certificate), critical=False)
    )


class VerificationCertificates:
    """Issues verification certificates with the active CA key; every one is an audit event."""

    def __init__(
        self,
        hsm: Hsm,
        store: SqlStore,
        active: Callable[[], ActiveCa],
        linter: Linter | None = None,
        *,
        record_refusal: EventRecorder | None = None,
    ) -> None:
        self._hsm = hsm
        self._store = store
        self._active = active
        # pkilint on every one: they are rare, so the full lint costs nothing that matters.
        self._linter = linter or Linter("full")
        # Appends a refused request's event, as Sign's are (app.py: Authority.refusals.record); None records nothing.
        self._record_refusal = record_refusal

    async def request(self, code: str, validity_seconds: int, actor: str) -> VerificationCertificate:
        """A caller's request (IssueVerificationCertificate): issue() off the event loop; a refusal is audited.

        The event is ca.verification-certificate, outcome refused (lint-failed for a certificate the
        lint stopped), with the code only once it is known to be a short printable one.
        """
        try:
            validity = validity_of_seconds(validity_seconds)
            return await asyncio.to_thread(self.issue, code, validity, actor)
        except CaError as refusal:
            if self._record_refusal is not None and is_refusal(refusal):
                details = {"code": code if _CODE.fullmatch(code) else "", "validity_seconds": str(validity_seconds)}
                await self._record_refusal(refusal_event(AUDIT_ACTION, actor, refusal, details=details))
            raise

    def issue(self, code: str, validity: timedelta | None, actor: str) -> VerificationCertificate:
        """Check, build, lint, sign in the token, then record the certificate in the audit log. Blocking."""
        code = check_code(code)
        validity = check_validity(validity)
        ca = self._active()
        throwaway_subject_key = ec.generate_private_key(ec.SECP256R1())  # never stored: only the CA's signature matters
        now = datetime.now(UTC).replace(microsecond=0)
        ca.check_valid(now)  # a CA certificate or parent expired: what it signs would not validate (FAILED_PRECONDITION)
        ca.check_names(verification_subject(code), [])  # nor would a subject the chain's nameConstraints forbid
        builder = build_verification_certificate(
            code, ca.certificate, throwaway_subject_key.public_key(), now, validity, ca.chain_valid_until
        )
        draft_key = issuer.draft_key_like(ca.private_key)  # type: ignore[arg-type]
        log.info("signing a verification certificate for code %r with CA key %s (caller %s)", code, ca.key.key_id, actor)
        certificate = self._hsm.run(lambda: issuer.sign_linted(builder, ca.private_key, draft_key, self._linter))  # type: ignore[arg-type]
        result = VerificationCertificate(certificate, ca.key.key_id)
        self._store.append_audit([_audit(result, code, actor)])
        log.info("issued verification certificate %s for code %r with CA key %s", result.serial, code, ca.key.key_id)
        return result


def _audit(result: VerificationCertificate, code: str, actor: str) -> AuditEvent:
    der = result.der
    return AuditEvent(
        time=datetime.now(UTC),
        actor=actor,
        action=AUDIT_ACTION,
        outcome="issued",
        serial=result.certificate.serial_number,
        key_id=result.issuer_key_id,
        reason="",
        details={
            "code": code,
            "not_after": result.certificate.not_valid_after_utc.isoformat(),
            "sha256": hashlib.sha256(der).hexdigest(),
            # The whole certificate: whatever the CA signed can be shown later.
            "certificate_der_b64": base64.b64encode(der).decode(),
        },
    )


def _aki(ca_certificate: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key())  # type: ignore[arg-type]


__all__ = [
    "AUDIT_ACTION",
    "VerificationCertificate",
    "VerificationCertificates",
    "build_verification_certificate",
    "check_code",
    "check_validity",
    "validity_of_seconds",
]
