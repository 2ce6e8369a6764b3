"""Full and delta CRLs from a real daemon, judged by openssl, pkilint and cryptography; HTTP and file distribution."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from ca_daemon import app, crl_der
from ca_daemon import config as config_module
from ca_daemon._proto.ca_daemon.v1 import ca_pb2
from ca_daemon.authority import load_active_ca
from ca_daemon.crl import CRL_HEALTH_SERVICE, CrlScheduler, await_first_crls
from ca_daemon.errors import FailedPrecondition, LintFailure
from ca_daemon.model import PublishedCrl
from ca_daemon.revocation import CrlIssuer, CrlPublisher
from ca_daemon.store import SqlStore
from ca_daemon.store.locks import Leadership
from ca_daemon.verify import CrlCache, DeviceVerifier, IdentityRule, http_fetch, sign_challenge
from tests.conftest import BIN, CaEnv, Daemon, device_csr, free_port, make_env, openssl_verify, wait_workers_serving
from tests.integration.crl_helpers import crl_env, get_crl, serials_in, sign, start, stub, wait_for_crl


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> tuple[CaEnv, int]:
    return crl_env(tmp_path_factory.mktemp("crl"), softhsm_conf)


@pytest.fixture(scope="module")
def daemon(setup: tuple[CaEnv, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start(setup[0], tmp_path_factory.mktemp("log"))
    yield d
    d.stop()


@pytest.fixture
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.env.target) as ch:
        yield ch


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def _crl_file(tmp_path: Path, *ders: bytes) -> str:
    path = tmp_path / f"crls-{uuid.uuid4().hex}.pem"
    path.write_bytes(b"".join(_pem(d) for d in ders))
    return str(path)


def _revoke(channel: grpc.Channel, serial: str) -> None:
    stub(channel).Revoke(ca_pb2.RevokeRequest(serial=serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)


def _lint(path: Path) -> list[str]:
    result = subprocess.run(
        [str(BIN / "lint_crl"), "lint", "-t", "CRL", "-p", "PKIX", "-s", "ALL", "-f", "JSON", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(result.stdout)
    findings = [(r["validator"], f) for r in report["results"] for f in r["finding_descriptions"]]
    # The linter really parsed the CRL: with -s ALL it lists every validator it ran, findings or not.
    assert any(r["validator"] == "CrlNumberPresenceValidator" for r in report["results"]), result.stdout
    return [f"{validator}: {f['code']}" for validator, f in findings if f["severity"] in {"ERROR", "FATAL"}]


def url_path_of(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


def _http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_delta_crl_semantics_with_openssl(channel: grpc.Channel, tmp_path: Path) -> None:
    """Revoked after the base: rejected with base + delta (-use_deltas), accepted with the base alone."""
    base = get_crl(channel)
    cert = sign(channel)
    _revoke(channel, cert.serial)
    delta = wait_for_crl(channel, lambda crl: int(cert.serial, 16) in serials_in(crl))
    parsed_base = x509.load_der_x509_crl(base.crl_der)
    parsed_delta = x509.load_der_x509_crl(delta.crl_der)
    assert int(cert.serial, 16) not in serials_in(parsed_base)
    indicator = parsed_delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number
    assert indicator == base.crl_number < delta.crl_number
    only_base = openssl_verify(tmp_path, cert.certificate_pem, cert.chain_pem, "-crl_check", "-CRLfile", _crl_file(tmp_path, base.crl_der))
    assert only_base.returncode == 0, only_base.stdout + only_base.stderr
    with_delta = openssl_verify(
        tmp_path,
        cert.certificate_pem,
        cert.chain_pem,
        "-crl_check",
        "-use_deltas",
        "-extended_crl",  # without it OpenSSL takes the newer delta for the whole CRL (see the test below)
        "-CRLfile",
        _crl_file(tmp_path, base.crl_der, delta.crl_der),
    )
    assert with_delta.returncode != 0
    assert "certificate revoked" in with_delta.stdout + with_delta.stderr


def test_crl_structure_and_pkilint(channel: grpc.Channel, tmp_path: Path) -> None:
    cert = sign(channel)
    _revoke(channel, cert.serial)
    delta = wait_for_crl(channel, lambda crl: int(cert.serial, 16) in serials_in(crl))
    base = get_crl(channel)
    ca = x509.load_pem_x509_certificates(cert.chain_pem.encode())[0]
    for response in (base, delta):
        crl = x509.load_der_x509_crl(response.crl_der)
        assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        assert crl.issuer == ca.subject
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == response.crl_number
        with pytest.raises(x509.ExtensionNotFound):  # one CRL of everything the key issued: no IDP narrows it
            crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert crl.next_update_utc == response.next_update.ToDatetime(tzinfo=UTC)
        path = tmp_path / f"{response.crl_number}.crl"
        path.write_bytes(response.crl_der)
        assert _lint(path) == []
    freshest = x509.load_der_x509_crl(base.crl_der).extensions.get_extension_for_class(x509.FreshestCRL).value
    delta_url = str(freshest[0].full_name[0].value) if freshest[0].full_name else ""
    assert delta_url.endswith("-delta.crl")
    with pytest.raises(x509.ExtensionNotFound):
        x509.load_der_x509_crl(delta.crl_der).extensions.get_extension_for_class(x509.FreshestCRL)


def test_openssl_crl_check_all_accepts_a_valid_leaf_and_refuses_a_revoked_one(channel: grpc.Channel, tmp_path: Path) -> None:
    """CRL_CHECK_ALL (nginx ssl_crl, Apache, curl --crlfile) checks the self-signed root against its own CRL too.

    The CRLs used to carry an Issuing Distribution Point naming the leaves' CDP with
    onlyContainsUserCerts, which put the root out of every CRL's scope: each chain was
    refused with "unable to get certificate CRL".
    """
    valid, revoked = sign(channel), sign(channel)
    _revoke(channel, revoked.serial)
    wait_for_crl(channel, lambda crl: int(revoked.serial, 16) in serials_in(crl))
    crls = _crl_file(tmp_path, get_crl(channel).crl_der, get_crl(channel, delta=True).crl_der)
    for flags in (("-crl_check_all",), ("-crl_check_all", "-use_deltas")):
        ok = openssl_verify(tmp_path, valid.certificate_pem, valid.chain_pem, *flags, "-CRLfile", crls)
        assert ok.returncode == 0, (flags, ok.stdout + ok.stderr)
    refused = openssl_verify(tmp_path, revoked.certificate_pem, revoked.chain_pem, "-crl_check_all", "-use_deltas", "-CRLfile", crls)
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr


def test_openssl_takes_a_newer_delta_for_the_whole_crl_unless_extended_crl_support_is_on(
    channel: grpc.Channel, setup: tuple[CaEnv, int], tmp_path: Path
) -> None:
    """What README ("Revocation and CRLs") tells OpenSSL-based relying parties: the full CRL alone, or -extended_crl.

    Found by the combined-scenario review: once a full CRL lists a revocation, the next delta
    no longer does, and OpenSSL without X509_V_FLAG_EXTENDED_CRL_SUPPORT scores a delta as a
    complete CRL and keeps the newer one, so with both loaded (as nginx's ssl_crl or
    Mosquitto's crlfile would) the revoked certificate verifies. If this ever fails on the
    'accepted' side, OpenSSL changed and the README's warning can go.
    """
    env, _ = setup
    on_full = sign(channel)
    _revoke(channel, on_full.serial)
    wait_for_crl(channel, lambda crl: int(on_full.serial, 16) in serials_in(crl))
    env.cli("crl", "publish")  # a full CRL that lists it
    full = get_crl(channel)
    assert int(on_full.serial, 16) in serials_in(x509.load_der_x509_crl(full.crl_der))
    time.sleep(1.1)  # a later thisUpdate second: OpenSSL keeps the first of two CRLs of the same time
    on_delta = sign(channel)
    _revoke(channel, on_delta.serial)

    def on_this_base(crl: x509.CertificateRevocationList) -> bool:
        base = crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number
        return base == full.crl_number and int(on_delta.serial, 16) in serials_in(crl)

    delta = wait_for_crl(channel, on_this_base)
    assert int(on_full.serial, 16) not in serials_in(x509.load_der_x509_crl(delta.crl_der))
    both, full_only = _crl_file(tmp_path, full.crl_der, delta.crl_der), _crl_file(tmp_path, full.crl_der)

    def verifies(cert: ca_pb2.SignResponse, crls: str, *flags: str) -> bool:
        result = openssl_verify(tmp_path, cert.certificate_pem, cert.chain_pem, "-crl_check_all", *flags, "-CRLfile", crls)
        assert result.returncode == 0 or "certificate revoked" in result.stdout + result.stderr, result.stdout + result.stderr
        return result.returncode == 0

    assert verifies(on_full, both) and verifies(on_full, both, "-use_deltas")  # the hazard the README warns of
    assert not verifies(on_full, full_only)
    assert not verifies(on_full, both, "-use_deltas", "-extended_crl")
    assert not verifies(on_delta, both, "-use_deltas", "-extended_crl")


def test_two_quick_deltas_have_distinct_this_update_so_if_modified_since_sees_the_second(
    channel: grpc.Channel, setup: tuple[CaEnv, int]
) -> None:
    """thisUpdate is the CRL's Last-Modified; two deltas of one second made If-Modified-Since answer 304 for the newer one."""
    _, port = setup
    full = x509.load_der_x509_crl(get_crl(channel).crl_der)
    path = url_path_of(str(full.extensions.get_extension_for_class(x509.FreshestCRL).value[0].full_name[0].value))
    a, b = sign(channel), sign(channel)
    _revoke(channel, a.serial)
    first = wait_for_crl(channel, lambda crl: int(a.serial, 16) in serials_in(crl))
    status, headers, body = _http_get(port, path)
    _revoke(channel, b.serial)  # publish_on_revoke: the next delta follows within the same second, unless it waits
    second = wait_for_crl(channel, lambda crl: int(b.serial, 16) in serials_in(crl))
    assert second.this_update.ToDatetime() > first.this_update.ToDatetime()
    if body == first.crl_der:  # the first delta was still served when fetched: revalidate by its date
        status, _, body = _http_get(port, path, {"If-Modified-Since": headers["last-modified"]})
        assert (status, body) == (200, second.crl_der)


def test_get_crl_if_newer_than(channel: grpc.Channel) -> None:
    full = get_crl(channel)
    same = get_crl(channel, if_newer_than=full.crl_number)
    assert same.not_modified and same.crl_der == b"" and same.crl_number == full.crl_number
    older = get_crl(channel, if_newer_than=full.crl_number - 1)
    assert not older.not_modified and older.crl_der == full.crl_der
    with pytest.raises(grpc.RpcError) as info:
        stub(channel).GetCRL(ca_pb2.GetCRLRequest(issuer_key_id="no-such-key"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub(channel).GetCRL(ca_pb2.GetCRLRequest(kind=7), timeout=10)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_http_serves_exactly_what_get_crl_returns(channel: grpc.Channel, setup: tuple[CaEnv, int]) -> None:
    env, port = setup
    cert = sign(channel)
    _revoke(channel, cert.serial)
    wait_for_crl(channel, lambda crl: int(cert.serial, 16) in serials_in(crl))
    leaf = x509.load_pem_x509_certificate(cert.certificate_pem.encode())
    cdp_url = str(leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value)
    aia_url = str(leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value[0].access_location.value)
    assert cdp_url.startswith(f"http://127.0.0.1:{port}/")
    full, delta = get_crl(channel), get_crl(channel, delta=True)
    delta_url = str(x509.load_der_x509_crl(full.crl_der).extensions.get_extension_for_class(x509.FreshestCRL).value[0].full_name[0].value)
    for url, expected in ((cdp_url, full), (delta_url, delta)):
        status, headers, body = _http_get(port, url.split(str(port), 1)[1])
        assert status == 200
        assert headers["content-type"] == "application/pkix-crl"
        assert body == expected.crl_der
        assert headers["etag"] and headers["last-modified"]
        status, _, body = _http_get(port, url.split(str(port), 1)[1], {"If-None-Match": headers["etag"]})
        assert (status, body) == (304, b"")
        status, _, _ = _http_get(port, url.split(str(port), 1)[1], {"If-Modified-Since": headers["last-modified"]})
        assert status == 304
    status, headers, body = _http_get(port, aia_url.split(str(port), 1)[1])
    assert status == 200 and headers["content-type"] == "application/pkix-cert"
    assert body == x509.load_pem_x509_certificates(cert.chain_pem.encode())[0].public_bytes(serialization.Encoding.DER)
    assert _http_get(port, "/crl/nothing-here.crl")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("HEAD", url_path_of(cdp_url))
        head = conn.getresponse()
        assert head.status == 200 and int(head.getheader("Content-Length") or 0) == len(full.crl_der) and head.read() == b""
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", url_path_of(cdp_url), body=b"x")
        assert conn.getresponse().status == 405
    finally:
        conn.close()
    # The files in the CRL directory hold the same bytes.
    directory = config_module.load(env.config_path).crl.directory
    assert directory is not None
    key_id = cdp_url.rsplit("/", 1)[1].removesuffix(".crl")
    assert (directory / f"{key_id}.crl").read_bytes() == full.crl_der
    assert (directory / f"{key_id}-delta.crl").read_bytes() == delta.crl_der


def _http_raw(port: int, request: bytes) -> bytes:
    """One raw request on its own connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_a_malformed_request_target_is_400_without_a_traceback(daemon: Daemon, setup: tuple[CaEnv, int]) -> None:
    """The CRL port is public: a target urlsplit refuses (an unclosed IPv6 bracket) is 400 Bad Request.

    It raised ValueError in the handler: the connection was dropped with no answer and every such
    request wrote an ERROR line with a traceback to the daemon's log, which anyone could repeat.
    """
    _, port = setup
    before = len(daemon.log())
    for target in (b"//[x", b"http://[::1/crl/x.crl", b"//[::1/crl/x.crl"):
        answer = _http_raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: ca\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (target, answer)
    assert _http_raw(port, b"GET /crl/nothing-here.crl HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404 ")  # still serving
    time.sleep(0.2)
    written = daemon.log()[before:]
    assert "Traceback" not in written and "Unhandled exception" not in written, written


def test_crl_health_is_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=CRL_HEALTH_SERVICE), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_crl_numbers_hold_across_a_restart_and_the_base_crl_rejects_revoked(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path, tmp_path: Path
) -> None:
    """A daemon that crashes and restarts continues above the highest CRL number; a new base lists earlier revocations."""
    env, _ = crl_env(tmp_path_factory.mktemp("restart"), softhsm_conf)
    # Full CRL every 60 s (the minimum) so the restarted daemon publishes a new base soon.
    env.edit_config("full_interval_seconds = 86400", "full_interval_seconds = 60")
    env.edit_config("delta_interval_seconds = 300", "delta_interval_seconds = 30")
    log_dir = tmp_path_factory.mktemp("log")
    daemon = start(env, log_dir)
    try:
        with grpc.insecure_channel(env.target) as channel:
            revoked, good = sign(channel), sign(channel)
            _revoke(channel, revoked.serial)
            before = wait_for_crl(channel, lambda crl: int(revoked.serial, 16) in serials_in(crl))
        daemon.kill()
        store = SqlStore(config_module.load(env.config_path).store.url)
        try:
            highest = store.max_crl_number(revoked.issuer_key_id)
        finally:
            store.close()
        assert highest >= before.crl_number
        # Make the restarted daemon's first full CRL due at once: age the stored one (as if the daemon was down a day).
        store = SqlStore(config_module.load(env.config_path).store.url)
        try:
            with store.engine.begin() as conn:
                conn.exec_driver_sql("UPDATE crls SET this_update = '2000-01-01 00:00:00.000000'")
        finally:
            store.close()
        daemon = start(env, log_dir)
        with grpc.insecure_channel(env.target) as channel:
            base = get_crl(channel)
            assert base.crl_number > highest
            assert int(revoked.serial, 16) in serials_in(x509.load_der_x509_crl(base.crl_der))
            delta = get_crl(channel, delta=True)
            assert delta.crl_number > base.crl_number
            rejected = openssl_verify(
                tmp_path, revoked.certificate_pem, revoked.chain_pem, "-crl_check", "-CRLfile", _crl_file(tmp_path, base.crl_der)
            )
            assert rejected.returncode != 0 and "certificate revoked" in rejected.stdout + rejected.stderr
            accepted = openssl_verify(
                tmp_path, good.certificate_pem, good.chain_pem, "-crl_check", "-CRLfile", _crl_file(tmp_path, base.crl_der)
            )
            assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    finally:
        daemon.stop()


def test_store_refuses_a_crl_number_that_does_not_increase(channel: grpc.Channel, setup: tuple[CaEnv, int]) -> None:
    env, _ = setup
    full = get_crl(channel)
    store = SqlStore(config_module.load(env.config_path).store.url)
    try:
        issuer_key_id = stub(channel).GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10).certificates[0].key_id
        latest = store.latest_crl(issuer_key_id, delta=False)
        assert latest is not None and latest.crl_number == full.crl_number
        replay = type(latest)(**{**latest.__dict__, "crl_number": store.max_crl_number(issuer_key_id)})
        with pytest.raises(FailedPrecondition, match="not above"):
            store.store_crl(replay)
    finally:
        store.close()


def test_a_crl_that_fails_its_self_check_is_not_published_and_health_shows_it(channel: grpc.Channel, setup: tuple[CaEnv, int]) -> None:
    """Sign with the CA key in the token but check against another CA certificate: a real verification failure."""
    env, _ = setup
    config = config_module.load(env.config_path)
    hsm = app.connect_hsm(config)
    store = SqlStore(config.store.url)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        publisher = CrlPublisher(config, hsm, store)
        issuer = publisher.issuers(datetime.now(UTC))[0]
        other_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        impostor = (
            x509.CertificateBuilder()
            .subject_name(issuer.certificate.subject)
            .issuer_name(issuer.certificate.subject)
            .public_key(other_key.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .sign(other_key, hashes.SHA256())
        )
        wrong = CrlIssuer(issuer.key_id, impostor, issuer.private_key, crl_der.CrlScope.for_ca(issuer.certificate, (), ()))
        before = store.max_crl_number(issuer.key_id)
        with pytest.raises(LintFailure, match="signature does not verify"):
            publisher.publish(wrong, delta=True)
        assert store.max_crl_number(issuer.key_id) == before
        assert [key for key, _ in store.crl_failures()] == [issuer.key_id]
        _wait_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert get_crl(channel, delta=True).crl_number <= before  # GetCRL still serves the last good one
        # The daemon's next good publication (a revocation triggers one) clears it.
        _revoke(channel, sign(channel).serial)
        _wait_health(health, health_pb2.HealthCheckResponse.SERVING)
    finally:
        store.close()
        hsm.close()


def test_a_failure_that_ends_after_another_process_published_leaves_crl_health_to_that_publication(
    tmp_path: Path, softhsm_conf: Path
) -> None:
    """The daemon refuses a CRL while the clock is behind the last one (dated ahead); the operator replaces those meanwhile.

    The daemon's attempt ends after the replacements were stored. Recorded then, its failure would
    keep CRL health NOT_SERVING with nothing due to clear it: a test of a stepped clock saw that.
    """
    env = make_env(tmp_path, softhsm_conf)
    config = config_module.load(env.config_path)
    hsm = app.connect_hsm(config)
    store = SqlStore(config.store.url)
    try:
        load_active_ca(config, hsm, store)
        daemon, operator = CrlPublisher(config, hsm, store), CrlPublisher(config, hsm, store)
        issuer = daemon.issuers(datetime.now(UTC))[0]
        ahead = datetime.now(UTC) + timedelta(days=1)
        for delta in (False, True):
            daemon.publish(issuer, delta=delta, now=ahead)
        refused: list[BaseException] = []

        def attempt() -> None:
            try:
                daemon.publish(issuer, delta=True)  # waits up to 2 s for the clock, then refuses
            except FailedPrecondition as exc:
                refused.append(exc)

        worker = threading.Thread(target=attempt)
        worker.start()
        time.sleep(0.5)
        replaced = [operator.publish(issuer, delta=delta, clock_was_ahead=True) for delta in (False, True)]
        worker.join(timeout=30)
        assert refused and getattr(refused[0], "rule", None) == "crl-clock-behind", refused
        assert store.max_crl_number(issuer.key_id) == replaced[-1].crl_number
        assert store.crl_failures() == [], "a failure that ended after the replacements were stored outlived them"
        # Without a publication meanwhile, the same refusal is recorded.
        operator.publish(issuer, delta=True, now=ahead)
        with pytest.raises(FailedPrecondition, match="is behind thisUpdate"):
            daemon.publish(issuer, delta=True)
        assert [key for key, _ in store.crl_failures()] == [issuer.key_id]
    finally:
        store.close()
        hsm.close()


def test_a_replica_that_lost_the_crl_leadership_leaves_crl_health_to_the_new_leader(
    tmp_path: Path, softhsm_conf: Path, pg_database: Callable[[], str]
) -> None:
    """Two replicas' publishers on one PostgreSQL database; the leader's session dies while it works.

    Its next commit is fenced (nothing published), and it must not write the publication status
    either: that row is every replica's CRL health, and the new leader, which publishes fine,
    would find nothing due to clear it for up to delta_interval (full_interval without deltas).
    """
    pg_url = pg_database()
    env = make_env(tmp_path, softhsm_conf, init=False)
    env.edit_config('url = "sqlite:///ca.db"', f'url = "{pg_url}"')
    env.cli("init")
    config = config_module.load(env.config_path)
    hsm = app.connect_hsm(config)
    store = SqlStore(config.store.url)
    old, new = Leadership(pg_url), Leadership(pg_url)
    try:
        load_active_ca(config, hsm, store)
        old_publisher, new_publisher = CrlPublisher(config, hsm, store), CrlPublisher(config, hsm, store)
        old_publisher.fence, new_publisher.fence = old, new
        assert old.poll() is True and new.poll() is False
        issuer = old_publisher.issuers(datetime.now(UTC))[0]
        old_publisher.publish(issuer, delta=False)
        with store.engine.connect() as conn:  # a partition, a long pause: the old leader has not noticed yet
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": old.backend_pid})
            conn.commit()
            # pg_terminate_backend only signals the backend: wait until it is gone, and its lock with it.
            deadline = time.monotonic() + 10
            while conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": old.backend_pid}).scalar():
                assert time.monotonic() < deadline, "the old leader's backend did not end"
                conn.commit()  # pg_stat_activity is a snapshot kept until the transaction ends: a new one each round
                time.sleep(0.02)
        assert new.poll() is True
        new_issuer = new_publisher.issuers(datetime.now(UTC))[0]
        new_publisher.publish(new_issuer, delta=False)
        new_publisher.publish(new_issuer, delta=True)
        last = store.max_crl_number(issuer.key_id)
        with pytest.raises(FailedPrecondition) as fenced:
            old_publisher.publish(issuer, delta=True)
        assert fenced.value.rule == "leader-fence"
        assert store.crl_failures() == [], "a replica that merely lost the leadership turned CRL health NOT_SERVING everywhere"
        # A failure of another kind in the old leader (here: no key to sign with) is not recorded either.
        with pytest.raises(FailedPrecondition, match="retired"):
            old_publisher.publish(dataclasses.replace(issuer, private_key=None), delta=True)
        assert store.max_crl_number(issuer.key_id) == last
        assert store.crl_failures() == []
        assert asyncio.run(CrlScheduler(config, new_publisher, store, new).run_once()) == []  # nothing due to clear a failure
        assert store.crl_failures() == []
        # The leader's own failures still are.
        with pytest.raises(FailedPrecondition, match="retired"):
            new_publisher.publish(dataclasses.replace(new_issuer, private_key=None), delta=True)
        assert [key for key, _ in store.crl_failures()] == [issuer.key_id]
    finally:
        old.release()
        new.release()
        store.close()
        hsm.close()


def _wait_health(health: health_pb2_grpc.HealthStub, status: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health.Check(health_pb2.HealthCheckRequest(service=CRL_HEALTH_SERVICE), timeout=5).status == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{CRL_HEALTH_SERVICE} did not become {status} within {timeout}s")


def test_expired_entries_leave_the_base_after_appearing_once(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """In-process with the real token and store: an expired certificate's entry is on one base CRL, then dropped."""
    from ca_daemon.model import AuditEvent, IssuedCertificate
    from ca_daemon.revocation import encode_entry

    env, _ = crl_env(tmp_path_factory.mktemp("expiry"), softhsm_conf)
    config = config_module.load(env.config_path)
    hsm = app.connect_hsm(config)
    store = app.connect_store(config)
    try:
        active = load_active_ca(config, hsm, store)
        now = datetime.now(UTC).replace(microsecond=0)

        def record(serial: int, not_after: datetime) -> None:
            cert = IssuedCertificate(
                serial=serial,
                issuer_key_id=active.key.key_id,
                device_id=f"d{serial}",
                profile="device",
                subject="CN=x",
                not_before=not_after - timedelta(days=30),
                not_after=not_after,
                der=b"\x30\x00",
                csr_sha256=b"",
                public_key_sha256=serial.to_bytes(32, "big"),
                request_id=f"r{serial}",
                created_at=now,
            )
            store.record_issuances([(cert, AuditEvent(time=now, actor="test", action="certificate.issue", outcome="issued"))])

        expired, valid = 0x1001, 0x1002
        record(expired, now - timedelta(days=1))
        record(valid, now + timedelta(days=30))
        store.record_revocations(
            serials=[expired, valid], device_id="", reason=1, revoked_at=now, invalidity_date=None, actor="test", encode_entry=encode_entry
        )
        publisher = CrlPublisher(config, hsm, store)
        issuer = publisher.issuers(now)[0]
        first = publisher.publish(issuer, delta=False, now=now)
        second = publisher.publish(issuer, delta=False, now=now + timedelta(seconds=1))
        assert set(serials_in(x509.load_der_x509_crl(first.der))) == {expired, valid}
        assert set(serials_in(x509.load_der_x509_crl(second.der))) == {valid}
        assert second.crl_number == first.crl_number + 1
        events = [e for e in store.audit_events() if e["action"] == "crl.publish"]
        assert [json.loads(e["details"])["crl_number"] for e in events] == [str(first.crl_number), str(second.crl_number)]
    finally:
        store.close()
        hsm.close()


def test_http_max_age_never_reaches_past_the_crls_next_update(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """Cache-Control max-age was computed once, when the CRL was published: a delta valid 62 s and published every 60 s
    was served with max-age=60 all along, so a cache that took it 4 s later kept it 2 s past its nextUpdate (and, while
    publication failed, a full CRL a day past it). It is now counted down to nextUpdate at each request."""
    env, port = crl_env(tmp_path_factory.mktemp("max-age"), softhsm_conf)
    env.edit_config("delta_interval_seconds = 300", "delta_interval_seconds = 60")
    env.edit_config("delta_validity_seconds = 3600", "delta_validity_seconds = 62")
    daemon = start(env, tmp_path_factory.mktemp("log"))
    try:
        _, _, body = _http_get(port, "/crl/ca-root-1-delta.crl")
        delta = x509.load_der_x509_crl(body)
        assert delta.next_update_utc is not None
        time.sleep(max(0.0, (delta.last_update_utc + timedelta(seconds=4) - datetime.now(UTC)).total_seconds()))
        before = datetime.now(UTC)
        status, headers, again = _http_get(port, "/crl/ca-root-1-delta.crl")
        assert (status, again) == (200, body)  # the same delta: the next is due 60 s after it
        max_age = int(headers["cache-control"].removeprefix("public, max-age="))
        assert 0 < max_age <= (delta.next_update_utc - before).total_seconds(), (headers["cache-control"], delta.next_update_utc, before)
    finally:
        daemon.stop()


def test_with_two_workers_one_publishes_and_every_worker_answers(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env, port = crl_env(tmp_path_factory.mktemp("workers"), softhsm_conf, workers=2)
    daemon = start(env, tmp_path_factory.mktemp("log"))
    try:
        # Both workers, which the fresh connections below are to reach: health is SERVING once one serves.
        wait_workers_serving(daemon.log, 2, 60, daemon.process)
        with grpc.insecure_channel(env.target) as channel:
            cert = sign(channel)
            _revoke(channel, cert.serial)
            delta = wait_for_crl(channel, lambda crl: int(cert.serial, 16) in serials_in(crl))
        # New connections land on either worker (SO_REUSEPORT): all serve the same last published CRL.
        for _ in range(6):
            with grpc.insecure_channel(env.target, options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
                assert get_crl(fresh, delta=True).crl_number >= delta.crl_number
        status, _, body = _http_get(port, "/crl/ca-root-1-delta.crl")
        assert status == 200 and x509.load_der_x509_crl(body).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= (
            delta.crl_number
        )
        time.sleep(0.5)
        published = [line for line in daemon.log().splitlines() if "published full CRL" in line]
        assert len(published) == 1, published  # only the primary worker publishes
    finally:
        daemon.stop()


def test_a_worker_that_does_not_publish_waits_for_the_first_full_and_delta_crl(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """A non-primary worker serves only once GetCRL can answer (CI saw NOT_FOUND from one that did not wait)."""
    env, _ = crl_env(tmp_path_factory.mktemp("first-crl"), softhsm_conf)
    config = config_module.load(env.config_path)
    hsm = app.connect_hsm(config)
    store = app.connect_store(config)
    try:
        load_active_ca(config, hsm, store)  # as a worker does first
        publisher = CrlPublisher(config, hsm, store)
        issuer = publisher.issuers(datetime.now(UTC))[0]
        assert not asyncio.run(await_first_crls(config, store, issuer.key_id, timeout=0.3))
        publisher.publish(issuer, delta=False)
        assert not asyncio.run(await_first_crls(config, store, issuer.key_id, timeout=0.3))  # the delta is still missing

        async def publish_delta_while_waiting() -> bool:
            waiting = asyncio.create_task(await_first_crls(config, store, issuer.key_id, timeout=10))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await asyncio.to_thread(lambda: publisher.publish(issuer, delta=True))
            return await waiting

        assert asyncio.run(publish_delta_while_waiting())
    finally:
        store.close()
        hsm.close()


def test_after_an_upgrade_a_full_crl_without_idp_comes_before_any_delta(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Earlier versions put an Issuing Distribution Point in every CRL; a delta must have its base's scope.

    So the first publication after the upgrade is a full CRL (without IDP), although the
    last one is recent, and only then a delta on it.
    """
    env, _ = crl_env(tmp_path_factory.mktemp("upgrade"), softhsm_conf)
    config = config_module.load(env.config_path)
    hsm = app.connect_hsm(config)
    store = SqlStore(config.store.url)
    try:
        load_active_ca(config, hsm, store)  # as a worker does first
        issuer = CrlPublisher(config, hsm, store).issuers(datetime.now(UTC))[0]
        now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
        cdp = [x509.UniformResourceIdentifier(url) for url in issuer.scope.distribution_points]
        legacy = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.certificate.subject)
            .last_update(now)
            .next_update(now + timedelta(days=7))
            .add_extension(issuer.scope.authority_key_identifier, critical=False)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(x509.IssuingDistributionPoint(cdp, None, True, False, None, False, False), critical=True)
            .sign(issuer.private_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        der = legacy.public_bytes(serialization.Encoding.DER)
        store.store_crl(PublishedCrl(issuer.key_id, 1, None, now, now + timedelta(days=7), 0, 0, der, now))

        published = asyncio.run(CrlScheduler(config, CrlPublisher(config, hsm, store), store).run_once())  # a restarted daemon
        assert [(crl.crl_number, crl.is_delta) for crl in published] == [(2, False), (3, True)]
        assert published[1].base_crl_number == 2
        for crl in published:
            with pytest.raises(x509.ExtensionNotFound):
                x509.load_der_x509_crl(crl.der).extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        # Once the base has the new scope, the next run publishes nothing new ahead of its schedule.
        assert asyncio.run(CrlScheduler(config, CrlPublisher(config, hsm, store), store).run_once()) == []
    finally:
        store.close()
        hsm.close()


def test_the_client_fetches_a_full_crl_larger_than_grpcs_default_message_limit(tmp_path: Path, softhsm_conf: Path) -> None:
    """A full CRL of 120,000 entries (a generation revoked wholesale) is about 6 MB in one GetCRL message:
    CaClient kept gRPC's default 4 MiB receive limit and got RESOURCE_EXHAUSTED instead of the CRL."""
    from bench.crl import child_populate
    from ca_daemon.client import CaClient

    env, _ = crl_env(tmp_path, softhsm_conf)
    child_populate(str(env.config_path), 120_000, seq=1)  # revoked certificates written straight into the store
    daemon = start(env, tmp_path)
    try:
        with CaClient(env.target, timeout=60) as ca:
            fetched = ca.crl()
    finally:
        daemon.stop()
    crl = x509.load_der_x509_crl(fetched.der)
    assert len(fetched.der) > 4 * 1024 * 1024 and len(crl) == 120_000


def test_the_connections_one_client_address_may_hold_on_the_http_port_are_a_setting(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """[server] http_connections_per_client: relying parties behind one address that does not cache need more than 32."""
    env, port = crl_env(tmp_path_factory.mktemp("per-client"), softhsm_conf)
    env.edit_config(f'http_listen = "127.0.0.1:{port}"', f'http_listen = "127.0.0.1:{port}"\nhttp_connections_per_client = 2')
    daemon = start(env, tmp_path_factory.mktemp("log"))
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        time.sleep(0.3)  # both accepted and counted
        started = time.monotonic()
        answer = _http_raw(port, b"GET /crl/nothing-here.crl HTTP/1.1\r\nHost: ca\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"Retry-After: 1" in answer and time.monotonic() - started < 5, answer
        idle.pop().close()
        deadline = time.monotonic() + 5
        while not _http_raw(port, b"GET /crl/nothing-here.crl HTTP/1.1\r\nHost: ca\r\n\r\n").startswith(b"HTTP/1.1 404 "):
            assert time.monotonic() < deadline, "a place freed by a closed connection was never given back"
            time.sleep(0.1)
    finally:
        for conn in idle:
            conn.close()
        daemon.stop()


def test_a_cdp_url_with_a_query_serves_the_full_and_the_delta_crl_each_at_its_own_url(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """The default delta URL of "ca-root-1.crl?v=1" was "ca-root-1.crl?v=1-delta": the server ignores queries, so both
    CRLs were served at one path and each delta replaced the full CRL at the URL the leaves carry."""
    env, port = crl_env(tmp_path_factory.mktemp("query"), softhsm_conf)
    env.edit_config(f'"http://127.0.0.1:{port}/crl/ca-root-1.crl"', f'"http://127.0.0.1:{port}/crl/ca-root-1.crl?v=1"')
    daemon = start(env, tmp_path_factory.mktemp("log"))
    try:
        with grpc.insecure_channel(env.target) as channel:
            cert = sign(channel)
            _revoke(channel, cert.serial)
            wait_for_crl(channel, lambda crl: int(cert.serial, 16) in serials_in(crl))  # a delta published after the full CRL
        leaf = x509.load_pem_x509_certificate(cert.certificate_pem.encode())
        (point,) = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        full_url = str(point.full_name[0].value) if point.full_name else ""
        assert full_url == f"http://127.0.0.1:{port}/crl/ca-root-1.crl?v=1"
        status, _, body = _http_get(port, full_url.removeprefix(f"http://127.0.0.1:{port}"))
        full = x509.load_der_x509_crl(body)
        assert status == 200
        with pytest.raises(x509.ExtensionNotFound):  # the full CRL, not the delta
            full.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        (freshest,) = full.extensions.get_extension_for_class(x509.FreshestCRL).value
        delta_url = str(freshest.full_name[0].value) if freshest.full_name else ""
        assert delta_url == f"http://127.0.0.1:{port}/crl/ca-root-1-delta.crl?v=1"
        status, _, body = _http_get(port, delta_url.removeprefix(f"http://127.0.0.1:{port}"))
        assert status == 200
        assert int(cert.serial, 16) in serials_in(x509.load_der_x509_crl(body))
        x509.load_der_x509_crl(body).extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    finally:
        daemon.stop()


def test_with_deltas_off_the_full_crl_names_no_delta_and_a_verifier_grants_a_valid_device(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """`delta = false` published no delta CRL, but each full CRL still named one (Freshest CRL, at the default derived
    URL): the relying-party verifier followed it to a 404 and refused every device at step revocation."""
    env, port = crl_env(tmp_path_factory.mktemp("no-delta"), softhsm_conf)
    env.edit_config("delta = true", "delta = false")
    daemon = start(env, tmp_path_factory.mktemp("log"))
    try:
        status, _, body = _http_get(port, "/crl/ca-root-1.crl")
        assert status == 200
        with pytest.raises(x509.ExtensionNotFound):
            x509.load_der_x509_crl(body).extensions.get_extension_for_class(x509.FreshestCRL)
        assert _http_get(port, "/crl/ca-root-1-delta.crl")[0] == 404  # nothing published there
        key = ec.generate_private_key(ec.SECP256R1())
        with grpc.insecure_channel(env.target) as channel:
            issued = stub(channel).Sign(ca_pb2.SignRequest(csr=device_csr("no-delta-1", key), request_id=str(uuid.uuid4())), timeout=10)
        chain = x509.load_pem_x509_certificates(issued.chain_pem.encode())
        verifier = DeviceVerifier([chain[-1]], IdentityRule(source="cn"), CrlCache(max_age=0))
        challenge = verifier.challenge()
        leaf = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
        decision = verifier.verify(leaf, chain[:-1], challenge, sign_challenge(key, challenge))
        assert decision.granted and decision.crl_numbers[1] is None, decision
    finally:
        daemon.stop()


def test_turning_deltas_off_withdraws_the_last_delta_everywhere(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """`delta = false` on a CA that had published deltas: after the restart its last delta was still handed out, at its
    HTTP path, as a file in crl.directory (rewritten at start), by GetCRL, and as ca_daemon_crl_age_seconds{kind="delta"},
    which grew for ever, so CaDaemonDeltaCrlStale fired 30 minutes later and never stopped."""
    env, port = crl_env(tmp_path_factory.mktemp("deltas-off"), softhsm_conf)
    log_dir = tmp_path_factory.mktemp("log")
    daemon = start(env, log_dir)
    try:
        with grpc.insecure_channel(env.target) as channel:
            assert get_crl(channel, delta=True).crl_number  # deltas on: one is published
        assert _http_get(port, "/crl/ca-root-1-delta.crl")[0] == 200
    finally:
        daemon.stop()
    delta_file = env.state_dir / "crl" / "ca-root-1-delta.crl"
    assert delta_file.exists()
    metrics_port = free_port()
    env.edit_config("delta = true", "delta = false")
    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"')
    daemon = start(env, log_dir)
    try:
        assert _http_get(port, "/crl/ca-root-1.crl")[0] == 200
        handed_out = []
        if _http_get(port, "/crl/ca-root-1-delta.crl")[0] != 404:
            handed_out.append("served at /crl/ca-root-1-delta.crl")
        if delta_file.exists():
            handed_out.append(f"file {delta_file.name}")
        with grpc.insecure_channel(env.target) as channel:
            try:
                handed_out.append(f"GetCRL: delta CRL {get_crl(channel, delta=True).crl_number}")
            except grpc.RpcError as refused:
                assert refused.code() == grpc.StatusCode.NOT_FOUND and "delta = false" in str(refused.details()), refused
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'ca_daemon_crl_age_seconds{issuer="ca-root-1",kind="full"}' in body
        handed_out += [line for line in body.splitlines() if 'kind="delta"' in line]
        assert not handed_out, f"with deltas off the last delta CRL is still handed out: {handed_out}"
    finally:
        daemon.stop()


def test_crl_publish_publishes_no_delta_with_deltas_off(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """`[crl] delta = false`: `ca-daemon crl publish --clock-was-ahead` still signed and stored a delta after the full CRL,
    and `crl publish --delta` one alone, though the README says none is published then. Now the first publishes the full
    CRL only, and the second is refused, naming the setting."""
    env, _ = crl_env(tmp_path_factory.mktemp("publish-no-delta"), softhsm_conf)
    env.edit_config("delta = true", "delta = false")
    start(env, tmp_path_factory.mktemp("log")).stop()  # the first start activates the CA key
    published = env.cli("crl", "publish", "--clock-was-ahead").stdout
    assert "published full CRL" in published and "delta" not in published.split("GetCRL")[0], published
    refused = env.cli("crl", "publish", "--delta", check=False)
    assert refused.returncode != 0 and "delta = false" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    store = SqlStore(config_module.load(env.config_path).store.url)
    try:
        assert store.latest_crl("ca-root-1", delta=True, with_der=False) is None
    finally:
        store.close()


def test_after_the_cdp_url_changes_the_crl_still_decides_certificates_issued_under_the_old_url(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path, tmp_path: Path
) -> None:
    """An operator moves the CRL Distribution Point (here /crl/... to /pki/...) and restarts; the certificates issued
    before carry the old URL. RFC 5280 6.3.3 (b)(2)(i) and OpenSSL use a CRL with an Issuing Distribution Point only for a
    certificate whose CDP it names, so a CRL whose IDP named the new URL alone would stop deciding the old certificates
    (their revocations no longer enforced, or every one refused). The CRLs carry no IDP: one CRL of everything the key
    issued, whatever URL a certificate names. Judged by openssl (-crl_check, -crl_check_all, deltas) and the relying-party
    verifier, which fetches the old certificate's CRL at the old URL (still served: /crl/KEY.crl always is)."""
    env, port = crl_env(tmp_path_factory.mktemp("cdp-change"), softhsm_conf)
    old_url, new_url = f"http://127.0.0.1:{port}/crl/ca-root-1.crl", f"http://127.0.0.1:{port}/pki/ca-root-1.crl"
    log_dir = tmp_path_factory.mktemp("log")
    old_key, new_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    daemon = start(env, log_dir)
    try:
        with grpc.insecure_channel(env.target) as channel:
            old = stub(channel).Sign(ca_pb2.SignRequest(csr=device_csr("cdp-old-1", old_key), request_id=str(uuid.uuid4())), timeout=10)
    finally:
        daemon.stop()
    env.edit_config(f'crl_distribution_points = ["{old_url}"]', f'crl_distribution_points = ["{new_url}"]')
    daemon = start(env, log_dir)
    try:
        with grpc.insecure_channel(env.target) as channel:
            new = stub(channel).Sign(ca_pb2.SignRequest(csr=device_csr("cdp-new-1", new_key), request_id=str(uuid.uuid4())), timeout=10)
            _revoke(channel, old.serial)
            wait_for_crl(channel, lambda crl: int(old.serial, 16) in serials_in(crl))  # the delta after the revocation
            env.cli("crl", "publish")  # a full CRL that lists it
            full = wait_for_crl(channel, lambda crl: int(old.serial, 16) in serials_in(crl), delta=False)
            time.sleep(1.1)  # a delta on that full CRL, a second later (OpenSSL keeps the first of two CRLs of one time)
            env.cli("crl", "publish", "--delta")
            delta = wait_for_crl(
                channel, lambda crl: crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number == full.crl_number
            )
        leaves = {name: x509.load_pem_x509_certificate(r.certificate_pem.encode()) for name, r in (("old", old), ("new", new))}
        cdps = {
            name: [
                str(n.value)
                for point in leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
                for n in point.full_name or []
            ]
            for name, leaf in leaves.items()
        }
        assert cdps == {"old": [old_url], "new": [new_url]}
        for der in (full.crl_der, delta.crl_der):
            with pytest.raises(x509.ExtensionNotFound):  # in scope for every certificate of the key, whichever URL it names
                x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert _http_get(port, "/crl/ca-root-1.crl")[2] == _http_get(port, "/pki/ca-root-1.crl")[2] == full.crl_der

        full_only, both = _crl_file(tmp_path, full.crl_der), _crl_file(tmp_path, full.crl_der, delta.crl_der)
        for flags in (("-crl_check",), ("-crl_check_all",), ("-crl_check_all", "-use_deltas", "-extended_crl")):
            crls = both if "-use_deltas" in flags else full_only
            on_old = openssl_verify(tmp_path, old.certificate_pem, old.chain_pem, *flags, "-CRLfile", crls)
            assert on_old.returncode != 0 and "certificate revoked" in on_old.stdout + on_old.stderr, (flags, on_old.stdout + on_old.stderr)
            on_new = openssl_verify(tmp_path, new.certificate_pem, new.chain_pem, *flags, "-CRLfile", crls)
            assert on_new.returncode == 0, (flags, on_new.stdout + on_new.stderr)

        chain = x509.load_pem_x509_certificates(new.chain_pem.encode())
        fetched: list[str] = []

        def fetch(url: str, etag: str) -> tuple[int, bytes, str]:
            fetched.append(url)
            return http_fetch(url, etag)

        verifier = DeviceVerifier([chain[-1]], IdentityRule(source="cn"), CrlCache(max_age=0, fetch=fetch))
        for name, key, granted in (("old", old_key, False), ("new", new_key, True)):
            challenge = verifier.challenge()
            decision = verifier.verify(leaves[name], chain[:-1], challenge, sign_challenge(key, challenge))
            assert decision.granted is granted, (name, decision)
        assert fetched[0] == old_url and new_url in fetched, fetched  # the old certificate's CRL from the old URL
        challenge = verifier.challenge()
        refused = verifier.verify(leaves["old"], chain[:-1], challenge, sign_challenge(old_key, challenge))
        assert refused.step == "revocation", refused
        assert refused.reason == f"certificate {int(old.serial, 16):x} is revoked (key_compromise)", refused
    finally:
        daemon.stop()


def test_every_crl_and_ca_url_a_key_s_certificates_carry_stays_served_after_the_configuration_moves_them(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """The CDP and caIssuers URLs move twice, each time to a path the daemon serves only because the configuration names
    it (not /crl/KEY.crl or /ca/KEY.der). The devices issued before keep the old URLs for life: the daemon recorded them
    (store key_urls) before it signed the first, and serves the key's current full CRL and its certificate at all of
    them, so a relying party that fetches the old certificate's CDP learns of its revocation instead of a 404. A URL that
    would serve another thing at a path earlier certificates carry is refused at start and by check-config."""
    env, port = crl_env(tmp_path_factory.mktemp("cdp-history"), softhsm_conf)
    log_dir = tmp_path_factory.mktemp("log")
    base = f"http://127.0.0.1:{port}"
    generations = [(f"{base}/pki/{n}/ca-root-1.crl", f"{base}/pki/{n}/ca-root-1.der") for n in ("v1", "v2", "v3")]
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in generations]
    configured = (f"{base}/crl/ca-root-1.crl", f"{base}/ca/ca-root-1.der")

    def move_to(crl_url: str, ca_url: str) -> None:
        nonlocal configured
        env.edit_config(f'crl_distribution_points = ["{configured[0]}"]', f'crl_distribution_points = ["{crl_url}"]')
        env.edit_config(f'ca_issuers_urls = ["{configured[1]}"]', f'ca_issuers_urls = ["{ca_url}"]')
        configured = (crl_url, ca_url)

    def sign_one(channel: grpc.Channel, n: int) -> ca_pb2.SignResponse:
        request = ca_pb2.SignRequest(csr=device_csr(f"moved-{n}", keys[n]), request_id=str(uuid.uuid4()))
        response: ca_pb2.SignResponse = stub(channel).Sign(request, timeout=10)
        return response

    leaves: list[ca_pb2.SignResponse] = []
    for n, urls in enumerate(generations[:-1]):
        move_to(*urls)
        daemon = start(env, log_dir)
        try:
            with grpc.insecure_channel(env.target) as channel:
                leaves.append(sign_one(channel, n))
        finally:
            daemon.stop()
    move_to(*generations[-1])
    fetched: list[str] = []

    def fetch(url: str, etag: str) -> tuple[int, bytes, str]:
        fetched.append(url)
        return http_fetch(url, etag)

    daemon = start(env, log_dir)
    try:
        with grpc.insecure_channel(env.target) as channel:
            leaves.append(sign_one(channel, len(generations) - 1))
            _revoke(channel, leaves[0].serial)
            env.cli("crl", "publish")
            full = wait_for_crl(channel, lambda crl: int(leaves[0].serial, 16) in serials_in(crl), delta=False)
        chain = x509.load_pem_x509_certificates(leaves[0].chain_pem.encode())
        ca_der = chain[0].public_bytes(serialization.Encoding.DER)
        for leaf, (crl_url, ca_url) in zip(leaves, generations, strict=True):
            certificate = x509.load_pem_x509_certificate(leaf.certificate_pem.encode())
            cdp = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
            aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
            assert [str(name.value) for point in cdp for name in point.full_name or []] == [crl_url]
            assert [str(d.access_location.value) for d in aia if d.access_method == AuthorityInformationAccessOID.CA_ISSUERS] == [ca_url]
            crl_status, _, crl_body = _http_get(port, crl_url.removeprefix(base))
            ca_status, _, ca_body = _http_get(port, ca_url.removeprefix(base))
            assert (crl_status, ca_status) == (200, 200), (crl_url, crl_status, ca_url, ca_status)
            assert crl_body == full.crl_der and ca_body == ca_der, crl_url
        # The first device's relying party fetches the CRL at the URL its certificate names, and refuses it.
        verifier = DeviceVerifier([chain[-1]], IdentityRule(source="cn"), CrlCache(max_age=0, fetch=fetch))
        first = x509.load_pem_x509_certificate(leaves[0].certificate_pem.encode())
        challenge = verifier.challenge()
        decision = verifier.verify(first, chain[:-1], challenge, sign_challenge(keys[0], challenge))
        assert fetched and fetched[0] == generations[0][0], fetched
        assert not decision.granted and decision.step == "revocation", decision
        assert decision.reason == f"certificate {first.serial_number:x} is revoked (key_compromise)", decision
    finally:
        daemon.stop()
    checked = env.cli("check-config")
    assert (
        "ok    served URLs: the CA key's URLs take no path that certificates already carry (6 recorded URL(s), all served)"
        in checked.stdout
    )
    # The caIssuers URL moved onto a path where the first devices find the key's CRL: their relying parties would get
    # the CA certificate there instead. Refused before anything is served, by check-config and at start.
    move_to(generations[-1][0], generations[0][0])
    expected = (
        f"ca.ca_issuers_urls URL '{generations[0][0]}' for CA key ca-root-1 has the path of '{generations[0][0]}', "
        "the CRL Distribution Point that certificates of CA key ca-root-1 carry"
    )
    refused = env.cli("check-config", check=False)
    assert refused.returncode != 0 and f"FAIL  served URLs: {expected}" in refused.stdout, refused.stdout
    not_served = env.cli("serve", check=False)
    assert not_served.returncode != 0 and expected in not_served.stderr, not_served.stderr[-2000:]
