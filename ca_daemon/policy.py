"""Issuance policy: pure functions from (CSR bytes, profile, caller, facts) to a decision.

No I/O here. A profile is a list of small rules applied in order (the way step-ca
composes its validators): each rule reads the parsed request and either refuses with a
PolicyViolation naming itself, the field and what was expected, or lets it through.
Adding a rule means adding one object, never editing a long function.

Facts that need the database (certificates already issued for the device ID or the
public key) are fetched by the authority and passed in as `IssuanceFacts`, so the
uniqueness rules stay pure too; the store re-checks them inside the issuing transaction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from ca_daemon.config import DEVICE_ID_PLACEHOLDER, WEAK_CSR_SIGNATURE_ALGORITHMS, ProfileConfig
from ca_daemon.errors import AlreadyExists, InvalidRequest, PermissionDenied, PolicyViolation, capped, echo
from ca_daemon.model import CertificateRequest

# The END label must repeat the BEGIN label (RFC 7468 section 2): "NEW " in both or in neither.
_PEM_CSR = re.compile(rb"-----BEGIN ((?:NEW )?)CERTIFICATE REQUEST-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END \1CERTIFICATE REQUEST-----")

# CSR signature algorithms by the names profiles use.
SIGNATURE_ALGORITHM_NAMES: dict[x509.ObjectIdentifier, str] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "sha384WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "sha512WithRSAEncryption",
    SignatureAlgorithmOID.RSASSA_PSS: "rsassa-pss",
    SignatureAlgorithmOID.ED25519: "ed25519",
    SignatureAlgorithmOID.RSA_WITH_SHA1: "sha1WithRSAEncryption",
    SignatureAlgorithmOID.ECDSA_WITH_SHA1: "ecdsa-with-SHA1",
    SignatureAlgorithmOID.RSA_WITH_MD5: "md5WithRSAEncryption",
    SignatureAlgorithmOID.DSA_WITH_SHA1: "dsa-with-sha1",
}

SUBJECT_OIDS: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
}
_SUBJECT_NAMES = {oid: name for name, oid in SUBJECT_OIDS.items()}

# RFC 5280 upper bounds (ub-*) for the attributes a profile can allow.
SUBJECT_UPPER_BOUNDS: dict[str, int] = {"CN": 64, "O": 64, "OU": 64, "C": 2, "L": 128, "ST": 128, "serialNumber": 64}

_STRING_TYPES = {x509.name._ASN1Type.UTF8String, x509.name._ASN1Type.PrintableString}
# DC and emailAddress are IA5String by definition.
_IA5_ATTRIBUTES = {NameOID.DOMAIN_COMPONENT, NameOID.EMAIL_ADDRESS}
_PRINTABLE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")
# Unicode categories refused in any name: controls, format characters (bidi overrides,
# zero-width joiners), line/paragraph separators, private use, surrogates, unassigned.
_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"}

KEY_USAGE_FIELDS: dict[str, str] = {
    "digitalSignature": "digital_signature",
    "contentCommitment": "content_commitment",
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
}
EKU_OIDS: dict[str, x509.ObjectIdentifier] = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
}
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521", "secp256k1": "secp256k1"}


@dataclass(frozen=True)
class SubjectAttribute:
    """One attribute of the CSR subject as encoded: which RDN, which type, which string type."""

    rdn: int
    oid: x509.ObjectIdentifier
    name: str
    string_type: str
    value: str


@dataclass(frozen=True)
class ParsedRequest:
    """A CSR that parsed and proved possession of its key, with what the rules need.

    Everything cryptography parses lazily (subject, extensions, SANs) is read here once,
    so a malformed part surfaces as one InvalidRequest in parse_csr, never as an
    unexpected exception inside a rule.
    """

    csr: x509.CertificateSigningRequest
    der: bytes
    sha256: bytes
    public_key_der: bytes
    public_key_sha256: bytes
    public_key: CertificatePublicKeyTypes | None = None
    signature_algorithm: str = ""
    subject: tuple[SubjectAttribute, ...] = ()
    extensions: tuple[x509.Extension[x509.ExtensionType], ...] = ()
    sans: tuple[x509.GeneralName, ...] = ()


@dataclass(frozen=True)
class IssuanceFacts:
    """What the store knows that the uniqueness rules need, fetched before deciding."""

    # Serials of unexpired, unrevoked certificates for the device ID.
    active_serials_for_device: tuple[int, ...] = ()
    # Device IDs (other than this one) that already have a certificate for the public key.
    devices_with_public_key: tuple[str, ...] = ()


NO_FACTS = IssuanceFacts()


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
    sans: tuple[x509.GeneralName, ...] = ()
    key_usage: frozenset[str] = frozenset({"digitalSignature"})
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    allow_reissue: bool = False


class Rule(Protocol):
    """One check of a profile over the request alone."""

    @property
    def name(self) -> str:
        """The rule's name, as refusals report it."""

    def check(self, request: ParsedRequest) -> None:
        """Raise PolicyViolation when the request breaks this rule."""


