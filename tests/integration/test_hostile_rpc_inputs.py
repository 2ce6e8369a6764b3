"""Hostile or malformed input to the gRPC services, against a real daemon (SoftHSM, SQLite, loopback gRPC).

Each input here once ended in INTERNAL or UNKNOWN (with a traceback in the daemon's log), in
RESOURCE_EXHAUSTED from gRPC's own limits, or was taken although the documented limits refuse it.
A caller must get a status it can act on (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...)
whose message names the field at fault, and nothing may be changed by a refused request.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.revocation import MAX_BULK_REQUEST_BYTES, MAX_BULK_SERIALS
from tests.conftest import CaEnv, Daemon, device_csr
from tests.e2e.test_setup import OVERSIZED_CA_SUBJECTS
from tests.integration.crl_helpers import crl_env, sign, start, stub


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> CaEnv:
    return crl_env(tmp_path_factory.mktemp("hostile-rpc"), softhsm_conf)[0]


@pytest.fixture(scope="module")
def daemon(env: CaEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start(env, tmp_path_factory.mktemp("hostile-rpc-log"))
    yield d
    d.stop()


@pytest.fixture
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.env.target) as ch:
        yield ch


def _error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value


def _details(error: grpc.RpcError) -> str:
    return error.details() or ""


def _ceremony(channel: grpc.Channel) -> ca_pb2_grpc.KeyCeremonyStub:
    return ca_pb2_grpc.KeyCeremonyStub(channel)


def _new_key(channel: grpc.Channel) -> str:
    """A pending key in the token, without a certificate."""
    label = f"hostile-{uuid.uuid4().hex[:8]}"
    _ceremony(channel).GenerateKey(ca_pb2.GenerateKeyRequest(label=label), timeout=60)
    return label


def _has_certificate(channel: grpc.Channel, key_id: str) -> bool:
    keys = {k.key_id: k for k in _ceremony(channel).ListKeys(ca_pb2.ListKeysRequest(), timeout=30).keys}
    return keys[key_id].has_certificate


# -- timestamps outside google.protobuf.Timestamp's range ---------------------------------------


@pytest.mark.parametrize(
    "invalidity_date",
    [Timestamp(seconds=10**12), Timestamp(seconds=0, nanos=-1)],
    ids=["seconds-past-year-9999", "negative-nanos"],
)
def test_revoke_refuses_an_out_of_range_invalidity_date_naming_it_and_revokes_nothing(
    channel: grpc.Channel, invalidity_date: Timestamp
) -> None:
    cert = sign(channel)
    request = ca_pb2.RevokeRequest(serial=cert.serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE, invalidity_date=invalidity_date)
    error = _error(lambda: stub(channel).Revoke(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert "invalidity_date is not a valid timestamp" in _details(error)
    got = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=cert.serial), timeout=10)
    assert not got.HasField("revocation")


def test_revoke_bulk_refuses_an_out_of_range_invalidity_date_naming_it_and_revokes_nothing(channel: grpc.Channel) -> None:
    cert = sign(channel)
    request = ca_pb2.RevokeBulkRequest(
        serials=[cert.serial], reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE, invalidity_date=Timestamp(seconds=10**12)
    )
    error = _error(lambda: stub(channel).RevokeBulk(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert "invalidity_date is not a valid timestamp" in _details(error)
    got = stub(channel).GetCertificate(ca_pb2.GetCertificateRequest(serial=cert.serial), timeout=10)
    assert not got.HasField("revocation")


def test_stream_audit_events_refuses_an_out_of_range_from_time_naming_it(channel: grpc.Channel) -> None:
    request = ca_pb2.StreamAuditEventsRequest(from_time=Timestamp(seconds=-(10**13)))
    error = _error(lambda: stub(channel).StreamAuditEvents(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert "from_time is not a valid timestamp" in _details(error)


# -- uint64 sequence numbers beyond the stores' signed 64-bit integers ---------------------------


@pytest.mark.parametrize("after_seq", [2**63, 2**64 - 1])
def test_stream_audit_events_after_a_sequence_number_beyond_int64_is_an_empty_stream(channel: grpc.Channel, after_seq: int) -> None:
    """No event can have such a number, so nothing comes after it."""
    pages = list(stub(channel).StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(after_seq=after_seq), timeout=10))
    assert [len(page.events) for page in pages] == [0]
    # The page's token resumes after the largest sequence number there can be: still nothing.
    resumed = ca_pb2.StreamAuditEventsRequest(page_token=pages[0].next_page_token)
    assert [len(page.events) for page in stub(channel).StreamAuditEvents(resumed, timeout=10)] == [0]


@pytest.mark.parametrize("after_seq", [2**63, 2**64 - 1])
def test_list_audit_checkpoints_after_a_sequence_number_beyond_int64_is_empty(channel: grpc.Channel, after_seq: int) -> None:
    reply = stub(channel).ListAuditCheckpoints(ca_pb2.ListAuditCheckpointsRequest(after_seq=after_seq), timeout=10)
    assert not reply.checkpoints


@pytest.mark.parametrize("after", ["1e400", str(2**70), "-1"], ids=["infinity", "beyond-int64", "negative"])
def test_a_forged_page_token_is_refused_as_not_issued_by_this_server(channel: grpc.Channel, after: str) -> None:
    # A token is base64 of {"after": N, "f": the first 16 hex digits of SHA-256 over the JSON [actions, device_id, serial]}.
    digest = hashlib.sha256(b'[[], "", ""]').hexdigest()[:16]
    token = base64.urlsafe_b64encode(f'{{"after": {after}, "f": "{digest}"}}'.encode()).decode().rstrip("=")
    error = _error(lambda: stub(channel).StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(page_token=token), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert "page_token is not a token this server issued" in _details(error)


@pytest.mark.parametrize("json_text", [b"[" * 100_000, b'{"after": ' + b"[" * 100_000], ids=["nested-arrays", "nested-after"])
def test_a_page_token_of_deeply_nested_json_is_refused_as_not_issued_by_this_server(
    channel: grpc.Channel, daemon: Daemon, json_text: bytes
) -> None:
    """The decoder gave up on it with RecursionError: INTERNAL, and a traceback in the daemon's log."""
    token = base64.urlsafe_b64encode(json_text).decode().rstrip("=")
    error = _error(lambda: stub(channel).StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(page_token=token), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert _details(error) == "page_token is not a token this server issued"
    assert "Traceback" not in daemon.log()


def test_an_audit_filter_of_more_actions_than_there_are_kinds_of_event_is_refused(channel: grpc.Channel) -> None:
    """The actions filter had no cap: each is a bound parameter of the query (PostgreSQL takes at most 65,535 in one
    statement). At most 256 are taken; more are refused by name, and 256 of them still stream."""
    actions = [f"no.such.action.{n}" for n in range(257)]
    error = _error(lambda: list(stub(channel).StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(actions=actions), timeout=10)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert _details(error).startswith("257 actions: filter on at most 256") and "[rule audit-filter]" in _details(error)
    pages = list(
        stub(channel).StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(actions=[*actions[:255], "certificate.issue"]), timeout=10)
    )
    assert all(event.action == "certificate.issue" for page in pages for event in page.events)


# -- validity numbers that overflow timedelta / datetime ----------------------------------------


@pytest.mark.parametrize("validity_seconds", [30 * 86400 + 1, 10**14, 2**63, 2**64 - 1])
def test_verification_certificate_refuses_a_validity_beyond_30_days_by_the_validity_rule(
    channel: grpc.Channel, validity_seconds: int
) -> None:
    request = ca_pb2.IssueVerificationCertificateRequest(code="0F3A9C", validity_seconds=validity_seconds)
    error = _error(lambda: stub(channel).IssueVerificationCertificate(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert f"validity {validity_seconds} seconds is out of range" in _details(error)
    assert "[rule verification-validity]" in _details(error)


@pytest.mark.parametrize("validity_days", [36_501, 3_000_000, 2**32 - 1])
def test_self_sign_refuses_a_validity_beyond_36500_days_naming_validity_days_and_installs_nothing(
    channel: grpc.Channel, validity_days: int
) -> None:
    label = _new_key(channel)
    request = ca_pb2.SelfSignKeyRequest(key_id=label, subject="CN=Hostile Root 2", validity_days=validity_days)
    error = _error(lambda: _ceremony(channel).SelfSignKey(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert f"root validity {validity_days} days is out of range" in _details(error)
    assert "[rule root-validity]" in _details(error)
    assert not _has_certificate(channel, label)


# -- limits the contract states ----------------------------------------------------------------


@pytest.mark.parametrize(
    "label",
    [
        *("\u0441\u0430-root-1", "\uff4b\uff45\uff59\uff12", "\u043a\u043b\u044e\u0447", "a" * 65, "ca root", "ca/root"),
        *(".", "..", "-x", "ca-root-1-delta"),
    ],
    ids=[
        *("cyrillic-homoglyph-of-ca-root-1", "fullwidth", "cyrillic", "65-characters", "space", "slash"),
        *("dot", "dot-dot", "dash-first", "delta"),
    ],
)
def test_generate_key_refuses_a_label_outside_the_documented_ascii_alphabet(channel: grpc.Channel, label: str) -> None:
    """ca.proto: 'CKA_LABEL of the new key, also its key_id: 1-64 of [A-Za-z0-9-_.], starting with a letter or digit,
    not ending in -delta'. "." and ".." put in a CRL URL in place of the configured label made a dot-segment; key K-delta's
    full CRL was served (and written) where key K's delta CRL is, /crl/K-delta.crl."""
    error = _error(lambda: _ceremony(channel).GenerateKey(ca_pb2.GenerateKeyRequest(label=label), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    rule = "1-64 of [A-Za-z0-9-_.], starting with a letter or digit, not ending in -delta"
    assert f"is not usable: use {rule} [rule label]" in _details(error)
    assert label not in [k.key_id for k in _ceremony(channel).ListKeys(ca_pb2.ListKeysRequest(), timeout=30).keys]


def test_generate_key_takes_a_label_of_64_characters_of_the_documented_alphabet(channel: grpc.Channel) -> None:
    label = f"Az09._-{uuid.uuid4().hex}".ljust(64, "x")
    reply = _ceremony(channel).GenerateKey(ca_pb2.GenerateKeyRequest(label=label), timeout=60)
    assert reply.key_id == label


# -- messages that quote unbounded input --------------------------------------------------------
# gRPC sends a status message twice in trailers limited to 16 KiB: a message quoting a 10k-character
# value whole reached the caller as RESOURCE_EXHAUSTED. The value is quoted cut, saying so.

LONG = 10_000


def _assert_quoted_cut(error: grpc.RpcError, code: grpc.StatusCode, start: str) -> None:
    assert error.code() == code, (error.code(), _details(error)[:300])
    assert _details(error).startswith(start), _details(error)[:300]
    assert "…(truncated)" in _details(error)
    assert len(_details(error).encode()) <= 1024


def test_get_crl_of_an_unknown_issuer_of_10k_characters_is_not_found_quoting_it_cut(channel: grpc.Channel) -> None:
    error = _error(lambda: stub(channel).GetCRL(ca_pb2.GetCRLRequest(issuer_key_id="z" * LONG), timeout=10))
    _assert_quoted_cut(error, grpc.StatusCode.NOT_FOUND, "no CA key 'zzz")


def test_sign_with_an_unknown_profile_of_10k_characters_is_permission_denied_quoting_it_cut(channel: grpc.Channel) -> None:
    request = ca_pb2.SignRequest(csr=device_csr(), profile="p" * LONG, request_id=str(uuid.uuid4()))
    error = _error(lambda: stub(channel).Sign(request, timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (error.code(), _details(error)[:300])
    assert "profile 'ppp" in _details(error)
    assert "…(truncated)" in _details(error)
    assert len(_details(error).encode()) <= 1024


def test_revoke_bulk_of_an_unknown_device_of_10k_characters_is_not_found_quoting_it_cut(channel: grpc.Channel) -> None:
    request = ca_pb2.RevokeBulkRequest(device_id="d" * LONG, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    error = _error(lambda: stub(channel).RevokeBulk(request, timeout=10))
    _assert_quoted_cut(error, grpc.StatusCode.NOT_FOUND, "no certificate was issued for device 'ddd")


def test_approve_an_unknown_action_of_10k_characters_is_invalid_argument_quoting_it_cut(channel: grpc.Channel) -> None:
    request = ca_pb2.ApproveKeyActionRequest(action="a" * LONG, key_id="ca-root-1")
    error = _error(lambda: _ceremony(channel).ApproveKeyAction(request, timeout=10))
    _assert_quoted_cut(error, grpc.StatusCode.INVALID_ARGUMENT, "unknown key action 'aaa")


def test_self_sign_an_unknown_key_id_of_10k_characters_is_not_found_quoting_it_cut(channel: grpc.Channel) -> None:
    request = ca_pb2.SelfSignKeyRequest(key_id="k" * LONG, subject="CN=Hostile Root")
    error = _error(lambda: _ceremony(channel).SelfSignKey(request, timeout=10))
    _assert_quoted_cut(error, grpc.StatusCode.NOT_FOUND, "no CA key 'kkk")


def test_generate_key_of_an_unknown_key_type_of_10k_characters_is_invalid_argument_quoting_it_cut(channel: grpc.Channel) -> None:
    request = ca_pb2.GenerateKeyRequest(label=f"hostile-{uuid.uuid4().hex[:8]}", key_type="t" * LONG)
    error = _error(lambda: _ceremony(channel).GenerateKey(request, timeout=10))
    _assert_quoted_cut(error, grpc.StatusCode.INVALID_ARGUMENT, "key type 'ttt")


def test_generate_key_with_a_label_of_10k_characters_is_invalid_argument_quoting_it_cut(channel: grpc.Channel) -> None:
    error = _error(lambda: _ceremony(channel).GenerateKey(ca_pb2.GenerateKeyRequest(label="l" * LONG), timeout=10))
    _assert_quoted_cut(error, grpc.StatusCode.INVALID_ARGUMENT, "key label 'lll")


@pytest.mark.parametrize("subject", ["CN=" + "s" * LONG, "s" * LONG, "O=" + "s" * LONG], ids=["long-cn", "not-a-name", "no-cn"])
def test_get_key_csr_with_a_subject_of_10k_characters_is_invalid_argument_quoting_it_cut(channel: grpc.Channel, subject: str) -> None:
    request = ca_pb2.GetKeyCSRRequest(key_id="ca-root-1", subject=subject)
    error = _error(lambda: _ceremony(channel).GetKeyCSR(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error)[:300])
    assert _details(error).endswith("[rule subject]")
    if subject.startswith("CN="):  # named by its attribute and length, not quoted
        assert _details(error).startswith("the CA subject's CN is 10000 characters long"), _details(error)[:300]
    else:
        assert "…(truncated)" in _details(error)
    assert len(_details(error).encode()) <= 1024


@pytest.mark.parametrize(("subject", "message"), OVERSIZED_CA_SUBJECTS, ids=["o-65", "l-129", "empty-o", "over-1-kib", "cn-65", "c-3"])
def test_self_sign_and_get_key_csr_refuse_a_subject_beyond_rfc_5280_bounds_and_install_nothing(
    channel: grpc.Channel, subject: str, message: str
) -> None:
    """The officer's key ceremony takes a CA subject too: the same bounds as `ca-daemon init` and `ca csr`."""
    label = _new_key(channel)
    for call in (
        lambda: _ceremony(channel).SelfSignKey(ca_pb2.SelfSignKeyRequest(key_id=label, subject=subject), timeout=60),
        lambda: _ceremony(channel).GetKeyCSR(ca_pb2.GetKeyCSRRequest(key_id=label, subject=subject), timeout=60),
    ):
        error = _error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error)[:300])
        assert _details(error).startswith(message) and _details(error).endswith("[rule subject]"), _details(error)[:300]
    assert not _has_certificate(channel, label)


# -- bytes that are not the request message ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "message_type", "payload"),
    [
        (
            "/ca_daemon.v1.CertificateAuthority/Sign",
            "ca_daemon.v1.SignRequest",
            ca_pb2.SignRequest(csr=b"x", request_id="AAAA").SerializeToString().replace(b"AAAA", b"\xff\xfe\xfd\xfc"),
        ),
        (
            "/ca_daemon.v1.CertificateAuthority/GetCertificate",
            "ca_daemon.v1.GetCertificateRequest",
            ca_pb2.GetCertificateRequest(serial="AAAA").SerializeToString().replace(b"AAAA", b"\xff\xfe\xfd\xfc"),
        ),
        ("/ca_daemon.v1.CertificateAuthority/GetCertificate", "ca_daemon.v1.GetCertificateRequest", b"\x0a\xff\xff\xff\xff\x0f"),
        ("/ca_daemon.v1.CertificateAuthority/StreamAuditEvents", "ca_daemon.v1.StreamAuditEventsRequest", b"\x0a\xff\xff\xff\xff\x0f"),
    ],
    ids=["sign-request-id-not-utf8", "serial-not-utf8", "corrupt-wire-format", "stream-corrupt-wire-format"],
)
def test_a_request_that_does_not_decode_is_invalid_argument_logged_as_a_refusal_without_a_traceback(
    channel: grpc.Channel, daemon: Daemon, method: str, message_type: str, payload: bytes
) -> None:
    if "Stream" in method:
        streaming = channel.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        error = _error(lambda: list(streaming(payload, timeout=10)))
    else:
        unary = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        error = _error(lambda: unary(payload, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert _details(error).startswith(f"request is not a valid {message_type}: "), _details(error)
    assert _details(error).endswith("[rule request-encoding]")
    deadline = time.monotonic() + 5
    while f"request is not a valid {message_type}" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)  # the request log is written in batches
    refusals = [line for line in daemon.log().splitlines() if f"request is not a valid {message_type}" in line]
    assert refusals and all('"status": "INVALID_ARGUMENT"' in line and method in line for line in refusals), refusals
    assert "Traceback" not in daemon.log()
    assert '"level": "ERROR"' not in daemon.log()


# -- RevokeBulk up to its documented limit reaches the daemon ------------------------------------


def _colon_serial() -> str:
    """A 20-byte serial as openssl prints it (the longest form revocation.MAX_SERIAL_TEXT allows for)."""
    return ":".join(f"{b:02X}" for b in b"\x7f" + secrets.token_bytes(19))


def test_revoke_bulk_of_5000_unknown_serials_is_answered_by_the_daemon_not_by_grpcs_size_limit(channel: grpc.Channel) -> None:
    """A receive limit of max_csr_bytes + 64 KiB stopped about 3,100 serials, short of revocation.MAX_BULK_SERIALS."""
    serials = [secrets.token_hex(19) for _ in range(5000)]  # 152-bit serials, the size the daemon issues
    request = ca_pb2.RevokeBulkRequest(serials=serials, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    error = _error(lambda: stub(channel).RevokeBulk(request, timeout=60))
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), _details(error))
    assert "was issued by this CA" in _details(error)


def test_revoke_bulk_of_the_documented_maximum_of_serials_in_their_longest_form_reaches_the_daemon(channel: grpc.Channel) -> None:
    serials = [_colon_serial() for _ in range(MAX_BULK_SERIALS)]
    request = ca_pb2.RevokeBulkRequest(serials=serials, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    assert request.ByteSize() <= MAX_BULK_REQUEST_BYTES
    error = _error(lambda: stub(channel).RevokeBulk(request, timeout=120))
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), _details(error))
    assert "was issued by this CA" in _details(error)


def test_revoke_bulk_of_one_serial_more_than_the_maximum_is_refused_by_the_bulk_rule(channel: grpc.Channel) -> None:
    serials = [secrets.token_hex(19) for _ in range(MAX_BULK_SERIALS + 1)]
    request = ca_pb2.RevokeBulkRequest(serials=serials, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    error = _error(lambda: stub(channel).RevokeBulk(request, timeout=120))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert f"{MAX_BULK_SERIALS + 1} serials in one request; split it [rule bulk]" == _details(error)


# -- officer input -------------------------------------------------------------------------------


def test_install_key_certificate_with_duplicate_extensions_is_refused_by_the_certificate_rule_and_installs_nothing(
    channel: grpc.Channel,
) -> None:
    label = _new_key(channel)
    csr_pem = _ceremony(channel).GetKeyCSR(ca_pb2.GetKeyCSRRequest(key_id=label, subject="CN=Hostile Intermediate"), timeout=60).csr_pem
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    parent = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outside Root")]))
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.20"), b"\x30\x03\x01\x01\xff"), critical=True)
        .sign(parent, hashes.SHA256())
    )
    # Turn the second extension into a second basicConstraints (same length OID: 2.5.29.20 -> 2.5.29.19).
    der = certificate.public_bytes(serialization.Encoding.DER).replace(bytes.fromhex("0603551d14"), bytes.fromhex("0603551d13"), 1)
    pem = "-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode() + "-----END CERTIFICATE-----\n"
    request = ca_pb2.InstallKeyCertificateRequest(key_id=label, certificate_pem=pem)
    error = _error(lambda: _ceremony(channel).InstallKeyCertificate(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert _details(error).startswith("the certificate 'CN=Hostile Intermediate' has unreadable extensions: ")
    assert _details(error).endswith("[rule certificate]")
    assert not _has_certificate(channel, label)


def _parent_signed(channel: grpc.Channel, label: str) -> tuple[bytes, bytes]:
    """DER of a certificate for the pending key label's CSR, signed by an outside root, and of that root."""
    csr_pem = _ceremony(channel).GetKeyCSR(ca_pb2.GetKeyCSRRequest(key_id=label, subject="CN=Hostile Intermediate"), timeout=60).csr_pem
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    parent = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outside Root")])
    now = datetime.now(UTC)

    def certificate(subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(root_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        )
        return builder.sign(parent, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    csr_key = csr.public_key()
    assert isinstance(csr_key, ec.EllipticCurvePublicKey)
    return certificate(csr.subject, csr_key), certificate(root_name, parent.public_key())


def _pem_of(*ders: bytes) -> str:
    return "".join("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode() + "-----END CERTIFICATE-----\n" for der in ders)


_EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey, 1.2.840.10045.2.1
_UNKNOWN_KEY_OID = bytes.fromhex("06072a8648ce3d0209")  # 1.2.840.10045.2.9, no key type cryptography knows


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (
            lambda leaf, root: _pem_of(leaf.replace(b"Outside Root", b"Outside\xffRoot"), root),
            "the certificate has an unreadable issuer name: ",
        ),
        (
            lambda leaf, root: _pem_of(leaf.replace(_EC_PUBLIC_KEY_OID, _UNKNOWN_KEY_OID), root),
            "the certificate has an unreadable public key: Unknown key type: 1.2.840.10045.2.9",
        ),
        (
            lambda leaf, root: _pem_of(leaf, root.replace(b"Outside Root", b"Outside\xffRoot", 1)),
            "parent certificate 1 has an unreadable issuer name: ",
        ),
        (
            lambda leaf, root: _pem_of(leaf, root.replace(_EC_PUBLIC_KEY_OID, _UNKNOWN_KEY_OID)),
            "parent certificate 1 has an unreadable public key: Unknown key type: 1.2.840.10045.2.9",
        ),
    ],
    ids=["issuer-not-utf8", "unknown-key-type", "parent-issuer-not-utf8", "parent-unknown-key-type"],
)
def test_install_key_certificate_with_an_unreadable_name_or_key_is_refused_by_the_certificate_rule_and_installs_nothing(
    channel: grpc.Channel, daemon: Daemon, mangle: Callable[[bytes, bytes], str], message: str
) -> None:
    """A UTF8String name that is not UTF-8, or a key of a type cryptography does not know, in the certificate ended in
    INTERNAL (a traceback in the log); in a parent, the chain was installed and the key published with it."""
    label = _new_key(channel)
    leaf, root = _parent_signed(channel, label)
    request = ca_pb2.InstallKeyCertificateRequest(key_id=label, certificate_pem=mangle(leaf, root))
    error = _error(lambda: _ceremony(channel).InstallKeyCertificate(request, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), _details(error))
    assert _details(error).startswith(message), _details(error)
    assert _details(error).endswith("[rule certificate]"), _details(error)
    assert not _has_certificate(channel, label)
    assert label not in [c.key_id for c in stub(channel).GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10).certificates]
    assert "Traceback" not in daemon.log()


def test_an_emergency_naming_an_unknown_successor_is_not_found_naming_successor_key_id(channel: grpc.Channel) -> None:
    """The refusal named the field key_id (the compromised key's, which exists), not successor_key_id."""
    request = ca_pb2.ApproveKeyActionRequest(action="emergency", key_id="ca-root-1", successor_key_id="no-such-successor")
    error = _error(lambda: _ceremony(channel).ApproveKeyAction(request, timeout=60))
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), _details(error))
    assert _details(error).startswith("no CA key 'no-such-successor' (successor_key_id); "), _details(error)
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "key" and info.metadata["field"] == "successor_key_id", info
