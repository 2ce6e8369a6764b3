"""Revoke, Unrevoke and RevokeBulk over real gRPC against a real daemon, SoftHSM token and SQLite store."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp

from ca_daemon import config as config_module
from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from ca_daemon.model import AuditEvent, IssuedCertificate
from ca_daemon.store import SqlStore
from tests.conftest import CaEnv, Daemon, device_csr
from tests.integration.crl_helpers import crl_env, serials_in, sign, start, stub, wait_for_crl


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> CaEnv:
    env = crl_env(tmp_path_factory.mktemp("revocation"), softhsm_conf)[0]  # profile device allows re-issue
    env.edit_config(
        '[callers."local-developer"]\nprofiles = ["device"]',
        '[profiles.meter]\nallow_reissue = false\n\n[callers."local-developer"]\nprofiles = ["device", "meter"]',
    )
    return env


@pytest.fixture(scope="module")
def daemon(env: CaEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start(env, tmp_path_factory.mktemp("log"))
    yield d
    d.stop()


@pytest.fixture
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.env.target) as ch:
        yield ch


def _revoke(
    channel: grpc.Channel, serial: str, reason: int = ca_pb2.REVOCATION_REASON_KEY_COMPROMISE, **kw: object
) -> ca_pb2.RevokeResponse:
    response: ca_pb2.RevokeResponse = stub(channel).Revoke(ca_pb2.RevokeRequest(serial=serial, reason=reason, **kw), timeout=10)  # type: ignore[arg-type]
    return response


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


def _ts(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def test_revoke_is_recorded_with_reason_and_invalidity_date(channel: grpc.Channel) -> None:
    cert = sign(channel)
    compromised = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    before = datetime.now(UTC).replace(microsecond=0)
    response = _revoke(channel, cert.serial, invalidity_date=_ts(compromised))
    assert before <= response.revoked_at.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)
    got = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=cert.serial), timeout=10)
    assert got.HasField("revocation")
    assert got.revocation.reason == ca_pb2.REVOCATION_REASON_KEY_COMPROMISE
    assert got.revocation.invalidity_date.ToDatetime(tzinfo=UTC) == compromised
    # It reaches the next delta CRL with its reason code and invalidity date.
    delta = wait_for_crl(channel, lambda crl: int(cert.serial, 16) in serials_in(crl))
    entry = serials_in(x509.load_der_x509_crl(delta.crl_der))[int(cert.serial, 16)]
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert entry.extensions.get_extension_for_class(x509.InvalidityDate).value.invalidity_date_utc == compromised


def test_revoking_twice_names_the_first_revocation(channel: grpc.Channel) -> None:
    cert = sign(channel)
    first = _revoke(channel, cert.serial, reason=ca_pb2.REVOCATION_REASON_SUPERSEDED)
    code, details = _code(lambda: _revoke(channel, cert.serial))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "superseded" in details
    assert first.revoked_at.ToDatetime(tzinfo=UTC).isoformat() in details


@pytest.mark.parametrize(
    "serial",
    ["-1", "0", "00", "f" * 41, "1" * 200, "xyz", "", "12 34", "0x", "-0a"],
)
def test_hostile_serials_are_invalid_argument(channel: grpc.Channel, serial: str) -> None:
    code, _ = _code(lambda: _revoke(channel, serial))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_serial_is_not_found(channel: grpc.Channel) -> None:
    code, details = _code(lambda: _revoke(channel, "7" * 38))
    assert code == grpc.StatusCode.NOT_FOUND
    assert f"no device certificate with serial {'7' * 38} was issued by this CA" in details
    assert "verification certificates" in details  # the CA signs those too, but does not keep them with device certificates


@pytest.mark.parametrize("reason", [7, 8, 10, 99, -1])
def test_unknown_reason_is_invalid_argument(channel: grpc.Channel, reason: int) -> None:
    cert = sign(channel)
    code, details = _code(lambda: _revoke(channel, cert.serial, reason=reason))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in details
    # Nothing was revoked.
    got = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=cert.serial), timeout=10)
    assert not got.HasField("revocation")


def test_invalidity_date_in_the_future_is_invalid_argument(channel: grpc.Channel) -> None:
    cert = sign(channel)
    code, _ = _code(lambda: _revoke(channel, cert.serial, invalidity_date=_ts(datetime.now(UTC) + timedelta(days=1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("year", [1, 999, 1949])
def test_invalidity_date_before_1950_is_invalid_argument_and_nothing_is_revoked(channel: grpc.Channel, year: int) -> None:
    # Year 999 used to be accepted and encoded as a 14-character GeneralizedTime: every later CRL was unreadable.
    cert = sign(channel)
    code, details = _code(lambda: _revoke(channel, cert.serial, invalidity_date=_ts(datetime(year, 6, 1, tzinfo=UTC))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalidity_date" in details and "1950" in details
    got = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=cert.serial), timeout=10)
    assert not got.HasField("revocation")


def test_hold_can_be_lifted_and_the_next_delta_says_remove_from_crl(channel: grpc.Channel) -> None:
    cert = sign(channel)
    serial = int(cert.serial, 16)
    _revoke(channel, cert.serial, reason=ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD)
    wait_for_crl(channel, lambda crl: serial in serials_in(crl))
    stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial=cert.serial), timeout=10)

    def removed(crl: x509.CertificateRevocationList) -> bool:
        entry = serials_in(crl).get(serial)
        return (
            entry is not None and entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.remove_from_crl
        )

    wait_for_crl(channel, removed)
    got = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=cert.serial), timeout=10)
    assert not got.HasField("revocation")
    code, _ = _code(lambda: stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial=cert.serial), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # After the hold is lifted the certificate can be revoked again, for good.
    _revoke(channel, cert.serial)
    wait_for_crl(
        channel,
        lambda crl: (
            serial in serials_in(crl)
            and serials_in(crl)[serial].extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
        ),
    )


def test_hold_can_become_final_but_final_reasons_cannot_be_lifted(channel: grpc.Channel) -> None:
    held = sign(channel)
    _revoke(channel, held.serial, reason=ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD)
    _revoke(channel, held.serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    code, details = _code(lambda: stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial=held.serial), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "key_compromise" in details
    unknown, _ = _code(lambda: stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial="5" * 30), timeout=10))
    assert unknown == grpc.StatusCode.NOT_FOUND


def test_a_hold_is_not_lifted_while_the_device_has_another_active_certificate(channel: grpc.Channel) -> None:
    """Profile meter, allow_reissue = false: a held certificate is not active, so its device got a new one;
    lifting the hold would leave the device two. FAILED_PRECONDITION, until the new one is revoked."""
    device = f"meter-{uuid.uuid4().hex[:8]}"

    def sign_meter() -> str:
        request = ca_pb2.SignRequest(csr=device_csr(device), request_id=str(uuid.uuid4()), profile="meter")
        return str(stub(channel).Sign(request, timeout=10).serial)

    held = sign_meter()
    _revoke(channel, held, reason=ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD)
    replacement = sign_meter()
    code, details = _code(lambda: stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial=held), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"another active certificate ({replacement})" in details and "[rule device-unique]" in details
    assert stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=held), timeout=10).HasField("revocation")
    _revoke(channel, replacement, reason=ca_pb2.REVOCATION_REASON_SUPERSEDED)
    stub(channel).Unrevoke(ca_pb2.UnrevokeRequest(serial=held), timeout=10)
    assert not stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=held), timeout=10).HasField("revocation")


def test_bulk_revocation_by_device_and_serials_is_one_transaction(channel: grpc.Channel) -> None:
    device = f"lost-{uuid.uuid4().hex[:8]}"
    mine = [sign(channel, device).serial for _ in range(3)]
    others = [sign(channel).serial for _ in range(2)]
    # An unknown serial in the list: NOT_FOUND and nothing at all is revoked.
    code, _ = _code(
        lambda: stub(channel).RevokeBulk(
            ca_pb2.RevokeBulkRequest(serials=[*others, "9" * 36], device_id=device, reason=ca_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION),
            timeout=10,
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    for serial in mine + others:
        assert not stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=serial), timeout=10).HasField("revocation")
    response = stub(channel).RevokeBulk(
        ca_pb2.RevokeBulkRequest(serials=others, device_id=device, reason=ca_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION), timeout=10
    )
    assert sorted(response.revoked_serials) == sorted(mine + others)
    delta = wait_for_crl(channel, lambda crl: {int(s, 16) for s in mine + others} <= set(serials_in(crl)))
    entries = serials_in(x509.load_der_x509_crl(delta.crl_der))
    for serial in mine + others:
        reason = entries[int(serial, 16)].extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason == x509.ReasonFlags.cessation_of_operation
    # Again for the device: nothing left to revoke, not an error.
    again = stub(channel).RevokeBulk(ca_pb2.RevokeBulkRequest(device_id=device), timeout=10)
    assert list(again.revoked_serials) == []
    code, _ = _code(lambda: stub(channel).RevokeBulk(ca_pb2.RevokeBulkRequest(device_id="never-seen-device"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(lambda: stub(channel).RevokeBulk(ca_pb2.RevokeBulkRequest(), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_expired_certificate_can_be_revoked(channel: grpc.Channel, env: CaEnv) -> None:
    """Signing never yields an expired certificate, so record one in the daemon's store (real SQLite) as an old issuance."""
    live = sign(channel)
    store = SqlStore(config_module.load(env.config_path).store.url)
    try:
        template = store.get_certificate(int(live.serial, 16))
        assert template is not None
        serial = int(uuid.uuid4().hex, 16) | (1 << 130)
        past = datetime.now(UTC).replace(microsecond=0) - timedelta(days=400)
        expired = IssuedCertificate(
            **{
                **template.__dict__,
                "serial": serial,
                "not_before": past,
                "not_after": past + timedelta(days=30),
                "request_id": str(uuid.uuid4()),
                "public_key_sha256": uuid.uuid4().bytes * 2,
            }
        )
        store.record_issuances([(expired, AuditEvent(time=past, actor="test", action="certificate.issue", outcome="issued"))])
    finally:
        store.close()
    _revoke(channel, format(serial, "x"))
    wait_for_crl(channel, lambda crl: serial in serials_in(crl))


