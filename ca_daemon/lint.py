"""Pre-issuance lint: pkilint (RFC 5280) on what the CA is about to sign. No I/O.

pkilint costs about 2 ms per certificate in-process, more than building and signing one,
so linting every certificate in full would halve the served Sign rate. Device
certificates of one profile differ only in a few fields, so `template` mode (the
default) lints each certificate *shape* in full once and, per certificate, checks only
what varies:

- the shape is everything but the varying values: signature algorithm, issuer, key
  algorithm, the subject's attribute types and string types, every extension's OID,
  criticality and value (for the SAN, its name types), and the time encodings;
- the varying values are checked against the same rules pkilint applies to them:
  serial range, validity order, subject string types, lengths and characters, SAN
  syntax (with the same `validators` functions pkilint uses) and the SKI method.

A new shape (a new profile, a key type not seen before, a reload) is linted in full
before its first certificate is signed. `full` mode lints every certificate with
pkilint; `off` skips linting. An ERROR or FATAL finding refuses issuance (LintFailure).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import validators  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_daemon.errors import LintFailure

log = logging.getLogger(__name__)

MODES = ("template", "full", "off")
_SHAPE_CACHE_SIZE = 4096
_MAX_SERIAL = (1 << 159) - 1
# pkilint checks URIs with `validators.url`, which knows only URLs with an authority
# ("scheme://host"); RFC 8141 URNs such as urn:dev:ops:<id> are valid URIs it flags.
_URN = re.compile(r"urn:[A-Za-z0-9][A-Za-z0-9-]{0,31}:[A-Za-z0-9()+,\-.:=@;$_!*'%/?#]+", re.IGNORECASE)
_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")
_UPPER_BOUNDS = {"2.5.4.3": 64, "2.5.4.10": 64, "2.5.4.11": 64, "2.5.4.6": 2, "2.5.4.7": 128, "2.5.4.8": 128, "2.5.4.5": 64}
# DER of the SAN and SKI extension OIDs, and the content of the rsaEncryption OID.
_SAN_OID = bytes.fromhex("0603551d11")
_SKI_OID = bytes.fromhex("0603551d0e")
_RSA_OID = bytes.fromhex("06092a864886f70d010101")
_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"}


@dataclass(frozen=True)
class Finding:
    """One pkilint finding at or above WARNING."""

    severity: str
    code: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity} {self.code} at {self.path}" + (f": {self.message}" if self.message else "")


class Linter:
    """Lints to-be-signed certificates; thread-safe (the shape cache has a lock)."""

    def __init__(self, mode: str = "template") -> None:
        if mode not in MODES:
            raise ValueError(f"lint mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self._shapes: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()
        self.full_lints = 0

    def check(self, certificate: x509.Certificate) -> None:
        """Raise LintFailure if the certificate (a draft, see issuer.draft_key_like) must not be issued."""
        if self.mode == "off":
            return
        if self.mode == "full":
            self._full(certificate)
            return
        fields = _tbs_fields(certificate)
        shape = certificate_shape(certificate, fields)
        with self._lock:
            known = shape in self._shapes
            if known:
                self._shapes.move_to_end(shape)
        if not known:
            self._full(certificate)
            with self._lock:
                self._shapes[shape] = None
                while len(self._shapes) > _SHAPE_CACHE_SIZE:
                    self._shapes.popitem(last=False)
        problems = varying_field_problems(certificate, fields)
        if problems:
            raise LintFailure("pre-issuance lint refused the certificate: " + "; ".join(problems), rule="lint")

    def _full(self, certificate: x509.Certificate) -> None:
        self.full_lints += 1
        findings = pkilint_findings(certificate.public_bytes(serialization.Encoding.DER))
        errors = [f for f in findings if f.severity in {"ERROR", "FATAL"}]
        for finding in findings:
            if finding.severity == "WARNING":
                log.warning("pre-issuance lint warning for %s: %s", certificate.subject.rfc4514_string(), finding)
        if errors:
            raise LintFailure("pre-issuance lint refused the certificate: " + "; ".join(str(e) for e in errors), rule="lint")


_validator: Any = None
_validator_lock = threading.Lock()


def _pkix_validator() -> Any:
    """pkilint's RFC 5280 certificate validator, as `lint_pkix_cert` builds it (built once)."""
    global _validator  # noqa: PLW0603 - one immutable validator tree per process
    with _validator_lock:
        if _validator is None:
            from pkilint.pkix import certificate, extension, name

            _validator = certificate.create_pkix_certificate_validator_container(
                certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
                [
                    certificate.create_issuer_validator_container([]),
                    certificate.create_validity_validator_container(),
                    certificate.create_subject_validator_container([]),
                    certificate.create_extensions_validator_container([]),
                    certificate.create_spki_validator_container([]),
                ],
            )
        return _validator


