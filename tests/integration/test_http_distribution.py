"""The public CRL port under hostile clients: real sockets on loopback against DistributionServer.

The server runs on its own event loop in a thread, as in the primary worker, where it shares
the loop with Sign; the clients are plain blocking sockets that stop reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from ca_daemon.http import (
    CRL_CONTENT_TYPE,
    DistributionServer,
    Resource,
)
from ca_daemon.peers import client_address

BIG = 16 * 1024 * 1024  # about the size of a full CRL of 500,000 entries


class Running:
    """A DistributionServer serving /big.crl (16 MiB) and /small.crl on a free loopback port."""

    def __init__(self, **limits: Any) -> None:
        """limits: DistributionServer's keyword arguments (max_connections, write_stall_s, ...); its defaults otherwise."""
        self.server = DistributionServer("127.0.0.1:0", **limits)
        now = datetime.now(UTC)
        self.server.set("/big.crl", Resource(bytes(BIG), CRL_CONTENT_TYPE, '"big"', now))
        self.server.set("/small.crl", Resource(b"x" * 100, CRL_CONTENT_TYPE, '"small"', now))
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10) and self.server.bound

    def tasks(self) -> int:
        """Tasks on the server's loop: one per connection it handles."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)

    def stop(self) -> None:
        async def stop_all() -> None:
            await self.server.stop()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:  # connections still being answered
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def stalled() -> Iterator[list[socket.socket]]:
    """Client sockets that asked for something and then never read; closed at the end."""
    sockets: list[socket.socket] = []
    yield sockets
    for s in sockets:
        with contextlib.suppress(OSError):
            s.close()


def _stall(port: int, path: str) -> socket.socket:
    """Ask for path and read nothing: the client socket, with a small receive window."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return client


def _get(port: int, path: str) -> bytes:
    """The whole answer to a GET of path."""
    with _stall(port, path) as client:
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        return answer


def test_clients_that_stop_reading_a_big_crl_do_not_each_hold_a_copy_of_it(stalled: list[socket.socket]) -> None:
    """asyncio buffers what the socket does not take: each stalled download held about the whole CRL."""
    running = Running()
    try:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(4):
                stalled.append(_stall(running.server.port, "/big.crl"))
            time.sleep(1.0)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 4 * 1024 * 1024, f"{held / 2**20:.1f} MiB held for 4 stalled downloads of a {BIG / 2**20:.0f} MiB CRL"
        assert _get(running.server.port, "/small.crl").startswith(b"HTTP/1.1 200 OK")
    finally:
        running.stop()


def test_connections_beyond_the_limit_get_503_and_stalled_ones_are_dropped(stalled: list[socket.socket]) -> None:
    running = Running(max_connections=2, write_stall_s=1.0)
    try:
        for _ in range(2):
            stalled.append(_stall(running.server.port, "/big.crl"))
        time.sleep(0.3)
        refused = _get(running.server.port, "/small.crl")
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable") and b"Retry-After: 1" in refused, refused
        time.sleep(1.5)  # the stalled downloads exceed write_stall_s: dropped, their places free again
        assert _get(running.server.port, "/small.crl").startswith(b"HTTP/1.1 200 OK")
        for client in stalled:  # the server aborted them: what the client reads ends early
            received = 0
            with contextlib.suppress(ConnectionError):
                while chunk := client.recv(1 << 20):
                    received += len(chunk)
            assert received < BIG
    finally:
        running.stop()


def test_connections_that_send_nothing_make_room_for_one_that_asks(stalled: list[socket.socket]) -> None:
    """Each silent connection held a place for the 10 s head timeout: one host opening connections answered everyone 503."""
    running = Running(max_connections=2)
    try:
        for _ in range(2):
            silent = socket.create_connection(("127.0.0.1", running.server.port), timeout=10)
            stalled.append(silent)
            time.sleep(0.1)  # the first is the oldest
        answer = _get(running.server.port, "/small.crl")
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:80]
        oldest = stalled[0]
        with contextlib.suppress(ConnectionError):
            assert oldest.recv(1) == b""  # closed by the server to make room
        # Both places taken by downloads being answered: a newcomer is still refused, and makes no room by closing one.
        stalled.extend(_stall(running.server.port, "/big.crl") for _ in range(2))
        time.sleep(0.3)
        refused = _get(running.server.port, "/small.crl")
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable"), refused[:80]
    finally:
        running.stop()