class FactRule(Protocol):
    """One check of a profile that also needs facts from the store."""

    @property
    def name(self) -> str:
        """The rule's name, as refusals report it."""

    def check_facts(self, device_id: str, facts: IssuanceFacts) -> None:
        """Raise AlreadyExists (or PolicyViolation) when the facts forbid issuing."""


def _violation(rule: str, field_: str, message: str, expected: str) -> PolicyViolation:
    return PolicyViolation(message, rule=rule, field=field_, expected=expected)


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def parse_csr(data: bytes, max_bytes: int, key_types: AllowedKeyTypes | None = None) -> ParsedRequest:
    """Parse a PEM or DER CSR strictly and verify its signature (proof of possession).

    The size is checked before any parsing. PEM must be exactly one CERTIFICATE REQUEST
    block and nothing else: cryptography's PEM loader tolerates text around the block,
    which would let trailing data through, so the block is cut out here. SHA-1 and MD5
    signatures are refused before the signature is even looked at, and so is a key the
    profile's key_types refuse: verifying with an RSA key of an odd size or a huge exponent
    costs a full signature check on the request's thread before it could be refused.
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
    except Exception as exc:  # ValueError, InvalidVersion, ...: any failure to load untrusted DER is "malformed"
        string_type = re.search(r"AttributeValue::(\w+)", str(exc))
        if string_type is not None:
            raise PolicyViolation(
                f"a subject attribute is not a valid {string_type.group(1)}",
                rule="subject-string-type",
                field="subject",
                expected="UTF8String or PrintableString values using only their character sets",
            ) from None
        reason = "truncated" if "ShortData" in str(exc) else "trailing data after the CSR" if "ExtraData" in str(exc) else "malformed"
        raise InvalidRequest(
            f"csr is not a valid PKCS#10 request ({reason})", rule="csr-format", field="csr", expected="a DER or PEM PKCS#10 CSR"
        ) from None
    algorithm = SIGNATURE_ALGORITHM_NAMES.get(csr.signature_algorithm_oid, csr.signature_algorithm_oid.dotted_string)
    if algorithm in WEAK_CSR_SIGNATURE_ALGORITHMS:
        raise PolicyViolation(
            f"csr is signed with {algorithm}; SHA-1 and MD5 signatures are never accepted",
            rule="csr-signature-algorithm",
            field="csr.signature_algorithm",
            expected="a SHA-2 based signature (e.g. ecdsa-with-SHA256) or Ed25519",
        )
    try:
        public_key = csr.public_key()
    except Exception as exc:
        raise _unusable_key_or_signature(exc) from None
    if key_types is not None:
        key_types.check_key(public_key)
    try:
        valid = csr.is_signature_valid
    except Exception as exc:
        raise _unusable_key_or_signature(exc) from None
    if not valid:
        raise InvalidRequest(
            "csr signature does not verify with its own public key (no proof of possession)",
            rule="proof-of-possession",
            field="csr.signature",
            expected="a CSR signed by the private key it certifies",
        )
    subject, extensions, sans = _read_contents(csr)
    public_key_der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ParsedRequest(
        csr=csr,
        der=der,
        sha256=hashlib.sha256(der).digest(),
        public_key_der=public_key_der,
        public_key_sha256=hashlib.sha256(public_key_der).digest(),
        public_key=public_key,
        signature_algorithm=algorithm,
        subject=subject,
        extensions=extensions,
        sans=sans,
    )


def _unusable_key_or_signature(exc: Exception) -> InvalidRequest:
    if isinstance(exc, (ValueError, TypeError, x509.UnsupportedGeneralNameType)):
        return InvalidRequest(f"csr public key or signature is unusable: {capped(str(exc), 200)}", rule="csr-format", field="csr")
    # cryptography raises UnsupportedAlgorithm for unknown key types
    return InvalidRequest(
        f"csr uses an unsupported key or signature algorithm ({type(exc).__name__})", rule="key-type", field="csr.public_key"
    )


def _read_contents(
    csr: x509.CertificateSigningRequest,
) -> tuple[tuple[SubjectAttribute, ...], tuple[x509.Extension[x509.ExtensionType], ...], tuple[x509.GeneralName, ...]]:
    """Subject, requested extensions and SANs, or one InvalidRequest saying which is malformed."""
    with warnings.catch_warnings():
        # cryptography warns (rather than fails) on out-of-range attribute lengths; the rules refuse those.
        warnings.simplefilter("ignore")
        return _read_contents_unchecked(csr)


def _read_contents_unchecked(
    csr: x509.CertificateSigningRequest,
) -> tuple[tuple[SubjectAttribute, ...], tuple[x509.Extension[x509.ExtensionType], ...], tuple[x509.GeneralName, ...]]:
    try:
        subject = tuple(
            SubjectAttribute(
                rdn=index,
                oid=attribute.oid,
                name=_SUBJECT_NAMES.get(attribute.oid, attribute.oid.dotted_string),
                string_type=attribute._type.name,
                value=attribute.value if isinstance(attribute.value, str) else attribute.value.hex(),
            )
            for index, rdn in enumerate(csr.subject.rdns)
            for attribute in rdn
        )
    except (ValueError, UnicodeError) as exc:
        raise PolicyViolation(
            f"csr subject is not well-formed ({_brief(exc)})",
            rule="subject-string-type",
            field="subject",
            expected="attribute values that are valid UTF8String or PrintableString",
        ) from None
    _refuse_repeated_attributes(csr)
    try:
        extensions = tuple(csr.extensions)
        sans: tuple[x509.GeneralName, ...] = ()
        for extension in extensions:
            if isinstance(extension.value, x509.SubjectAlternativeName):
                sans = tuple(extension.value)
    except Exception as exc:  # ValueError, DuplicateExtension, UnsupportedGeneralNameType, ...
        raise InvalidRequest(
            f"csr requested extensions are malformed ({_brief(exc)})",
            rule="csr-format",
            field="csr.extensions",
            expected="well-formed, non-repeated extensions",
        ) from None
    return subject, extensions, sans


def _refuse_repeated_attributes(csr: x509.CertificateSigningRequest) -> None:
    """Each attribute type at most once (X.501): `cryptography` reads only the first extensionRequest.

    A CSR with two would be read as asking for the first one's extensions here and perhaps for
    the second one's (CA:true, say) by another reader: two requests in one, refused as malformed.
    """
    try:
        types = [attribute.oid for attribute in csr.attributes]
    except Exception as exc:
        raise InvalidRequest(f"csr attributes are malformed ({_brief(exc)})", rule="csr-format", field="csr.attributes") from None
    repeated = sorted({oid.dotted_string for oid in types if types.count(oid) > 1})
    if repeated:
        names = ", ".join(_ATTRIBUTE_NAMES.get(dotted, dotted) for dotted in repeated)
        raise InvalidRequest(
            f"csr carries the attribute {names} more than once; a request carries each attribute once",
            rule="csr-format",
            field="csr.attributes",
            expected="each CSR attribute (e.g. extensionRequest) at most once",
        )


_ATTRIBUTE_NAMES = {"1.2.840.113549.1.9.14": "extensionRequest", "1.2.840.113549.1.9.7": "challengePassword"}


def _brief(exc: Exception) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def parse_serial(text: str) -> int:
    """A serial number as hex text ('0A:1b' or '0a1b'); refuse anything else with the reason."""
    cleaned = text.strip().replace(":", "").lower().removeprefix("0x")
    if not cleaned or len(cleaned) > 40 or any(c not in "0123456789abcdef" for c in cleaned):
        raise InvalidRequest(
            f"serial {echo(text, 64)} is not a hexadecimal serial number of at most 20 bytes",
            rule="serial",
            field="serial",
            expected="hexadecimal, 1 to 40 digits",
        )
    serial = int(cleaned, 16)
    if serial == 0:
        raise InvalidRequest("serial 0 is never issued (serials are positive)", rule="serial", field="serial", expected="a positive serial")
    return serial


def device_id_of(request: ParsedRequest) -> str:
    """The (first) CN: the device ID. SingleCommonName makes sure there is exactly one."""
    return next((a.value for a in request.subject if a.oid == NameOID.COMMON_NAME), "")


# ---------------------------------------------------------------------------
# Rules over the request
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CsrSignatureAlgorithm:
    """The CSR is signed with one of the profile's algorithms (SHA-1 and MD5 never pass parse_csr)."""

    allowed: tuple[str, ...]
    name: str = "csr-signature-algorithm"

    def check(self, request: ParsedRequest) -> None:
        if request.signature_algorithm not in self.allowed:
            raise _violation(
                self.name,
                "csr.signature_algorithm",
                f"csr signature algorithm {request.signature_algorithm} is not allowed by this profile",
                ", ".join(self.allowed),
            )


