"""Issue 6: mTLS roles over real TLS, and the hash-chained audit log, against a real daemon.

One daemon (two worker processes, real SoftHSM, SQLite, TLS on loopback) set up with
`ca-daemon mtls init --apply`; many clients: one per role, one without any role, one
revoked, one expired, and one without a certificate. The matrix walks every RPC for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_daemon import access, app, config, tls
from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from tests.conftest import (
    FAST_RECONNECT,
    CaEnv,
    device_csr,
    free_port,
    make_env,
    mounted_tmpfs,
    spawn_daemon,
    wait_channel_serving,
    wait_workers_serving,
)

pytestmark = pytest.mark.slow

ROLE_CLIENTS = {"prog": "programmer", "off": "officer", "aud": "auditor", "adm": "admin"}
SERVICE = ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"]
METHODS = sorted(m.name for m in SERVICE.methods)
CALLERS = [*ROLE_CLIENTS, "nobody", "revoked", "expired", "no-certificate"]


@dataclass
class TlsDaemon:
    env: CaEnv
    tls_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    def channel(self, name: str | None, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
        root = (self.tls_dir / "ca.pem").read_bytes()
        if name is None:
            credentials = grpc.ssl_channel_credentials(root)
        else:
            key = (self.tls_dir / "clients" / f"{name}.key").read_bytes()
            cert = (self.tls_dir / "clients" / f"{name}.pem").read_bytes()
            credentials = grpc.ssl_channel_credentials(root, key, cert)
        return grpc.secure_channel(f"localhost:{self.env.port}", credentials, options=options)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


def prepare_tls(env: CaEnv, *mtls_init_args: str) -> int:
    """`mtls init --apply` with these arguments and the metrics endpoint on a free port, which it returns."""
    env.cli("mtls", "init", "--out", str(env.state_dir / "tls"), *mtls_init_args, "--apply")
    metrics_port = free_port()
    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"')
    return metrics_port


def serve_tls(env: CaEnv, metrics_port: int, client: str = "prog") -> TlsDaemon:
    """Serve env as prepare_tls left it; once client's calls are answered and every worker serves."""
    log_path = env.state_dir / "daemon.log"
    daemon = TlsDaemon(env, env.state_dir / "tls", spawn_daemon(env, log_path), log_path, metrics_port)
    _wait_tls_serving(daemon, client)
    return daemon


def start_tls_daemon(env: CaEnv, *mtls_init_args: str, client: str = "prog") -> TlsDaemon:
    """`mtls init --apply` with these arguments, metrics on a free port, serve; once client's calls are answered and every worker serves."""
    return serve_tls(env, prepare_tls(env, *mtls_init_args), client)


def _issue_expired(env: CaEnv, tls_dir: Path) -> None:
    """A client certificate that expired yesterday, from the real mTLS CA key in the HSM."""
    cfg = config.load(env.config_path)
    hsm = app.connect_hsm(cfg)
    store = app.connect_store(cfg)
    try:
        ca, _ = tls.ensure_mtls_ca(hsm, store, cfg.tls.ca_key_uri, "test")
        key = tls.new_key()
        cert = tls.issue(
            ca,
            store,
            tls.make_csr(key, "expired"),
            name="expired",
            role="programmer",
            kind="client",
            actor="test",
            validity=timedelta(days=1),
            not_before=datetime.now(UTC) - timedelta(days=2),
        )
        tls.write_private(tls_dir / "clients" / "expired.key", tls.key_pem(key))
        (tls_dir / "clients" / "expired.pem").write_bytes(tls.pem(cert))
    finally:
        hsm.close()
        store.close()


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[TlsDaemon]:
    env = make_env(tmp_path_factory.mktemp("mtls"), softhsm_conf, workers=2)
    env.edit_config("checkpoint_interval_seconds = 300", "checkpoint_interval_seconds = 1")
    tls_dir = env.state_dir / "tls"
    clients = [arg for name, role in {**ROLE_CLIENTS, "revoked": "programmer"}.items() for arg in ("--client", f"{name}:{role}")]
    env.cli("mtls", "init", "--out", str(tls_dir), *clients, "--apply")
    # A certificate from the right CA whose identity no role names.
    env.cli("mtls", "issue", "--out", str(tls_dir), "--client", "nobody:admin")
    _issue_expired(env, tls_dir)
    revoked = x509_serial(tls_dir / "clients" / "revoked.pem")
    env.cli("mtls", "revoke", "--serial", revoked)
    metrics_port = free_port()
    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"')
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    daemon = TlsDaemon(env, tls_dir, process, log_path, metrics_port)
    _wait_tls_serving(daemon)
    yield daemon
    daemon.stop()


def x509_serial(path: Path) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


def _wait_tls_serving(daemon: TlsDaemon, client: str = "adm") -> None:
    """Until client's calls are answered and every worker serves."""
    with daemon.channel(client, FAST_RECONNECT) as channel:
        wait_channel_serving(channel, 40, daemon.process, daemon.log)
    wait_workers_serving(daemon.log, config.load(daemon.env.config_path).server.workers, 40, daemon.process)


@pytest.fixture(scope="module")
def channels(tls_daemon: TlsDaemon) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: tls_daemon.channel(None if name == "no-certificate" else name) for name in CALLERS}
    yield opened
    for channel in opened.values():
        channel.close()


def _call(channel: grpc.Channel, method: str) -> grpc.StatusCode:
    """Call method with an empty request; the status code it ends with."""
    descriptor = SERVICE.methods_by_name[method]
    request_type = getattr(ca_pb2, descriptor.input_type.name)
    response_type = getattr(ca_pb2, descriptor.output_type.name)
    path = f"/{SERVICE.full_name}/{method}"
    try:
        if descriptor.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=request_type.SerializeToString, response_deserializer=response_type.FromString
            )
            for _ in stream(request_type(), timeout=10):
                pass
        else:
            unary = channel.unary_unary(
                path, request_serializer=request_type.SerializeToString, response_deserializer=response_type.FromString
            )
            unary(request_type(), timeout=10)
    except grpc.RpcError as exc:
        _call.last_details = exc.details() or ""  # type: ignore[attr-defined]
        return exc.code()
    _call.last_details = ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("method", METHODS)
def test_role_matrix(channels: dict[str, grpc.Channel], method: str, caller: str) -> None:
    code = _call(channels[caller], method)
    details: str = _call.last_details  # type: ignore[attr-defined]
    if caller == "no-certificate":
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        assert "client certificate is required" in details
        return
    if caller == "expired":
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        assert "expired at" in details
        return
    if caller == "revoked":
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        assert "revoked" in details
        return
    needed = access.RULES[f"/{SERVICE.full_name}/{method}"]
    role = ROLE_CLIENTS.get(caller)
    if role in needed:
        assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (code, details)
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
        assert f"{method} needs role " in details
        assert all(r in details for r in needed)


def test_every_rpc_has_a_role_rule() -> None:
    services = ca_pb2.DESCRIPTOR.services_by_name.values()  # CertificateAuthority and KeyCeremony (issue 7)
    rpcs = {f"/{service.full_name}/{m.name}" for service in services for m in service.methods}
    assert rpcs == set(access.RULES) - {access.METRICS}  # the one other rule is the metrics endpoint's


