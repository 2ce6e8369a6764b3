"""CSR parsing is strict: one PEM block or exact DER, a size limit before parsing, POP checked."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_daemon import policy
from ca_daemon.errors import InvalidRequest

LIMIT = 64 * 1024


def _csr(cn: str = "device-1") -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )


def test_pem_and_der_give_the_same_request() -> None:
    csr = _csr()
    pem = policy.parse_csr(csr.public_bytes(serialization.Encoding.PEM), LIMIT)
    der = policy.parse_csr(csr.public_bytes(serialization.Encoding.DER), LIMIT)
    assert pem.der == der.der == csr.public_bytes(serialization.Encoding.DER)
    assert pem.sha256 == der.sha256


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda pem, der: b"", "empty"),
        (lambda pem, der: b"hello world", "not a valid PKCS#10"),
        (lambda pem, der: der[:-7], "truncated"),
        (lambda pem, der: der + b"\x00\x01", "trailing data"),
        (lambda pem, der: pem + b"trailing garbage\n", "exactly one CERTIFICATE REQUEST block"),
        (lambda pem, der: b"prefix\n" + pem, "exactly one CERTIFICATE REQUEST block"),
        (lambda pem, der: pem + pem, "exactly one CERTIFICATE REQUEST block"),
        (lambda pem, der: pem.replace(b"MI", b"M!", 1), "exactly one CERTIFICATE REQUEST block"),
        (lambda pem, der: b"0" * (LIMIT + 1), "over the limit"),
    ],
    ids=["empty", "not-asn1", "truncated", "der-trailing", "pem-trailing", "pem-prefix", "two-blocks", "bad-base64", "oversize"],
)
def test_malformed_requests_are_refused_with_the_reason(mutate, fragment: str) -> None:  # type: ignore[no-untyped-def]
    csr = _csr()
    data = mutate(csr.public_bytes(serialization.Encoding.PEM), csr.public_bytes(serialization.Encoding.DER))
    with pytest.raises(InvalidRequest) as excinfo:
        policy.parse_csr(data, LIMIT)
    assert fragment in excinfo.value.message
    assert excinfo.value.field == "csr"


def test_size_is_checked_before_parsing() -> None:
    huge = _csr().public_bytes(serialization.Encoding.DER) + b"\x00" * LIMIT
    with pytest.raises(InvalidRequest) as excinfo:
        policy.parse_csr(huge, LIMIT)
    assert excinfo.value.rule == "csr-size"


def test_signature_that_does_not_verify_is_refused() -> None:
    der = bytearray(_csr().public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the signature value
    with pytest.raises(InvalidRequest) as excinfo:
        policy.parse_csr(bytes(der), LIMIT)
    assert excinfo.value.rule in {"proof-of-possession", "csr-format"}


def test_pem_with_crlf_line_endings_is_accepted() -> None:
    csr = _csr()
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)).replace(b"\n", b"\r\n")
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\r\n" + body + b"-----END CERTIFICATE REQUEST-----\r\n"
    assert policy.parse_csr(pem, LIMIT).csr.subject == csr.subject


def test_pem_end_label_must_repeat_the_begin_label() -> None:
    """RFC 7468: "NEW CERTIFICATE REQUEST" in both labels or in neither; a mixed pair is not one block."""
    pem = _csr().public_bytes(serialization.Encoding.PEM)
    both_new = pem.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
    assert policy.parse_csr(both_new, LIMIT).der == policy.parse_csr(pem, LIMIT).der
    for mixed in (both_new.replace(b"END NEW", b"END", 1), pem.replace(b"END", b"END NEW", 1)):
        with pytest.raises(InvalidRequest, match="exactly one CERTIFICATE REQUEST block"):
            policy.parse_csr(mixed, LIMIT)


def test_a_repeated_extension_request_attribute_is_refused() -> None:
    """cryptography reads only the first extensionRequest (in DER order): a CA:true in the other went unseen and was signed."""
    from asn1crypto import csr as asn1_csr  # type: ignore[import-untyped]  # python-pkcs11's dependency

    key = ec.generate_private_key(ec.SECP256R1())
    harmless = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:dev:device-1")])
    ca_true = x509.BasicConstraints(ca=True, path_length=None)

    def requesting(*extensions: x509.ExtensionType) -> bytes:
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    info = asn1_csr.CertificationRequest.load(requesting(harmless))["certification_request_info"]
    second = asn1_csr.CertificationRequest.load(requesting(ca_true))["certification_request_info"]["attributes"][0]
    info["attributes"] = [info["attributes"][0].copy(), second.copy()]
    tbs = info.dump(force=True)
    signed = asn1_csr.CertificationRequest(
        {
            "certification_request_info": asn1_csr.CertificationRequestInfo.load(tbs),
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": key.sign(tbs, ec.ECDSA(hashes.SHA256())),
        }
    ).dump()
    assert len(x509.load_der_x509_csr(signed).extensions) == 1  # cryptography reads one of the two requests
    with pytest.raises(InvalidRequest) as refused:
        policy.parse_csr(signed, LIMIT)
    assert "extensionRequest more than once" in refused.value.message
    assert (refused.value.rule, refused.value.field) == ("csr-format", "csr.attributes")