@dataclass(frozen=True)
class AllowedKeyTypes:
    """The device key is one the relying parties accept: named EC curves, RSA within bounds with e=65537, Ed25519."""

    ec_curves: tuple[str, ...] = ("P-256", "P-384")
    rsa_min_bits: int = 2048
    rsa_max_bits: int = 8192
    ed25519: bool = True
    name: str = "key-type"

    def _expected(self) -> str:
        kinds = [f"EC {'/'.join(self.ec_curves)}"] if self.ec_curves else []
        if self.rsa_max_bits:
            kinds.append(f"RSA {self.rsa_min_bits}-{self.rsa_max_bits} bits with exponent 65537")
        if self.ed25519:
            kinds.append("Ed25519")
        return ", ".join(kinds) or "no key type (the profile allows none)"

    def check(self, request: ParsedRequest) -> None:
        self.check_key(request.public_key or request.csr.public_key())

    def check_key(self, key: CertificatePublicKeyTypes) -> None:
        """The rule on the key alone: parse_csr applies it before proof of possession."""
        if isinstance(key, ec.EllipticCurvePublicKey):
            curve = _CURVES.get(key.curve.name, key.curve.name)
            if curve not in self.ec_curves:
                raise _violation(self.name, "csr.public_key", f"EC curve {curve} is not allowed", self._expected())
        elif isinstance(key, rsa.RSAPublicKey):
            exponent = key.public_numbers().e
            if not self.rsa_max_bits or not self.rsa_min_bits <= key.key_size <= self.rsa_max_bits or exponent != 65537:
                raise _violation(
                    self.name, "csr.public_key", f"RSA-{key.key_size} with exponent {echo(exponent)} is not allowed", self._expected()
                )
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if not self.ed25519:
                raise _violation(self.name, "csr.public_key", "Ed25519 keys are not allowed by this profile", self._expected())
        else:
            raise _violation(self.name, "csr.public_key", f"key type {type(key).__name__} is not allowed", self._expected())