def test_revoke_during_concurrent_sign_of_the_same_device(channel: grpc.Channel) -> None:
    """Revocations by device race Sign calls for that device: every call succeeds and the outcome is consistent."""
    device = f"racing-{uuid.uuid4().hex[:8]}"
    first = sign(channel, device)
    signed: list[str] = []
    errors: list[BaseException] = []

    def sign_many() -> None:
        try:
            for _ in range(8):
                signed.append(sign(channel, device).serial)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=sign_many)
    thread.start()
    revoked: set[str] = set()
    revoked.update(_revoke_device(channel, device))
    for _ in range(3):
        revoked.update(_revoke_device(channel, device))
    thread.join(timeout=60)
    assert not errors, errors
    revoked.update(_revoke_device(channel, device))
    assert first.serial in revoked
    # Every certificate of the device is now revoked, each exactly once, and the store agrees.
    assert set(signed) <= revoked
    for serial in [first.serial, *signed]:
        got = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=serial), timeout=10)
        assert got.HasField("revocation")


def _revoke_device(channel: grpc.Channel, device: str) -> list[str]:
    response = stub(channel).RevokeBulk(
        ca_pb2.RevokeBulkRequest(device_id=device, reason=ca_pb2.REVOCATION_REASON_AFFILIATION_CHANGED), timeout=10
    )
    return list(response.revoked_serials)
