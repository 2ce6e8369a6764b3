"""Issuance policy: pure functions from (CSR bytes, profile, caller) to a decision.

No I/O here. A profile is a list of small rules applied in order (the way step-ca
composes its validators): each rule reads the parsed request and either refuses with a
PolicyViolation naming itself, the field and what was expected, or lets it through.
Adding a rule means adding one object, never editing a long function.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_daemon.errors import InvalidRequest, PolicyViolation
from ca_daemon.model import CertificateRequest

_PEM_CSR = re.compile(
    rb"-----BEGIN (NEW )?CERTIFICATE REQUEST-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END (NEW )?CERTIFICATE REQUEST-----"
)


@dataclass(frozen=True)
class ParsedRequest:
    """A CSR that parsed and proved possession of its key, with what the rules need."""

    csr: x509.CertificateSigningRequest
    der: bytes
    sha256: bytes
    public_key_der: bytes
    public_key_sha256: bytes


@dataclass(frozen=True)
class Decision:
    """Everything the issuer needs to build a leaf; nothing else reaches it."""

    device_id: str
    profile: str
    subject: x509.Name
    public_key_der: bytes
    validity: timedelta
    csr_sha256: bytes
    public_key_sha256: bytes


class Rule(Protocol):
    """One check of a profile."""

    name: str

    def check(self, request: ParsedRequest) -> None:
        """Raise PolicyViolation when the request breaks this rule."""


def parse_csr(data: bytes, max_bytes: int) -> ParsedRequest:
    """Parse a PEM or DER CSR strictly and verify its signature (proof of possession).

    The size is checked before any parsing. PEM must be exactly one CERTIFICATE REQUEST
    block and nothing else: cryptography's PEM loader tolerates text around the block,
    which would let trailing data through, so the block is cut out here.
    """
    if not data:
        raise InvalidRequest("csr is empty; send a PKCS#10 CSR in PEM or DER", rule="csr-format", field="csr")
    if len(data) > max_bytes:
        raise InvalidRequest(
            f"csr is {len(data)} bytes, over the limit of {max_bytes} bytes",
            rule="csr-size",
            field="csr",
            expected=f"at most {max_bytes} bytes",
        )
    stripped = data.strip()
    if b"-----BEGIN" in stripped and not data.startswith(b"\x30"):  # DER starts with SEQUENCE
        match = _PEM_CSR.fullmatch(stripped)
        if match is None:
            raise InvalidRequest(
                "csr PEM must hold exactly one CERTIFICATE REQUEST block with nothing before or after it",
                rule="csr-format",
                field="csr",
                expected="one PEM block",
            )
        try:
            der = base64.b64decode(b"".join(match.group(2).split()), validate=True)
        except binascii.Error:
            raise InvalidRequest("csr PEM body is not valid base64", rule="csr-format", field="csr") from None
    else:
        der = data
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        reason = "truncated" if "ShortData" in str(exc) else "trailing data after the CSR" if "ExtraData" in str(exc) else "malformed"
        raise InvalidRequest(
            f"csr is not a valid PKCS#10 request ({reason})", rule="csr-format", field="csr", expected="a DER or PEM PKCS#10 CSR"
        ) from None
    try:
        public_key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType) as exc:
        raise InvalidRequest(f"csr public key or signature is unusable: {exc}", rule="csr-format", field="csr") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for unknown key types
        raise InvalidRequest(
            f"csr uses an unsupported key or signature algorithm ({type(exc).__name__})", rule="key-type", field="csr.public_key"
        ) from None
    if not valid:
        raise InvalidRequest(
            "csr signature does not verify with its own public key (no proof of possession)",
            rule="proof-of-possession",
            field="csr.signature",
            expected="a CSR signed by the private key it certifies",
        )
    public_key_der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ParsedRequest(
        csr=csr,
        der=der,
        sha256=hashlib.sha256(der).digest(),
        public_key_der=public_key_der,
        public_key_sha256=hashlib.sha256(public_key_der).digest(),
    )


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleCommonName:
    """The subject holds exactly one CN: it is the device ID."""

    name: str = "subject-cn"

    def check(self, request: ParsedRequest) -> None:
        cns = request.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise PolicyViolation(
                f"subject must contain exactly one CN (the device ID); found {len(cns)}",
                rule=self.name,
                field="subject.CN",
                expected="exactly one CN",
            )


@dataclass(frozen=True)
class DeviceIdPattern:
    """The device ID (the CN) matches the profile's pattern."""

    pattern: str
    name: str = "device-id-format"

    def check(self, request: ParsedRequest) -> None:
        value = device_id_of(request)
        if re.fullmatch(self.pattern, value) is None:
            raise PolicyViolation(
                f"subject CN {value!r} is not a valid device ID",
                rule=self.name,
                field="subject.CN",
                expected=f"a value matching {self.pattern}",
            )


@dataclass(frozen=True)
class AllowedKeyTypes:
    """The device key is one the relying parties accept: EC P-256/P-384, RSA >= 2048 (e=65537), Ed25519."""

    name: str = "key-type"

    def check(self, request: ParsedRequest) -> None:
        key = request.csr.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in {"secp256r1", "secp384r1"}:
                raise PolicyViolation(
                    f"EC curve {key.curve.name} is not allowed", rule=self.name, field="csr.public_key", expected="P-256 or P-384"
                )
        elif isinstance(key, rsa.RSAPublicKey):
            if not 2048 <= key.key_size <= 8192 or key.public_numbers().e != 65537:
                raise PolicyViolation(
                    f"RSA-{key.key_size} with exponent {key.public_numbers().e} is not allowed",
                    rule=self.name,
                    field="csr.public_key",
                    expected="RSA 2048 to 8192 bits with exponent 65537",
                )
        elif not isinstance(key, ed25519.Ed25519PublicKey):
            raise PolicyViolation(
                f"key type {type(key).__name__} is not allowed", rule=self.name, field="csr.public_key", expected="EC, RSA or Ed25519"
            )


def device_id_of(request: ParsedRequest) -> str:
    value = request.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


@dataclass(frozen=True)
class Profile:
    """A named, ordered list of rules and what an issued certificate gets."""

    name: str
    rules: Sequence[Rule]
    validity: timedelta
    max_validity: timedelta
    description: str = ""


def default_rules(device_id_pattern: str) -> list[Rule]:
    return [AllowedKeyTypes(), SingleCommonName(), DeviceIdPattern(device_id_pattern)]


def decide(request: ParsedRequest, profile: Profile) -> Decision:
    """Apply the profile's rules in order; the first refusal wins."""
    for rule in profile.rules:
        rule.check(request)
    device_id = device_id_of(request)
    return Decision(
        device_id=device_id,
        profile=profile.name,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
        public_key_der=request.public_key_der,
        validity=profile.validity,
        csr_sha256=request.sha256,
        public_key_sha256=request.public_key_sha256,
    )


def check_request_fields(request: CertificateRequest) -> None:
    """Fields every Sign call must carry, checked before any parsing."""
    if not request.request_id:
        raise InvalidRequest(
            "request_id is required: choose a unique ID per request so retries are safe",
            rule="request-id",
            field="request_id",
            expected="a non-empty string of at most 256 characters",
        )
    if len(request.request_id) > 256 or not request.request_id.isprintable():
        raise InvalidRequest(
            "request_id must be at most 256 printable characters",
            rule="request-id",
            field="request_id",
            expected="a non-empty string of at most 256 printable characters",
        )