@dataclass(frozen=True)
class SubjectStructure:
    """Each RDN holds one attribute: multi-valued RDNs hide attributes from naive readers."""

    name: str = "subject-structure"

    def check(self, request: ParsedRequest) -> None:
        rdns = [a.rdn for a in request.subject]
        if len(rdns) != len(set(rdns)):
            raise _violation(self.name, "subject", "subject has a multi-valued RDN", "one attribute per RDN")


@dataclass(frozen=True)
class SubjectStringType:
    """Values are UTF8String or a PrintableString holding only printable characters."""

    name: str = "subject-string-type"

    def check(self, request: ParsedRequest) -> None:
        for a in request.subject:
            if a.oid in _IA5_ATTRIBUTES and a.string_type == "IA5String" and a.value.isascii():
                continue
            if a.string_type not in {t.name for t in _STRING_TYPES}:
                raise _violation(self.name, f"subject.{a.name}", f"subject {a.name} is a {a.string_type}", "UTF8String or PrintableString")
            if a.string_type == "PrintableString" and _PRINTABLE.fullmatch(a.value) is None:
                raise _violation(
                    self.name,
                    f"subject.{a.name}",
                    f"subject {a.name} is a PrintableString with characters outside its character set",
                    "A-Z a-z 0-9 space and '()+,-./:=?",
                )


