"""Builds certificates from decisions. No I/O: the private key passed in does the signing.

The issuer sees only a fully decided request (like Boulder's CA component): the subject,
key, validity and extensions are settled before it runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from ca_daemon import crl_der
from ca_daemon.errors import LintFailure, capped, echo
from ca_daemon.lint import Linter
from ca_daemon.policy import SUBJECT_UPPER_BOUNDS, Decision
from ca_daemon.remote_keys import Buffer, EcKeyWithoutPrivateHalf, Ed25519KeyWithoutPrivateHalf, RsaKeyWithoutPrivateHalf

SERIAL_BYTES = 20


def new_serial() -> int:
    """A positive serial of 159 random bits from the OS CSPRNG (RFC 5280: at most 20 octets)."""
    while True:
        serial = int.from_bytes(secrets.token_bytes(SERIAL_BYTES), "big") >> 1
        if serial.bit_length() > 128:
            return serial


def signature_hash(key: CertificateIssuerPrivateKeyTypes) -> crl_der.SignatureHash | None:
    """The hash paired with a CA key, for cryptography's builders: the one its CRLs name (crl_der.signature_algorithm)."""
    return crl_der.signature_algorithm(key)[1]


def draft_key_like(
    key: CertificateIssuerPrivateKeyTypes | CertificateIssuerPublicKeyTypes,
) -> CertificateIssuerPrivateKeyTypes:
    """A stand-in for the CA key (or its public half) that drafts are built with: see _DraftKey.

    A process without the CA key (the daemon's parent, checking a reload) passes the CA
    certificate's public key.
    """
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        return _DraftEcKey(public)
    if isinstance(public, rsa.RSAPublicKey):
        return _DraftRsaKey(public)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return _DraftEd25519Key(public)
    raise TypeError(f"no draft key for a {type(key).__name__} CA key")


class _DraftKey:
    """Signs drafts with a placeholder instead of a signature.

    Lint-before-sign needs the to-be-signed bytes before the CA key signs them, and
    cryptography builds a certificate only by signing it. Its builder takes any key object
    of the right kind and calls its sign(), so this one answers with a placeholder of no
    cryptographic worth: the draft's TBS, which carries the CA key's AlgorithmIdentifier
    because this key has the CA key's type, is what sign_draft has the CA key sign. A
    software key signing each draft (RSA-1024 for RSA CAs) cost about 0.2 ms a certificate
    here against 0.02 ms for this. A draft that escaped would not verify under any key.
    """

    NO_PRIVATE_HALF = "a draft key has no private half: it only stands in for the CA key while a draft is built"


# An ECDSA-Sig-Value (r = s = 1): well-formed DER, so a draft parses and lints like a real certificate.
_EC_PLACEHOLDER = bytes.fromhex("3006020101020101")


class _DraftEcKey(_DraftKey, EcKeyWithoutPrivateHalf):
    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        return _EC_PLACEHOLDER


class _DraftRsaKey(_DraftKey, RsaKeyWithoutPrivateHalf):
    def __init__(self, public: rsa.RSAPublicKey) -> None:
        super().__init__(public)
        self._placeholder = bytes((public.key_size + 7) // 8)

    def sign(self, data: Buffer, padding: AsymmetricPadding, algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo) -> bytes:
        return self._placeholder


class _DraftEd25519Key(_DraftKey, Ed25519KeyWithoutPrivateHalf):
    def sign(self, data: Buffer) -> bytes:
        return bytes(64)


def sign_linted(
    builder: x509.CertificateBuilder,
    key: CertificateIssuerPrivateKeyTypes,
    draft_key: CertificateIssuerPrivateKeyTypes,
    linter: Linter,
) -> x509.Certificate:
    """Lint-before-sign in one call: draft_linted, then sign_draft."""
    if linter.mode == "off":
        return builder.sign(key, signature_hash(key))
    return sign_draft(draft_linted(builder, draft_key, linter), key)


def draft_linted(builder: x509.CertificateBuilder, draft_key: CertificateIssuerPrivateKeyTypes, linter: Linter) -> x509.Certificate:
    """The certificate built with the draft key (draft_key_like), after the lint passed (LintFailure otherwise).

    As in Boulder, the real key signs only after the lint passed (sign_draft), and what it
    signs is byte for byte what was linted. With lint off the draft is made all the same,
    so issuance has one path: build and check first, then sign with the CA key.
    """
    draft = builder.sign(draft_key, signature_hash(draft_key))
    linter.check(draft)
    return draft


def sign_draft(draft: x509.Certificate, key: CertificateIssuerPrivateKeyTypes) -> x509.Certificate:
    """The real certificate: the CA key's signature around the draft's unchanged to-be-signed bytes.

    The draft key has the CA key's type, so the signature algorithm inside the TBS is
    already right; a mismatch is refused as a LintFailure and nothing is issued.
    """
    algorithm_identifier, _ = crl_der.signature_algorithm(key)
    certificate = x509.load_der_x509_certificate(crl_der.sign_tbs(draft.tbs_certificate_bytes, algorithm_identifier, key))
    if certificate.signature_algorithm_oid != draft.signature_algorithm_oid:
        raise LintFailure(
            "the CA key's signature algorithm differs from the linted certificate's (draft key of another type?); nothing was issued",
            rule="lint",
        )
    return certificate


@dataclass(frozen=True)
class LeafUrls:
    crl_distribution_points: Sequence[str] = ()
    ca_issuers: Sequence[str] = ()


def build_leaf(
    decision: Decision,
    issuer_certificate: x509.Certificate,
    serial: int,
    now: datetime,
    backdate: timedelta,
    urls: LeafUrls,
    *,
    not_after_limit: datetime | None = None,
) -> x509.CertificateBuilder:
    """A device certificate: CA:false, the profile's key usage (critical) and EKU, SANs, SKI/AKI, CDP and AIA.

    Its notAfter is the decision's validity, capped at not_after_limit: the earliest notAfter of the issuer's chain
    (ActiveCa.chain_valid_until), so the leaf outlives no certificate it chains through. None: the issuer
    certificate's own notAfter (a root, or a template that is only linted).
    """
    public_key = serialization.load_der_public_key(decision.public_key_der)
    assert isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey))
    not_before = now - backdate
    limit = (
        issuer_certificate.not_valid_after_utc if not_after_limit is None else min(not_after_limit, issuer_certificate.not_valid_after_utc)
    )
    not_after = min(now + decision.validity, limit)
    builder = (
        x509.CertificateBuilder()
        .subject_name(decision.subject)
        .issuer_name(issuer_certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(decision.key_usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(decision.extended_key_usage)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(issuer_certificate), critical=False)
    )
    if decision.sans:
        # Non-critical: the subject is never empty (it holds at least the device ID).
        builder = builder.add_extension(x509.SubjectAlternativeName(list(decision.sans)), critical=False)
    if urls.crl_distribution_points:
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(url) for url in urls.crl_distribution_points],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
    if urls.ca_issuers:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(u))
                    for u in urls.ca_issuers
                ]
            ),
            critical=False,
        )
    return builder


