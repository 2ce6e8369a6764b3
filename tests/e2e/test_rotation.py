"""Issue 7: CA key rotation by two officers, against a real daemon, token, database and openssl.

One daemon (two worker processes, SoftHSM, SQLite, mTLS on loopback) set up with
`ca-daemon mtls init --apply` for two officers, a programmer and an auditor. The test walks
one life cycle in order: issue under key 1; generate, self-sign (with link certificates)
and pre-publish key 2; a single officer cannot activate it; two can, while a Sign stream
keeps running; issue under key 2; revoke one leaf of each generation and let openssl judge
each leaf with its own generation's CRLs, and each trust store validate both generations
through the link certificates; key 1 retires (final CRL) once its leaves expired; key 1 is
destroyed and pkcs11-tool no longer finds it. Every dual-controlled step is first tried by
one officer alone, and that changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import create_engine, select

from ca_daemon._proto.ca_daemon.v1 import ca_pb2, ca_pb2_grpc
from ca_daemon.store import schema
from tests.conftest import CaEnv, device_csr, free_port, make_env, spawn_daemon, wait_channel_serving, wait_workers_serving

pytestmark = pytest.mark.slow

KEY1 = "ca-root-1"
KEY2 = "ca-root-2"
LEAF_VALIDITY_S = 30
PREPUBLICATION_S = 5
PKCS11_TOOL = ("pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so")
CLIENTS = {"off1": "officer", "off2": "officer", "prog": "programmer", "aud": "auditor"}
EMERGENCY_POLL_MS = 3000
BIG_STORE = 2_000


@dataclass
class RotationDaemon:
    env: CaEnv
    tls_dir: Path
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def channel(self, name: str) -> grpc.Channel:
        clients = self.tls_dir / "clients"
        credentials = grpc.ssl_channel_credentials(
            (self.tls_dir / "ca.pem").read_bytes(), (clients / f"{name}.key").read_bytes(), (clients / f"{name}.pem").read_bytes()
        )
        return grpc.secure_channel(f"localhost:{self.env.port}", credentials)

    def cli_as(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        clients = self.tls_dir / "clients"
        tls = ["--target", f"localhost:{self.env.port}", "--tls-ca", str(self.tls_dir / "ca.pem")]
        tls += ["--tls-cert", str(clients / f"{name}.pem"), "--tls-key", str(clients / f"{name}.key")]
        return self.env.cli(*args, *tls, check=check)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def rotation_daemon(tmp_path_factory: pytest.TempPathFactory, softhsm_conf: Path) -> Iterator[RotationDaemon]:
    yield from _rotation_daemon(tmp_path_factory.mktemp("rotation"), softhsm_conf, poll_interval_ms=200)


@pytest.fixture
def slow_polling_daemon(tmp_path: Path, softhsm_conf: Path) -> Iterator[RotationDaemon]:
    """Workers that poll for the active key only every EMERGENCY_POLL_MS: a switch is followed late unless a commit says so."""
    yield from _rotation_daemon(tmp_path / "daemon", softhsm_conf, poll_interval_ms=EMERGENCY_POLL_MS)


@pytest.fixture
def big_store_daemon(tmp_path: Path, softhsm_conf: Path, pg_database: Callable[[], str]) -> Iterator[RotationDaemon]:
    """On PostgreSQL, whose group commits go on while a revocation pass runs (SQLite's wait for its write lock), with
    BIG_STORE certificates of key 1 issued before: an emergency's first pass takes seconds, as on a fleet's store."""
    url = pg_database()
    yield from _rotation_daemon(tmp_path / "daemon", softhsm_conf, poll_interval_ms=200, store_url=url, before_start=_issued_before)


def _issued_before(url: str) -> None:
    """BIG_STORE certificates of key 1 written straight into the store (their DER is a stand-in: only the emergency's
    revocation pass, which reads serials and dates, ever looks at them)."""
    now = datetime.now(UTC)
    rows = [
        {
            "serial": f"{secrets.randbits(150) | 1 << 149:x}",
            "issuer_key_id": KEY1,
            "device_id": f"fleet-{n}",
            "profile": "device",
            "subject": f"CN=fleet-{n}",
            "not_before": now - timedelta(days=1),
            "not_after": now + timedelta(days=300),
            "der": b"stand-in",
            "csr_sha256": hashlib.sha256(b"csr-%d" % n).digest(),
            "public_key_sha256": hashlib.sha256(b"key-%d" % n).digest(),
            "request_id": f"fleet-{n}",
            "created_at": now - timedelta(days=1),
        }
        for n in range(BIG_STORE)
    ]
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            conn.execute(schema.certificates.insert(), rows)
    finally:
        engine.dispose()


def _rotation_daemon(
    base: Path,
    softhsm_conf: Path,
    *,
    poll_interval_ms: int,
    store_url: str = "",
    before_start: Callable[[str], None] | None = None,
) -> Iterator[RotationDaemon]:
    base.mkdir(exist_ok=True)
    env = make_env(base, softhsm_conf, workers=2, init=not store_url)
    if store_url:
        env.edit_config('url = "sqlite:///ca.db"', f'url = "{store_url}"')
        env.cli("init")
        if before_start is not None:
            before_start(store_url)
    http_port = free_port()
    env.edit_config("127.0.0.1:8080", f"127.0.0.1:{http_port}")
    env.edit_config("publish_on_revoke = true\n", "publish_on_revoke = true\ncheck_interval_ms = 100\n")
    env.edit_config("validity_days = 365\n", f"validity_days = 365\nvalidity_seconds = {LEAF_VALIDITY_S}\n")
    env.edit_config("allow_reissue = false", "allow_reissue = true")
    rotation = f"prepublication_seconds = {PREPUBLICATION_S}\npoll_interval_ms = {poll_interval_ms}"
    env.edit_config("prepublication_seconds = 604800", rotation)
    tls_dir = env.state_dir / "tls"
    clients = [arg for name, role in CLIENTS.items() for arg in ("--client", f"{name}:{role}")]
    env.cli("mtls", "init", "--out", str(tls_dir), *clients, "--apply")
    log_path = env.state_dir / "daemon.log"
    process = spawn_daemon(env, log_path)
    daemon = RotationDaemon(env, tls_dir, http_port, process, log_path)
    try:
        _wait_serving(daemon)
        yield daemon
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def _wait_serving(daemon: RotationDaemon) -> None:
    with daemon.channel("aud") as channel:
        wait_channel_serving(channel, 40, daemon.process, daemon.log, settle=1.0)  # settle: both workers
    # Both workers, each of which the tests see switch keys: health is SERVING once one serves (a settle is no bound
    # under load, and a worker that starts after the switch loads key 2 without logging one).
    wait_workers_serving(daemon.log, 2, 60, daemon.process)


# -- helpers -------------------------------------------------------------------------------


def sign(channel: grpc.Channel) -> ca_pb2.SignResponse:
    stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
    response: ca_pb2.SignResponse = stub.Sign(ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4())), timeout=20)
    return response


def approve(channel: grpc.Channel, action: str, key_id: str, successor: str = "") -> ca_pb2.ApproveKeyActionResponse:
    stub = ca_pb2_grpc.KeyCeremonyStub(channel)
    request = ca_pb2.ApproveKeyActionRequest(action=action, key_id=key_id, successor_key_id=successor)
    response: ca_pb2.ApproveKeyActionResponse = stub.ApproveKeyAction(request, timeout=60)
    return response


def key_status(channel: grpc.Channel) -> dict[str, str]:
    reply = ca_pb2_grpc.KeyCeremonyStub(channel).ListKeys(ca_pb2.ListKeysRequest(), timeout=10)
    return {k.key_id: k.status for k in reply.keys}


def ca_certificates(channel: grpc.Channel) -> dict[str, ca_pb2.CACertificate]:
    reply = ca_pb2_grpc.CertificateAuthorityStub(channel).GetCACertificates(ca_pb2.GetCACertificatesRequest(), timeout=10)
    return {c.key_id: c for c in reply.certificates}


def get_crl(channel: grpc.Channel, key_id: str, *, delta: bool) -> bytes:
    kind = ca_pb2.CRL_KIND_DELTA if delta else ca_pb2.CRL_KIND_FULL
    reply = ca_pb2_grpc.CertificateAuthorityStub(channel).GetCRL(ca_pb2.GetCRLRequest(kind=kind, issuer_key_id=key_id), timeout=10)
    return bytes(reply.crl_der)


def wait_revoked_in_delta(channel: grpc.Channel, key_id: str, serial: int) -> bytes:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with_entry = get_crl(channel, key_id, delta=True)
        if any(e.serial_number == serial for e in x509.load_der_x509_crl(with_entry)):
            return with_entry
        time.sleep(0.1)
    raise AssertionError(f"serial {serial:x} never appeared in the delta CRL of {key_id}")


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def crl_pem(der: bytes) -> bytes:
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def openssl_verify(root_pem: str, leaf_pem: str, tmp: Path, *extra: str, untrusted: str = "") -> subprocess.CompletedProcess[str]:
    name = uuid.uuid4().hex[:8]
    args = ["openssl", "verify", "-x509_strict", "-CAfile", write(tmp / f"root-{name}.pem", root_pem)]
    if untrusted:
        args += ["-untrusted", write(tmp / f"untrusted-{name}.pem", untrusted)]
    return subprocess.run([*args, *extra, write(tmp / f"leaf-{name}.pem", leaf_pem)], capture_output=True, text=True, check=False)


def pkcs11_labels(env: CaEnv) -> str:
    """The token's objects as pkcs11-tool lists them (the PIN from the environment, never argv)."""
    result = subprocess.run(
        [*PKCS11_TOOL, "--token-label", env.token, "--login", "--pin", "env:ROTATION_TEST_PIN", "--list-objects"],
        capture_output=True,
        text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(env.softhsm_conf), "ROTATION_TEST_PIN": env.user_pin},
        check=True,
    )
    return result.stdout