@dataclass(frozen=True)
class SubjectCharacters:
    """No control, format (bidi override, zero-width), separator, private-use or unassigned characters."""

    name: str = "subject-characters"

    def check(self, request: ParsedRequest) -> None:
        for a in request.subject:
            bad = forbidden_character(a.value)
            if bad is not None:
                raise _violation(
                    self.name,
                    f"subject.{a.name}",
                    f"subject {a.name} contains the forbidden character U+{ord(bad):04X} ({unicodedata.category(bad)})",
                    "printable characters only, no control or bidirectional-override characters",
                )


def forbidden_character(value: str) -> str | None:
    """The first character of value that never belongs in a certificate name, if any."""
    for char in value:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return char
    return None


@dataclass(frozen=True)
class SubjectRequired:
    """Every attribute the profile requires is present."""

    required: tuple[str, ...] = ("CN",)
    name: str = "subject-required"

    def check(self, request: ParsedRequest) -> None:
        present = {a.name for a in request.subject}
        for attribute in self.required:
            if attribute not in present:
                raise _violation(
                    self.name, f"subject.{attribute}", f"subject has no {attribute}", f"subject with {', '.join(self.required)}"
                )


@dataclass(frozen=True)
class SingleCommonName:
    """The subject holds exactly one CN: it is the device ID."""

    name: str = "subject-cn"

    def check(self, request: ParsedRequest) -> None:
        cns = [a for a in request.subject if a.oid == NameOID.COMMON_NAME]
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
                f"subject CN {echo(value)} is not a valid device ID",
                rule=self.name,
                field="subject.CN",
                expected=f"a value matching {self.pattern}",
            )


@dataclass(frozen=True)
class SubjectValueLength:
    """No empty value and none longer than the profile's limit or RFC 5280's upper bound."""

    max_length: int = 64
    name: str = "subject-length"

    def check(self, request: ParsedRequest) -> None:
        for a in request.subject:
            limit = min(self.max_length, SUBJECT_UPPER_BOUNDS.get(a.name, self.max_length))
            if a.name == "C" and re.fullmatch("[A-Z]{2}", a.value) is None:
                raise _violation(
                    self.name, "subject.C", f"subject C {echo(a.value)} is not a country code", "two capital letters (ISO 3166)"
                )
            if not a.value.strip():
                raise _violation(self.name, f"subject.{a.name}", f"subject {a.name} is empty", "a non-empty value")
            if len(a.value) > limit:
                raise _violation(
                    self.name, f"subject.{a.name}", f"subject {a.name} is {len(a.value)} characters long", f"at most {limit} characters"
                )


@dataclass(frozen=True)
class SubjectAttributes:
    """Only allowed attributes, each at most once and matching its pattern; CN is the device ID."""

    allowed: tuple[tuple[str, str], ...] = ()
    name: str = "subject-attributes"

    def check(self, request: ParsedRequest) -> None:
        patterns = dict(self.allowed)
        seen: set[str] = set()
        for a in request.subject:
            if a.name == "CN":
                continue
            pattern = patterns.get(a.name)
            if pattern is None:
                raise _violation(
                    self.name,
                    f"subject.{a.name}",
                    f"subject attribute {a.name} is not allowed by this profile",
                    "only " + ", ".join(["CN", *patterns]),
                )
            if a.name in seen:
                raise _violation(self.name, f"subject.{a.name}", f"subject attribute {a.name} appears twice", "each attribute at most once")
            seen.add(a.name)
            if re.fullmatch(pattern, a.value) is None:
                raise _violation(
                    self.name, f"subject.{a.name}", f"subject {a.name} {echo(a.value)} is not allowed", f"a value matching {pattern}"
                )


