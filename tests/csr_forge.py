"""Hand-built PKCS#10 DER for CSRs that `cryptography` refuses to create.

SHA-1 and MD5 signatures, NUL or invalid UTF-8 in names, BMPString or TeletexString
values, multi-valued RDNs, duplicate extensions, a signature by another key: a hostile
device can send all of these, so the tests must be able to make them. A tiny DER
encoder is enough; the CSR is signed over exactly the CertificationRequestInfo bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

UTF8 = 0x0C
PRINTABLE = 0x13
TELETEX = 0x14
IA5 = 0x16
BMP = 0x1E

CN = "2.5.4.3"
O = "2.5.4.10"  # noqa: E741
OU = "2.5.4.11"

SIG_OIDS = {
    ("ec", "sha1"): "1.2.840.10045.4.1",
    ("ec", "sha256"): "1.2.840.10045.4.3.2",
    ("ec", "sha384"): "1.2.840.10045.4.3.3",
    ("rsa", "sha1"): "1.2.840.113549.1.1.5",
    ("rsa", "md5"): "1.2.840.113549.1.1.4",
    ("rsa", "sha256"): "1.2.840.113549.1.1.11",
}


def tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def set_of(*parts: bytes) -> bytes:
    return tlv(0x31, b"".join(sorted(parts)))


def oid(dotted: str) -> bytes:
    numbers = [int(x) for x in dotted.split(".")]
    body = bytes([40 * numbers[0] + numbers[1]])
    for number in numbers[2:]:
        chunk = [number & 0x7F]
        rest = number >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, body)


def attribute(type_oid: str, value: bytes | str, tag: int = UTF8) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if tag == BMP and isinstance(value, str):
        raw = value.encode("utf-16-be")
    return seq(oid(type_oid), tlv(tag, raw))


def name(*rdns: Sequence[bytes]) -> bytes:
    """A Name from RDNs, each a list of encoded attributes (more than one: multi-valued)."""
    return seq(*(set_of(*rdn) for rdn in rdns))


def simple_name(*attrs: tuple[str, bytes | str, int]) -> bytes:
    return name(*([attribute(t, v, tag)] for t, v, tag in attrs))


def extension(type_oid: str, value_der: bytes, critical: bool = False) -> bytes:
    return seq(oid(type_oid), *([tlv(0x01, b"\xff")] if critical else []), tlv(0x04, value_der))


def extension_request(*extensions: bytes) -> bytes:
    return seq(oid("1.2.840.113549.1.9.14"), set_of(seq(*extensions)))


def _key_kind(key: object) -> str:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"


def forge_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    subject: bytes,
    *,
    extensions: Sequence[bytes] = (),
    hash_name: str = "sha256",
    spki_of: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    pem: bool = False,
) -> bytes:
    """A CSR over subject and extensions, signed by key with hash_name; spki_of certifies another key (broken POP)."""
    certified = spki_of or key
    spki = certified.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    attributes = tlv(0xA0, extension_request(*extensions) if extensions else b"")
    info = seq(tlv(0x02, b"\x00"), subject, spki, attributes)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(info)
        algorithm = seq(oid("1.3.101.112"))
    else:
        hash_algorithm = {"sha1": hashes.SHA1(), "md5": hashes.MD5(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[hash_name]
        kind = _key_kind(key)
        if isinstance(key, rsa.RSAPrivateKey):
            signature = key.sign(info, padding.PKCS1v15(), hash_algorithm)
            algorithm = seq(oid(SIG_OIDS[(kind, hash_name)]), tlv(0x05, b""))
        else:
            signature = key.sign(info, ec.ECDSA(hash_algorithm))
            algorithm = seq(oid(SIG_OIDS[(kind, hash_name)]))
    der = seq(info, algorithm, tlv(0x03, b"\x00" + signature))
    if not pem:
        return der
    import base64

    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"
