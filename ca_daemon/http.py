"""CRL and CA certificate distribution over plain HTTP (RFC 5280 CDP/AIA URLs are http://).

Stdlib asyncio only: the server answers GET and HEAD for a handful of fixed paths from
bytes already in memory (the last published CRLs, the CA certificates), so it needs no
framework; it never builds anything per request. Each resource carries an ETag (issuer
and CRL number) and Last-Modified (thisUpdate); If-None-Match and If-Modified-Since
give 304. One request per connection keeps the parser small and the server hard to tie up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import urlsplit

from ca_daemon.logs import LogThrottle

log = logging.getLogger(__name__)

_MAX_HEAD_BYTES = 8192
_READ_TIMEOUT_S = 10.0
_MAX_DROPPED_BYTES = 1 << 20  # of an oversized request, read and dropped before the connection is closed
# The port is public and shares the primary worker's event loop with Sign. Connections beyond
# this many at once close the one waiting longest for its request head, or if every one is being
# answered, are answered 503 at once; a response goes out in chunks, each of which must
# leave within the stall timeout, so a client that stops reading holds one chunk, not a copy of a
# CRL of a million entries (asyncio's transport buffers whatever the socket does not take).
MAX_CONNECTIONS = 512
WRITE_STALL_S = 30.0
_CHUNK_BYTES = 64 * 1024
# The stall timeout alone let a client read one chunk per 29 s and hold its place for hours of a large CRL.
# The whole response must also leave within SEND_BASE_S + its size at MIN_SEND_RATE (nginx's send_timeout
# and Apache mod_reqtimeout's minrate in one): 16 KiB/s (128 kbit/s) is below any link a relying party
# fetches CRLs over, yet holding all 512 places costs a client 8 MiB/s of reading; the base gives a slow
# start or a lossy link the same grace as one chunk. A 1 MB CRL: 91 s; 16 MiB: about 18 minutes.
SEND_BASE_S = 30.0
MIN_SEND_RATE = 16 * 1024  # bytes per second
_DROP_LOG_INTERVAL_S = 60.0  # a client dropped for reading too slowly: at most one log line per interval
_RETRY_BIND_S = 5.0
CRL_CONTENT_TYPE = "application/pkix-crl"
CERT_CONTENT_TYPE = "application/pkix-cert"


@dataclass(frozen=True)
class Resource:
    """One immutable response body with its validators."""

    body: bytes
    content_type: str
    etag: str
    last_modified: datetime
    # Seconds a cache may keep it; 0 means revalidate.
    max_age: int = 0
    # A CRL's nextUpdate: each response's max-age ends there at the latest, counted from when it is sent.
    expires: datetime | None = None

    def max_age_at(self, now: datetime) -> int:
        if self.expires is None:
            return self.max_age
        return max(0, min(self.max_age, int((self.expires - now).total_seconds())))

    @classmethod
    def certificate(cls, der: bytes, not_before: datetime) -> Resource:
        return cls(der, CERT_CONTENT_TYPE, '"' + hashlib.sha256(der).hexdigest()[:32] + '"', not_before, max_age=3600)


def url_path(url: str) -> str:
    return urlsplit(url).path or "/"


class DistributionServer:
    """Serves the resources set with `set`; binds on start and keeps retrying if the port is taken."""

    def __init__(
        self,
        listen: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        write_stall_s: float = WRITE_STALL_S,
        send_base_s: float = SEND_BASE_S,
        min_send_rate: float = MIN_SEND_RATE,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._max_connections = max_connections
        self._write_stall_s = write_stall_s
        self._send_base_s = send_base_s
        self._min_send_rate = min_send_rate
        self._drop_lines = LogThrottle(_DROP_LOG_INTERVAL_S)
        self._connections: set[asyncio.StreamWriter] = set()  # being answered (MAX_CONNECTIONS)
        # Those of them still waiting for their request head, oldest first (see _make_room).
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._resources: dict[str, Resource] = {}
        self._server: asyncio.Server | None = None
        self._binder: asyncio.Task[None] | None = None
        self.error = ""

    @property
    def bound(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def set(self, path: str, resource: Resource) -> None:
        self._resources[path] = resource

    def remove(self, path: str, *, if_body: bytes) -> None:
        """Stop serving path (404 from now on) if it still serves if_body, not whatever replaced it."""
        resource = self._resources.get(path)
        if resource is not None and resource.body == if_body:
            del self._resources[path]

    async def start(self) -> None:
        """Bind now if possible; otherwise log, report unhealthy and keep trying in the background."""
        if not await self._try_bind():
            self._binder = asyncio.get_running_loop().create_task(self._keep_binding(), name="http-bind")

    async def _try_bind(self) -> bool:
        try:
            self._server = await asyncio.start_server(self._handle, self._host, self._port, reuse_address=True)
        except OSError as exc:
            message = f"cannot serve CRLs over HTTP on {self._host}:{self._port}: {exc.strerror}"
            if message != self.error:
                log.error("%s; retrying every %.0f s", message, _RETRY_BIND_S)
            self.error = message
            return False
        self.error = ""
        log.info("serving CRLs and CA certificates over HTTP on %s:%d", self._host, self.port)
        return True

    async def _keep_binding(self) -> None:
        while not await self._try_bind():
            await asyncio.sleep(_RETRY_BIND_S)

    async def stop(self) -> None:
        if self._binder is not None:
            self._binder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._binder
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):  # wait_closed waits for every connection: a stalled client held it
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def _make_room(self) -> bool:
        """At the limit, close the connection that has waited longest for its request head; False if none waits.

        Idle connections each held a place for the head timeout (10 s): one host opening connections and
        sending nothing answered every other relying party 503. A client sends its head at once; one that has
        not is the one to go. Connections being answered (a large CRL going out) keep their place.
        """
        if not self._waiting:
            return False
        oldest = next(iter(self._waiting))
        del self._waiting[oldest]
        self._connections.discard(oldest)
        oldest.transport.abort()
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections and not self._make_room():
            writer.write(_head("503 Service Unavailable", [("Retry-After", "1"), ("Content-Length", "0")]))
            # Closing with the request unread would reset the connection and discard the answer: wait a moment for it.
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=1.0)
            writer.close()
            return
        self._connections.add(writer)
        self._waiting[writer] = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=_READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:  # a head beyond the reader's buffer (64 KiB): answered like one over _MAX_HEAD_BYTES
            self._waiting.pop(writer, None)
            await self._refuse_unread(reader, writer, "431 Request Header Fields Too Large")
            return
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):  # gone, silent, or closed by _make_room
            self._waiting.pop(writer, None)
            self._connections.discard(writer)
            writer.close()
            return
        self._waiting.pop(writer, None)
        try:
            status, headers, body = self._respond(head)
            writer.write(_head(status, headers))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._send_base_s + len(body) / self._min_send_rate
            view = memoryview(body)
            for start in range(0, len(view), _CHUNK_BYTES):
                await self._drain(writer, deadline, head)
                writer.write(view[start : start + _CHUNK_BYTES])
            await self._drain(writer, deadline, head)
        except TimeoutError:  # the client stopped reading or fell behind: drop what is buffered rather than flush it on close
            _reset(writer)
        except ConnectionError:
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _drain(self, writer: asyncio.StreamWriter, deadline: float, head: bytes) -> None:
        """Wait for the client to take what is buffered: TimeoutError after the stall timeout, or at the response's
        deadline (logged: a client that reads, but too slowly, is the one a person may want to know about)."""
        left = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(writer.drain(), timeout=max(0.0, min(self._write_stall_s, left)))
        except TimeoutError:
            if left <= self._write_stall_s:
                self._log_too_slow(writer, head)
            raise

    def _log_too_slow(self, writer: asyncio.StreamWriter, head: bytes) -> None:
        held_back = self._drop_lines.admit("too-slow")
        if held_back is None:
            return
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        log.warning(
            "HTTP client %s dropped: it read %r too slowly (under %.0f bytes/s after the first %.0f s)%s",
            client,
            head.split(b"\r\n", 1)[0].decode("latin-1")[:200],
            self._min_send_rate,
            self._send_base_s,
            f" ({held_back} more dropped since the last such line)" if held_back else "",
        )

    async def _refuse_unread(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: str) -> None:
        """Answer status and close; the rest of the request is read and dropped for a moment first, since
        closing with it unread resets the connection and the client would lose the answer."""
        status_line, headers, body = _plain(status)
        writer.write(_head(status_line, headers) + body)
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(1.0):
                await writer.drain()
                dropped = 0
                while dropped < _MAX_DROPPED_BYTES and (chunk := await reader.read(65536)):
                    dropped += len(chunk)
        self._connections.discard(writer)
        writer.close()

    def _respond(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        if len(head) > _MAX_HEAD_BYTES:
            return _plain("431 Request Header Fields Too Large")
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ")
        except ValueError:
            return _plain("400 Bad Request")
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            status, out, body = _plain("405 Method Not Allowed")
            return status, [*out, ("Allow", "GET, HEAD")], body
        try:
            path = urlsplit(target).path
        except ValueError:  # e.g. an unclosed IPv6 bracket: an answer, not a traceback in the log
            return _plain("400 Bad Request")
        resource = self._resources.get(path)
        if resource is None:
            return _plain("404 Not Found")
        max_age = resource.max_age_at(datetime.now(UTC))
        out = [
            ("Content-Type", resource.content_type),
            ("ETag", resource.etag),
            ("Last-Modified", format_datetime(resource.last_modified.astimezone(UTC), usegmt=True)),
            ("Cache-Control", f"public, max-age={max_age}" if max_age else "no-cache"),
        ]
        if _not_modified(resource, headers):
            return "304 Not Modified", out, b""
        out.append(("Content-Length", str(len(resource.body))))
        return "200 OK", out, b"" if method == "HEAD" else resource.body


def _not_modified(resource: Resource, headers: dict[str, str]) -> bool:
    if "if-none-match" in headers:  # RFC 9110 13.1.3: If-None-Match takes precedence
        tags = [t.strip().removeprefix("W/") for t in headers["if-none-match"].split(",")]
        return "*" in tags or resource.etag in tags
    since = headers.get("if-modified-since")
    if since:
        try:
            since_at = parsedate_to_datetime(since)
            if since_at.tzinfo is None:  # asctime ("Sun Nov  6 08:49:37 1994"), which RFC 9110 5.6.7 has us accept, is GMT
                since_at = since_at.replace(tzinfo=UTC)
            # A date later than the server's clock is invalid (RFC 2616 14.25; Apache ignores it too): it is the
            # Last-Modified of a CRL dated ahead by a clock that was wrong, and its replacement must not get 304.
            return since_at <= datetime.now(UTC) and resource.last_modified.replace(microsecond=0) <= since_at
        except (TypeError, ValueError):
            return False
    return False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset: a plain close still has the kernel send what the socket buffered, up to megabytes
    (tcp_wmem) to a client that was dropped for not taking them."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _head(status: str, headers: list[tuple[str, str]]) -> bytes:
    # Date: an origin server with a clock must send it (RFC 9110 6.6.1); a cache counts a response's age from it.
    date = format_datetime(datetime.now(UTC), usegmt=True)
    lines = [f"HTTP/1.1 {status}", f"Date: {date}", *(f"{k}: {v}" for k, v in headers), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _plain(status: str) -> tuple[str, list[tuple[str, str]], bytes]:
    body = (status + "\n").encode()
    return status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))], body


__all__ = ["CERT_CONTENT_TYPE", "CRL_CONTENT_TYPE", "DistributionServer", "Resource", "url_path"]
