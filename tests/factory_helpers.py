"""Shared by the factory-to-cloud tests: a software CA that is not ours, and private-key needles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ForeignCa:
    """A CA the broker and the verifier do not trust, issuing certificates shaped exactly like ours."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str = "Some other CA") -> ForeignCa:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def crl(self, revoked: tuple[int, ...] = ()) -> x509.CertificateRevocationList:
        now = datetime.now(UTC).replace(microsecond=0)
        entries = [x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build() for s in revoked]
        return x509.CertificateRevocationListBuilder(
            issuer_name=self.certificate.subject, last_update=now, next_update=now + timedelta(days=7), revoked_certificates=entries
        ).sign(self.key, hashes.SHA256())

    def issue(self, public_key: ec.EllipticCurvePublicKey, device_id: str, *, server: bool = False, ip: str = "") -> x509.Certificate:
        now = datetime.now(UTC)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"urn:dev:ops:{device_id}")]
        if ip:
            import ipaddress

            sans = [x509.IPAddress(ipaddress.ip_address(ip))]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.key, hashes.SHA256())
        )


def private_key_needles(key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    """Every form in which a device's private key could leak: raw scalar, PKCS#8 DER, SEC1 DER and the PEM bodies."""
    scalar = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    sec1 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return {"scalar": scalar, "scalar-hex": scalar.hex().encode(), "pkcs8": pkcs8, "sec1": sec1, "pem-body": body[:64]}