def build_root(subject: x509.Name, public_key: x509.Certificate | object, now: datetime, validity: timedelta) -> x509.CertificateBuilder:
    """A self-signed root CA certificate for the key (CA:true critical, keyCertSign and cRLSign)."""
    assert isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey))
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )


def build_link(
    subject_certificate: x509.Certificate, issuer_certificate: x509.Certificate, now: datetime, crl_urls: tuple[str, ...] = ()
) -> x509.CertificateBuilder:
    """A link (cross) certificate: the subject root's name and key, certified by the issuer root.

    With old-signs-new and new-signs-old, a relying party that trusts either generation
    of a self-signed root can validate certificates of both. Valid until the earlier of
    the two roots expires; subject and issuer key identifiers as in the roots, so path
    builders find it.
    """
    public_key = subject_certificate.public_key()
    assert isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey))
    issuer_public = issuer_certificate.public_key()
    assert isinstance(issuer_public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey))
    not_after = min(subject_certificate.not_valid_after_utc, issuer_certificate.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_certificate.subject)
        .issuer_name(issuer_certificate.subject)
        .public_key(public_key)
        .serial_number(new_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    )
    if crl_urls:
        points = [x509.DistributionPoint([x509.UniformResourceIdentifier(u)], None, None, None) for u in crl_urls]
        builder = builder.add_extension(x509.CRLDistributionPoints(points), critical=False)
    return builder


