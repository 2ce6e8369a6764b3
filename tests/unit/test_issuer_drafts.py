"""Drafts for lint-before-sign: built with a stand-in for the CA key, then signed by the CA key itself.

Every CA key type the daemon can hold (EC P-256 and P-384, RSA, Ed25519) is checked with a
software key in its place: the issuer does no I/O, so which object signs does not matter here;
the integration tests sign the same way with keys in SoftHSM.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from ca_daemon import issuer, policy
from ca_daemon.config import ProfileConfig
from ca_daemon.lint import Linter

CA_KEYS: dict[str, Callable[[], CertificateIssuerPrivateKeyTypes]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def _root(key: CertificateIssuerPrivateKeyTypes) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Draft Test CA")])
    return issuer.build_root(name, key.public_key(), datetime.now(UTC), timedelta(days=30)).sign(key, issuer.signature_hash(key))


def _leaf_builder(root: x509.Certificate) -> x509.CertificateBuilder:
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-0001")]))
        .sign(device_key, issuer.signature_hash(device_key))
    )
    decision = policy.decide(
        policy.parse_csr(csr.public_bytes(serialization.Encoding.DER), 65536),
        policy.build_profile(ProfileConfig(name="device", san_templates=("urn:dev:ops:{device_id}",))),
    )
    return issuer.build_leaf(
        decision, root, issuer.new_serial(), datetime.now(UTC), timedelta(minutes=1), issuer.LeafUrls(["http://ca.example/ca.crl"])
    )


@pytest.mark.parametrize("key_type", sorted(CA_KEYS))
def test_the_draft_has_the_to_be_signed_bytes_the_ca_key_would_sign(key_type: str) -> None:
    key = CA_KEYS[key_type]()
    builder = _leaf_builder(_root(key))
    for draft_key in (issuer.draft_key_like(key), issuer.draft_key_like(key.public_key())):  # a worker's, the parent's
        draft = builder.sign(draft_key, issuer.signature_hash(draft_key))
        assert draft.tbs_certificate_bytes == builder.sign(key, issuer.signature_hash(key)).tbs_certificate_bytes


@pytest.mark.parametrize("key_type", sorted(CA_KEYS))
def test_only_the_ca_keys_signature_verifies(key_type: str, tmp_path: Path) -> None:
    key = CA_KEYS[key_type]()
    root = _root(key)
    builder = _leaf_builder(root)
    draft = issuer.draft_linted(builder, issuer.draft_key_like(key), Linter("full"))
    with pytest.raises(InvalidSignature):
        draft.verify_directly_issued_by(root)  # a draft that escaped is worth nothing
    certificate = issuer.sign_draft(draft, key)
    assert certificate.tbs_certificate_bytes == draft.tbs_certificate_bytes
    certificate.verify_directly_issued_by(root)
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), str(tmp_path / "leaf.pem")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_draft_key_has_no_private_half() -> None:
    for make in CA_KEYS.values():
        draft_key = issuer.draft_key_like(make())
        with pytest.raises(TypeError, match="no private half"):
            draft_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