def pkilint_findings(der: bytes) -> list[Finding]:
    """pkilint's findings at WARNING or above, minus its known false positive on URNs."""
    from pkilint import loader
    from pkilint.validation import ValidationFindingSeverity

    try:
        document = loader.load_der_certificate(der, "to-be-signed")
        results = _pkix_validator().validate(document.root)
    except Exception as exc:  # pkilint raises plain exceptions on undecodable input
        return [Finding("FATAL", "lint.decode", "certificate", f"{type(exc).__name__}: {exc}")]
    findings: list[Finding] = []
    for result in results:
        for description in result.finding_descriptions:
            severity = description.finding.severity
            if severity > ValidationFindingSeverity.WARNING:
                continue
            code = description.finding.code
            if code == "pkix.invalid_uri_syntax" and _URN.fullmatch(str(result.node.pdu)):
                continue
            findings.append(Finding(severity.name, code, result.node.path, description.message or ""))
    return findings


def certificate_shape(certificate: x509.Certificate, fields: list[_Tlv] | None = None) -> Hashable:
    """Everything pkilint judges except the values that vary from one certificate to the next.

    Read from the to-be-signed DER: version, signature algorithm and issuer as they are;
    the validity's time encodings; the subject's attribute types and string types, RDN by
    RDN; the key's algorithm and size (and an RSA key's exponent); every extension's OID,
    criticality and value, but for the SAN only its name types and for the SKI only its length.
    fields: the certificate's _tbs_fields, when the caller has them already.
    """
    fields = fields or _tbs_fields(certificate)
    version, _serial, signature, issuer, validity, subject, spki = fields[:7]
    extensions: list[tuple[bytes, bytes, Hashable]] = []
    for extension in next((_children(_children(f.content)[0].content) for f in fields[7:] if f.tag == 0xA3), []):
        parts = _children(extension.content)  # extnID, critical (absent when false), extnValue
        oid, value = parts[0].der, parts[-1].content
        detail: Hashable = value
        if oid == _SAN_OID:
            detail = tuple(name.tag for name in _children(_children(value)[0].content))
        elif oid == _SKI_OID:
            detail = len(value)
        extensions.append((oid, parts[1].der if len(parts) == 3 else b"", detail))
    return (
        version.der,
        signature.der,
        issuer.der,
        tuple(time.tag for time in _children(validity.content)),
        tuple(
            tuple((atv[0].der, atv[1].tag) for atv in (_children(a.content) for a in _children(rdn.content)))
            for rdn in _children(subject.content)
        ),
        _key_shape(spki),
        tuple(extensions),
    )


class _Tlv(NamedTuple):
    tag: int
    der: bytes  # the whole TLV
    content: bytes


