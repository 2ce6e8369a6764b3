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
import re
import socket
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from ca_daemon.http_paths import request_path
from ca_daemon.logs import LogThrottle
from ca_daemon.peers import client_address

log = logging.getLogger(__name__)

_MAX_HEAD_BYTES = 8192
_MAX_HEADER_LINES = 100  # as Apache's LimitRequestFields and http.client; no CRL fetcher sends a tenth of it
_READ_TIMEOUT_S = 10.0
_MAX_DROPPED_BYTES = 1 << 20  # of an oversized request, read and dropped before the connection is closed
# The port is public and shares the primary worker's event loop with Sign. Connections beyond
# this many at once close the one waiting longest for its request head, or if every one is being
# answered, are answered 503 at once; a response goes out in chunks, each of which must
# leave within the stall timeout, so a client that stops reading holds one chunk, not a copy of a
# CRL of a million entries (asyncio's transport buffers whatever the socket does not take).
MAX_CONNECTIONS = 512
# One host asking for a large CRL on every connection and reading nothing held all of them (reconnecting each time the
# stall timeout dropped one): everyone else got 503. A client address may hold this share at once; one more is answered
# 503 at once. An IPv6 address counts by its /64, which one host or site is given whole and may pick addresses from at
# will. Relying parties behind one NAT or proxy address share it: a download holds a connection only while it lasts,
# and a caching proxy or CDN holds one per CRL it refreshes, so 32 downloads at once from one address is already far
# beyond what CRL fetching needs.
MAX_PER_CLIENT = MAX_CONNECTIONS // 16
# A connection turned away with 503 waits up to a second for its request (closing with it unread would reset the
# connection and lose the answer). Uncounted, a flood of connections beyond the limit held a task and a socket each:
# beyond this many at once, one is closed without an answer.
MAX_TURNED_AWAY = MAX_CONNECTIONS // 8
_TURN_AWAY_WAIT_S = 1.0
_STOP_WAIT_S = 1.0  # for the handlers of the connections stop() closed: each ends within a loop iteration or two
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
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")  # RFC 9112 2.3, case-sensitive
_SUPPORTED_VERSIONS = ("HTTP/1.0", "HTTP/1.1")
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.1: a token


