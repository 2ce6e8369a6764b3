"""The servicer's own conversions: on the Sign path they equal the libraries' slower ones; a refusal's status fits in gRPC's trailers."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp

from ca_daemon import errors
from ca_daemon.service import _pem, _timestamp, status_message, to_status


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


@pytest.mark.parametrize("text", ["z" * 100_000, "\u043a" * 100_000, "\U0001f512" * 100_000], ids=["ascii", "cyrillic", "emoji"])
def test_a_refusals_status_is_cut_to_1_kib_keeping_the_rule_and_saying_it_was_cut(text: str) -> None:
    error = errors.NotFound(f"no CA key {text}", rule="issuer", field="issuer_key_id", expected=text)
    message = status_message(error)
    assert len(message.encode()) <= errors.MESSAGE_BYTES
    assert message.startswith("no CA key ")
    assert message.endswith(f"{errors.TRUNCATED} [rule issuer]")
    status = to_status(error)
    # grpc-message is percent-encoded (3 bytes a byte at most), grpc-status-details-bin base64: far below 16 KiB in all.
    trailers = dict(status.trailing_metadata)
    assert 3 * len(message.encode()) + len(trailers["grpc-status-details-bin"]) * 4 // 3 < 8 * 1024


def test_a_short_refusal_is_unchanged() -> None:
    error = errors.InvalidRequest("page_token is not a token this server issued", field="page_token")
    assert status_message(error) == "page_token is not a token this server issued"
    assert status_message(errors.NotFound("no CA key 'x'", rule="issuer")) == "no CA key 'x' [rule issuer]"


def test_echo_quotes_a_callers_value_and_cuts_a_long_one() -> None:
    assert errors.echo("ca-root-1") == "'ca-root-1'"
    assert errors.echo("p" * 10_000) == "'" + "p" * 79 + errors.TRUNCATED
    assert errors.echo(65537) == "65537"
    assert errors.echo(2**3000 + 1) == "<a 3001-bit number>"