def build_ca_csr(subject: x509.Name) -> x509.CertificateSigningRequestBuilder:
    """A CSR for an outside parent CA to certify this CA key as an intermediate."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
    )


# RFC 5280 (Appendix A) upper bounds, in characters, of the attributes a CA subject can carry: the profiles' table
# (policy.SUBJECT_UPPER_BOUNDS) and the other ub-* of RFC 5280. Country codes and the CN are also checked by
# cryptography itself (C: 2, CN: 1 to 64 bytes), which refuses them while parsing.
_CA_SUBJECT_UPPER_BOUNDS: dict[x509.ObjectIdentifier, tuple[int, str]] = {
    NameOID.COMMON_NAME: (SUBJECT_UPPER_BOUNDS["CN"], "ub-common-name"),
    NameOID.ORGANIZATION_NAME: (SUBJECT_UPPER_BOUNDS["O"], "ub-organization-name"),
    NameOID.ORGANIZATIONAL_UNIT_NAME: (SUBJECT_UPPER_BOUNDS["OU"], "ub-organizational-unit-name"),
    NameOID.COUNTRY_NAME: (SUBJECT_UPPER_BOUNDS["C"], "ub-country-name-alpha-length"),
    NameOID.LOCALITY_NAME: (SUBJECT_UPPER_BOUNDS["L"], "ub-locality-name"),
    NameOID.STATE_OR_PROVINCE_NAME: (SUBJECT_UPPER_BOUNDS["ST"], "ub-state-name"),
    NameOID.SERIAL_NUMBER: (SUBJECT_UPPER_BOUNDS["serialNumber"], "ub-serial-number"),
    NameOID.TITLE: (64, "ub-title"),
    NameOID.PSEUDONYM: (128, "ub-pseudonym"),
    NameOID.EMAIL_ADDRESS: (255, "ub-emailaddress-length"),
}
# The most a CA subject may encode to (DER). Every certificate and CRL the CA signs carries it as the issuer name,
# and devices receive it in every chain and TLS handshake. One each of CN, O, OU, L, ST, C, serialNumber and title at
# RFC 5280's bounds encodes to 676 bytes; attributes without a bound (DC, UID, dotted OIDs) or repeated ones could
# otherwise make it any size.
MAX_CA_SUBJECT_BYTES = 1024


# What a CA subject may be, as refusals say it: the bounds (check_ca_subject_bounds), and as typed (parse_subject).
CA_SUBJECT_BOUNDS = f"each attribute within RFC 5280's upper bound, at most {MAX_CA_SUBJECT_BYTES} bytes encoded"
CA_SUBJECT_EXPECTED = f"an RFC 4514 name with a CN, {CA_SUBJECT_BOUNDS}"

# cryptography refuses a CN outside 1 to 64 bytes and a C other than 2 while parsing, saying only "Attribute's length
# must be ...". Stand-in OIDs (of the example arc, 2.999), which it does not check, let a refused text be parsed again
# for check_ca_subject_bounds to name the attribute, its length and RFC 5280's bound.
_UNCHECKED_STAND_INS: dict[str, x509.ObjectIdentifier] = {
    "CN": x509.ObjectIdentifier("2.999.4514.3"),
    "C": x509.ObjectIdentifier("2.999.4514.6"),
}
_STOOD_IN_FOR = {
    _UNCHECKED_STAND_INS["CN"]: (NameOID.COMMON_NAME, "CN"),
    _UNCHECKED_STAND_INS["C"]: (NameOID.COUNTRY_NAME, "C"),
}


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 string such as 'CN=Factory CA,O=Example' as an x509.Name, for a CA certificate or CSR.

    Refused (ValueError): no CN, or what check_ca_subject_bounds refuses. Every CA subject a command or the key
    ceremony takes comes through here.
    """
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        _check_bounds_of_unparsed(text)
        raise ValueError(f"not an RFC 4514 distinguished name: {echo(text)} ({capped(str(exc), 160)})") from None
    if not name.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise ValueError(f"the CA subject {echo(text)} needs a CN")
    check_ca_subject_bounds(name)
    return name


def check_ca_subject_bounds(name: x509.Name) -> None:
    """Refuse (ValueError) a CA subject with an attribute empty or longer than RFC 5280's upper bound, or over
    MAX_CA_SUBJECT_BYTES encoded: every certificate and CRL the CA signs carries it as the issuer name.

    For the subjects officers type (parse_subject) and the one an outside parent puts in the CA certificate it
    issues (authority.import_ca_certificate).
    """
    for attribute in name:
        _check_attribute_bounds(attribute.rfc4514_attribute_name, attribute.oid, attribute.value)
    encoded = len(name.public_bytes())
    if encoded > MAX_CA_SUBJECT_BYTES:
        raise ValueError(
            f"the CA subject encodes to {encoded} bytes, over the {MAX_CA_SUBJECT_BYTES} allowed: every certificate the CA "
            "signs carries it; give fewer or shorter attributes"
        )


def _check_attribute_bounds(shown: str, oid: x509.ObjectIdentifier, value: str | bytes) -> None:
    if not value:
        raise ValueError(f"the CA subject's {shown} is empty: RFC 5280 gives every attribute at least one character")
    bound = _CA_SUBJECT_UPPER_BOUNDS.get(oid)
    if bound is not None and len(value) > bound[0]:
        raise ValueError(f"the CA subject's {shown} is {len(value)} characters long: RFC 5280 allows at most {bound[0]} ({bound[1]})")


def _check_bounds_of_unparsed(text: str) -> None:
    """The bound refusal behind cryptography's refusal of text, if any (see _UNCHECKED_STAND_INS); else nothing."""
    try:
        name = x509.Name.from_rfc4514_string(text, _UNCHECKED_STAND_INS)
    except ValueError:
        return  # not a bound: the caller reports cryptography's reason
    for attribute in name:
        oid, shown = _STOOD_IN_FOR.get(attribute.oid, (attribute.oid, attribute.rfc4514_attribute_name))
        _check_attribute_bounds(shown, oid, attribute.value)


def _leaf_key_usage(names: frozenset[str]) -> x509.KeyUsage:
    """The profile's key usages (names as in RFC 5280); a leaf never gets keyCertSign or cRLSign."""
    return x509.KeyUsage(
        digital_signature="digitalSignature" in names,
        content_commitment="contentCommitment" in names,
        key_encipherment="keyEncipherment" in names,
        data_encipherment="dataEncipherment" in names,
        key_agreement="keyAgreement" in names,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def ca_key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    """A KeyUsage with only these bits (CA certificates: keyCertSign and cRLSign, with digitalSignature)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
