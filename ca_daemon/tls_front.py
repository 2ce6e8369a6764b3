"""TLS 1.3 termination in front of a worker's gRPC server, so that mTLS refusals are gRPC statuses.

Why not grpcio's own TLS: `grpc.ssl_server_credentials` offers only "require and verify a
client certificate" or "do not ask for one", and no minimum protocol version. With the
first, a caller without a certificate (or with an expired one) is cut off in the handshake
and sees UNAVAILABLE, with nothing in our log or audit trail; a TLS 1.2 caller is only
refused per call. Python's `ssl` can do what we need: ask for a certificate without
requiring one (CERT_OPTIONAL), accept TLS 1.3 only, and leave validity dates to us
(X509_V_FLAG_NO_CHECK_TIME), so the authenticator can answer UNAUTHENTICATED with the reason.

Each client connection is handshaken here and then relayed byte for byte to the worker's
plaintext gRPC port on loopback, over a connection of its own. The backend connection's
local port is the key under which we keep the client's certificate and protocol version;
the interceptor finds them from the call's peer address (`ipv4:127.0.0.1:PORT`). A
connection to the backend port that did not come through here has no entry and is refused.

One client address (an IPv4 address, an IPv6 /64) may open `handshakes_per_client` connections a second
in a worker, in bursts of twice as many; one more is closed before its handshake, which costs the client
nothing and us almost nothing. A handshake costs a worker its key exchange, its signature and the client
chain's verification, on the loop that also answers Sign: a station that reconnects in a tight loop (no
backoff after an error) took a worker's CPU from every other line.

A worker holds at most `max_connections` client connections (handshaking ones included);
one more is closed at once, so a flood of idle or half-open connections costs a bounded
amount of memory and file descriptors. A connection without a client certificate is let
through only to be told why it is refused: at most one in 16 of those slots, each for 10 s.
Without these bounds anyone who reached the port held a slot for as long as it liked (the
certificate is optional in the handshake), and 2,048 such idle connections locked every
authenticated caller out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ca_daemon.logs import LogThrottle
from ca_daemon.peers import ClientRate, client_address

log = logging.getLogger(__name__)

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the handshake checks signatures and the chain, and
# access.Authenticator checks the dates of the certificate and of the client CAs it chains to.
_NO_CHECK_TIME = 0x200000
_HANDSHAKE_TIMEOUT_S = 10.0
# A connection that presented no client certificate is closed this long after its handshake: long enough for
# its calls to be answered UNAUTHENTICATED with the reason, too short to hold a slot.
UNCERTIFIED_LIFETIME_S = 10.0
# The share of max_connections that connections without a client certificate may hold at once.
_UNCERTIFIED_SHARE = 16
# The backend's peer string for our relays' connections: they connect from 127.0.0.1 to 127.0.0.1.
_RELAY_PEER_HOST = "ipv4:127.0.0.1"
_CHUNK = 256 * 1024
# Connections refused for the limit are logged at most this often, with how many there were;
# so are refused handshakes, per reason (see handshake_refusal_reason).
_REFUSAL_LOG_INTERVAL_S = 10.0
# OpenSSL X509_V_ERR_* codes meaning "the chain does not lead to a client CA we trust": unable to
# get the issuer (2, 20), self-signed leaf (18), self-signed certificate in chain (19), and unable
# to verify the leaf's signature (21, a lone certificate whose issuer is unknown).
_UNKNOWN_ISSUER_CODES = frozenset({2, 18, 19, 20, 21})
# OpenSSL reason names of a TLS version or protocol we do not speak (TLS 1.2 and older, plaintext
# HTTP or gRPC to the TLS port, no common ALPN protocol or cipher).
_PROTOCOL_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "WRONG_VERSION_NUMBER",
        "VERSION_TOO_LOW",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "NO_SHARED_CIPHER",
        "NO_APPLICATION_PROTOCOL",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "TLSV1_ALERT_NO_APPLICATION_PROTOCOL",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LENGTH_MISMATCH",
    }
)
# The alerts a client sends when it does not accept the server's certificate.
_SERVER_CERTIFICATE_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
    }
)
# Refusals that say nothing about a client's credentials or software (a port probe, a client
# that gave up): logged at INFO; every other reason is a misconfigured client or server, WARNING.
_QUIET_REASONS = frozenset({"closed", "timeout"})
# Every name handshake_refusal_reason returns. The metric exposes each at 0 from the start: a series that
# first appears at 1 has no increase for Prometheus, so the first refusal of a kind would alert no one.
REFUSAL_REASONS = ("unknown-ca", "bad-client-certificate", "server-certificate-rejected", "protocol", "timeout", "closed", "other")
# The front end's own limits, by the name its closures are counted (and logged) under: server.max_connections
# reached, a client address over server.tls_handshakes_per_client, the share of connections without a certificate.
CLOSING_LIMITS = ("connection-limit", "handshake-rate", "uncertified-limit")

# _NOT_UTF8: asyncio ends the handshake by reading the peer certificate as text (SSLObject.getpeercert()), and a
# name in it that is not UTF-8 (a Latin-1 SAN from a client CA we trust; OpenSSL verifies it) raises
# UnicodeDecodeError, not an ssl.SSLError. Uncaught, each such connection logged two ERROR tracebacks, unthrottled,
# and was not counted; it is a refused handshake (bad-client-certificate) like any other, and asyncio's own
# report of it is left out (_quiet_undecodable_certificates).
_ASYNCIO_HANDSHAKE_FAILED = "SSL handshake failed"

AuthContext = Mapping[str, Iterable[bytes]]
_NO_CONTEXT: AuthContext = {}


def tls13_server_context(cert_file: Path, key_file: Path, client_ca_file: Path) -> ssl.SSLContext:
    """A server context that accepts TLS 1.3 only and trusts client_ca_file for client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cafile=client_ca_file)
    return context


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path) -> ssl.SSLContext:
    """TLS 1.3 only, HTTP/2 by ALPN, client certificates asked for and chain-verified when sent."""
    context = tls13_server_context(cert_file, key_file, client_ca_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags = ssl.VerifyFlags(context.verify_flags | _NO_CHECK_TIME)
    context.set_alpn_protocols(["h2"])
    return context


class TlsFrontEnd:
    """Accepts TLS on the public address and relays each connection to the gRPC backend."""

    def __init__(
        self,
        context: ssl.SSLContext,
        max_connections: int,
        cert_file: Path | None = None,
        *,
        count_refused_handshake: Callable[[str], None] = lambda reason: None,
        count_closed_connection: Callable[[str], None] = lambda limit: None,
        log_interval: float = _REFUSAL_LOG_INTERVAL_S,
        uncertified_lifetime: float = UNCERTIFIED_LIFETIME_S,
        handshakes_per_client: int = 0,
    ) -> None:
        self._context = context
        # 0: no limit (tests of other bounds); the daemon passes server.tls_handshakes_per_client.
        self._handshake_rate = ClientRate(handshakes_per_client, 2 * handshakes_per_client) if handshakes_per_client else None
        # The server certificate file that context was made from (the expiry warning reads it).
        self.cert_file = cert_file
        self._max_connections = max_connections
        self._max_uncertified = max(1, max_connections // _UNCERTIFIED_SHARE)
        self._uncertified = 0  # open connections without a client certificate
        self._uncertified_lifetime = uncertified_lifetime
        self._count_refused_handshake = count_refused_handshake
        self._count_closed_connection = count_closed_connection
        self._refusal_lines = LogThrottle(log_interval)
        self._backend_port = 0
        self._peers: dict[int, AuthContext] = {}
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, *, backend_port: int) -> int:
        """Listen on host:port (shared with the other workers: SO_REUSEPORT); the port bound."""
        self._backend_port = backend_port
        _quiet_undecodable_certificates(asyncio.get_running_loop())
        self._server = await asyncio.start_server(self._accept, host, port, reuse_port=True, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    def replace_context(self, context: ssl.SSLContext, cert_file: Path | None) -> None:
        """Handshake new connections with context (a reloaded certificate, key or client CA bundle) made from cert_file.

        Connections already open keep the session they negotiated.
        """
        self._context = context
        self.cert_file = cert_file

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        """Cut the connections still open (after the gRPC server's grace period)."""
        self.stop_accepting()
        for task in list(self._relays):
            task.cancel()
        if self._relays:
            await asyncio.gather(*self._relays, return_exceptions=True)

    def auth_context_of(self, peer: str) -> AuthContext:
        """What the TLS handshake of the client behind a backend peer address established.

        Empty (no TLS, no certificate) for an address that is not one of our relays. Our relays connect
        from 127.0.0.1 exactly: a local process can connect from another 127.0.0.0/8 address with the
        port number of one of them (visible in /proc/net/tcp), and a prefix match gave it that client's identity.
        """
        host, _, port = peer.rpartition(":")
        if host != _RELAY_PEER_HOST or not port.isdigit():
            return _NO_CONTEXT
        return self._peers.get(int(port), _NO_CONTEXT)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._handshake_rate is not None and not self._handshake_rate.admit(client_address(writer.get_extra_info("peername"))):
            self._refuse_too_fast(writer)
            return
        if len(self._relays) >= self._max_connections:
            self._refuse_over_limit(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._serve_connection(reader, writer)
        finally:
            self._relays.discard(task)
            writer.close()

    def _refuse_over_limit(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection beyond the limit; say so in the log, at most once per interval."""
        writer.close()
        limit = f"connection limit reached (server.max_connections = {self._max_connections} open connections in this worker)"
        message = f"{limit}: closed %d new connection(s), the last from %s"
        self._closed_at_limit("connection-limit", message, writer.get_extra_info("peername"))

    def _refuse_too_fast(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection its client opened beyond its rate, before any handshake; logged at most once per interval."""
        writer.close()
        assert self._handshake_rate is not None
        rate = self._handshake_rate.rate
        limit = f"server.tls_handshakes_per_client = {rate:g} new connections a second from one client address in this worker"
        self._closed_at_limit(
            "handshake-rate",
            f"{limit}, in bursts of {2 * rate:g}: closed %d before their handshake, the last from %s",
            writer.get_extra_info("peername"),
        )

    def _closed_at_limit(self, kind: str, message: str, client: object) -> None:
        """Count a connection closed by the limit kind (one of CLOSING_LIMITS); log message (with %d for how many were
        closed, %s for the last one's address) at most once per interval for kind."""
        self._count_closed_connection(kind)
        held_back = self._refusal_lines.admit(kind)
        if held_back is not None:
            log.warning(message, held_back + 1, _address(client))

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")
        try:
            await writer.start_tls(self._context, ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S)
        except (OSError, TimeoutError, UnicodeDecodeError) as exc:  # ssl.SSLError is an OSError; see _NOT_UTF8
            self._handshake_refused(client, exc)
            return
        auth = auth_context(writer.get_extra_info("ssl_object"))
        if "x509_pem_cert" in auth:
            await self._relay_to_backend(auth, reader, writer, lifetime=None)
            return
        if self._uncertified >= self._max_uncertified:
            self._refuse_uncertified(client)
            return
        self._uncertified += 1
        try:
            await self._relay_to_backend(auth, reader, writer, lifetime=self._uncertified_lifetime)
        finally:
            self._uncertified -= 1

    def _refuse_uncertified(self, client: object) -> None:
        """Close a connection without a client certificate beyond its share of the slots; logged at most once per interval."""
        share = (
            f"{self._max_uncertified} connection(s) without a client certificate are open in this worker "
            f"(at most 1/{_UNCERTIFIED_SHARE} of server.max_connections)"
        )
        self._closed_at_limit("uncertified-limit", f"{share}: closed %d more after their handshake, the last from %s", client)

    async def _relay_to_backend(
        self, auth: AuthContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, lifetime: float | None
    ) -> None:
        """Relay until either side closes, or lifetime seconds have passed (None: no limit)."""
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self._backend_port)
        except OSError as exc:
            log.error("cannot reach this worker's gRPC backend on 127.0.0.1:%d: %s", self._backend_port, exc)
            return
        local_port = int(backend_writer.get_extra_info("sockname")[1])
        self._peers[local_port] = auth  # before the first byte reaches the backend
        try:
            upstream = asyncio.create_task(_relay(reader, backend_writer))
            downstream = asyncio.create_task(_relay(backend_reader, writer))
            try:
                await asyncio.wait({upstream, downstream}, timeout=lifetime, return_when=asyncio.FIRST_COMPLETED)
            finally:
                upstream.cancel()
                downstream.cancel()
                await asyncio.gather(upstream, downstream, return_exceptions=True)
        finally:
            if self._peers.get(local_port) is auth:
                del self._peers[local_port]
            backend_writer.close()

    def _handshake_refused(self, client: object, exc: BaseException) -> None:
        """Count a refused handshake by reason (a metric to alert on); log it, at most one line per reason per interval.

        Not an audit event: the caller is not authenticated yet, and anyone who can reach the
        port could otherwise grow the tamper-evident log at will. The first refusal for a
        reason is logged at once, later ones with the number left out since its last line.
        """
        reason = handshake_refusal_reason(exc)
        self._count_refused_handshake(reason)
        held_back = self._refusal_lines.admit(reason)
        if held_back is None:
            return
        log.log(
            logging.INFO if reason in _QUIET_REASONS else logging.WARNING,
            "TLS handshake with %s refused (%s): %s%s",
            _address(client),
            reason,
            _reason(exc),
            f" ({held_back} more refused for this reason since the last such line)" if held_back else "",
        )


def _quiet_undecodable_certificates(loop: asyncio.AbstractEventLoop) -> None:
    """Leave out asyncio's ERROR report of a handshake that failed on a client certificate name that is not UTF-8.

    TlsFrontEnd counts and logs that refusal itself (see _NOT_UTF8); every other report goes where it went.
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ASYNCIO_HANDSHAKE_FAILED and isinstance(context.get("exception"), UnicodeDecodeError):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def handshake_refusal_reason(exc: BaseException) -> str:
    """Why a server-side TLS handshake failed, as one of a few stable names (the metric's label).

    unknown-ca: the client's certificate does not chain to `tls.client_ca`;
    bad-client-certificate: it chains, but fails another check (signature, purpose, ...);
    server-certificate-rejected: the client refused *our* certificate (expired, or not signed by
    the CA the client trusts): every client of that kind is locked out until tls.cert is fixed;
    protocol: not TLS 1.3 with HTTP/2 (an old TLS version, plaintext, no common protocol);
    timeout: no handshake within 10 s; closed: the client went away mid-handshake; other.
    """
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, UnicodeDecodeError):
        return "bad-client-certificate"  # see _NOT_UTF8
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "unknown-ca" if exc.verify_code in _UNKNOWN_ISSUER_CODES else "bad-client-certificate"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _PROTOCOL_REASONS:
            return "protocol"
        if reason in _SERVER_CERTIFICATE_ALERTS:
            return "server-certificate-rejected"
        if reason == "UNEXPECTED_EOF_WHILE_READING" or isinstance(exc, ssl.SSLEOFError):
            return "closed"
        return "other"
    if isinstance(exc, ConnectionError | EOFError):
        return "closed"
    return "other"


async def _relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy bytes until end of stream or a broken connection."""
    with contextlib.suppress(OSError, ConnectionError):
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()


def auth_context(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> AuthContext:
    """The same keys grpcio's auth context uses, so access.Authenticator reads either (the metrics endpoint too)."""
    if ssl_object is None:
        return _NO_CONTEXT
    context: dict[str, tuple[bytes, ...]] = {"ssl_tls_version": ((ssl_object.version() or "").encode(),)}
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        context["x509_pem_cert"] = (ssl.DER_cert_to_PEM_cert(der).encode(),)
    return context


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"a name in the client certificate is not UTF-8 ({exc.reason} at byte {exc.start})"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


__all__ = [
    "CLOSING_LIMITS",
    "REFUSAL_REASONS",
    "AuthContext",
    "TlsFrontEnd",
    "auth_context",
    "handshake_refusal_reason",
    "server_context",
    "tls13_server_context",
]