def test_a_withdrawn_crl_is_taken_down_only_where_it_is_still_served() -> None:
    """A retired key's delta is withdrawn; another key's CRL served at a shared path since then stays."""
    running = Running()
    try:
        now = datetime.now(UTC)
        running.server.set("/shared-delta.crl", Resource(b"newer key's delta", CRL_CONTENT_TYPE, '"new-1"', now))
        running.server.remove("/shared-delta.crl", if_body=b"x" * 100)
        running.server.remove("/small.crl", if_body=b"x" * 100)
        assert _get(running.server.port, "/shared-delta.crl").startswith(b"HTTP/1.1 200 OK")
        assert _get(running.server.port, "/small.crl").startswith(b"HTTP/1.1 404 Not Found")
    finally:
        running.stop()


def test_a_request_head_beyond_the_read_buffer_gets_431_not_a_bare_close() -> None:
    """A 100 KB path overran the reader's 64 KiB buffer and the connection was closed with no answer."""
    running = Running()
    try:
        for size in (10_000, 100_000, 300_000):
            with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as client:
                client.sendall(b"GET /" + b"a" * size + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while chunk := client.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), (size, answer[:80])
        assert _get(running.server.port, "/small.crl").startswith(b"HTTP/1.1 200 OK")  # still serving
    finally:
        running.stop()


def test_a_crl_past_its_next_update_is_served_no_cache() -> None:
    """max-age counts down to the CRL's nextUpdate at each request and ends there: no cache may keep an expired CRL."""
    running = Running()
    try:
        now = datetime.now(UTC)
        running.server.set("/expired.crl", Resource(b"x", CRL_CONTENT_TYPE, '"e"', now, max_age=3600, expires=now))
        running.server.set("/soon.crl", Resource(b"x", CRL_CONTENT_TYPE, '"s"', now, max_age=3600, expires=now + timedelta(seconds=30)))
        assert b"\r\nCache-Control: no-cache\r\n" in _get(running.server.port, "/expired.crl")
        answer = _get(running.server.port, "/soon.crl")
        max_age = int(answer.split(b"Cache-Control: public, max-age=")[1].split(b"\r\n")[0])
        assert 28 <= max_age <= 30, answer
    finally:
        running.stop()


def test_if_modified_since_in_each_http_date_format_gets_304() -> None:
    """RFC 9110 5.6.7: a recipient accepts IMF-fixdate, RFC 850 and asctime dates. asctime has no zone, parsed to a naive
    datetime whose comparison raised TypeError: the condition was ignored and the whole CRL sent again."""
    running = Running()
    try:
        modified = datetime.now(UTC) - timedelta(hours=1)
        running.server.set("/c.crl", Resource(b"crl", CRL_CONTENT_TYPE, '"c"', modified))
        since = modified + timedelta(minutes=1)
        for date in (
            since.strftime("%a, %d %b %Y %H:%M:%S GMT"),
            since.strftime("%A, %d-%b-%y %H:%M:%S GMT"),
            since.strftime("%a %b ") + f"{since.day:2d}" + since.strftime(" %H:%M:%S %Y"),
        ):
            with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as client:
                client.sendall(f"GET /c.crl HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: {date}\r\n\r\n".encode())
                answer = b""
                while chunk := client.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 304 Not Modified\r\n"), (date, answer)
    finally:
        running.stop()


def test_every_answer_carries_the_date_a_cache_counts_its_age_from() -> None:
    """RFC 9110 6.6.1: an origin server with a clock sends Date; none was sent, on 200, 304, 404 or 503 alike."""
    running = Running()
    try:
        running.server.set("/c.crl", Resource(b"crl", CRL_CONTENT_TYPE, '"c"', datetime.now(UTC)))
        for path in ("/c.crl", "/missing.crl"):
            head = _get(running.server.port, path).split(b"\r\n\r\n", 1)[0].decode("latin-1")
            dates = [line.split(": ", 1)[1] for line in head.split("\r\n") if line.lower().startswith("date: ")]
            assert len(dates) == 1, head
            assert abs((parsedate_to_datetime(dates[0]) - datetime.now(UTC)).total_seconds()) < 60, head
    finally:
        running.stop()