def san_kind(name: x509.GeneralName) -> str:
    """The profile's name for a SAN type: dns, uri, email, ip, or the type's own name."""
    if isinstance(name, x509.DNSName):
        return "dns"
    if isinstance(name, x509.UniformResourceIdentifier):
        return "uri"
    if isinstance(name, x509.RFC822Name):
        return "email"
    if isinstance(name, x509.IPAddress):
        return "ip"
    return type(name).__name__


def san_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    value = name.value
    return value if isinstance(value, str) else repr(value)


@dataclass(frozen=True)
class SanTypes:
    """Each requested SAN is of a type the profile allows."""

    allowed: tuple[str, ...] = ()
    name: str = "san-type"

    def check(self, request: ParsedRequest) -> None:
        for san in request.sans:
            kind = san_kind(san)
            if kind not in self.allowed:
                raise _violation(
                    self.name,
                    f"csr.san.{kind}",
                    f"a {kind} SAN is not allowed by this profile",
                    "SAN types " + ", ".join(self.allowed) if self.allowed else "no requested SANs",
                )


@dataclass(frozen=True)
class SanNoWildcards:
    """No wildcard anywhere in a requested SAN: a device certificate names exactly one thing."""

    name: str = "san-wildcard"

    def check(self, request: ParsedRequest) -> None:
        for san in request.sans:
            text = san_text(san)
            if "*" in text:
                raise _violation(self.name, f"csr.san.{san_kind(san)}", f"SAN {echo(text)} is a wildcard", "names without '*'")


@dataclass(frozen=True)
class SanValues:
    """Each requested SAN matches its type's pattern, with {device_id} bound to this device."""

    allowed: tuple[tuple[str, str], ...] = ()
    name: str = "san-pattern"

    def check(self, request: ParsedRequest) -> None:
        if not request.sans:
            return
        device_id = device_id_of(request)
        patterns = dict(self.allowed)
        for san in request.sans:
            kind = san_kind(san)
            text = san_text(san)
            bad = forbidden_character(text)
            pattern = bind_device_id(patterns.get(kind, "(?!)"), device_id)
            if bad is not None or not text or not text.isascii() or re.fullmatch(pattern, text) is None:
                raise _violation(
                    self.name,
                    f"csr.san.{kind}",
                    f"{kind} SAN {echo(text)} is not allowed for device {echo(device_id)}",
                    f"a value matching {pattern}",
                )


def bind_device_id(pattern: str, device_id: str) -> str:
    """A SAN pattern with {device_id} replaced by the regex-escaped device ID."""
    return pattern.replace(DEVICE_ID_PLACEHOLDER, re.escape(device_id))


@dataclass(frozen=True)
class RequestedExtensions:
    """Requested CA powers are refused; other requested extensions are dropped or refused, never copied.

    Only the SAN is honoured (after the SAN rules); the certificate's key usage and EKU come
    from the profile.
    """

    refuse_others: bool = False
    name: str = "requested-extensions"

    def check(self, request: ParsedRequest) -> None:
        for extension in request.extensions:
            value = extension.value
            kind = extension.oid.dotted_string if isinstance(value, x509.UnrecognizedExtension) else type(value).__name__
            field_ = f"csr.extensions.{kind}"
            if isinstance(value, x509.BasicConstraints) and value.ca:
                raise _violation(self.name, field_, "the CSR asks for a CA certificate (BasicConstraints CA:true)", "CA:false or none")
            if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
                raise _violation(
                    self.name, field_, "the CSR asks for keyCertSign or cRLSign", "no CA key usages (they come from the profile)"
                )
            if isinstance(value, x509.SubjectAlternativeName):
                continue
            if self.refuse_others:
                raise _violation(
                    self.name,
                    field_,
                    f"the CSR requests extension {extension.oid.dotted_string}, which this profile refuses",
                    "no requested extensions other than subjectAltName",
                )


