"""The hand-written CRL encoder against `cryptography`: same TBS bytes, signatures that verify."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from hypothesis import given
from hypothesis import strategies as st

from ca_daemon import crl_der, issuer, revocation
from ca_daemon.errors import LintFailure
from ca_daemon.model import RevocationReason

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
CDP = ("http://crl.example/crl/ca-1.crl",)
DELTA = ("http://crl.example/crl/ca-1-delta.crl",)


def _ca(key: CertificateIssuerPrivateKeyTypes) -> x509.Certificate:
    builder = issuer.build_root(x509.Name.from_rfc4514_string("CN=Test CA,O=Example"), key.public_key(), NOW, timedelta(days=30))
    return builder.sign(key, issuer.signature_hash(key))


@given(st.integers(min_value=0, max_value=2**168))
def test_integer_matches_cryptography(value: int) -> None:
    assert crl_der.integer(value) == x509.CRLNumber(value).public_bytes()


@pytest.mark.parametrize("length", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**24 + 5])
def test_lengths_are_definite_and_minimal(length: int) -> None:
    encoded = crl_der.header(0x30, length)
    if length < 128:
        assert encoded == bytes((0x30, length))
    else:
        count = encoded[1] & 0x7F
        assert encoded[1] & 0x80 and int.from_bytes(encoded[2:], "big") == length and encoded[2] != 0 and len(encoded) == 2 + count


def test_times_switch_to_generalized_time_in_2050() -> None:
    assert crl_der.time(datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)) == b"\x17\x0d491231235959Z"
    assert crl_der.time(datetime(2050, 1, 1, tzinfo=UTC)) == b"\x18\x0f20500101000000Z"


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=st.just(UTC)))
def test_generalized_time_has_four_year_digits_as_cryptography_writes_it(value: datetime) -> None:
    # strftime's %Y wrote year 999 as "999": a 14-character time that made every later CRL unreadable.
    value = value.replace(microsecond=0)
    assert crl_der.generalized_time(value) == x509.InvalidityDate(value).public_bytes()
    if not 1950 <= value.year < 2050:
        assert crl_der.time(value) == crl_der.generalized_time(value)


@given(
    serial=st.integers(min_value=1, max_value=2**159),
    reason=st.sampled_from([*RevocationReason, crl_der.REMOVE_FROM_CRL]),
    invalidity=st.none() | st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)),
)
def test_entries_read_back_as_they_were_encoded(serial: int, reason: int, invalidity: datetime | None) -> None:
    entry = revocation.encode_entry(serial, NOW, reason, invalidity)
    read = crl_der.read_entry(entry)
    assert (read.serial_number, read.revocation_date_utc) == (serial, NOW)
    names = {extension.oid for extension in read.extensions}
    assert (x509.CRLReason.oid in names) == (reason != RevocationReason.UNSPECIFIED)
    assert (x509.InvalidityDate.oid in names) == (invalidity is not None)


def test_an_entry_that_does_not_read_back_is_refused_before_it_is_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    # The encoder as it was: year 999 came out as "9990601000000Z". The read-back must catch
    # any such slip before the entry is stored and copied into every later CRL.
    def unpadded(value: datetime) -> bytes:
        return crl_der.tlv(0x18, value.strftime("%Y%m%d%H%M%SZ").encode())

    monkeypatch.setattr(crl_der, "generalized_time", unpadded)
    with pytest.raises(LintFailure, match="does not read back"):
        revocation.encode_entry(5, NOW, RevocationReason.KEY_COMPROMISE, datetime(999, 6, 1, tzinfo=UTC))


def _builder_equivalent(
    key: CertificateIssuerPrivateKeyTypes,
    ca: x509.Certificate,
    revoked: list[tuple[int, datetime, RevocationReason, datetime | None]],
    number: int,
    base: int | None,
) -> x509.CertificateRevocationList:
    scope = crl_der.CrlScope.for_ca(ca, CDP, DELTA)
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=[_cryptography_entry(*entry) for entry in revoked])
        .issuer_name(ca.subject)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=7))
        .add_extension(scope.authority_key_identifier, critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    if base is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(base), critical=True)
    else:
        builder = builder.add_extension(
            x509.FreshestCRL([x509.DistributionPoint([x509.UniformResourceIdentifier(DELTA[0])], None, None, None)]), critical=False
        )
    return builder.sign(key, issuer.signature_hash(key))


def _cryptography_entry(
    serial: int, revoked_at: datetime, reason: RevocationReason, invalidity: datetime | None
) -> x509.RevokedCertificate:
    builder = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
    if reason != RevocationReason.UNSPECIFIED:
        flag = {
            RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
            RevocationReason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
            RevocationReason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
            RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
            RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
            RevocationReason.CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
            RevocationReason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
        }[reason]
        builder = builder.add_extension(x509.CRLReason(flag), critical=False)
    if invalidity is not None:
        builder = builder.add_extension(x509.InvalidityDate(invalidity.replace(tzinfo=None)), critical=False)
    return builder.build()


KEYS = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("key_type", sorted(KEYS))
@pytest.mark.parametrize("delta", [False, True])
def test_tbs_is_byte_identical_to_cryptography_and_signature_verifies(key_type: str, delta: bool) -> None:
    key = KEYS[key_type]()
    ca = _ca(key)  # type: ignore[arg-type]
    revoked = [
        (issuer.new_serial(), NOW - timedelta(hours=i), reason, NOW - timedelta(days=3) if i % 2 else None)
        for i, reason in enumerate([*RevocationReason, *RevocationReason])
    ]
    revoked.append((1, NOW, RevocationReason.KEY_COMPROMISE, None))  # smallest serial
    revoked.append((2**159 - 1, NOW, RevocationReason.UNSPECIFIED, None))  # the largest 20-octet serial
    scope = crl_der.CrlScope.for_ca(ca, CDP, DELTA)
    algorithm, _ = crl_der.signature_algorithm(key)  # type: ignore[arg-type]
    entries = b"".join(crl_der.revoked_entry(*entry) for entry in revoked)
    base = 41 if delta else None
    tbs = crl_der.tbs_cert_list(
        scope,
        algorithm_identifier=algorithm,
        this_update=NOW,
        next_update=NOW + timedelta(days=7),
        entries=entries,
        crl_number=42,
        base_crl_number=base,
    )
    der = crl_der.sign_crl(tbs, algorithm, key)  # type: ignore[arg-type]
    ours = x509.load_der_x509_crl(der)
    theirs = _builder_equivalent(key, ca, revoked, 42, base)  # type: ignore[arg-type]
    assert ours.tbs_certlist_bytes == theirs.tbs_certlist_bytes
    assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
    assert ours.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    if key_type == "ed25519":
        assert der == theirs.public_bytes(serialization.Encoding.DER)  # deterministic signatures: identical CRLs
    assert len(ours) == len(revoked)


def test_an_empty_crl_has_no_revoked_certificates_field() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca(key)
    algorithm, _ = crl_der.signature_algorithm(key)
    tbs = crl_der.tbs_cert_list(
        crl_der.CrlScope.for_ca(ca, CDP, DELTA),
        algorithm_identifier=algorithm,
        this_update=NOW,
        next_update=NOW + timedelta(days=7),
        entries=b"",
        crl_number=1,
    )
    crl = x509.load_der_x509_crl(crl_der.sign_crl(tbs, algorithm, key))
    assert len(crl) == 0
    assert crl.tbs_certlist_bytes == _builder_equivalent(key, ca, [], 1, None).tbs_certlist_bytes


def test_remove_from_crl_entry() -> None:
    entry = crl_der.revoked_entry(77, NOW, crl_der.REMOVE_FROM_CRL)
    key = ec.generate_private_key(ec.SECP256R1())
    algorithm, _ = crl_der.signature_algorithm(key)
    tbs = crl_der.tbs_cert_list(
        crl_der.CrlScope.for_ca(_ca(key), CDP, DELTA),
        algorithm_identifier=algorithm,
        this_update=NOW,
        next_update=NOW + timedelta(hours=1),
        entries=entry,
        crl_number=3,
        base_crl_number=2,
    )
    crl = x509.load_der_x509_crl(crl_der.sign_crl(tbs, algorithm, key))
    revoked = crl.get_revoked_certificate_by_serial_number(77)
    assert revoked is not None
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.remove_from_crl