def _ask(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """The whole answer to request, sent as given."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(request)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        return answer


def _read_slowly(clients: list[socket.socket], *, give_up_s: float) -> list[tuple[int, float]]:
    """Read up to 64 KiB from each client in turn every 0.05 s (under 1.3 MB/s each) until the server closes each
    or give_up_s pass: for each, bytes received and seconds until it was closed."""
    began = time.monotonic()
    results = {client: (0, give_up_s) for client in clients}
    while (reading := [c for c in clients if results[c][1] == give_up_s]) and time.monotonic() - began < give_up_s:
        for client in reading:
            received = results[client][0]
            try:
                chunk = client.recv(65536)
            except ConnectionError:
                chunk = b""
            results[client] = (received + len(chunk), give_up_s if chunk else time.monotonic() - began)
        time.sleep(0.05)
    return [results[c] for c in clients]


def test_a_client_reading_too_slowly_for_the_whole_crl_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Each chunk had only to leave within the stall timeout: one read every 29 s kept a place for hours of a big CRL.

    Here the deadline is 0.5 s + 16 MiB at 4 MiB/s = 4.5 s; the readers never stall for the 3 s stall timeout, but at
    under 1.3 MB/s would need 13 s for the whole body. A dropped client is reset: the kernel does not go on sending
    it the megabytes already in the socket's send buffer.
    """
    caplog.set_level(logging.WARNING, logger="ca_daemon.http")
    running = Running(write_stall_s=3.0, send_base_s=0.5, min_send_rate=4 * 1024 * 1024)
    try:
        slow = []
        for _ in range(2):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # before connect: what the kernel holds for it
            client.settimeout(3)
            client.connect(("127.0.0.1", running.server.port))
            client.sendall(b"GET /big.crl HTTP/1.1\r\nHost: x\r\n\r\n")
            slow.append(client)
        try:
            results = _read_slowly(slow, give_up_s=12.0)
        finally:
            for client in slow:
                client.close()
        for received, took in results:
            assert received < BIG // 2 and 4.0 < took < 7.0, results
        time.sleep(0.2)
        dropped = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.http" and "too slowly" in r.getMessage()]
        assert len(dropped) == 1, dropped  # the second drop is held back (one line per interval)
        assert "127.0.0.1" in dropped[0] and "/big.crl" in dropped[0], dropped
        with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as fast:  # gets all of it in time
            fast.sendall(b"GET /big.crl HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = bytearray()
            while chunk := fast.recv(1 << 20):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(bytes(4096)) and len(answer) > BIG, answer[:80]
    finally:
        running.stop()


def test_a_request_head_ending_lines_in_bare_lf_is_answered_at_once() -> None:
    """RFC 9112 2.2: a server may take a bare LF for a line end. The head was read up to CRLF CRLF: no answer for 10 s."""
    running = Running()
    try:
        for request in (
            b"GET /small.crl HTTP/1.1\nHost: x\n\n",
            b"GET /small.crl HTTP/1.0\n\n",
            b"GET /small.crl HTTP/1.1\r\nHost: x\n\r\n",
        ):
            began = time.monotonic()
            answer = _ask(running.server.port, request, timeout=3.0)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"x" * 100), (request, answer[:80])
            assert time.monotonic() - began < 2.0, request
        # RFC 9112 2.2: empty lines before the request line are ignored.
        assert _ask(running.server.port, b"\r\n\nGET /small.crl HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3.0).startswith(b"HTTP/1.1 200 OK")
    finally:
        running.stop()


def test_an_unsupported_http_version_gets_505_and_a_malformed_request_line_400() -> None:
    running = Running()
    try:
        for version in ("HTTP/2.0", "HTTP/3.0", "HTTP/0.9", "HTTP/1.2"):
            answer = _ask(running.server.port, f"GET /small.crl {version}\r\nHost: x\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), (version, answer[:80])
            assert b"text/plain" in answer and b"HTTP/1.0 and HTTP/1.1" in answer, answer
        # HTTP/2 with prior knowledge starts with this preface: not a method we allow, but the version comes first.
        assert _ask(running.server.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").startswith(b"HTTP/1.1 505 ")
        for line in (
            "GET /small.crl http/1.1",
            "GET /small.crl FOO/1.1",
            "GET /small.crl HTTP/1.1x",
            "GET /small.crl HTTP/11",
            "GET /small.crl",
        ):
            answer = _ask(running.server.port, f"{line}\r\nHost: x\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (line, answer[:80])
        assert _ask(running.server.port, b"GET /small.crl HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
    finally:
        running.stop()


def test_a_request_without_one_host_or_with_a_malformed_header_line_gets_400() -> None:
    """RFC 9112 3.2 and 5: an HTTP/1.1 request without a Host header, or with two, and a header line that is not
    NAME: VALUE (whitespace before the colon, no colon, folded onto the line before) are refused; before, each was
    answered 200 as if it were sound."""
    running = Running()
    try:
        for head in (
            "GET /small.crl HTTP/1.1\r\n",
            "GET /small.crl HTTP/1.1\r\nAccept: */*\r\n",
            "GET /small.crl HTTP/1.1\r\nHost: x\r\nHost: y\r\n",
            "GET /small.crl HTTP/1.1\r\nHost : x\r\n",
            "GET /small.crl HTTP/1.1\r\nHost: x\r\nAccept */*\r\n",
            "GET /small.crl HTTP/1.1\r\nHost: x\r\nAccept: a,\r\n b\r\n",
            "GET /small.crl HTTP/1.0\r\nX Y: z\r\n",
        ):
            answer = _ask(running.server.port, f"{head}\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"x" * 100 not in answer, (head, answer[:120])
        for head in ("GET /small.crl HTTP/1.0\r\n", "GET /small.crl HTTP/1.1\r\nhost: x\r\nX-a_b.c~1: ok\r\n"):
            assert _ask(running.server.port, f"{head}\r\n".encode()).startswith(b"HTTP/1.1 200 OK\r\n"), head
    finally:
        running.stop()


def test_percent_encoded_paths_are_decoded_before_routing_and_unsafe_ones_refused() -> None:
    """A path was matched as sent: /sm%61ll.crl was 404. Decoded, a path must not smuggle dot-segments, slashes or NUL."""
    running = Running()
    now = datetime.now(UTC)
    running.server.set("/crl/ca-root-1.crl", Resource(b"root crl", CRL_CONTENT_TYPE, '"r"', now))
    running.server.set("/crl/ca%20two.crl", Resource(b"two crl", CRL_CONTENT_TYPE, '"t"', now))  # a URL from the configuration
    try:
        for path in ("/sm%61ll.crl", "/crl/ca%2Droot-1.crl", "/crl/ca%2droot%2D1%2Ecrl", "/crl/ca%20two.crl", "/crl/ca-root-1.crl"):
            answer = _ask(running.server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), (path, answer[:80])
        for path in (
            "/%2E%2E/small.crl",
            "/crl/%2e%2e/small.crl",
            "/crl/%2e/ca-root-1.crl",
            "/crl/../small.crl",
            "/./small.crl",
            "/crl/..",
            "/crl%2Fca-root-1.crl",
            "/small.crl%00",
            "/sm%zzall.crl",
            "/sm%C3%28all.crl",
        ):
            answer = _ask(running.server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (path, answer[:80])
            assert answer.split(b"\r\n\r\n", 1)[1].startswith(b"400 Bad Request: "), (path, answer)  # says why
        assert _ask(running.server.port, b"GET /missing%2Ecrl HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404 Not Found")
    finally:
        running.stop()


def test_request_targets_other_than_a_path_or_an_absolute_url_get_400() -> None:
    """RFC 9112 3.2: GET takes an origin-form (/path) or absolute-form (http://host/path) target. //host/path was read as
    an authority and served /path; "small.crl" and "*" were 404."""
    running = Running()
    try:
        assert _ask(running.server.port, b"GET http://x/small.crl HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
        assert _ask(running.server.port, b"GET /small.crl?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
        assert _ask(running.server.port, b"GET //x/small.crl HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404 Not Found")
        for target in (
            b"small.crl",
            b"*",
            b"x:80",
            b"ftp://x/small.crl",
            b"/sm\xe9ll.crl",
            b"/small.crl\rX",
            b"//[x/small.crl",
            b"/small.crl#x",
        ):
            answer = _ask(running.server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (target, answer[:80])
    finally:
        running.stop()


def test_head_answers_carry_no_body_whatever_the_status() -> None:
    """RFC 9110 9.3.2: a HEAD answer has no content. 404 and 400 answers to HEAD carried their text body."""
    running = Running()
    try:
        for target, status in ((b"/small.crl", b"200 OK"), (b"/missing.crl", b"404 Not Found"), (b"/%2e%2e/x", b"400 Bad Request")):
            answer = _ask(running.server.port, b"HEAD " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = answer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 " + status) and body == b"", (target, answer)
            assert b"Content-Length: " in head, head
    finally:
        running.stop()


def test_a_request_with_very_many_header_lines_gets_431() -> None:
    """Each of a few thousand one-letter headers was parsed into the dict; 100 is more than any CRL fetcher sends."""
    running = Running()
    try:
        many = b"".join(b"A%d: b\r\n" % i for i in range(101))
        answer = _ask(running.server.port, b"GET /small.crl HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:80]
        fewer = b"".join(b"A%d: b\r\n" % i for i in range(90))
        assert _ask(running.server.port, b"GET /small.crl HTTP/1.1\r\nHost: x\r\n" + fewer + b"\r\n").startswith(b"HTTP/1.1 200 OK")
    finally:
        running.stop()


def _stall_from(source: str, port: int, path: str) -> socket.socket:
    """_stall from the loopback address source (all of 127.0.0.0/8 is loopback on Linux): another client host."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.bind((source, 0))
    client.connect(("127.0.0.1", port))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return client


def test_one_host_cannot_take_every_place_from_the_others(stalled: list[socket.socket], caplog: pytest.LogCaptureFixture) -> None:
    """One host asked for the big CRL on every connection and read nothing: every other relying party got 503.

    Its connections beyond its share are answered 503 at once, though the server has room, and logged (one line, naming
    it); another host is served.
    """
    caplog.set_level(logging.WARNING, logger="ca_daemon.http")
    running = Running(max_connections=4, max_per_client=2)
    try:
        stalled.extend(_stall_from("127.0.0.1", running.server.port, "/big.crl") for _ in range(4))
        time.sleep(0.3)
        with _stall_from("127.0.0.2", running.server.port, "/small.crl") as other:
            answer = b""
            while chunk := other.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:80]
        for client in stalled[2:]:  # beyond its share
            client.settimeout(0.5)
            refused = b""
            while chunk := client.recv(65536):
                refused += chunk
            assert refused.startswith(b"HTTP/1.1 503 Service Unavailable") and b"Retry-After: 1" in refused, refused[:80]
        for client in stalled[:2]:  # its share keeps its places
            assert client.recv(65536).startswith(b"HTTP/1.1 200 OK")
        refusals = [r.getMessage() for r in caplog.records if r.name == "ca_daemon.http" and "per client address" in r.getMessage()]
        assert len(refusals) == 1 and "127.0.0.1" in refusals[0], refusals  # the second is held back and counted
    finally:
        running.stop()


def test_an_ipv6_client_counts_by_its_64_and_a_mapped_ipv4_one_by_its_address() -> None:
    """A host given an IPv6 /64 can pick any address in it: counted by address, it could take every place alone."""
    same_host = {client_address((f"2001:db8:1:2:{i:x}::{i:x}", 8080, 0, 0)) for i in range(1, 100)}
    assert same_host == {"2001:db8:1:2::/64"}
    assert client_address(("2001:db8:1:3::1", 8080, 0, 0)) == "2001:db8:1:3::/64"
    assert client_address(("fe80::1%eth0", 8080, 0, 2)) == "fe80::/64"
    assert client_address(("::ffff:192.0.2.7", 8080, 0, 0)) == client_address(("192.0.2.7", 8080)) == "192.0.2.7"


def test_a_flood_beyond_the_limit_holds_a_bounded_number_of_refusals_and_stop_closes_them(
    stalled: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """Each connection turned away with 503 lived up to 1 s waiting for its request, uncounted, and stop() left them open:
    a flood of connections grew the loop's tasks and open sockets without bound. Turning connections away, with a 503
    or closing them unanswered, is logged (once a minute at most, with a count): it was silent."""
    caplog.set_level(logging.WARNING, logger="ca_daemon.http")
    running = Running(max_connections=2, max_turned_away=4)
    try:
        stalled.extend(_stall(running.server.port, "/big.crl") for _ in range(2))
        time.sleep(0.3)
        flood = [socket.create_connection(("127.0.0.1", running.server.port), timeout=10) for _ in range(100)]
        stalled.extend(flood)  # silent: each 503 handler waits for a request that never comes
        time.sleep(0.3)
        assert running.tasks() <= 2 * (2 + 4), running.tasks()  # each handler, and the wait_for it runs as a task
        answered = 0
        for client in flood:  # each closed at once, or within the cap answered 503 at once (a timeout here fails the test)
            client.settimeout(0.5)
            with contextlib.suppress(ConnectionError):
                answer = client.recv(65536)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer[:80]
                answered += bool(answer)
        assert answered <= 4, answered
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        full = [w for w in warnings if "answered 503: all 2 connections are being answered" in w]
        unanswered = [w for w in warnings if "closed without an answer: 4 connections are already being turned away" in w]
        assert len(full) == 1 and len(unanswered) == 1, warnings  # one line a minute each, not one per connection
        time.sleep(1.0)  # those turned away with 503 gave up waiting for their request
        again = [socket.create_connection(("127.0.0.1", running.server.port), timeout=10) for _ in range(4)]
        stalled.extend(again)  # within the cap: answered 503 and waiting for their request when the server stops
        time.sleep(0.3)
        began = time.monotonic()
        asyncio.run_coroutine_threadsafe(running.server.stop(), running.loop).result(10)
        assert time.monotonic() - began < 0.5
        assert running.tasks() == 0  # no connection left open, being answered or turned away
        for client in [*stalled[:2], *again]:
            client.settimeout(0.5)
            with contextlib.suppress(ConnectionError):
                while client.recv(1 << 20):
                    pass
    finally:
        running.stop()
