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