def issuer_certificates(channel: grpc.Channel) -> dict[str, x509.Certificate]:
    return {k: x509.load_pem_x509_certificate(c.certificate_pem.encode()) for k, c in ca_certificates(channel).items()}


class SignStream:
    """Programming stations signing without pause, each in a thread on its own connection, recording every answer
    (with when its request was first sent) and error.

    Like ca_daemon.client.CaClient, a station retries UNAVAILABLE with the same request_id (at most `retries` times,
    0.1 s apart): a certificate signed with a key that stopped being active meanwhile is answered so.
    """

    def __init__(self, daemon: RotationDaemon, *, stations: int = 1, retries: int = 2) -> None:
        self._daemon = daemon
        self._retries = retries
        self.issued: list[ca_pb2.SignResponse] = []
        self.sent_at: dict[str, float] = {}  # serial -> time.monotonic() when its request was first sent
        self.errors: list[str] = []
        self.retried: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(stations)]

    def __enter__(self) -> SignStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        with self._daemon.channel("prog") as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            while not self._stop.is_set():
                request = ca_pb2.SignRequest(csr=device_csr(), request_id=str(uuid.uuid4()))
                sent = time.monotonic()
                for attempt in range(self._retries + 1):
                    try:
                        response: ca_pb2.SignResponse = stub.Sign(request, timeout=20)
                    except grpc.RpcError as exc:
                        if exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self._retries:
                            self.retried.append(exc.details() or "")
                            time.sleep(0.1)
                            continue
                        self.errors.append(f"{exc.code().name}: {exc.details()}")
                        break
                    self.sent_at[response.serial] = sent
                    self.issued.append(response)
                    break