def test_programmer_signs_and_denials_are_audited(tls_daemon: TlsDaemon, channels: dict[str, grpc.Channel]) -> None:
    stub = ca_pb2_grpc.CertificateAuthorityStub(channels["prog"])
    issued = stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
    with pytest.raises(grpc.RpcError) as denied:
        ca_pb2_grpc.CertificateAuthorityStub(channels["aud"]).Sign(ca_pb2.SignRequest(csr=device_csr(), request_id="x"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    events = _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(actions=["access.deny"]))
    assert any(e.actor == "aud" and e.outcome == "permission-denied" and "Sign" in e.details_json for e in events)
    issues = _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(serial=issued.serial))
    assert [(e.action, e.outcome, e.actor) for e in issues] == [("certificate.issue", "issued", "prog")]
    # The serial filter takes a serial as GetCertificate and Revoke do; it never widens to the whole log.
    even = issued.serial.zfill(len(issued.serial) + len(issued.serial) % 2)
    spelled = "0x" + ":".join(even[i : i + 2] for i in range(0, len(even), 2)).upper()
    assert [e.seq for e in _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(serial=spelled))] == [e.seq for e in issues]
    for bad in ("0", "000", "zz", "-1"):
        with pytest.raises(grpc.RpcError) as refused:
            _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(serial=bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, refused.value.details())
        assert "serial" in (refused.value.details() or ""), refused.value.details()
    # One JSON line per request with method, caller, status and latency (written in batches, within 20 ms).
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in tls_daemon.log().splitlines() if line.startswith("{") and '"ca_daemon.rpc"' in line]
        signs = [
            line for line in lines if line.get("method", "").endswith("/Sign") and line.get("caller") == "prog" and line["status"] == "OK"
        ]
        denial_lines = [line for line in lines if line.get("caller") == "aud" and line["status"] == "PERMISSION_DENIED"]
        if (signs and denial_lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert signs and isinstance(signs[0]["latency_ms"], float)
    assert denial_lines


def _stream(channel: grpc.Channel, request: ca_pb2.StreamAuditEventsRequest) -> list[ca_pb2.AuditEvent]:
    stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
    return [event for page in stub.StreamAuditEvents(request, timeout=10) for event in page.events]


def test_profiles_list_speaks_mtls(tls_daemon: TlsDaemon) -> None:
    """`ca-daemon profiles list` (README, Issuance policy) against a daemon outside development mode.

    It had no TLS options, so it could only ever meet an mTLS daemon as a closed socket.
    """
    clients = tls_daemon.tls_dir / "clients"
    tls = ["--tls-ca", str(tls_daemon.tls_dir / "ca.pem"), "--tls-cert", str(clients / "prog.pem"), "--tls-key", str(clients / "prog.key")]
    listed = tls_daemon.env.cli("profiles", "list", *tls)
    assert listed.stdout.startswith("device\t") and "validity 365 days" in listed.stdout, listed.stdout
    plaintext = tls_daemon.env.cli("profiles", "list", check=False)
    assert plaintext.returncode == 1 and "pass --tls-ca, --tls-cert and --tls-key" in plaintext.stderr, plaintext.stderr


def test_stream_is_paged_filtered_and_resumable(channels: dict[str, grpc.Channel]) -> None:
    stub = ca_pb2_grpc.CertificateAuthorityStub(channels["aud"])
    everything = _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(page_size=1000))
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert all(e.prev_hash == p.hash for p, e in itertools.pairwise(everything))
    pages = list(stub.StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(page_size=3, max_events=7), timeout=10))
    assert [len(p.events) for p in pages] == [3, 3, 1]
    rest = _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(page_size=4, page_token=pages[-1].next_page_token))
    assert [e.seq for e in rest] == [e.seq for e in everything[7:]]
    later = _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(after_seq=everything[-3].seq))
    assert [e.seq for e in later][:2] == [e.seq for e in everything[-2:]]
    since = everything[-2].time.ToDatetime(tzinfo=UTC)
    by_time = _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(from_time=everything[-2].time))
    assert by_time and all(e.time.ToDatetime(tzinfo=UTC) >= since for e in by_time)
    keys = _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(actions=["key.generate", "mtls.revoke"]))
    assert {e.action for e in keys} == {"key.generate", "mtls.revoke"}
    with pytest.raises(grpc.RpcError) as other_filters:
        _stream(channels["aud"], ca_pb2.StreamAuditEventsRequest(actions=["crl.publish"], page_token=pages[-1].next_page_token))
    assert other_filters.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_revoking_a_client_takes_effect_without_restart(tls_daemon: TlsDaemon) -> None:
    with tls_daemon.channel("adm") as channel:
        assert _call(channel, "ListProfiles") == grpc.StatusCode.OK
    tls_daemon.env.cli("mtls", "revoke", "--serial", x509_serial(tls_daemon.tls_dir / "clients" / "adm.pem"))
    deadline = time.monotonic() + 10
    code = grpc.StatusCode.OK
    while time.monotonic() < deadline:
        with tls_daemon.channel("adm") as channel:
            code = _call(channel, "ListProfiles")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            break
        time.sleep(0.3)
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_only_an_officer_revokes_a_ca_link_certificate(tmp_path: Path, softhsm_conf: Path) -> None:
    """Revoke is the programmer's for device certificates. A CA link certificate is a chain alternative for every device
    of both roots: a programmer's Revoke of one is PERMISSION_DENIED, saying what it is and how an officer revokes it,
    audited as a refused revocation, with nothing revoked; the officer's command from that message revokes it."""
    env = make_env(tmp_path, softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")  # the CRL port: not the default other daemons may hold
    daemon = start_tls_daemon(env, "--client", "prog:programmer", "--client", "off:officer", "--client", "aud:auditor")
    try:
        with daemon.channel("prog") as prog, daemon.channel("off") as off, daemon.channel("aud") as aud:
            ceremony = ca_pb2_grpc.KeyCeremonyStub(off)
            ceremony.GenerateKey(ca_pb2.GenerateKeyRequest(label="ca-root-2"), timeout=30)
            signed = ceremony.SelfSignKey(ca_pb2.SelfSignKeyRequest(key_id="ca-root-2", subject="CN=Root 2"), timeout=30)
            links = [x509.load_pem_x509_certificate(pem.encode()) for pem in signed.link_certificates_pem]
            assert len(links) == 2
            serials = [format(link.serial_number, "x") for link in links]
            ca = ca_pb2_grpc.CertificateAuthorityStub(prog)
            for serial in serials:
                with pytest.raises(grpc.RpcError) as refused:
                    ca.Revoke(ca_pb2.RevokeRequest(serial=serial, reason=ca_pb2.REVOCATION_REASON_SUPERSEDED), timeout=10)
                details = refused.value.details() or ""
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (refused.value.code(), details)
                assert f"Revoke of certificate {serial} needs role officer: it is a CA link certificate" in details, details
                assert "caller 'prog' has roles: programmer" in details, details
                assert f"`ca-daemon client revoke --serial {serial} --reason REASON`" in details, details
                assert details.endswith(f"[rule {access.REVOKE_CA_LINK}]"), details
                # Nothing is revoked; the refusal is audited as every refused revocation is.
                assert not ca.GetCertificate(ca_pb2.GetCertificateRequest(serial=serial), timeout=10).HasField("revocation")
                events = _stream(aud, ca_pb2.StreamAuditEventsRequest(serial=serial, actions=["certificate.revoke"]))
                assert [(e.action, e.outcome, e.actor, e.reason) for e in events] == [
                    ("certificate.revoke", "refused", "prog", access.REVOKE_CA_LINK)
                ]
            # A programmer still revokes the certificates issued to devices.
            device = ca.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
            ca.Revoke(ca_pb2.RevokeRequest(serial=device.serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
            # An officer revokes a link certificate with the command the refusal names.
            clients = daemon.tls_dir / "clients"
            tls = ["--target", f"localhost:{env.port}", "--tls-ca", str(daemon.tls_dir / "ca.pem")]
            tls += ["--tls-cert", str(clients / "off.pem"), "--tls-key", str(clients / "off.key")]
            done = env.cli("client", "revoke", "--serial", serials[0], "--reason", "superseded", *tls)
            assert done.stdout.startswith(f"revoked {serials[0]} (superseded) at "), done.stdout
            revocation = ca.GetCertificate(ca_pb2.GetCertificateRequest(serial=serials[0]), timeout=10).revocation
            assert revocation.reason == ca_pb2.REVOCATION_REASON_SUPERSEDED
            events = _stream(aud, ca_pb2.StreamAuditEventsRequest(serial=serials[0], actions=["certificate.revoke"]))
            assert [(e.outcome, e.actor) for e in events] == [("refused", "prog"), ("revoked", "off")]
    finally:
        daemon.stop()


def test_a_programmer_revokes_only_certificates_of_the_profiles_it_may_ask_for(tmp_path: Path, softhsm_conf: Path) -> None:
    """A programming service's credential revokes what it could have had issued: a caller whose [callers] profiles are
    only gateway may not Revoke a device-profile certificate (PERMISSION_DENIED, rule revoke-profile, naming the profile,
    what the caller may ask for and the two ways out), nothing is revoked and the refusal is audited; it revokes its own
    profile's certificates, an officer revokes any, and once a reload grants it the profile, so may it."""
    env = make_env(tmp_path, softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")  # the CRL port: not the default other daemons may hold
    metrics_port = prepare_tls(
        env, "--client", "prog:programmer", "--client", "line2:programmer", "--client", "off:officer", "--client", "aud:auditor"
    )
    text = env.config_path.read_text()
    line2 = '[callers."line2"]\nprofiles = ["device"]'
    assert line2 in text, text
    gateway = '[profiles.gateway]\ndescription = "Gateways"\nvalidity_days = 90\n'
    env.config_path.write_text(text.replace(line2, '[callers."line2"]\nprofiles = ["gateway"]') + "\n" + gateway)
    daemon = serve_tls(env, metrics_port)
    try:
        with daemon.channel("prog") as prog, daemon.channel("line2") as other, daemon.channel("off") as off, daemon.channel("aud") as aud:
            by_prog, by_line2, by_officer = (ca_pb2_grpc.CertificateAuthorityStub(c) for c in (prog, other, off))

            def sign(stub: ca_pb2_grpc.CertificateAuthorityStub, profile: str) -> str:
                request = ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4()), profile=profile)
                return str(stub.Sign(request, timeout=10).serial)

            def revoked(serial: str) -> bool:
                return by_prog.GetCertificate(ca_pb2.GetCertificateRequest(serial=serial), timeout=10).HasField("revocation")

            devices = [sign(by_prog, "device") for _ in range(3)]
            gateway_serial = sign(by_line2, "gateway")
            with pytest.raises(grpc.RpcError) as refused:
                by_line2.Revoke(ca_pb2.RevokeRequest(serial=devices[0], reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
            details = refused.value.details() or ""
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (refused.value.code(), details)
            assert f"Revoke of certificate {devices[0]} (device " in details, details
            assert "needs profile 'device', which caller 'line2' may not ask for (its [callers] profiles: gateway" in details, details
            assert f"`ca-daemon client revoke --serial {devices[0]} --reason REASON`" in details, details
            assert "add 'device' to [callers.\"line2\"] profiles and run `ca-daemon reload`" in details, details
            assert details.endswith(f"[rule {access.REVOKE_PROFILE}]"), details
            assert not revoked(devices[0])
            events = _stream(aud, ca_pb2.StreamAuditEventsRequest(serial=devices[0], actions=["certificate.revoke"]))
            assert [(e.action, e.outcome, e.actor, e.reason) for e in events] == [
                ("certificate.revoke", "refused", "line2", access.REVOKE_PROFILE)
            ]
            # Its own profile's certificates it revokes; the programmer of the device profile may not revoke a gateway's.
            by_line2.Revoke(ca_pb2.RevokeRequest(serial=gateway_serial, reason=ca_pb2.REVOCATION_REASON_SUPERSEDED), timeout=10)
            assert revoked(gateway_serial)
            other_gateway = sign(by_line2, "gateway")
            with pytest.raises(grpc.RpcError) as other_way:
                by_prog.Revoke(ca_pb2.RevokeRequest(serial=other_gateway, reason=ca_pb2.REVOCATION_REASON_SUPERSEDED), timeout=10)
            assert other_way.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs profile 'gateway', which caller 'prog' may not ask for (its [callers] profiles: device" in (
                other_way.value.details() or ""
            )
            assert not revoked(other_gateway)
            # An officer revokes any device certificate.
            by_officer.Revoke(ca_pb2.RevokeRequest(serial=devices[1], reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
            assert revoked(devices[1])
            # A reload that grants line2 the device profile lets it revoke them, without a restart.
            env.config_path.write_text(
                env.config_path.read_text().replace(
                    '[callers."line2"]\nprofiles = ["gateway"]', line2.replace('["device"]', '["gateway", "device"]')
                )
            )
            env.cli("reload")
            deadline = time.monotonic() + 15
            while True:
                try:
                    by_line2.Revoke(ca_pb2.RevokeRequest(serial=devices[2], reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and time.monotonic() < deadline, error.details()
                    time.sleep(0.2)
            assert revoked(devices[2])
    finally:
        daemon.stop()


def test_chain_verifies_and_every_tampering_is_caught(tls_daemon: TlsDaemon, channels: dict[str, grpc.Channel], tmp_path: Path) -> None:
    stub = ca_pb2_grpc.CertificateAuthorityStub(channels["prog"])
    serials = [stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10).serial for _ in range(12)]
    with pytest.raises(grpc.RpcError) as denied:  # an access.deny of this test's own, not one left by an earlier test
        ca_pb2_grpc.CertificateAuthorityStub(channels["aud"]).Sign(ca_pb2.SignRequest(csr=device_csr(), request_id="x"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    env = tls_daemon.env
    # One checkpoint before the revocation and one after it, whatever earlier tests of the module left in the log.
    _wait_checkpoint_covers_head(env)
    stub.Revoke(ca_pb2.RevokeRequest(serial=serials[0], reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
    revoked_at = "(SELECT max(seq) FROM audit_events WHERE action = 'certificate.revoke')"
    _wait_audit(env, f"SELECT count(*) FROM audit_events WHERE action = 'crl.publish' AND seq > {revoked_at}")  # the delta CRL
    _wait_checkpoint_covers_head(env)  # checkpoint_interval_seconds = 1 in this daemon
    public, export = env.audit_verifies(tmp_path)
    lines = export.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    actions = {r.get("action") for r in records}
    assert {"certificate.issue", "certificate.revoke", "crl.publish", "key.generate", "mtls.issue", "mtls.revoke", "access.deny"} <= actions
    events = [i for i, r in enumerate(records) if r["type"] == "event"]
    checkpoints = [i for i, r in enumerate(records) if r["type"] == "checkpoint"]
    assert len(checkpoints) >= 2
    target = events[len(events) // 2]
    seq = records[target]["seq"]

    def check(name: str, changed: list[str], expect: str, first_bad: int | None, problems: int | None = None) -> None:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(changed) + "\n")
        result = env.cli("audit", "verify", "--file", str(path), "--public-key", str(public), check=False)
        assert result.returncode == 1, (name, result.stdout)
        assert expect in result.stdout, (name, result.stdout)
        if first_bad is not None:
            assert f"first bad event: seq {first_bad};" in result.stdout, (name, result.stdout)
        if problems is not None:  # only the damage itself, not every intact event after it
            more = f"(+{problems - 1} more problem(s))" if problems > 1 else "more problem(s)"
            assert (more in result.stdout) == (problems > 1), (name, result.stdout)

    # a changed byte inside an event (its actor)
    changed = list(lines)
    changed[target] = changed[target].replace(f'"actor": "{records[target]["actor"]}"', f'"actor": "{records[target]["actor"]}x"')
    assert changed[target] != lines[target]
    check("changed", changed, f"event {seq} was changed", seq, problems=1)
    # a deleted event: its gap, the next event's broken link and the end record's count (the events after it used to fail one by one)
    check("deleted", [line for i, line in enumerate(lines) if i != target], "missing: deleted", seq, problems=3)
    # an inserted event (a copy of another, placed here)
    inserted = list(lines)
    inserted.insert(target, lines[events[1]])
    check("inserted", inserted, "reordered or inserted", records[events[1]]["seq"])
    # two events swapped
    swapped = list(lines)
    swapped[target], swapped[target + 1] = lines[target + 1], lines[target]
    if records[target + 1]["type"] == "event":
        check("reordered", swapped, "", None)
    # truncation: drop every event after the first checkpoint's event, keep the later checkpoints
    first_cp = records[checkpoints[-1]]["seq"]
    truncated = [line for line, r in zip(lines, records, strict=True) if r["type"] != "event" or r["seq"] < first_cp - 2]
    check("truncated", truncated, "truncated", first_cp - 2)
    # a rewritten chain (hashes recomputed after a change) is caught by the signed checkpoint
    from ca_daemon.audit_hash import event_hash

    rewritten, prev = [], None
    for original in records:
        r = dict(original)
        if r["type"] == "event":
            if r["seq"] == seq:
                r["reason"] = "forged"
            fields = {
                **r,
                "time": datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S.%fZ"),
                "request_digest": bytes.fromhex(r["request_digest"]),
            }
            prev_hash = bytes.fromhex(prev) if prev else b"\x00" * 32
            r["prev_hash"] = prev_hash.hex()
            r["hash"] = event_hash(fields, r["seq"], prev_hash).hex()
            prev = r["hash"]
        rewritten.append(json.dumps(r, sort_keys=True))
    check("rewritten", rewritten, "were altered", None)
    # a forged checkpoint signature
    forged = list(lines)
    cp = dict(records[checkpoints[0]])
    cp["count"] += 1
    forged[checkpoints[0]] = json.dumps(cp)
    check("forged-checkpoint", forged, "no valid signature", None)


def _rechain(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recompute prev_hash/hash of every event record (export form), as an insider can: no key needed."""
    from ca_daemon.audit_hash import GENESIS, event_hash

    prev, out = GENESIS, []
    for original in records:
        r = dict(original)
        if r["type"] == "event":
            fields = {
                **r,
                "time": datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S.%fZ"),
                "request_digest": bytes.fromhex(r["request_digest"]),
            }
            r["prev_hash"] = prev.hex()
            r["hash"] = event_hash(fields, r["seq"], prev).hex()
            prev = bytes.fromhex(r["hash"])
        out.append(r)
    return out


def _wait_audit(env: CaEnv, query: str, timeout: float = 15.0) -> None:
    """Until query (one value) on env's SQLite database is true: what the daemon does every interval, without a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(env.state_dir / "ca.db", timeout=30)) as conn:
            if conn.execute(query).fetchone()[0]:
                return
        assert time.monotonic() < deadline, f"not within {timeout}s: {query}"
        time.sleep(0.1)


def _wait_checkpoint_covers_head(env: CaEnv) -> None:
    """Until the daemon has signed a checkpoint covering every audit event there is now."""
    with contextlib.closing(sqlite3.connect(env.state_dir / "ca.db", timeout=30)) as conn:
        head = int(conn.execute("SELECT max(seq) FROM audit_events").fetchone()[0])
    _wait_audit(env, f"SELECT coalesce(max(seq), 0) >= {head} FROM audit_checkpoints")


def _verify_file(env: CaEnv, path: Path) -> tuple[int, str]:
    public = env.state_dir / "audit.pem"
    if not public.exists():
        env.cli("audit", "public-key", "--out", str(public))
    result = env.cli("audit", "verify", "--file", str(path), "--public-key", str(public), check=False)
    return result.returncode, result.stdout + result.stderr


def _write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def test_verify_compares_every_signed_checkpoint_with_the_chain_wherever_the_file_puts_it(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Checkpoints moved ahead of their events still catch a chain rewritten with recomputed hashes."""
    env = make_env(tmp_path_factory.mktemp("moved-checkpoints"), softhsm_conf)
    env.cli("audit", "checkpoint")  # a signed head before the issuance: the events up to it are vouched for
    env.cli("mtls", "init", "--out", str(env.state_dir / "tls"), "--client", "alice:admin", "--client", "bob:programmer")
    export = env.state_dir / "audit.jsonl"
    env.cli("audit", "export", "--out", str(export), "--checkpoint")
    code, output = _verify_file(env, export)
    assert code == 0 and output.startswith("OK:") and "not covered" not in output, output
    records = [json.loads(line) for line in export.read_text().splitlines()]
    issue = next(r for r in records if r.get("action") == "mtls.issue" and '"admin"' in r["details"])
    covering = min(r["seq"] for r in records if r["type"] == "checkpoint" and r["seq"] >= issue["seq"])
    vouched = max(r["seq"] for r in records if r["type"] == "checkpoint" and r["seq"] < issue["seq"])

    def checkpoints_first(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        inner = rs[1:-1] if rs[-1]["type"] == "end" else rs[1:]
        moved = [r for r in inner if r["type"] == "checkpoint"] + [r for r in inner if r["type"] != "checkpoint"]
        return [rs[0], *moved, *rs[len(inner) + 1 :]]

    # Moving the checkpoints alone changes nothing that is signed: it verifies.
    code, output = _verify_file(env, _write_records(env.state_dir / "moved.jsonl", checkpoints_first(records)))
    assert code == 0 and output.startswith("OK:") and "not covered" not in output, output

    # Re-attributed issuance, chain recomputed (no key needed), checkpoints put first: caught by the checkpoint covering it.
    forged = _rechain([dict(r, actor="cli:someone-else") if r is issue else r for r in records])
    code, output = _verify_file(env, _write_records(env.state_dir / "forged.jsonl", checkpoints_first(forged)))
    assert code == 1 and output.startswith("FAILED:"), output
    assert f"the signed checkpoint at seq {covering} names head" in output and "were altered" in output, output
    # The damage is named after the last signed head the chain still gives (it said "first bad event: seq 1").
    assert output.startswith(f"FAILED: first bad event: seq {vouched + 1};"), output
    assert f"the events in {vouched + 1}..{covering} were altered (the signed checkpoint at seq {vouched} still matches" in output, output


def test_verify_refuses_an_export_without_its_header_or_end_record_or_with_lines_after_it(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """A copy that lost its last lines (here the mtls.revoke an insider wants gone) fails, even cut at a checkpoint."""
    env = make_env(tmp_path_factory.mktemp("export-end"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "alice:admin")
    env.cli("audit", "checkpoint")
    env.cli("mtls", "revoke", "--serial", x509_serial(tls_dir / "clients" / "alice.pem"), "--crl-out", str(tls_dir / "client-ca.crl"))
    export = env.state_dir / "audit.jsonl"
    env.cli("audit", "export", "--out", str(export), "--checkpoint")
    code, output = _verify_file(env, export)
    assert code == 0 and output.startswith("OK:") and "not covered" not in output, output
    lines = export.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    header, end = records[0], records[-1]
    assert (header["type"], header["format"], header["version"]) == ("header", "ca-daemon-audit-export", 2)
    events = [r for r in records if r["type"] == "event"]
    assert end == {
        "type": "end",
        "events": len(events),
        "checkpoints": sum(r["type"] == "checkpoint" for r in records),
        "last_seq": events[-1]["seq"],
        "last_hash": events[-1]["hash"],
    }
    checkpoints = [i for i, r in enumerate(records) if r["type"] == "checkpoint"]
    assert len(checkpoints) >= 2 and checkpoints[-1] == len(lines) - 2

    def verify_lines(name: str, kept: list[str]) -> str:
        path = env.state_dir / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in kept))
        code, output = _verify_file(env, path)
        assert code == 1 and output.startswith("FAILED:"), (name, output)
        return output

    # Cut at a line boundary right after the earlier checkpoint: every remaining signature is valid.
    cut = verify_lines("cut", lines[: checkpoints[-2] + 1])
    assert f"the file has no end record (its last event is seq {records[checkpoints[-2]]['seq']}): it was cut short" in cut, cut
    # Only the end record lost.
    assert "has no end record" in verify_lines("no-end", lines[:-1])
    # Events dropped with the end record kept: it names what was exported.
    dropped = verify_lines("dropped", [*lines[: checkpoints[-2] + 1], lines[-1]])
    assert f"the end record says {end['events']} event(s) and {end['checkpoints']} checkpoint(s) up to seq {end['last_seq']}" in dropped
    assert "lines were dropped, added or changed since the export" in dropped, dropped
    # Empty, no header, something appended after the end.
    assert "the file is empty" in verify_lines("empty", [])
    assert "does not begin with a ca-daemon-audit-export header" in verify_lines("no-header", lines[1:])
    appended = verify_lines("appended", [*lines, lines[1]])
    assert "1 record(s) follow the end record: lines were added after the export" in appended, appended
    # An end record rewritten with a lone surrogate and a huge value: one bounded FAILED line, not an encoding error.
    garbled = verify_lines("garbled-end", [*lines[:-1], json.dumps({**end, "last_seq": "\ud800" + "9" * 100_000})])
    assert garbled.startswith("FAILED: the end record says") and "up to seq \\ud800999" in garbled and len(garbled) < 3000, garbled
    # An export of the previous version (no end record) is refused with what to do.
    old = verify_lines("version-1", [json.dumps({**header, "version": 1}), *lines[1:-1]])
    assert "a version 1 export, which has no end record" in old and "export the log again" in old, old


def test_verify_takes_each_record_only_in_the_form_an_export_writes_it(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """A line edited so that it shows something else while its hash or signature still checks fails, naming the seq.

    The hash covers values, not their spelling: a key given twice (readers disagree on which
    counts), an added key, null for "", an upper-case hash or a count of 4.0 all verified OK.
    """
    env = make_env(tmp_path_factory.mktemp("export-form"), softhsm_conf)
    env.cli("mtls", "init", "--out", str(env.state_dir / "tls"), "--client", "alice:admin")
    export = env.state_dir / "audit.jsonl"
    env.cli("audit", "export", "--out", str(export), "--checkpoint")
    code, output = _verify_file(env, export)
    assert code == 0 and output.startswith("OK:"), output
    lines = export.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if json.loads(line).get("action") == "mtls.issue")
    event = json.loads(lines[at])
    seq, actor = event["seq"], json.dumps(event["actor"])
    checkpoint_at = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "checkpoint")

    def verify_with(name: str, index: int, line: str) -> str:
        path = env.state_dir / f"{name}.jsonl"
        path.write_text("".join(f"{line if i == index else kept}\n" for i, kept in enumerate(lines)))
        code, output = _verify_file(env, path)
        assert code == 1 and output.startswith("FAILED:"), (name, output)
        return output

    twice = verify_with("actor-twice", at, lines[at].replace(f'"actor": {actor}', f'"actor": "cli:mallory", "actor": {actor}'))
    assert f"first bad event: seq {seq}; line {at + 1} is not a valid export record (a key appears twice)" in twice, twice
    added = verify_with("added-key", at, json.dumps({**event, "approved_by": "cli:mallory"}, sort_keys=True))
    assert f"first bad event: seq {seq}; event {seq} has 'approved_by' in a form no export writes" in added, added
    null = verify_with("null-device", at, json.dumps({**event, "device_id": None}, sort_keys=True))
    assert f"event {seq} has 'device_id' in a form no export writes" in null, null
    upper = verify_with("upper-hash", at, json.dumps({**event, "hash": event["hash"].upper()}, sort_keys=True))
    assert f"event {seq} has 'hash' in a form no export writes" in upper, upper
    # A record of no type an export has is named by its line (it said "line ?").
    typo = verify_with("unknown-type", at, json.dumps({**event, "type": "evnt"}, sort_keys=True))
    assert f"line {at + 1} is not a valid export record (its type is 'evnt', not one of header, event, checkpoint, end)" in typo, typo
    checkpoint = json.loads(lines[checkpoint_at])
    count = verify_with("float-count", checkpoint_at, json.dumps({**checkpoint, "count": float(checkpoint["count"])}, sort_keys=True))
    assert f"the checkpoint at seq {checkpoint['seq']} is not in the form an export writes it" in count, count


def test_the_daemon_refuses_to_sign_a_checkpoint_over_a_chain_rewritten_behind_its_back_until_it_is_restored(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """An insider re-attributes a signed issuance, recomputes the chain and deletes the checkpoints: the daemon signs nothing more."""
    from tests.conftest import Daemon

    env = make_env(tmp_path_factory.mktemp("rewritten-behind"), softhsm_conf)
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    env.edit_config("checkpoint_interval_seconds = 300", "checkpoint_interval_seconds = 1")
    db = env.state_dir / "ca.db"
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            serial = stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10).serial
            _wait_checkpoint_covers_head(env)  # the daemon signs a checkpoint covering the issuance
            export = env.state_dir / "before.jsonl"
            env.cli("audit", "export", "--out", str(export))
            records = [json.loads(line) for line in export.read_text().splitlines()]
            target = next(r["seq"] for r in records if r.get("action") == "certificate.issue" and str(r.get("serial")) == serial.lower())
            forged = _rechain([dict(r, actor="someone-else") if r.get("seq") == target and r["type"] == "event" else r for r in records])
            conn = sqlite3.connect(db, timeout=30, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                vouched = conn.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()[0]  # the daemon's last signature
                assert vouched is not None and vouched >= target
                original = conn.execute("SELECT seq, actor, prev_hash, hash FROM audit_events WHERE seq >= ?", (target,)).fetchall()
                for r in forged:
                    if r["type"] == "event" and r["seq"] >= target:
                        conn.execute(
                            "UPDATE audit_events SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                            (r["actor"], bytes.fromhex(r["prev_hash"]), bytes.fromhex(r["hash"]), r["seq"]),
                        )
                conn.execute("DELETE FROM audit_checkpoints WHERE seq >= ?", (target,))
                conn.execute("COMMIT")
            finally:
                conn.close()
            refused_before = daemon.log().count("refusing to sign an audit checkpoint")
            stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)  # business as usual
            deadline = time.monotonic() + 15
            while daemon.log().count("refusing to sign an audit checkpoint") < refused_before + 2:  # two intervals since
                assert time.monotonic() < deadline, daemon.log()[-3000:]
                time.sleep(0.1)
            with sqlite3.connect(db) as check:
                assert check.execute("SELECT count(*) FROM audit_checkpoints WHERE seq >= ?", (target,)).fetchone()[0] == 0
            lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
            refusals = [line for line in lines if "refusing to sign an audit checkpoint" in line["msg"]]
            assert len(refusals) >= 2, daemon.log()[-3000:]
            assert refusals[0]["level"] == "ERROR" and f"at seq {vouched} (signed by this process)" in refusals[0]["msg"], refusals[0]
            public = env.state_dir / "audit.pem"
            env.cli("audit", "public-key", "--out", str(public))
            live = env.cli("audit", "verify", "--live", "--public-key", str(public))
            assert live.stdout.startswith("OK:") and "not covered by a signature yet" in live.stdout, live.stdout

            # Restored: the rows as they were, and the events appended since linked to them again.
            # The next interval's checkpoint covers the head again.
            with sqlite3.connect(db, timeout=30) as conn:
                conn.executemany(
                    "UPDATE audit_events SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?", [(*row[1:], row[0]) for row in original]
                )
            env.cli("audit", "export", "--out", str(export))
            relinked = _rechain([json.loads(line) for line in export.read_text().splitlines()])
            with sqlite3.connect(db, timeout=30) as conn:
                for r in relinked:
                    if r["type"] == "event" and r["seq"] > original[-1][0]:
                        conn.execute(
                            "UPDATE audit_events SET prev_hash = ?, hash = ? WHERE seq = ?",
                            (bytes.fromhex(r["prev_hash"]), bytes.fromhex(r["hash"]), r["seq"]),
                        )
            _wait_checkpoint_covers_head(env)
    finally:
        daemon.stop()
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT actor FROM audit_events WHERE seq = ?", (target,)).fetchone()[0] != "someone-else"
    live = env.cli("audit", "verify", "--live", "--public-key", str(public))
    assert live.stdout.startswith("OK:") and "not covered" not in live.stdout, live.stdout


def test_secrets_never_in_logs_events_or_export(tls_daemon: TlsDaemon, tmp_path: Path) -> None:
    env = tls_daemon.env
    pins = [(env.state_dir / "pins" / name).read_text().strip() for name in ("user.pin", "so.pin")]
    export = tmp_path / "all.jsonl"
    env.cli("audit", "export", "--out", str(export))
    database = sqlite3.connect(env.state_dir / "ca.db")
    try:
        dump = "\n".join(database.iterdump())
    finally:
        database.close()
    haystacks = {"daemon log": tls_daemon.log(), "export": export.read_text(), "database": dump}
    for pin in pins:
        assert len(pin) >= 16
        for name, text in haystacks.items():
            assert pin not in text, f"a PIN appears in the {name}"
            assert pin.encode().hex() not in text, f"a PIN (hex) appears in the {name}"


def test_a_client_with_several_connections_is_served_by_every_worker(tls_daemon: TlsDaemon) -> None:
    """SO_REUSEPORT spreads connections, not calls: CaClient(connections=N) is how one service uses all workers."""
    from ca_daemon.client import CaClient, TlsOptions

    clients = tls_daemon.tls_dir / "clients"
    options = TlsOptions(tls_daemon.tls_dir / "ca.pem", clients / "prog.pem", clients / "prog.key", "localhost")
    with CaClient(f"127.0.0.1:{tls_daemon.env.port}", tls=options, connections=16) as client:
        serials = {client.sign(device_csr()).serial for _ in range(32)}
    assert len(serials) == 32
    signers = {
        entry["pid"]
        for entry in (json.loads(line) for line in tls_daemon.log().splitlines() if line.startswith("{"))
        if entry.get("method", "").endswith("/Sign") and entry.get("status") == "OK" and entry.get("caller") == "prog"
    }
    assert len(signers) == 2, signers  # both worker processes signed (16 connections all on one: p = 2^-15)


def test_metrics_are_served_over_mtls_only(tls_daemon: TlsDaemon, channels: dict[str, grpc.Channel]) -> None:
    import ssl
    import urllib.error
    import urllib.request

    ca_pb2_grpc.CertificateAuthorityStub(channels["aud"]).GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10)
    url = f"https://localhost:{tls_daemon.metrics_port}/metrics"
    clients = tls_daemon.tls_dir / "clients"
    deadline = time.monotonic() + 5
    while "GetCACertificates" not in (body := _scrape(tls_daemon)):  # request metrics are written up to 20 ms after the call
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert "ca_daemon_requests_total" in body
    # When the certificates run out, for alerts: the TLS server certificate (365 days) and the CA's.
    tls_left = _gauge(body, "ca_daemon_tls_certificate_expiry_seconds")
    assert 364 * 86400 < tls_left <= 365 * 86400
    ca_left = _gauge(body, 'ca_daemon_ca_certificate_expiry_seconds{issuer="ca-root-1",status="active"}')
    assert ca_left > 365 * 86400
    anonymous = ssl.create_default_context(cafile=str(tls_daemon.tls_dir / "ca.pem"))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, context=anonymous, timeout=10).read()
    tls12 = ssl.create_default_context(cafile=str(tls_daemon.tls_dir / "ca.pem"))
    tls12.load_cert_chain(clients / "aud.pem", clients / "aud.key")
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, urllib.error.URLError)):
        urllib.request.urlopen(url, context=tls12, timeout=10)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_daemon.metrics_port}/metrics", timeout=10).read()


def _scrape(tls_daemon: TlsDaemon, client: str = "aud") -> str:
    """The metrics page, fetched over mTLS as client (the auditor by default).

    A refusal is raised as an HTTPError whose body is read and whose connection is closed: one
    left open was finalised later, inside whichever test was running, as an "unclosed SSLSocket"
    ResourceWarning, which the suite turns into an error (seen once in a fresh-clone CI run).
    """
    import io
    import ssl
    import urllib.error
    import urllib.request

    clients = tls_daemon.tls_dir / "clients"
    scraper = ssl.create_default_context(cafile=str(tls_daemon.tls_dir / "ca.pem"))
    scraper.load_cert_chain(clients / f"{client}.pem", clients / f"{client}.key")
    url = f"https://localhost:{tls_daemon.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, context=scraper, timeout=10) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as refused:
        with refused:
            body = refused.read()
        raise urllib.error.HTTPError(url, refused.code, str(refused.reason), refused.headers, io.BytesIO(body)) from None


def test_metrics_scrapers_need_the_auditor_or_admin_role_and_an_unrevoked_certificate(tls_daemon: TlsDaemon) -> None:
    """As for an RPC: a programmer, a certificate no role names and a revoked one get 403 with the reason, audited."""
    import urllib.error

    refusals = {}
    for client in ("prog", "nobody", "revoked"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            _scrape(tls_daemon, client)
        assert refused.value.code == 403
        refusals[client] = refused.value.read().decode()
    assert "metrics needs role auditor or admin; caller 'prog' has roles: programmer" in refusals["prog"]
    assert "caller 'nobody' has roles: none" in refusals["nobody"]
    assert "revoked" in refusals["revoked"], refusals["revoked"]
    assert "ca_daemon_requests_total" in _scrape(tls_daemon, "aud")
    database = sqlite3.connect(tls_daemon.env.state_dir / "ca.db")
    try:
        denials = database.execute(
            "SELECT actor, outcome FROM audit_events WHERE action = 'access.deny' AND details LIKE '%\"method\": \"/metrics\"%'"
        ).fetchall()
    finally:
        database.close()
    assert sorted(denials) == [("-", "unauthenticated"), ("nobody", "permission-denied"), ("prog", "permission-denied")]


def _gauge(body: str, sample: str) -> float:
    """The value of one sample (name with its labels, as exposed) in a Prometheus text exposition."""
    values = [float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.rsplit(" ", 1)[0] == sample]
    assert len(values) == 1, f"{sample} not exposed once in:\n{body}"
    return values[0]


def test_the_daemon_refuses_tls12_in_the_handshake(tls_daemon: TlsDaemon) -> None:
    """Refused in the handshake, logged, and counted in ca_daemon_tls_handshakes_refused_total (to alert on)."""
    import socket
    import ssl

    def refused_for_protocol() -> float:
        body = _scrape(tls_daemon)
        sample = 'ca_daemon_tls_handshakes_refused_total{reason="protocol"}'
        return _gauge(body, sample) if sample in body else 0.0

    before = refused_for_protocol()
    client = ssl.create_default_context(cafile=str(tls_daemon.tls_dir / "ca.pem"))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", tls_daemon.env.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        client.wrap_socket(raw, server_hostname="localhost")
    client = ssl.create_default_context(cafile=str(tls_daemon.tls_dir / "ca.pem"))
    client.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", tls_daemon.env.port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls13,
    ):
        assert (tls13.version(), tls13.selected_alpn_protocol()) == ("TLSv1.3", "h2")
    deadline = time.monotonic() + 5
    while "TLS handshake with 127.0.0.1:" not in tls_daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "TLS handshake with 127.0.0.1:" in tls_daemon.log()
    assert "refused (protocol): UNSUPPORTED_PROTOCOL" in tls_daemon.log()
    assert refused_for_protocol() == before + 1  # the good TLS 1.3 connection is not counted


def test_a_target_the_server_certificate_does_not_name_is_refused_with_what_to_pass(tls_daemon: TlsDaemon) -> None:
    """The key commands dial server.listen by default, 0.0.0.0:50051 in deploy/ca-daemon.example.toml: the client's
    own name check fails, and all an operator saw was "the daemon answered UNAVAILABLE: failed to connect to all
    addresses; ... Hostname Verification Check failed"."""
    env, tls_dir = tls_daemon.env, tls_daemon.tls_dir
    tls_args = ["--tls-ca", str(tls_dir / "ca.pem"), "--tls-cert", str(tls_dir / "clients" / "aud.pem")]
    tls_args += ["--tls-key", str(tls_dir / "clients" / "aud.key")]
    refused = env.cli("client", "ca-certs", *tls_args, "--target", f"0.0.0.0:{env.port}", check=False)
    assert refused.returncode == 1, refused
    assert "Hostname Verification Check failed" in refused.stderr, refused.stderr
    assert f"does not name the host of the target (0.0.0.0:{env.port})" in refused.stderr, refused.stderr
    assert "--tls-server-name" in refused.stderr, refused.stderr
    named = env.cli("client", "ca-certs", *tls_args, "--target", f"0.0.0.0:{env.port}", "--tls-server-name", "localhost")
    assert "BEGIN CERTIFICATE" in named.stdout


def test_every_handshake_refusal_reason_is_exposed_at_zero_from_the_start(tls_daemon: TlsDaemon) -> None:
    """A counter series whose first sample is already 1 has no increase for Prometheus: one client rejecting the
    daemon's certificate (openssl s_client with another CA) made ca_daemon_tls_handshakes_refused_total
    {reason="server-certificate-rejected"} 1 at its first scrape, and CaDaemonServerCertificateRejected
    (increase over 10 m > 0) stayed at 0. Each reason is there at 0 before its first refusal."""
    import inspect
    import re

    from ca_daemon import tls_front

    source = inspect.getsource(tls_front.handshake_refusal_reason).splitlines()
    returned = {name for line in source if line.strip().startswith("return ") for name in re.findall(r'"([a-z-]+)"', line)}
    assert returned == set(tls_front.REFUSAL_REASONS)
    body = _scrape(tls_daemon)
    for reason in tls_front.REFUSAL_REASONS:
        sample = f'ca_daemon_tls_handshakes_refused_total{{reason="{reason}"}}'
        assert sample in body, f"{sample} not exposed in:\n{body}"
    assert _gauge(body, 'ca_daemon_tls_handshakes_refused_total{reason="server-certificate-rejected"}') == 0.0
    limits = set(re.findall(r'_closed_at_limit\(\s*"([a-z-]+)"', inspect.getsource(tls_front.TlsFrontEnd)))
    assert limits == set(tls_front.CLOSING_LIMITS)  # every limit the front end closes at is counted under its name
    for limit in tls_front.CLOSING_LIMITS:  # closures at the front end's limits, likewise
        assert _gauge(body, f'ca_daemon_connections_closed_total{{limit="{limit}"}}') == 0.0


def test_a_client_address_over_its_handshake_rate_is_closed_counted_and_logged(tls_daemon: TlsDaemon) -> None:
    """The daemon wires each worker's front end to the metric: 2,000 connections in a row from 127.0.0.9 (opened and
    closed at once, as a station reconnecting without backoff does) exceed the default rate of 100 a second, in bursts
    of 200, in both workers, and the closures are counted in ca_daemon_connections_closed_total{limit="handshake-rate"}.
    After the exposed-at-zero test: this one moves the count."""
    import socket

    sample = 'ca_daemon_connections_closed_total{limit="handshake-rate"}'
    before = _gauge(_scrape(tls_daemon), sample)
    for _ in range(2000):
        with socket.create_connection(("127.0.0.1", tls_daemon.env.port), timeout=10, source_address=("127.0.0.9", 0)):
            pass
    deadline = time.monotonic() + 10
    while (closed := _gauge(_scrape(tls_daemon), sample) - before) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 < closed < 2000, closed
    expected = "server.tls_handshakes_per_client = 100 new connections a second from one client address in this worker"
    assert expected in tls_daemon.log() and "the last from 127.0.0.9:" in tls_daemon.log()
    with tls_daemon.channel("prog") as channel:  # 127.0.0.1 has a bucket of its own
        grpc.channel_ready_future(channel).result(timeout=10)


def test_every_metric_the_alert_rules_use_is_exposed(tls_daemon: TlsDaemon, channels: dict[str, grpc.Channel]) -> None:
    """deploy/prometheus-alerts.yml names only samples this daemon serves (labelled ones once their event happened)."""
    import re
    import socket
    import ssl

    import yaml

    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "prometheus-alerts.yml").read_text())
    used = {name for group in rules["groups"] for rule in group["rules"] for name in re.findall(r"\bca_daemon_\w+", rule["expr"])}
    assert len(used) >= 7, used
    stub = ca_pb2_grpc.CertificateAuthorityStub(channels["prog"])
    stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
    old_tls = ssl.create_default_context(cafile=str(tls_daemon.tls_dir / "ca.pem"))
    old_tls.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", tls_daemon.env.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        old_tls.wrap_socket(raw, server_hostname="localhost")
    tls_daemon.env.cli("db", "backup", "--out", str(tls_daemon.env.state_dir / f"backup-{uuid.uuid4().hex[:6]}.db"))  # signs a checkpoint
    deadline = time.monotonic() + 10
    while True:
        body = _scrape(tls_daemon)
        served = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and not line.startswith("#")}
        if used <= served or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert used <= served, f"not served: {sorted(used - served)}"


def test_tls13_only_and_no_certificate_rules() -> None:
    authenticator = access.Authenticator(access.RoleMap(()), None)
    with pytest.raises(access.Unauthenticated, match=r"TLS 1\.3 is required"):
        authenticator.authenticate({"ssl_tls_version": [b"TLSv1.2"], "x509_pem_cert": [b"x"]})
    with pytest.raises(access.Unauthenticated, match="client certificate is required"):
        authenticator.authenticate({"ssl_tls_version": [b"TLSv1.3"]})


def test_an_auditor_exports_the_log_over_the_api_and_verifies_it(
    tls_daemon: TlsDaemon, channels: dict[str, grpc.Channel], tmp_path: Path
) -> None:
    """`ca-daemon client audit-export` (auditor, mTLS, no database access) writes what `audit verify` checks."""
    stub = ca_pb2_grpc.CertificateAuthorityStub(channels["prog"])
    for _ in range(3):
        stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
    env, tls_dir = tls_daemon.env, tls_daemon.tls_dir
    _wait_checkpoint_covers_head(env)  # checkpoint_interval_seconds = 1 in this daemon: a checkpoint covers these events
    remote = tmp_path / "remote.jsonl"
    tls_args = ["--tls-ca", str(tls_dir / "ca.pem"), "--tls-cert", str(tls_dir / "clients" / "aud.pem")]
    tls_args += ["--tls-key", str(tls_dir / "clients" / "aud.key"), "--target", f"localhost:{env.port}"]
    exported = env.cli("client", "audit-export", *tls_args, "--out", str(remote))
    assert "signed checkpoints to" in exported.stdout, exported.stdout
    public = tmp_path / "audit.pem"
    env.cli("audit", "public-key", "--out", str(public))
    verified = env.cli("audit", "verify", "--file", str(remote), "--public-key", str(public))
    assert verified.stdout.startswith("OK:") and "valid checkpoint(s)" in verified.stdout, verified.stdout
    assert " 0 valid checkpoint(s)" not in verified.stdout, verified.stdout

    # A failed export leaves an earlier one as it was: here the caller is not an auditor.
    kept = remote.read_bytes()
    prog_args = [arg.replace("aud.", "prog.") for arg in tls_args]
    refused = env.cli("client", "audit-export", *prog_args, "--out", str(remote), check=False)
    assert refused.returncode != 0 and "auditor" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert remote.read_bytes() == kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".remote.jsonl")] == []  # no temporary file left

    # Record for record what the database export holds (up to the shorter of the two: the log may have grown).
    local = tmp_path / "local.jsonl"
    env.cli("audit", "export", "--out", str(local))
    remote_records = [json.loads(line) for line in remote.read_text().splitlines()[1:-1]]  # without header and end record
    local_records = [json.loads(line) for line in local.read_text().splitlines()[1:-1]]
    shorter = min(len(remote_records), len(local_records))
    assert shorter > 10
    assert remote_records[:shorter] == local_records[:shorter]

    auditor = ca_pb2_grpc.CertificateAuthorityStub(channels["aud"])
    with pytest.raises(grpc.RpcError) as too_big:
        auditor.ListAuditCheckpoints(ca_pb2.ListAuditCheckpointsRequest(page_size=1_000_000), timeout=10)
    assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in (too_big.value.details() or "")
    beyond = auditor.ListAuditCheckpoints(ca_pb2.ListAuditCheckpointsRequest(after_seq=10**12), timeout=10)
    assert list(beyond.checkpoints) == []

    # The remote file is checked for real: one changed byte in an event covered by a checkpoint is found.
    lines = remote.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"outcome": "issued"' in line)
    lines[index] = lines[index].replace('"outcome": "issued"', '"outcome": "issueD"', 1)
    remote.write_text("\n".join(lines) + "\n")
    tampered = env.cli("audit", "verify", "--file", str(remote), "--public-key", str(public), check=False)
    assert tampered.returncode != 0 and "hash" in tampered.stdout + tampered.stderr, tampered.stdout + tampered.stderr


def _codes_over_fresh_connections(daemon: TlsDaemon, client: str, method: str, connections: int = 8) -> set[grpc.StatusCode]:
    """The status of one call on each of several new connections, so that every worker answers."""
    codes = set()
    for _ in range(connections):
        with daemon.channel(client) as channel:
            codes.add(_call(channel, method))
    return codes


def _wait_codes(daemon: TlsDaemon, client: str, method: str, expected: grpc.StatusCode) -> None:
    deadline = time.monotonic() + 15
    while (codes := _codes_over_fresh_connections(daemon, client, method)) != {expected}:
        assert time.monotonic() < deadline, f"{client} {method}: {codes}, expected only {expected.name}"
        time.sleep(0.3)


def test_a_reload_puts_new_roles_in_force_in_every_worker(tls_daemon: TlsDaemon) -> None:
    """[roles] is reloadable: a grant added by `ca-daemon reload` lets the caller in, and taking it away shuts it out again."""
    assert _codes_over_fresh_connections(tls_daemon, "nobody", "ListProfiles") == {grpc.StatusCode.PERMISSION_DENIED}
    tls_daemon.env.edit_config('admin = ["adm"]', 'admin = ["adm", "nobody"]')
    try:
        tls_daemon.env.cli("reload")
        _wait_codes(tls_daemon, "nobody", "ListProfiles", grpc.StatusCode.OK)
        assert _codes_over_fresh_connections(tls_daemon, "nobody", "Sign") == {grpc.StatusCode.PERMISSION_DENIED}  # admin only
    finally:
        tls_daemon.env.edit_config('admin = ["adm", "nobody"]', 'admin = ["adm"]')
        tls_daemon.env.cli("reload")
    _wait_codes(tls_daemon, "nobody", "ListProfiles", grpc.StatusCode.PERMISSION_DENIED)
    assert tls_daemon.log().count("role rule(s) and") >= 4  # both workers, both reloads


def _write_client_crl(env: CaEnv, validity: timedelta) -> None:
    """Replace the client CRL file with the internal mTLS CA's CRL valid for `validity` (signed in the token)."""
    cfg = config.load(env.config_path)
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    try:
        ca = tls.load_mtls_ca(hsm, store, cfg.tls.ca_key_uri)
        assert ca is not None and cfg.tls.client_crl_file is not None
        cfg.tls.client_crl_file.write_bytes(tls.build_crl(ca, store, validity).public_bytes(serialization.Encoding.PEM))
    finally:
        hsm.close()
        store.close()


def _client_crl_next_update(env: CaEnv) -> datetime:
    crl_file = config.load(env.config_path).tls.client_crl_file
    assert crl_file is not None
    next_update = x509.load_pem_x509_crl(crl_file.read_bytes()).next_update_utc
    assert next_update is not None
    return next_update


def test_the_refresh_re_signs_only_an_expiring_crl_of_the_internal_ca(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    env = make_env(tmp_path_factory.mktemp("crl-refresh-unit"), softhsm_conf)
    env.cli("mtls", "init", "--out", str(env.state_dir / "tls"), "--client", "prog:programmer", "--apply")
    cfg = config.load(env.config_path)
    crl_file = cfg.tls.client_crl_file
    assert crl_file is not None
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    try:

        def refresh() -> x509.CertificateRevocationList | None:
            return tls.refresh_client_crl(hsm, store, cfg.tls.ca_key_uri, crl_file, timedelta(days=30), datetime.now(UTC))

        assert refresh() is None  # the 90-day CRL of `mtls init` is far from its nextUpdate
        _write_client_crl(env, timedelta(days=2))
        fresh = refresh()
        assert fresh is not None and fresh.next_update_utc is not None
        assert fresh.next_update_utc > datetime.now(UTC) + timedelta(days=80)
        assert _client_crl_next_update(env) == fresh.next_update_utc  # the file itself was replaced
        # Another CA's CRL in the file is left alone, however close its nextUpdate.
        other_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        foreign = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "outside client CA")]))
            .last_update(now)
            .next_update(now + timedelta(days=1))
            .sign(other_key, hashes.SHA256())
        )
        crl_file.write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
        assert refresh() is None
        assert crl_file.read_bytes() == foreign.public_bytes(serialization.Encoding.PEM)
        # In a bundle of CRLs only the internal CA's is re-signed; the other CA's stays as it was,
        # since a client CA without its CRL has every client refused.
        _write_client_crl(env, timedelta(days=2))
        foreign_pem = foreign.public_bytes(serialization.Encoding.PEM)
        crl_file.write_bytes(crl_file.read_bytes() + foreign_pem)
        fresh = refresh()
        assert fresh is not None and fresh.next_update_utc is not None
        assert fresh.next_update_utc > datetime.now(UTC) + timedelta(days=80)
        assert crl_file.read_bytes() == fresh.public_bytes(serialization.Encoding.PEM) + foreign_pem
        assert refresh() is None  # fresh now
    finally:
        hsm.close()
        store.close()


def test_a_client_crl_refresh_that_fails_is_tried_again_soon_and_the_refresh_goes_on(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-signing that failed (here a full disk) was tried again an hour later only, the CRL's last hours before its
    nextUpdate perhaps, after which every mTLS call is refused; the message blamed write access whatever the cause.
    A failure is now tried again in a minute (here 0.2 s; the hourly check is left as it is), and the CRL is re-signed
    once there is room."""
    env = make_env(tmp_path_factory.mktemp("crl-refresh-full"), softhsm_conf)
    env.cli("mtls", "init", "--out", str(env.state_dir / "tls"), "--client", "prog:programmer", "--apply")
    _write_client_crl(env, timedelta(days=2))  # within the refresh window: the next check re-signs it
    cfg = config.load(env.config_path)
    assert cfg.tls.client_crl_file is not None
    monkeypatch.setattr(app, "_CLIENT_CRL_RETRY_S", 0.2)
    with mounted_tmpfs(env.state_dir / "small", "64k") as small:
        crl_file = small / "client-ca.crl"
        crl_file.write_bytes(cfg.tls.client_crl_file.read_bytes())
        filler = small / "filler"
        with filler.open("wb") as out, contextlib.suppress(OSError):
            out.write(bytes(1 << 20))  # the file system is full: the re-signed CRL cannot be written
        moved = dataclasses.replace(cfg, tls=dataclasses.replace(cfg.tls, client_crl_file=crl_file))
        hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)

        async def refresh_until_written() -> None:
            task = asyncio.create_task(app._keep_client_crl_fresh(moved, hsm, store))
            await asyncio.sleep(1.5)  # several attempts, each refused for want of room
            assert not task.done(), task  # before: ended by the first OSError
            filler.unlink()
            deadline = time.monotonic() + 30
            while (x509.load_pem_x509_crl(crl_file.read_bytes()).next_update_utc or datetime.min.replace(tzinfo=UTC)) < datetime.now(
                UTC
            ) + timedelta(days=80):
                assert time.monotonic() < deadline, "the CRL was never re-signed"
                await asyncio.sleep(0.1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        try:
            with caplog.at_level(logging.ERROR, logger="ca_daemon.app"):
                asyncio.run(refresh_until_written())
        finally:
            hsm.close()
            store.close()
    failures = [r.getMessage() for r in caplog.records if "could not re-sign the client CA CRL" in r.getMessage()]
    assert failures and "next attempt in 0 s" in failures[0] and "No space left on device" in failures[0], failures
    assert "write access" not in failures[0], failures


def test_the_refresh_lists_a_client_revoked_on_another_replica(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """`mtls revoke` rewrites its own host's client CRL only; a replica sharing the database re-signs its file
    at its next check, where it admitted the revoked client until its CRL's nextUpdate came near (90 days)."""
    env = make_env(tmp_path_factory.mktemp("crl-refresh-replica"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "prog:programmer", "--client", "gone:programmer", "--apply")
    cfg = config.load(env.config_path)
    crl_file = cfg.tls.client_crl_file
    assert crl_file is not None
    serial = x509.load_pem_x509_certificate((tls_dir / "clients" / "gone.pem").read_bytes()).serial_number
    env.cli("mtls", "revoke", "--serial", f"{serial:x}", "--crl-out", str(env.state_dir / "other-replica.crl"))
    assert serial not in {entry.serial_number for entry in x509.load_pem_x509_crl(crl_file.read_bytes())}
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    try:

        def refresh() -> x509.CertificateRevocationList | None:
            return tls.refresh_client_crl(hsm, store, cfg.tls.ca_key_uri, crl_file, timedelta(days=30), datetime.now(UTC))

        fresh = refresh()
        assert fresh is not None and serial in {entry.serial_number for entry in fresh}
        assert crl_file.read_bytes() == fresh.public_bytes(serialization.Encoding.PEM)
        assert refresh() is None  # the file lists every revocation now
    finally:
        hsm.close()
        store.close()


def test_a_client_crl_that_cannot_be_written_is_a_ca_error_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """The daemon's refresh retries a CaError hourly; an OSError (a read-only tls directory under the unit's
    ProtectSystem=strict) ended its task silently, and once the CRL expired every mTLS client was refused."""
    from ca_daemon.errors import CaError

    env = make_env(tmp_path_factory.mktemp("crl-refresh-unwritable"), softhsm_conf)
    env.cli("mtls", "init", "--out", str(env.state_dir / "tls"), "--client", "prog:programmer", "--apply")
    _write_client_crl(env, timedelta(days=2))
    cfg = config.load(env.config_path)
    crl_file = cfg.tls.client_crl_file
    assert crl_file is not None
    before = crl_file.read_bytes()
    (crl_file.parent / (crl_file.name + ".tmp")).mkdir()  # the temporary file cannot be written (root ignores modes)
    hsm, store = app.connect_hsm(cfg), app.connect_store(cfg)
    try:
        with pytest.raises(CaError, match=f"cannot write the client CA CRL {crl_file}: .*write access to {crl_file.parent}"):
            tls.refresh_client_crl(hsm, store, cfg.tls.ca_key_uri, crl_file, timedelta(days=30), datetime.now(UTC))
    finally:
        hsm.close()
        store.close()
    assert crl_file.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_files_the_operator_replaces_as_root_keep_the_daemons_ownership(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """deploy/: the daemon runs as ca-daemon and owns its TLS files; `mtls renew-server` and `mtls crl`, run as
    root, left root-owned files (the server key mode 0600), which the daemon could not read after the reload."""
    env = make_env(tmp_path_factory.mktemp("tls-owner"), softhsm_conf)
    env.cli("mtls", "init", "--out", str(env.state_dir / "tls"), "--client", "prog:programmer", "--apply")
    cfg = config.load(env.config_path)
    files = [cfg.tls.key_file, cfg.tls.cert_file, cfg.tls.client_crl_file]
    daemon_user = (65534, 65534)
    for file in files:
        assert file is not None
        os.chown(file, *daemon_user)
    env.cli("mtls", "renew-server", "--days", "30")
    env.cli("mtls", "crl")
    for file in files:
        assert file is not None
        info = file.stat()
        assert (info.st_uid, info.st_gid) == daemon_user, file
    key_file = cfg.tls.key_file
    assert key_file is not None and key_file.stat().st_mode & 0o777 == 0o600


def test_the_daemon_re_signs_a_client_crl_about_to_expire(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """A client CRL two days from its nextUpdate is re-signed at start-up: mTLS callers never meet an expired CRL."""
    env = make_env(tmp_path_factory.mktemp("crl-refresh"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "adm:admin", "--client", "prog:programmer", "--apply")
    _write_client_crl(env, timedelta(days=2))
    log_path = env.state_dir / "daemon.log"
    daemon = TlsDaemon(env, tls_dir, spawn_daemon(env, log_path), log_path, 0)
    try:
        _wait_tls_serving(daemon)
        deadline = time.monotonic() + 20
        while _client_crl_next_update(env) < datetime.now(UTC) + timedelta(days=80):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.2)
        assert "re-signed the client CA CRL" in daemon.log()
        with daemon.channel("prog") as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
    finally:
        daemon.stop()
    database = sqlite3.connect(env.state_dir / "ca.db")
    try:
        events = database.execute("SELECT actor, outcome FROM audit_events WHERE action = 'mtls.crl'").fetchall()
    finally:
        database.close()
    import getpass

    assert events == [(f"cli:{getpass.getuser()}", "published"), ("client-crl-refresh", "published")]  # mtls init's, the refresh's


def test_every_publication_of_the_mtls_crl_is_an_audit_event_by_its_operator(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """`mtls init`, `mtls crl` and `mtls revoke` sign the client CA's CRL: each is an `mtls.crl` event, like the daemon's refresh."""
    import getpass

    env = make_env(tmp_path_factory.mktemp("mtls-crl-audit"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "alice:admin")
    alice = x509_serial(tls_dir / "clients" / "alice.pem")
    env.cli("mtls", "crl", "--out", str(tls_dir / "re-signed.crl"))
    env.cli("mtls", "revoke", "--serial", alice, "--crl-out", str(tls_dir / "client-ca.crl"))
    database = sqlite3.connect(env.state_dir / "ca.db")
    try:
        events = database.execute(
            "SELECT actor, outcome, key_id, reason, details FROM audit_events WHERE action = 'mtls.crl' ORDER BY seq"
        ).fetchall()
    finally:
        database.close()
    operator = f"cli:{getpass.getuser()}"
    assert [(actor, outcome, key_id, reason) for actor, outcome, key_id, reason, _ in events] == [
        (operator, "published", "mtls-ca-1", "mtls init"),
        (operator, "published", "mtls-ca-1", "re-signed by the operator"),
        (operator, "published", "mtls-ca-1", f"revoked {alice}"),
    ]
    paths = [json.loads(details)["path"] for *_, details in events]
    assert paths == [str(tls_dir / "client-ca.crl"), str(tls_dir / "re-signed.crl"), str(tls_dir / "client-ca.crl")]
    assert [json.loads(details)["revoked"] for *_, details in events] == ["0", "0", "1"]
    crl = x509.load_pem_x509_crl((tls_dir / "client-ca.crl").read_bytes())
    assert [entry.serial_number for entry in crl] == [int(alice, 16)]  # the file the last event names is the published one


def test_development_mode_metrics_reload_and_shutdown_checkpoint(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> None:
    """Plaintext on loopback: the local identity has every role; metrics; reloads and shutdown are audited."""
    from tests.conftest import Daemon

    env = make_env(tmp_path_factory.mktemp("dev-metrics"), softhsm_conf, workers=2)
    metrics_port = free_port()
    env.edit_config('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"')
    daemon = Daemon(env, env.state_dir / "daemon.log").start()
    try:
        with grpc.insecure_channel(env.target) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            issued = stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=10)
            stub.Revoke(ca_pb2.RevokeRequest(serial=issued.serial), timeout=10)
            events = [e for page in stub.StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(), timeout=10) for e in page.events]
            assert any(e.action == "certificate.issue" and e.actor == "local-developer" for e in events)
        import urllib.request

        def scrape() -> str:
            return str(urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode())

        def wait_reloads(applied: int, gauge: str, until: Callable[[float], bool]) -> str:
            """Until both workers applied the reloads so far (their audit events) and the parent's gauge says it decided."""
            _wait_audit(env, f"SELECT count(*) >= {applied} FROM audit_events WHERE action = 'config.reload' AND outcome = 'applied'")
            deadline = time.monotonic() + 15
            while not until(_gauge(body := scrape(), gauge)):
                assert time.monotonic() < deadline, body
                time.sleep(0.1)
            return body

        # Both workers serving first: one that failed at start and was started again a moment later (SoftHSM once
        # did not find the token) began with the accepted configuration and recorded no reload (seen once in CI).
        wait_workers_serving(daemon.log, 2, process=daemon.process)
        started_at = _gauge(scrape(), "ca_daemon_config_last_reload_success_timestamp_seconds")
        env.cli("reload")
        body = wait_reloads(2, "ca_daemon_config_last_reload_success_timestamp_seconds", lambda value: value > started_at)
        assert 'ca_daemon_requests_total{code="OK",method="/ca_daemon.v1.CertificateAuthority/Sign"} 1.0' in body
        assert "ca_daemon_request_duration_seconds_bucket" in body
        assert "ca_daemon_hsm_sign_duration_seconds_count" in body
        assert 'ca_daemon_crl_number{issuer="ca-root-1",kind="full"}' in body
        assert "ca_daemon_crl_age_seconds" in body
        chain = [line for line in body.splitlines() if line.startswith("ca_daemon_audit_chain_length ")]
        assert chain and float(chain[0].split()[1]) >= 5
        assert _gauge(body, 'ca_daemon_ca_certificate_expiry_seconds{issuer="ca-root-1",status="active"}') > 0
        assert not [line for line in body.splitlines() if line.startswith("ca_daemon_tls_certificate_expiry_seconds")]  # no TLS
        assert _gauge(body, "ca_daemon_config_last_reload_successful") == 1
        loaded_at = _gauge(body, "ca_daemon_config_last_reload_success_timestamp_seconds")

        # A refused reload (here signalled by hand: `ca-daemon reload` checks the file first) is there to alert on.
        good = env.config_path.read_text()
        env.config_path.write_text(good + "\n[crl]\nnext_update_hourz = 3\n")
        assert daemon.process is not None
        os.kill(daemon.process.pid, signal.SIGHUP)
        body = wait_reloads(2, "ca_daemon_config_last_reload_successful", lambda value: value != 1)
        assert _gauge(body, "ca_daemon_config_last_reload_successful") == 0
        assert _gauge(body, "ca_daemon_config_last_reload_success_timestamp_seconds") == loaded_at
        env.config_path.write_text(good)
        env.cli("reload")
        body = wait_reloads(4, "ca_daemon_config_last_reload_successful", lambda value: value != 0)
        assert _gauge(body, "ca_daemon_config_last_reload_successful") == 1
        assert _gauge(body, "ca_daemon_config_last_reload_success_timestamp_seconds") > loaded_at
    finally:
        daemon.stop()
    public = env.state_dir / "audit.pem"
    env.cli("audit", "public-key", "--out", str(public))
    result = env.cli("audit", "verify", "--live", "--public-key", str(public))
    # The workers signed a checkpoint of the head at shutdown: every event is covered.
    assert result.stdout.startswith("OK:") and "not covered" not in result.stdout, result.stdout
    database = sqlite3.connect(env.state_dir / "ca.db")
    try:
        reloads = database.execute("SELECT outcome FROM audit_events WHERE action = 'config.reload'").fetchall()
        per_head = database.execute("SELECT seq, count(*) FROM audit_checkpoints GROUP BY seq HAVING count(*) > 1").fetchall()
        heads = database.execute("SELECT count(*) FROM audit_checkpoints").fetchone()
    finally:
        database.close()
    # One per worker and accepted reload; the refused one reached no worker: the daemon refused it and recorded that.
    assert reloads == [("applied",)] * 2 + [("refused",)] + [("applied",)] * 2, reloads
    assert per_head == [] and heads[0] >= 1  # both workers stopped at once: the head they left was signed once


def test_mtls_revoke_without_a_crl_file_revokes_nothing_and_names_its_option(
    tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path
) -> None:
    """Without [tls] (mtls init without --apply) and --crl-out, the revocation was recorded and then the command failed
    telling the operator to pass --out (an option revoke lacks); rerun with --crl-out, it said 'already revoked' and
    wrote no CRL."""
    env = make_env(tmp_path_factory.mktemp("mtls-revoke-no-crl"), softhsm_conf)
    tls_dir = env.state_dir / "tls"
    env.cli("mtls", "init", "--out", str(tls_dir), "--client", "alice:admin")
    alice = x509_serial(tls_dir / "clients" / "alice.pem")
    refused = env.cli("mtls", "revoke", "--serial", alice, check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr == "ca-daemon: no tls.client_crl in the configuration; name the file with --crl-out\n"
    assert [line.split("\t")[-1] for line in env.cli("mtls", "list").stdout.splitlines() if "\talice\t" in line] == ["valid"]
    env.cli("mtls", "revoke", "--serial", alice, "--crl-out", str(tls_dir / "client-ca.crl"))
    crl = x509.load_pem_x509_crl((tls_dir / "client-ca.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(alice, 16)) is not None
    refused = env.cli("mtls", "crl", check=False)
    assert refused.stderr == "ca-daemon: no tls.client_crl in the configuration; name the file with --out\n"