def _children(der: bytes) -> list[_Tlv]:
    """The TLVs one after another in der (the contents of a SEQUENCE or SET).

    Hand-written: cryptography parses certificates but does not show their DER structure,
    and the shape is read from the very bytes that will be signed, cheaply (it runs on
    every Sign). Only for drafts that cryptography built: one-byte tags, definite lengths.
    """
    found = []
    at = 0
    while at < len(der):
        tag, length, header = der[at], der[at + 1], 2
        if length & 0x80:
            header += length & 0x7F
            length = int.from_bytes(der[at + 2 : at + header], "big")
        end = at + header + length
        if end > len(der):
            raise ValueError("DER value runs past its container")
        found.append(_Tlv(tag, der[at:end], der[at + header : end]))
        at = end
    return found


def _tbs_fields(certificate: x509.Certificate) -> list[_Tlv]:
    """The TBSCertificate's fields: version, serial, signature, issuer, validity, subject, key, then extensions."""
    return _children(_children(certificate.tbs_certificate_bytes)[0].content)


def _key_shape(spki: _Tlv) -> Hashable:
    algorithm, key = _children(spki.content)
    if _RSA_OID in algorithm.content:
        modulus, exponent = _children(_children(key.content[1:])[0].content)
        return algorithm.der, len(modulus.content.lstrip(b"\x00")), exponent.content
    return algorithm.der, len(key.content)


def _subject_key_sha1(fields: list[_Tlv]) -> bytes:
    """RFC 5280 method 1: the SHA-1 of the subjectPublicKey BIT STRING's value (without its unused-bits octet)."""
    _algorithm, key = _children(fields[6].content)
    return hashlib.sha1(key.content[1:], usedforsecurity=False).digest()


def varying_field_problems(certificate: x509.Certificate, fields: list[_Tlv] | None = None) -> list[str]:
    """The checks pkilint makes on the fields that vary per certificate, made directly (fields: as in certificate_shape)."""
    problems: list[str] = []
    if not 1 <= certificate.serial_number <= _MAX_SERIAL:
        problems.append("serial number out of range (1 to 2^159-1)")
    if certificate.not_valid_before_utc >= certificate.not_valid_after_utc:
        problems.append("notBefore is not before notAfter")
    for attribute in certificate.subject:
        value = attribute.value if isinstance(attribute.value, str) else ""
        oid = attribute.oid.dotted_string
        if not value:
            problems.append(f"subject {oid} is empty")
        if len(value) > _UPPER_BOUNDS.get(oid, 1 << 30):
            problems.append(f"subject {oid} exceeds its RFC 5280 upper bound")
        if attribute._type.name == "PrintableString" and _PRINTABLE.fullmatch(value) is None:
            problems.append(f"subject {oid} is not a valid PrintableString")
        if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in value):
            problems.append(f"subject {oid} contains control or format characters")
    for extension in certificate.extensions:
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName):
            problems.extend(_san_problems(value))
        elif isinstance(value, x509.SubjectKeyIdentifier) and value.digest != _subject_key_sha1(fields or _tbs_fields(certificate)):
            problems.append("subjectKeyIdentifier is not the SHA-1 of the subject public key (RFC 5280 method 1)")
    return problems


def _san_problems(san: x509.SubjectAlternativeName) -> list[str]:
    problems: list[str] = []
    for name in san:
        if isinstance(name, x509.DNSName):
            if validators.domain(name.value) is not True:
                problems.append(f"dNSName {name.value!r} is not a valid domain name")
        elif isinstance(name, x509.UniformResourceIdentifier):
            # The URN test first: it is a regular expression, and validators' decorator inspects its function on every call.
            if _URN.fullmatch(name.value) is None and validators.url(name.value) is not True:
                problems.append(f"URI {name.value!r} is not a valid URI")
        elif isinstance(name, x509.RFC822Name):
            if validators.email(name.value) is not True:
                problems.append(f"rfc822Name {name.value!r} is not a valid mailbox")
        elif not isinstance(name, x509.IPAddress):
            problems.append(f"SAN of type {type(name).__name__} is not expected in a device certificate")
    return problems
