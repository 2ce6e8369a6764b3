"""The TLS front end (tls_front.py) in front of a real grpc.aio server, with real TLS over loopback.

Certificates are made here with `cryptography` so that each case (expired client, expired
client CA, unknown CA) is one line; the daemon-level matrix is in test_access_audit.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ca_daemon import access, tls_front
from ca_daemon.config import RoleGrant
from ca_daemon.model import AuditEvent
from ca_daemon.service import ErrorInterceptor

SIGN = "/ca_daemon.v1.CertificateAuthority/Sign"
NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _issue(
    name: str,
    issuer: Issued | None,
    *,
    ca: bool = False,
    server: bool = False,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=30),
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    certificate = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(certificate, key)


@dataclass
class Pki:
    ca: Issued
    old_ca: Issued  # a client CA that has expired (its client certificate has not)
    server: Issued
    clients: dict[str, Issued]
    directory: Path

    @property
    def client_ca_file(self) -> Path:
        return self.directory / "client-ca.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("front-pki")
    ca = _issue("test client CA", None, ca=True, not_before=NOW - timedelta(days=10), not_after=NOW + timedelta(days=3650))
    old_ca = _issue("retired client CA", None, ca=True, not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=1))
    stranger_ca = _issue("unknown CA", None, ca=True)
    clients = {
        "alice": _issue("alice", ca),
        "bob": _issue("bob", ca),
        "expired": _issue("expired", ca, not_before=NOW - timedelta(days=3), not_after=NOW - timedelta(days=1)),
        "early": _issue("early", ca, not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=30)),
        "orphan": _issue("orphan", old_ca, not_before=NOW - timedelta(days=3), not_after=NOW + timedelta(days=30)),
        "stranger": _issue("stranger", stranger_ca),
    }
    server = _issue("localhost", ca, server=True)
    for name, issued in {**clients, "server": server}.items():
        (directory / f"{name}.pem").write_bytes(issued.pem())
        key_path = directory / f"{name}.key"
        key_path.write_bytes(issued.key_pem())
        key_path.chmod(0o600)
    (directory / "client-ca.pem").write_bytes(ca.pem() + old_ca.pem())
    return Pki(ca, old_ca, server, clients, directory)


class FrontEndServer:
    """A grpc.aio server with our interceptor and health, behind a TlsFrontEnd, on its own loop thread."""

    def __init__(self, pki: Pki, max_connections: int = 64, **front_options: Any) -> None:
        directory = pki.directory
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        context = tls_front.server_context(directory / "server.pem", directory / "server.key", pki.client_ca_file)
        self.front = tls_front.TlsFrontEnd(context, max_connections, **front_options)
        self.denials: list[AuditEvent] = []  # the access.deny events the interceptor records
        authenticator = access.Authenticator(
            access.RoleMap([RoleGrant("programmer", "identity", "alice")]), None, client_cas=[pki.ca.certificate, pki.old_ca.certificate]
        )
        self.port, self.backend_port = self._run(self._start(authenticator))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def _start(self, authenticator: access.Authenticator) -> tuple[int, int]:
        front = self.front
        self.server = grpc.aio.server(
            interceptors=[
                ErrorInterceptor(
                    authenticator, record_denial=self._record_denial, auth_context_of=lambda context: front.auth_context_of(context.peer())
                )
            ]
        )

        async def sign(request: bytes, _context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return b"signed:" + request

        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("ca_daemon.v1.CertificateAuthority", {"Sign": grpc.unary_unary_rpc_method_handler(sign)})]
        )
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        backend_port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        return await front.start("127.0.0.1", 0, backend_port=backend_port), backend_port

    async def _record_denial(self, event: AuditEvent) -> None:
        self.denials.append(event)

    async def _stop(self) -> None:
        self.front.stop_accepting()
        await self.server.stop(1)
        await self.front.stop()

    def close(self) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def front(pki: Pki) -> Iterator[FrontEndServer]:
    server = FrontEndServer(pki)
    yield server
    server.close()


def _channel(pki: Pki, front: FrontEndServer, client: str | None) -> grpc.Channel:
    root = pki.ca.pem()
    if client is None:
        credentials = grpc.ssl_channel_credentials(root)
    else:
        issued = pki.clients[client]
        credentials = grpc.ssl_channel_credentials(root, issued.key_pem(), issued.pem())
    return grpc.secure_channel(f"localhost:{front.port}", credentials)


def _sign(channel: grpc.Channel, payload: bytes = b"x") -> bytes:
    result: bytes = channel.unary_unary(SIGN, request_serializer=None, response_deserializer=None)(payload, timeout=10)
    return result


def _refusal(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        _sign(channel)
    return refused.value.code(), refused.value.details() or ""


def test_a_client_with_the_role_is_served(pki: Pki, front: FrontEndServer) -> None:
    with _channel(pki, front, "alice") as channel:
        assert _sign(channel, b"csr") == b"signed:csr"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (None, "a client certificate is required (mTLS); none was presented"),
        ("expired", "client certificate"),
        ("early", "is not valid before"),
        ("orphan", "client CA 'CN=retired client CA'"),
    ],
)
def test_refusals_that_reach_us_are_unauthenticated_with_the_reason(
    pki: Pki, front: FrontEndServer, client: str | None, reason: str
) -> None:
    with _channel(pki, front, client) as channel:
        code, details = _refusal(channel)
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert reason in details
    if client in ("expired", "orphan"):
        assert "expired at" in details


def test_each_connection_is_its_own_caller(pki: Pki, front: FrontEndServer) -> None:
    """Many calls over two clients' connections at once: each call is judged by its own connection's certificate."""
    errors: list[str] = []

    def hammer(client: str) -> None:
        with _channel(pki, front, client) as channel:
            for _ in range(40):
                try:
                    _sign(channel)
                    outcome = "served"
                except grpc.RpcError as exc:
                    outcome = f"{exc.code().name}: {exc.details()}"
                if client == "alice" and outcome != "served":
                    errors.append(f"alice: {outcome}")
                if client == "bob" and not (outcome.startswith("PERMISSION_DENIED") and "caller 'bob'" in outcome):
                    errors.append(f"bob: {outcome}")

    threads = [threading.Thread(target=hammer, args=(name,)) for name in ("alice", "bob", "alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_an_unknown_ca_and_tls12_are_refused_in_the_handshake(
    pki: Pki, front: FrontEndServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ca_daemon.tls_front")
    with _channel(pki, front, "stranger") as channel:
        code, _ = _refusal(channel)
    assert code == grpc.StatusCode.UNAVAILABLE  # the chain does not verify: no TLS session, so no RPC

    tls12 = ssl.create_default_context(cafile=None)
    tls12.load_verify_locations(cadata=pki.ca.pem().decode())
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        tls12.wrap_socket(raw, server_hostname="localhost")

    tls13 = ssl.create_default_context()
    tls13.load_verify_locations(cadata=pki.ca.pem().decode())
    tls13.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as raw, tls13.wrap_socket(raw, server_hostname="localhost") as s:
        assert (s.version(), s.selected_alpn_protocol()) == ("TLSv1.3", "h2")
    refused = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.tls_front"]
    assert sum("TLS handshake with 127.0.0.1:" in m and "refused" in m for m in refused) >= 2, refused


def _handshake(pki: Pki, port: int, *, client: str | None = None, trust: Issued | None = None, tls12: bool = False) -> None:
    """One raw TLS connection that the front end refuses: the client side's error is expected and ignored."""
    context = ssl.create_default_context(cadata=(trust or pki.ca).pem().decode())
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(pki.directory / f"{client}.pem", pki.directory / f"{client}.key")
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        contextlib.suppress(ssl.SSLError, ConnectionError),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(1) == b""  # TLS 1.3: the server judges the client certificate after the client's Finished