class _HeadTooLarge(Exception):
    """The request head passed _MAX_HEAD_BYTES or _MAX_HEADER_LINES: answered 431."""


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
        max_per_client: int = MAX_PER_CLIENT,
        max_turned_away: int = MAX_TURNED_AWAY,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._max_connections = max_connections
        self._write_stall_s = write_stall_s
        self._send_base_s = send_base_s
        self._min_send_rate = min_send_rate
        self._max_per_client = max_per_client
        self._max_turned_away = max_turned_away
        self._drop_lines = LogThrottle(_DROP_LOG_INTERVAL_S)
        # Being answered (MAX_CONNECTIONS), each with the client address it counts against (MAX_PER_CLIENT).
        self._connections: dict[asyncio.StreamWriter, str] = {}
        self._per_client: dict[str, int] = {}
        self._turned_away: set[asyncio.StreamWriter] = set()  # being answered 503 (MAX_TURNED_AWAY)
        self._handlers: set[asyncio.Task[Any]] = set()  # of every connection above, for stop() to wait for
        self._stopping = False
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
        """Serve resource at path, which may be percent-encoded as in a URL of the configuration."""
        self._resources[unquote(path)] = resource  # requests are routed by their decoded path

    def remove(self, path: str, *, if_body: bytes) -> None:
        """Stop serving path (404 from now on) if it still serves if_body, not whatever replaced it."""
        path = unquote(path)
        resource = self._resources.get(path)
        if resource is not None and resource.body == if_body:
            del self._resources[path]

    async def start(self) -> None:
        """Bind now if possible; otherwise log, report unhealthy and keep trying in the background."""
        self._stopping = False
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
        """Stop listening, close every connection (being answered, waiting or turned away) and wait for their handlers."""
        self._stopping = True
        if self._binder is not None:
            self._binder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._binder
        if self._server is not None:
            self._server.close()
            for writer in [*self._connections, *self._turned_away]:  # a stalled client held wait_closed (3.12)
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None
        if self._handlers:  # Python 3.11's wait_closed does not wait for them
            await asyncio.wait(set(self._handlers), timeout=_STOP_WAIT_S)

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
        self._release(oldest)
        oldest.transport.abort()
        return True

    def _release(self, writer: asyncio.StreamWriter) -> None:
        """writer no longer holds a place, nor counts against its client address; a second call does nothing."""
        client = self._connections.pop(writer, None)
        if client is not None:
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, tracked so that stop() can wait for its end; one accepted as the server stops is closed."""
        task = asyncio.current_task()
        if self._stopping or task is None:
            writer.transport.abort()
            return
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = client_address(writer.get_extra_info("peername"))
        held = self._per_client.get(client, 0)
        if held >= self._max_per_client:  # before _make_room: a client over its share closes no one else's connection
            self._log_over_share(client, held)
            await self._turn_away(reader, writer)
            return
        if len(self._connections) >= self._max_connections and not self._make_room():
            self._log_full(client)
            await self._turn_away(reader, writer)
            return
        self._connections[writer] = client
        self._per_client[client] = held + 1
        self._waiting[writer] = None
        try:
            lines = await asyncio.wait_for(_read_head(reader), timeout=_READ_TIMEOUT_S)
        except (asyncio.LimitOverrunError, _HeadTooLarge):  # LimitOverrunError: a line beyond the reader's buffer (64 KiB)
            self._waiting.pop(writer, None)
            reason = f"more than {_MAX_HEAD_BYTES} bytes or {_MAX_HEADER_LINES} header lines"
            await self._refuse_unread(reader, writer, "431 Request Header Fields Too Large", reason)
            return
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):  # gone, silent, or closed by _make_room
            self._waiting.pop(writer, None)
            self._release(writer)
            writer.close()
            return
        self._waiting.pop(writer, None)
        try:
            status, headers, body = self._respond(lines)
            writer.write(_head(status, headers))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._send_base_s + len(body) / self._min_send_rate
            view = memoryview(body)
            for start in range(0, len(view), _CHUNK_BYTES):
                await self._drain(writer, deadline, lines[0])
                writer.write(view[start : start + _CHUNK_BYTES])
            await self._drain(writer, deadline, lines[0])
        except TimeoutError:  # the client stopped reading or fell behind: drop what is buffered rather than flush it on close
            _reset(writer)
        except ConnectionError:
            pass
        finally:
            self._release(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _turn_away(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer 503 with Retry-After: an answer HTTP clients and caches retry on, where a bare close looks like a fault.
        Beyond MAX_TURNED_AWAY at once, close at once."""
        if len(self._turned_away) >= self._max_turned_away:
            self._log_throttled(
                "flood",
                "HTTP connection from %s closed without an answer: %d connections are already being turned away with 503",
                client_address(writer.get_extra_info("peername")),
                len(self._turned_away),
            )
            writer.transport.abort()
            return
        self._turned_away.add(writer)
        try:
            writer.write(_head("503 Service Unavailable", [("Retry-After", "1"), ("Content-Length", "0")]))
            # Closing with the request unread would reset the connection and discard the answer: wait a moment for it.
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, _HeadTooLarge, TimeoutError, ConnectionError):
                await asyncio.wait_for(_read_head(reader), timeout=_TURN_AWAY_WAIT_S)
        finally:
            self._turned_away.discard(writer)
            writer.close()

    def _log_full(self, client: str) -> None:
        self._log_throttled(
            "full",
            "HTTP connection from %s answered 503: all %d connections are being answered (put a cache or CDN in front)",
            client,
            self._max_connections,
        )

    def _log_throttled(self, kind: str, message: str, *args: object) -> None:
        """A WARNING at most once per interval for each kind, counting the ones held back since."""
        held_back = self._drop_lines.admit(kind)
        if held_back is None:
            return
        log.warning(message + "%s", *args, f" ({held_back} more since the last such line)" if held_back else "")

    def _log_over_share(self, client: str, held: int) -> None:
        self._log_throttled(
            "over-share",
            "HTTP connection from %s answered 503: that address already holds %d connections, the limit per client address",
            client,
            held,
        )

    async def _drain(self, writer: asyncio.StreamWriter, deadline: float, request_line: bytes) -> None:
        """Wait for the client to take what is buffered: TimeoutError after the stall timeout, or at the response's
        deadline (logged: a client that reads, but too slowly, is the one a person may want to know about)."""
        left = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(writer.drain(), timeout=max(0.0, min(self._write_stall_s, left)))
        except TimeoutError:
            if left <= self._write_stall_s:
                self._log_too_slow(writer, request_line)
            raise

    def _log_too_slow(self, writer: asyncio.StreamWriter, request_line: bytes) -> None:
        held_back = self._drop_lines.admit("too-slow")
        if held_back is None:
            return
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        log.warning(
            "HTTP client %s dropped: it read %r too slowly (under %.0f bytes/s after the first %.0f s)%s",
            client,
            request_line.decode("latin-1")[:200],
            self._min_send_rate,
            self._send_base_s,
            f" ({held_back} more dropped since the last such line)" if held_back else "",
        )

    async def _refuse_unread(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: str, reason: str) -> None:
        """Answer status and close; the rest of the request is read and dropped for a moment first, since
        closing with it unread resets the connection and the client would lose the answer."""
        status_line, headers, body = _plain(status, reason)
        writer.write(_head(status_line, headers) + body)
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(1.0):
                await writer.drain()
                dropped = 0
                while dropped < _MAX_DROPPED_BYTES and (chunk := await reader.read(65536)):
                    dropped += len(chunk)
        self._release(writer)
        writer.close()

    def _respond(self, lines: list[bytes]) -> tuple[str, list[tuple[str, str]], bytes]:
        status, headers, body = self._answer(lines)
        if lines[0].startswith(b"HEAD "):  # RFC 9110 9.3.2: the same head, no content, whatever the status
            return status, headers, b""
        return status, headers, body

    def _answer(self, lines: list[bytes]) -> tuple[str, list[tuple[str, str]], bytes]:
        if any(b"\r" in line for line in lines):  # RFC 9112 2.2: a bare CR is invalid
            return _plain("400 Bad Request", "a bare CR in the request head")
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            return _plain("400 Bad Request", "the request line is not METHOD TARGET HTTP/1.1")
        if not _VERSION.fullmatch(version):
            return _plain("400 Bad Request", "the request line is not METHOD TARGET HTTP/1.1")
        if version not in _SUPPORTED_VERSIONS:
            return _plain("505 HTTP Version Not Supported", "this server speaks HTTP/1.0 and HTTP/1.1")
        headers: dict[str, str] = {}
        hosts = 0
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            # RFC 9112 5.1 and 5.2: a field name is a token right before the colon (no whitespace: a server must
            # refuse it, as proxies may read such a line differently); a line folded onto the one before is refused.
            if not sep or _FIELD_NAME.fullmatch(name) is None:
                return _plain("400 Bad Request", "a header line is not NAME: VALUE (no space before ':', no folded lines)")
            key = name.lower()
            hosts += key == "host"
            headers[key] = value.strip()
        if version == "HTTP/1.1" and hosts != 1:  # RFC 9112 3.2: a server must answer 400 to none or several
            return _plain("400 Bad Request", "an HTTP/1.1 request needs exactly one Host header")
        if method not in ("GET", "HEAD"):
            status, out, body = _plain("405 Method Not Allowed")
            return status, [*out, ("Allow", "GET, HEAD")], body
        try:
            path = request_path(target)
        except ValueError as exc:
            return _plain("400 Bad Request", str(exc))
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
        return "200 OK", out, resource.body


async def _read_head(reader: asyncio.StreamReader) -> list[bytes]:
    """The request line and header lines, without their ends; a line may end in CRLF or a bare LF (RFC 9112 2.2).

    Empty lines before the request line are skipped (ibid.). IncompleteReadError if the client goes first;
    _HeadTooLarge (or LimitOverrunError, for one line beyond the reader's buffer) past the limits.
    """
    lines: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\n")
        size += len(line)
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if line:
            lines.append(line)
        elif lines:
            return lines
        if size > _MAX_HEAD_BYTES or len(lines) > 1 + _MAX_HEADER_LINES:
            raise _HeadTooLarge


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


def _plain(status: str, reason: str = "") -> tuple[str, list[tuple[str, str]], bytes]:
    """A short plain-text answer: the status, and why where the status alone does not say."""
    body = (f"{status}: {reason}\n" if reason else f"{status}\n").encode()
    return status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))], body


__all__ = ["CERT_CONTENT_TYPE", "CRL_CONTENT_TYPE", "DistributionServer", "Resource", "url_path"]