# -- the life cycle ----------------------------------------------------------------------------


def test_rotation_life_cycle(rotation_daemon: RotationDaemon, tmp_path: Path) -> None:
    d = rotation_daemon
    with d.channel("prog") as prog, d.channel("off1") as off1, d.channel("off2") as off2, d.channel("aud") as aud:
        # Generation 1.
        a_good, a_revoked = sign(prog), sign(prog)
        assert {a_good.issuer_key_id, a_revoked.issuer_key_id} == {KEY1}

        # Key 2: generated and self-signed by one officer (CLI over the RPCs), with the two link certificates.
        d.cli_as("off1", "key", "create", "--label", KEY2)
        out = d.cli_as(
            "off1", "key", "self-sign", "--key-id", KEY2, "--subject", "CN=Rotation Root CA 2", "--out", str(tmp_path / "k2.pem")
        )
        published = time.monotonic()  # no earlier than the pre-publication began
        assert "2 link certificate(s)" in out.stdout, out.stdout
        # Before the pre-publication period ends, activation is refused outright (asked at once: a loaded machine is slow).
        with pytest.raises(grpc.RpcError) as early:
            approve(off1, "activate", KEY2)
        assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "pre-published" in (early.value.details() or "")
        status = d.cli_as("aud", "key", "status").stdout
        assert f"{KEY2}\tec-p256\tpending\tpublished_at=" in status and f"{KEY1}\tec-p256\tactive" in status, status
        # Pre-published: listed and served over HTTP before it signs anything; Sign still uses key 1.
        listed = ca_certificates(aud)
        assert listed[KEY2].status == "pending" and listed[KEY1].status == "active"
        assert len(listed[KEY2].link_certificates_pem) == 1 and len(listed[KEY1].link_certificates_pem) == 1
        root2_der = x509.load_pem_x509_certificate(listed[KEY2].certificate_pem.encode()).public_bytes(serialization.Encoding.DER)
        assert _http_get(d.http_port, f"/ca/{KEY2}.der") == root2_der
        assert sign(prog).issuer_key_id == KEY1
        time.sleep(max(0.0, published + PREPUBLICATION_S + 0.5 - time.monotonic()))

        # One officer, even twice, changes nothing (once with the CLI, once over gRPC).
        cli = d.cli_as("off1", "key", "approve", "activate", "--key-id", KEY2)
        assert "recorded (1 of 2 distinct officers); nothing changed yet" in cli.stdout, cli.stdout + cli.stderr
        single = approve(off1, "activate", KEY2)
        assert not single.executed and list(single.officers) == ["off1"]
        assert key_status(aud)[KEY2] == "pending"
        assert sign(prog).issuer_key_id == KEY1

        # The second officer activates it while a programming station keeps signing.
        with SignStream(d) as stream:
            time.sleep(1.0)
            done = approve(off2, "activate", KEY2)
            assert done.executed and list(done.officers) == ["off1", "off2"], done
            time.sleep(2.0)  # both workers switch (poll every 200 ms) and keep signing under key 2
        assert stream.errors == []
        assert {r.issuer_key_id for r in stream.issued} == {KEY1, KEY2}
        assert key_status(aud) == {KEY1: "superseded", KEY2: "active"}
        roots = issuer_certificates(aud)
        for response in stream.issued:
            leaf = x509.load_pem_x509_certificate(response.certificate_pem.encode())
            leaf.verify_directly_issued_by(roots[response.issuer_key_id])  # signed by the key it names

        # Every worker switched (each opened key 2 in its own HSM connection), without a restart.
        deadline = time.monotonic() + 10
        while d.log().count(f"switched the signing CA key from {KEY1} to {KEY2}") < 2:
            assert time.monotonic() < deadline, d.log()[-3000:]
            time.sleep(0.2)
        assert d.process.poll() is None

        # Generation 2, over fresh connections (SO_REUSEPORT spreads them over both workers).
        b = []
        for _ in range(6):
            with d.channel("prog") as fresh:
                b.append(sign(fresh))
        assert {r.issuer_key_id for r in b} == {KEY2}
        b_good, b_revoked = b[0], b[1]

        # Revoke one leaf of each generation; each key lists it in its own CRLs.
        revoke = ca_pb2_grpc.CertificateAuthorityStub(off1).Revoke
        for response in (a_revoked, b_revoked):
            revoke(ca_pb2.RevokeRequest(serial=response.serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE), timeout=10)
        delta1 = wait_revoked_in_delta(aud, KEY1, int(a_revoked.serial, 16))
        delta2 = wait_revoked_in_delta(aud, KEY2, int(b_revoked.serial, 16))
        base1, base2 = get_crl(aud, KEY1, delta=False), get_crl(aud, KEY2, delta=False)
        assert int(a_revoked.serial, 16) not in {e.serial_number for e in x509.load_der_x509_crl(delta2)}

        root1_pem, root2_pem = listed[KEY1].certificate_pem, listed[KEY2].certificate_pem
        # -extended_crl: without it OpenSSL takes the newer delta for the whole CRL (README, Revocation and CRLs).
        gen1_crls = ["-crl_check", "-use_deltas", "-extended_crl", "-CRLfile", write(tmp_path / "b1.pem", crl_pem(base1))]
        gen1_crls += ["-CRLfile", write(tmp_path / "d1.pem", crl_pem(delta1))]
        gen2_crls = ["-crl_check", "-use_deltas", "-extended_crl", "-CRLfile", write(tmp_path / "b2.pem", crl_pem(base2))]
        gen2_crls += ["-CRLfile", write(tmp_path / "d2.pem", crl_pem(delta2))]
        for checked, root, crls, ok in (
            (a_good, root1_pem, gen1_crls, True),
            (a_revoked, root1_pem, gen1_crls, False),
            (b_good, root2_pem, gen2_crls, True),
            (b_revoked, root2_pem, gen2_crls, False),
        ):
            result = openssl_verify(root, checked.certificate_pem, tmp_path, *crls)
            assert (result.returncode == 0) == ok, (checked.serial, result.stdout, result.stderr)
            if not ok:
                assert "certificate revoked" in result.stdout + result.stderr

        # Both trust stores validate both generations: through the link certificates.
        old_signs_new = listed[KEY2].link_certificates_pem[0]
        new_signs_old = listed[KEY1].link_certificates_pem[0]
        assert openssl_verify(root1_pem, b_good.certificate_pem, tmp_path, untrusted=old_signs_new).returncode == 0
        assert openssl_verify(root2_pem, a_good.certificate_pem, tmp_path, untrusted=new_signs_old).returncode == 0
        assert openssl_verify(root1_pem, b_good.certificate_pem, tmp_path).returncode != 0  # the link is what does it
        assert openssl_verify(root2_pem, a_good.certificate_pem, tmp_path).returncode != 0

        # Key 1 keeps signing its CRLs while any of its leaves is valid: retiring it now is refused.
        with pytest.raises(grpc.RpcError) as busy:
            approve(off1, "retire", KEY1)
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION, busy.value.details()

        # Once they expired, two officers retire it; it publishes a final CRL.
        last_not_after = max(
            x509.load_pem_x509_certificate(r.certificate_pem.encode()).not_valid_after_utc
            for r in [a_good, a_revoked, *stream.issued]
            if r.issuer_key_id == KEY1
        )
        time.sleep(max(0.0, last_not_after.timestamp() - time.time()) + 1.5)
        crl_before = x509.load_der_x509_crl(get_crl(aud, KEY1, delta=False))
        delta_path, delta_file = f"/crl/{KEY1}-delta.crl", d.env.state_dir / "crl" / f"{KEY1}-delta.crl"
        assert _http_status(d.http_port, delta_path) == 200 and delta_file.exists()  # key 1 still publishes deltas
        assert not approve(off2, "retire", KEY1).executed
        assert key_status(aud)[KEY1] == "superseded"
        retired = approve(off1, "retire", KEY1)
        assert retired.executed, retired
        assert key_status(aud)[KEY1] == "retired"
        final = x509.load_der_x509_crl(get_crl(aud, KEY1, delta=False))
        crl_number = final.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert crl_number > crl_before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert int(a_revoked.serial, 16) in {e.serial_number for e in final}
        assert final.next_update_utc is not None and final.next_update_utc >= roots[KEY1].not_valid_after_utc
        assert final.is_signature_valid(roots[KEY1].public_key())  # type: ignore[arg-type]
        # Key 1 issued a link certificate, so its CRLs cover CA certificates (no IDP narrows them); no delta follows the final CRL.
        with pytest.raises(x509.ExtensionNotFound):
            final.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        with pytest.raises(x509.ExtensionNotFound):
            final.extensions.get_extension_for_class(x509.FreshestCRL)
        # The retired key can revoke nothing more, so the link it issued for key 2 is withdrawn on its final CRL.
        link_entry = final.get_revoked_certificate_by_serial_number(x509.load_pem_x509_certificate(old_signs_new.encode()).serial_number)
        assert link_entry is not None
        assert link_entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.cessation_of_operation
        deadline = time.monotonic() + 10
        while _http_get(d.http_port, f"/crl/{KEY1}.crl") != final.public_bytes(serialization.Encoding.DER):
            assert time.monotonic() < deadline, "the final CRL is not served over HTTP"
            time.sleep(0.2)
        # Its last delta is withdrawn with it: the final CRL has no delta to follow it, and a stale one would only expire.
        with pytest.raises(grpc.RpcError) as no_delta:
            get_crl(aud, KEY1, delta=True)
        assert no_delta.value.code() == grpc.StatusCode.NOT_FOUND, no_delta.value.details()
        assert f"CA key {KEY1} is retired" in (no_delta.value.details() or "")
        deadline = time.monotonic() + 10  # the CRL schedule takes it down at its next check (every 100 ms here)
        while _http_status(d.http_port, delta_path) != 404 or delta_file.exists():
            assert time.monotonic() < deadline, "the retired key's last delta CRL is still served"
            time.sleep(0.1)
        link_path = f"/ca/links/{KEY1}-signs-{KEY2}.der"
        assert x509.load_der_x509_certificate(_http_get(d.http_port, link_path)) == x509.load_pem_x509_certificate(old_signs_new.encode())

        # Destroying: one officer changes nothing; the second deletes it from the token.
        assert f"label:      {KEY1}" in pkcs11_labels(d.env)
        assert not approve(off1, "destroy", KEY1).executed
        assert key_status(aud)[KEY1] == "retired"
        assert f"label:      {KEY1}" in pkcs11_labels(d.env)
        assert approve(off2, "destroy", KEY1).executed
        assert key_status(aud)[KEY1] == "destroyed"
        labels = pkcs11_labels(d.env)
        assert f"label:      {KEY1}" not in labels and f"label:      {KEY2}" in labels
        # `init` with the configuration still naming key 1 says what became of it and which key is active.
        rerun = d.env.cli("init")
        assert f"CA key {KEY1} already has a certificate (it is destroyed); nothing to do" in rerun.stdout, rerun.stdout
        assert f"the active CA key is {KEY2}" in rerun.stdout, rerun.stdout
        preflight = d.env.cli("check-config").stdout
        assert f"CA key: {KEY2} in the token matches its certificate" in preflight and KEY1 not in preflight, preflight

        # Issuance goes on under key 2, and the audit log holds every approval.
        assert sign(prog).issuer_key_id == KEY2
    approvals = [e for e in _audit_actions(d, "key.approve") if e.outcome != "refused"]
    refused = [(e.actor, _detail(e, "action"), e.key_id, e.reason) for e in _audit_actions(d, "key.approve") if e.outcome == "refused"]
    assert refused == [("off1", "activate", KEY2, "prepublication"), ("off1", "retire", KEY1, "unexpired-certificates")]
    assert [(e.actor, _detail(e, "action")) for e in approvals] == [
        ("off1", "activate"),
        ("off1", "activate"),
        ("off2", "activate"),
        ("off2", "retire"),
        ("off1", "retire"),
        ("off1", "destroy"),
        ("off2", "destroy"),
    ]
    ceremony = _audit_actions(d, "key.activate", "key.retire", "key.destroy")
    executed = [(e.action, e.key_id, e.actor) for e in ceremony if e.outcome == "executed"]
    assert executed == [("key.activate", KEY2, "off2"), ("key.retire", KEY1, "off1"), ("key.destroy", KEY1, "off2")]