# ---------------------------------------------------------------------------
# Rules over the store's facts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OneActivePerDevice:
    """At most one active certificate per device ID, unless the profile allows re-issue."""

    name: str = "device-unique"

    def check_facts(self, device_id: str, facts: IssuanceFacts) -> None:
        if facts.active_serials_for_device:
            serials = ", ".join(format(s, "x") for s in facts.active_serials_for_device[:3])
            raise AlreadyExists(
                f"device {device_id!r} already has an active certificate ({serials}); "
                "revoke it first or use a profile that allows re-issue",
                rule=self.name,
                field="subject.CN",
                expected="a device ID without an active certificate",
            )


@dataclass(frozen=True)
class PublicKeyBoundToDevice:
    """A public key already certified for another device ID is never certified again."""

    name: str = "public-key-unique"

    def check_facts(self, device_id: str, facts: IssuanceFacts) -> None:
        others = [d for d in facts.devices_with_public_key if d != device_id]
        if others:
            raise AlreadyExists(
                f"this public key is already certified for another device ({others[0]!r}); every device needs its own key",
                rule=self.name,
                field="csr.public_key",
                expected="a key pair not certified for another device ID",
            )


# ---------------------------------------------------------------------------
# Profiles and decisions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A named, ordered list of rules and what an issued certificate gets."""

    name: str
    rules: Sequence[Rule]
    validity: timedelta
    max_validity: timedelta
    description: str = ""
    fact_rules: Sequence[FactRule] = ()
    san_templates: tuple[str, ...] = ()
    key_usage: frozenset[str] = frozenset({"digitalSignature"})
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    allow_reissue: bool = False
    settings: ProfileConfig | None = field(default=None, compare=False)

    @property
    def key_types(self) -> AllowedKeyTypes | None:
        """The profile's key-type rule, which parse_csr applies before proof of possession."""
        return next((rule for rule in self.rules if isinstance(rule, AllowedKeyTypes)), None)

    def describe_rules(self) -> list[str]:
        """One line per rule, in the order applied (for ListProfiles)."""
        lines = [_describe(rule) for rule in self.rules]
        lines += [_describe(rule) for rule in self.fact_rules]
        if self.san_templates:
            lines.append("san-templates: " + ", ".join(self.san_templates))
        lines.append("key-usage: " + ", ".join(sorted(self.key_usage)))
        lines.append("extended-key-usage: " + ", ".join(eku_name(o) for o in self.extended_key_usage))
        return lines


def _describe(rule: Rule | FactRule) -> str:
    params = {k: v for k, v in vars(rule).items() if k != "name"}
    detail = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return f"{rule.name}: {detail}" if detail else rule.name


def eku_name(oid: x509.ObjectIdentifier) -> str:
    """An extended key usage as the configuration names it (clientAuth), anyExtendedKeyUsage, else its dotted OID."""
    if oid == ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE:  # never issued to devices, but found in CA certificates
        return "anyExtendedKeyUsage"
    return next((name for name, o in EKU_OIDS.items() if o == oid), oid.dotted_string)


def default_rules(device_id_pattern: str) -> list[Rule]:
    return build_profile(ProfileConfig(name="device", device_id_pattern=device_id_pattern)).rules  # type: ignore[return-value]


def build_profile(settings: ProfileConfig) -> Profile:
    """The rules of a `[profiles.NAME]` table, in the order they are applied."""
    rules: list[Rule] = [
        AllowedKeyTypes(settings.ec_curves, settings.rsa_min_bits, settings.rsa_max_bits, settings.ed25519),
        CsrSignatureAlgorithm(settings.csr_signature_algorithms),
        SubjectStructure(),
        SubjectStringType(),
        SubjectCharacters(),
        SubjectRequired(settings.subject_required),
        SingleCommonName(),
        DeviceIdPattern(settings.device_id_pattern),
        SubjectValueLength(settings.subject_max_length),
        SubjectAttributes(settings.subject_allowed),
        SanTypes(tuple(kind for kind, _ in settings.san_allowed)),
        SanNoWildcards(),
        SanValues(settings.san_allowed),
        RequestedExtensions(refuse_others=settings.requested_extensions == "refuse"),
    ]
    fact_rules: list[FactRule] = [PublicKeyBoundToDevice()]
    if not settings.allow_reissue:
        fact_rules.insert(0, OneActivePerDevice())
    return Profile(
        name=settings.name,
        rules=rules,
        validity=settings.validity,
        max_validity=settings.max_validity,
        description=settings.description,
        fact_rules=fact_rules,
        san_templates=settings.san_templates,
        key_usage=frozenset(settings.key_usage),
        extended_key_usage=tuple(EKU_OIDS.get(u) or x509.ObjectIdentifier(u) for u in settings.extended_key_usage),
        allow_reissue=settings.allow_reissue,
        settings=settings,
    )


