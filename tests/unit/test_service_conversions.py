"""The servicer's own conversions on the Sign path equal the libraries' slower ones."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp

from ca_daemon.service import _pem, _timestamp


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 26, 5, 1, 2, tzinfo=UTC),
        datetime(2049, 12, 31, 23, 59, 59, 123456, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2))),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ],
)
def test_timestamp_equals_protobufs_from_datetime(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)
    assert _timestamp(value) == expected


def test_pem_equals_cryptographys_and_the_standard_librarys() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "pem-test")])
    now = datetime.now(UTC)
    certificate = x509.CertificateBuilder(
        issuer_name=name,
        subject_name=name,
        public_key=key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=now,
        not_valid_after=now + timedelta(days=1),
    ).sign(key, hashes.SHA256())
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert _pem(der) == certificate.public_bytes(serialization.Encoding.PEM).decode()
    for size in (1, 47, 48, 49, 1000):  # line breaks at every length
        assert _pem(der[:size]) == ssl.DER_cert_to_PEM_cert(der[:size])