def test_an_emergency_switch_hands_out_no_certificate_of_the_compromised_key_after_the_switch(
    slow_polling_daemon: RotationDaemon, tmp_path: Path
) -> None:
    """Workers signed with the compromised key until their next poll (up to EMERGENCY_POLL_MS after the switch): those
    certificates were stored, returned as successes, and revoked by the emergency's second pass. Now the commit refuses
    them (UNAVAILABLE), the worker follows the new key at once, and the station's retry gets a certificate of the new key
    well within one poll interval. (Before the switch, while the emergency revokes, key 1 is halted: those retries are
    answered that it is compromised, so the stations retry up to 30 times, 0.1 s apart.)"""
    d = slow_polling_daemon
    with d.channel("off1") as off1, d.channel("off2") as off2, d.channel("aud") as aud:
        d.cli_as("off1", "key", "create", "--label", KEY2)
        d.cli_as("off1", "key", "self-sign", "--key-id", KEY2, "--subject", "CN=Emergency Root CA 2", "--out", str(tmp_path / "k2.pem"))
        assert not approve(off1, "emergency", KEY1, KEY2).executed
        switched_at: list[float] = []

        def watch_the_switch() -> None:  # the switch is committed before ListKeys can show it
            while key_status(aud).get(KEY2) != "active":
                time.sleep(0.02)
            switched_at.append(time.monotonic())

        watcher = threading.Thread(target=watch_the_switch, daemon=True)
        with SignStream(d, stations=4, retries=30) as stream:
            time.sleep(1.0)
            watcher.start()
            done = approve(off2, "emergency", KEY1, KEY2)  # returns after the second pass, two poll intervals on
            assert done.executed, done
            time.sleep(1.0)
        watcher.join(timeout=10)
        assert switched_at and stream.errors == [], stream.errors[:5]
        roots = issuer_certificates(aud)
        after = [r for r in stream.issued if stream.sent_at[r.serial] > switched_at[0]]
        before = [r for r in stream.issued if stream.sent_at[r.serial] <= switched_at[0]]
        assert len(after) >= 10 and any(r.issuer_key_id == KEY1 for r in before), (len(after), len(before))
        stub = ca_pb2_grpc.CertificateAuthorityStub(aud)
        for response in stream.issued:
            leaf = x509.load_pem_x509_certificate(response.certificate_pem.encode())
            leaf.verify_directly_issued_by(roots[response.issuer_key_id])  # signed by the key it names
            stored = stub.GetCertificate(ca_pb2.GetCertificateRequest(serial=response.serial), timeout=10)
            assert stored.issuer_key_id == response.issuer_key_id
            if response in after:  # requested once the switch was committed: the new key's, and valid
                assert response.issuer_key_id == KEY2 and not stored.HasField("revocation"), response.serial
            else:  # the compromised key's certificates of before the switch are all revoked; the new key's none
                assert stored.HasField("revocation") == (response.issuer_key_id == KEY1), response.serial
        assert any("the CA key changed while the request was signed" in r for r in stream.retried), stream.retried[:3]
    discarded = [e for e in _audit_actions(d, "certificate.issue") if e.outcome == "refused"]
    assert discarded and {(e.reason, e.key_id) for e in discarded} <= {("ca-key-changed", KEY1), ("ca-key-compromised", KEY1)}
    assert ("ca-key-changed", KEY1) in {(e.reason, e.key_id) for e in discarded}


