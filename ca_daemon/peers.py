"""Who a connection counts against, and how often each may open one: shared by the CRL HTTP server and the TLS front end."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable


def client_address(peer: object) -> str:
    """What a connection from peer (its peername) counts against: its IPv4 address, or its IPv6 address's /64."""
    if not isinstance(peer, tuple) or not peer:
        return ""
    try:
        address = ipaddress.ip_address(str(peer[0]).partition("%")[0])  # fe80::1%eth0: the zone is not the address
    except ValueError:
        return str(peer[0])
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:  # a dual-stack socket sees IPv4 clients as ::ffff:a.b.c.d
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class ClientRate:
    """A token bucket per client address: `rate` new connections a second on average, in bursts of up to `burst`.

    Hand-written (twenty lines): the PyPI rate limiters are asyncio waiters or whole frameworks, and a
    refusal here must cost nothing and never wait. At most max_clients buckets are kept, the least recently
    used dropped first: a client not seen for a while has a full bucket, which is what having none means.
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 65_536, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when counted)

    def admit(self, client: str) -> bool:
        """Take one token from client's bucket: False (nothing taken) when it is empty."""
        now = self._clock()
        tokens, counted = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * self.rate)
        admitted = tokens >= 1.0 - 1e-9  # ten tenths of a token, summed in floating point, fall short of one
        self._buckets[client] = (tokens - 1.0 if admitted else tokens, now)
        if len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return admitted


__all__ = ["ClientRate", "client_address"]