def check_rules(request: ParsedRequest, profile: Profile) -> str:
    """Apply the profile's request rules in order (the first refusal wins); return the device ID."""
    for rule in profile.rules:
        rule.check(request)
    return device_id_of(request)


def decide(
    request: ParsedRequest, profile: Profile, facts: IssuanceFacts = NO_FACTS, requested_validity: timedelta | None = None
) -> Decision:
    """Apply every rule of the profile, then settle what the certificate will hold."""
    return settle(request, profile, check_rules(request, profile), facts, requested_validity)


def settle(
    request: ParsedRequest,
    profile: Profile,
    device_id: str,
    facts: IssuanceFacts = NO_FACTS,
    requested_validity: timedelta | None = None,
) -> Decision:
    """decide() for a request whose request rules already passed (check_rules gave device_id): the fact rules, then the content.

    The Sign path checks the request rules before its store read, to refuse early without
    one, and decides after it: the rules need not run twice (about 10 us of a request's 1 ms).
    """
    for fact_rule in profile.fact_rules:
        fact_rule.check_facts(device_id, facts)
    validity = profile.validity
    if requested_validity is not None and requested_validity.total_seconds() > 0:
        if requested_validity > profile.max_validity:
            raise _violation(
                "validity",
                "validity_seconds",
                f"requested validity of {int(requested_validity.total_seconds())} s exceeds the profile's maximum",
                f"at most {int(profile.max_validity.total_seconds())} seconds",
            )
        validity = requested_validity
    return Decision(
        device_id=device_id,
        profile=profile.name,
        subject=issued_subject(request),
        public_key_der=request.public_key_der,
        validity=validity,
        csr_sha256=request.sha256,
        public_key_sha256=request.public_key_sha256,
        sans=issued_sans(request, profile, device_id),
        key_usage=profile.key_usage,
        extended_key_usage=profile.extended_key_usage,
        allow_reissue=profile.allow_reissue,
    )


def issued_subject(request: ParsedRequest) -> x509.Name:
    """The subject of the certificate: the checked attributes, re-encoded with their default string types."""
    try:
        return x509.Name([x509.NameAttribute(a.oid, a.value) for a in request.subject])
    except ValueError as exc:
        message = f"the subject cannot be encoded ({_brief(exc)})"
        raise _violation("subject-string-type", "subject", message, "valid attribute values") from None


def issued_sans(request: ParsedRequest, profile: Profile, device_id: str) -> tuple[x509.GeneralName, ...]:
    """Template SANs bound to the device ID, then the requested SANs that passed the SAN rules."""
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(t.replace(DEVICE_ID_PLACEHOLDER, device_id)) for t in profile.san_templates
    ]
    for san in request.sans:
        if san not in names:
            names.append(san)
    return tuple(names)


def authorize(caller: str, profile: str, callers: dict[str, tuple[str, ...]]) -> None:
    """The caller may ask for this profile, or PermissionDenied naming what it may ask for."""
    allowed = callers.get(caller, ())
    if profile not in allowed:
        raise PermissionDenied(
            f"caller {echo(caller)} may not use profile {echo(profile)}; allowed: {', '.join(allowed) or 'none'}",
            rule="caller-profiles",
            field="profile",
            expected=" or ".join(allowed) or "no profile (ask an administrator to add this caller to [callers])",
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