def test_refused_handshakes_are_counted_by_reason_and_logged_once_per_reason_per_interval(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Each kind of handshake failure has its own reason (the metric's label); the log has one line per reason per interval."""
    caplog.set_level(logging.INFO, logger="ca_daemon.tls_front")
    refusals: list[str] = []
    server = FrontEndServer(pki, count_refused_handshake=refusals.append, log_interval=3.0)

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(refusals) < count:
            assert time.monotonic() < deadline, refusals
            time.sleep(0.02)

    try:
        _handshake(pki, server.port, client="stranger")  # a certificate from a CA we do not trust
        _handshake(pki, server.port, client="stranger")
        wait_for(2)
        first_two_at = time.monotonic()
        _handshake(pki, server.port, client="alice", tls12=True)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:  # plaintext HTTP to the TLS port
            raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            raw.recv(100)
        _handshake(pki, server.port, client="alice", trust=pki.old_ca)  # the client does not trust our server certificate
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()  # a port probe
        with _channel(pki, server, "alice") as channel:
            assert _sign(channel) == b"signed:x"  # a good client is not counted
        wait_for(6)
        time.sleep(max(0.0, first_two_at + 3.2 - time.monotonic()))
        _handshake(pki, server.port, client="stranger")
        wait_for(7)
    finally:
        server.close()
    assert sorted(refusals) == sorted(["unknown-ca"] * 3 + ["protocol"] * 2 + ["server-certificate-rejected", "closed"])
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ca_daemon.tls_front"]
    unknown = [message for level, message in lines if "(unknown-ca)" in message]
    assert len(unknown) == 2, lines  # the second stranger within the interval was counted, not logged
    assert "more refused" not in unknown[0] and unknown[1].endswith("(1 more refused for this reason since the last such line)")
    assert all(message.startswith("TLS handshake with 127.0.0.1:") for _, message in lines), lines
    assert [level for level, message in lines if "(protocol)" in message] == [logging.WARNING], lines
    assert [level for level, message in lines if "(server-certificate-rejected)" in message] == [logging.WARNING], lines
    assert [level for level, message in lines if "(closed)" in message] == [logging.INFO], lines


def test_the_plaintext_backend_serves_nobody_directly(front: FrontEndServer) -> None:
    """A local process that connects to the loopback backend port, bypassing TLS, is not anyone."""
    with grpc.insecure_channel(f"127.0.0.1:{front.backend_port}") as channel:
        code, details = _refusal(channel)
        with pytest.raises(grpc.RpcError) as health:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert health.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "this connection uses no TLS" in details


def test_connections_beyond_the_limit_are_closed_and_logged(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """Two idle TCP connections (never handshaking) fill a limit of 2: a third is closed at once; room again once one goes."""
    caplog.set_level(logging.WARNING, logger="ca_daemon.tls_front")
    closed: list[str] = []  # the metric's counts
    server = FrontEndServer(pki, max_connections=2, count_closed_connection=closed.append)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        time.sleep(0.3)  # both accepted by the front end
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as third:
            third.settimeout(5)
            assert third.recv(1) == b""  # closed by the server, long before the 10 s handshake timeout
        with _channel(pki, server, "alice") as channel, pytest.raises(grpc.RpcError) as full:
            _sign(channel)
        assert full.value.code() == grpc.StatusCode.UNAVAILABLE
        idle[0].close()
        deadline = time.monotonic() + 10
        while True:  # the front end notices the closed connection, then has room for one more
            with _channel(pki, server, "alice") as channel:
                try:
                    assert _sign(channel, b"csr") == b"signed:csr"
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.2)
        idle[1].close()
    finally:
        server.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.tls_front"]
    assert any("connection limit reached (server.max_connections = 2" in m for m in warnings), warnings
    assert set(closed) == {"connection-limit"} and len(closed) >= 2, closed  # the third socket, then the gRPC client


def test_a_client_reconnecting_faster_than_its_rate_is_closed_before_the_handshake_and_others_are_served(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A station that reconnects in a tight loop (here 127.0.0.2, 20 connections in a row) gets its burst of handshakes
    (2 x the rate of 2 a second), then its connections are closed before any handshake and logged once; another
    client (127.0.0.1) is served meanwhile, and the station is served again a moment later."""
    caplog.set_level(logging.WARNING, logger="ca_daemon.tls_front")
    closed: list[str] = []
    server = FrontEndServer(pki, handshakes_per_client=2, count_closed_connection=closed.append)
    context = ssl.create_default_context(cadata=pki.ca.pem().decode())
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(pki.directory / "alice.pem", pki.directory / "alice.key")

    def handshake_from(source: str) -> bool:
        """Whether a TLS handshake from source completes (the connection is closed at once either way)."""
        with socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(source, 0)) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="localhost"):
                    return True
            except (ssl.SSLError, ConnectionError):
                return False

    try:
        started = time.monotonic()
        outcomes = [handshake_from("127.0.0.2") for _ in range(20)]
        refilled = 2 * (time.monotonic() - started)  # tokens the rate gave back meanwhile (a slow machine: more)
        assert outcomes[:4] == [True] * 4 and outcomes.count(True) <= 4 + refilled + 1 and False in outcomes, (outcomes, refilled)
        assert closed == ["handshake-rate"] * outcomes.count(False), (closed, outcomes)  # each one counted
        with _channel(pki, server, "alice") as channel:
            assert _sign(channel, b"other") == b"signed:other"  # 127.0.0.1: a bucket of its own
        time.sleep(1.1)  # two tokens back
        assert handshake_from("127.0.0.2")
    finally:
        server.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.tls_front"]
    expected = "server.tls_handshakes_per_client = 2 new connections a second from one client address in this worker, in bursts of 4"
    assert any(m.startswith(expected) and "before their handshake, the last from 127.0.0.2:" in m for m in warnings), warnings


def _backend_source_ports(backend_port: int) -> set[int]:
    """Local ports of the front end's open connections to the backend, read from /proc/net/tcp as any local user can."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if state == "01" and remote == f"0100007F:{backend_port:04X}" and local.startswith("0100007F:"):
            ports.add(int(local.split(":")[1], 16))
    return ports


def _relay_from(source: tuple[str, int], backend_port: int) -> tuple[socket.socket, threading.Thread]:
    """A listener whose one connection is relayed to the backend from the given source address."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            client, _ = listener.accept()
            with client, socket.socket() as upstream:
                upstream.bind(source)
                upstream.connect(("127.0.0.1", backend_port))
                downstream = threading.Thread(target=pump, args=(upstream, client), daemon=True)
                downstream.start()
                pump(client, upstream)
                downstream.join(timeout=10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_local_process_cannot_borrow_a_relayed_connections_identity_from_another_loopback_address(
    pki: Pki, front: FrontEndServer
) -> None:
    """127.0.0.10:PORT is not the front end's 127.0.0.1:PORT, though the backend's peer string starts the same.

    The front end's backend connections come from 127.0.0.1; their port numbers are visible to every local
    user (/proc/net/tcp), and any 127.0.0.0/8 address can connect from the same port number. Such a
    connection was taken for the TLS client behind the front end's connection of that port: a local
    user without a certificate called Sign as alice while alice's connection was open.
    """
    with _channel(pki, front, "alice") as alice:
        assert _sign(alice) == b"signed:x"  # alice's connection is open and relayed
        ports = _backend_source_ports(front.backend_port)
        assert ports
        for port in ports:
            listener, thread = _relay_from(("127.0.0.10", port), front.backend_port)
            try:
                with grpc.insecure_channel(f"127.0.0.1:{listener.getsockname()[1]}") as borrowed:
                    code, details = _refusal(borrowed)
            finally:
                listener.close()
                thread.join(timeout=10)
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
            assert "this connection uses no TLS" in details


def _uncertified_tls(port: int, pki: Pki) -> ssl.SSLSocket:
    """A TLS 1.3 connection that completed its handshake without a client certificate and then sends nothing."""
    context = ssl.create_default_context(cadata=pki.ca.pem().decode())
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
    tls.settimeout(10)
    return tls


def test_connections_without_a_certificate_get_a_share_of_the_slots_for_a_short_time(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """The certificate is optional in the handshake, so anyone could hold every slot: 2,048 idle connections with no
    certificate locked authenticated callers out for as long as they stayed. Now at most max_connections / 16 of them
    are open at once, each for a limited time (1 s here, 10 s by default)."""
    caplog.set_level(logging.WARNING, logger="ca_daemon.tls_front")
    closed: list[str] = []
    server = FrontEndServer(pki, max_connections=32, uncertified_lifetime=1.0, count_closed_connection=closed.append)
    try:
        held = [_uncertified_tls(server.port, pki) for _ in range(2)]  # 32 / 16 = 2 may be open
        time.sleep(0.3)
        with _uncertified_tls(server.port, pki) as third:
            assert third.recv(1) == b""  # closed right after the handshake
        with _channel(pki, server, "alice") as channel:
            assert _sign(channel, b"csr") == b"signed:csr"  # a caller with a certificate has room
        started = time.monotonic()
        for tls in held:
            while tls.recv(65536):  # the backend's HTTP/2 settings, then the end: closed after their lifetime
                pass
            tls.close()
        assert time.monotonic() - started < 5
    finally:
        server.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.tls_front"]
    assert any("connection(s) without a client certificate are open in this worker" in m for m in warnings), warnings
    assert closed == ["uncertified-limit"]


def test_calls_without_a_certificate_are_logged_in_summary_not_audited(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """Each was an access.deny audit event and a request-log line: a peer with no certificate grew the tamper-evident
    log at 1.4 MB/s. A caller whose certificate is refused (expired here) is still audited."""
    caplog.set_level(logging.INFO, logger="ca_daemon.rpc")
    front = FrontEndServer(pki)  # its own interceptor: the summary line is not held back by another test's calls
    try:
        with _channel(pki, front, None) as channel:
            for _ in range(20):
                assert _refusal(channel)[0] == grpc.StatusCode.UNAUTHENTICATED
        with _channel(pki, front, "expired") as channel:
            assert _refusal(channel)[0] == grpc.StatusCode.UNAUTHENTICATED
        time.sleep(0.1)  # the request log is written in batches
    finally:
        front.close()
    assert [(e.action, e.reason) for e in front.denials] == [("access.deny", "client-certificate-expired")]
    lines = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.rpc"]
    assert sum("without a client certificate" in line for line in lines) == 1, lines  # one line for the 20 calls
    assert sum(line.startswith("rpc ") and "UNAUTHENTICATED" in line for line in lines) == 1, lines  # the expired caller's


def test_a_client_certificate_with_a_name_that_is_not_utf8_is_a_counted_refusal_not_a_traceback(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate from a trusted client CA whose SAN URI holds a byte that is not UTF-8 (OpenSSL verifies it): asyncio's
    handshake reads the peer certificate as text, and the UnicodeDecodeError escaped the front end. Each such connection
    logged two ERROR tracebacks ('SSL handshake failed', 'Unhandled exception in client_connected_cb'), unthrottled, and
    was not counted in the refused-handshakes metric."""
    from tests.csr_forge import oid, seq, tlv

    key = ec.generate_private_key(ec.SECP256R1())
    draft = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "latin")]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:client:latin")]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())
    )
    tbs = draft.tbs_certificate_bytes.replace(b"urn:client:latin", b"urn:client:l\xe4tin")  # Latin-1 'ä'
    der = seq(tbs, seq(oid("1.2.840.10045.4.3.2")), tlv(0x03, b"\x00" + pki.ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))))
    (tmp_path / "latin.pem").write_text(ssl.DER_cert_to_PEM_cert(der))
    (tmp_path / "latin.key").write_bytes(Issued(draft, key).key_pem())
    caplog.set_level(logging.INFO)
    refusals: list[str] = []
    server = FrontEndServer(pki, count_refused_handshake=refusals.append)
    try:
        for _ in range(3):
            _handshake(Pki(pki.ca, pki.old_ca, pki.server, pki.clients, tmp_path), server.port, client="latin")
        deadline = time.monotonic() + 10
        while len(refusals) < 3:
            assert time.monotonic() < deadline, refusals
            time.sleep(0.02)
        with _channel(pki, server, "alice") as channel:
            assert _sign(channel) == b"signed:x"
    finally:
        server.close()
    assert refusals == ["bad-client-certificate"] * 3
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors
    lines = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.tls_front"]
    assert len(lines) == 1 and "refused (bad-client-certificate): a name in the client certificate is not UTF-8" in lines[0], lines