def test_during_an_emergency_no_certificate_of_the_compromised_key_is_handed_out_and_then_revoked(
    big_store_daemon: RotationDaemon, tmp_path: Path
) -> None:
    """The emergency revoked what key 1 signed (BIG_STORE certificates: seconds) while key 1 still signed; what workers
    committed meanwhile was handed out to stations and revoked by the second pass, after the switch. Now key 1 is halted
    before the pass: every key 1 certificate a station received was committed before the halt and revoked by the first
    pass, and the stations are answered UNAVAILABLE ("compromised ... issuance resumes") until key 2 is active."""
    d = big_store_daemon
    with d.channel("off1") as off1, d.channel("off2") as off2:
        d.cli_as("off1", "key", "create", "--label", KEY2)
        d.cli_as("off1", "key", "self-sign", "--key-id", KEY2, "--subject", "CN=Emergency Root CA 2", "--out", str(tmp_path / "k2.pem"))
        assert not approve(off1, "emergency", KEY1, KEY2).executed
        with SignStream(d, stations=4, retries=300) as stream:  # 0.1 s apart: stations wait out the first pass
            time.sleep(1.0)
            started = time.monotonic()
            done = approve(off2, "emergency", KEY1, KEY2)
            took = time.monotonic() - started
            assert done.executed, done
            time.sleep(0.5)
    assert stream.errors == [], stream.errors[:5]
    handed_out = {int(r.serial, 16) for r in stream.issued if r.issuer_key_id == KEY1}
    assert handed_out and any(r.issuer_key_id == KEY2 for r in stream.issued), (len(handed_out), len(stream.issued))
    store_url = d.env.config_path.read_text().split('url = "', 1)[1].split('"', 1)[0]
    engine = create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1))
    events = schema.audit_events
    try:
        with engine.connect() as conn:
            executed = conn.execute(
                select(events.c.seq).where(events.c.action == "key.emergency", events.c.outcome == "executed")
            ).scalar_one()
            revoked_at = {
                int(serial, 16): seq
                for serial, seq in conn.execute(select(events.c.serial, events.c.seq).where(events.c.action == "certificate.revoke"))
            }
    finally:
        engine.dispose()
    # Every key 1 certificate a station received is revoked, by the first pass. (Leaves live LEAF_VALIDITY_S: one the
    # second pass found expired is not revoked at all.)
    late = sorted(f"{s:x}" for s in handed_out if revoked_at.get(s, executed + 1) > executed)
    assert late == [], (
        f"{len(late)} of {len(handed_out)} key 1 certificate(s) handed out were not revoked before the switch "
        f"(the emergency took {took:.1f} s)"
    )
    assert any("which is compromised" in r and "issuance resumes" in r for r in stream.retried), stream.retried[:3]


