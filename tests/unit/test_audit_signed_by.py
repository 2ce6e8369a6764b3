"""audit._issued_certificate: `--live` reads a revoked certificate's notAfter only from a certificate of that serial that
the CA key signed. By the key's signature, not by names: verify_directly_issued_by also compared the issuer name with
the CA certificate in the store, so a CA certificate installed again for the same key with its subject spelt another
way (a review found PrintableString against UTF8String) made every earlier certificate look forged."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from ca_daemon.audit import _issued_certificate

KEYS: dict[str, Callable[[], CertificateIssuerPrivateKeyTypes]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def _leaf(issuer_key: CertificateIssuerPrivateKeyTypes, issuer_name: x509.Name, serial: int) -> bytes:
    device = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]))
        .issuer_name(issuer_name)
        .public_key(device.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
    )
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("key_type", sorted(KEYS))
def test_a_certificate_is_matched_by_serial_and_the_ca_keys_signature_whatever_the_names(key_type: str) -> None:
    ca_key, other_key = KEYS[key_type](), KEYS[key_type]()
    printable = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Factory CA", x509.name._ASN1Type.PrintableString)])
    der = _leaf(ca_key, printable, 4242)
    found = _issued_certificate(der, 4242, ca_key.public_key())
    assert found is not None and found.serial_number == 4242
    assert _issued_certificate(der, 4243, ca_key.public_key()) is None  # another serial
    assert _issued_certificate(der, 4242, other_key.public_key()) is None  # another key's signature
    assert _issued_certificate(der[:-4] + b"\x00" * 4, 4242, ca_key.public_key()) is None  # a damaged signature
    assert _issued_certificate(b"not a certificate", 4242, ca_key.public_key()) is None
    assert _issued_certificate(der, 4242, None) is None  # a CA key the store does not know