def test_key_ceremony_role_matrix(rotation_daemon: RotationDaemon) -> None:
    """Officers may call every KeyCeremony method; auditors only ListKeys; programmers none."""
    service = ca_pb2.DESCRIPTOR.services_by_name["KeyCeremony"]
    allowed = {"off1": {m.name for m in service.methods}, "aud": {"ListKeys"}, "prog": set()}
    for name, methods in allowed.items():
        with rotation_daemon.channel(name) as channel:
            stub = ca_pb2_grpc.KeyCeremonyStub(channel)
            for method in service.methods:
                request = getattr(ca_pb2, method.input_type.name)()  # empty: refused as invalid, never executed
                try:
                    getattr(stub, method.name)(request, timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                denied = code == grpc.StatusCode.PERMISSION_DENIED
                assert denied == (method.name not in methods), (name, method.name, code)
    # The officer's empty requests were refused as invalid, each audited (also those the servicer refused while converting them).
    refused = {
        (e.action, e.reason)
        for e in _audit_actions(rotation_daemon, "key.generate", "key.certificate", "key.csr", "key.approve")
        if e.outcome == "refused" and e.actor == "off1" and e.key_id == ""
    }
    assert refused == {
        ("key.generate", "label"),
        ("key.certificate", "subject"),
        ("key.certificate", "certificate"),
        ("key.csr", "subject"),
        ("key.approve", "action"),
    }


def _audit_actions(daemon: RotationDaemon, *actions: str) -> list[ca_pb2.AuditEvent]:
    with daemon.channel("aud") as channel:
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        pages = stub.StreamAuditEvents(ca_pb2.StreamAuditEventsRequest(actions=list(actions)), timeout=20)
        return [event for page in pages for event in page.events]


def _detail(event: ca_pb2.AuditEvent, name: str) -> str:
    import json

    value: str = json.loads(event.details_json).get(name, "")
    return value


def _http_get(port: int, path: str) -> bytes:
    import urllib.request

    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                body: bytes = response.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _http_status(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
