"""peers.ClientRate: the per-client token bucket in front of TLS handshakes."""

from __future__ import annotations

from ca_daemon.peers import ClientRate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_gets_its_burst_then_its_rate_and_others_are_not_affected() -> None:
    clock = Clock()
    rate = ClientRate(2, 4, clock=clock)
    assert [rate.admit("10.0.0.1") for _ in range(6)] == [True] * 4 + [False] * 2
    assert rate.admit("10.0.0.2")  # another address has its own bucket
    clock.now += 0.5  # one token back at 2 a second
    assert [rate.admit("10.0.0.1") for _ in range(2)] == [True, False]
    clock.now += 60  # refilled to the burst, never beyond it
    assert [rate.admit("10.0.0.1") for _ in range(5)] == [True] * 4 + [False]


def test_refusals_take_nothing_so_a_client_that_keeps_trying_still_gets_its_rate() -> None:
    clock = Clock()
    rate = ClientRate(10, 1, clock=clock)
    admitted = 0
    for _ in range(1000):  # 10 s of a client trying every 10 ms
        clock.now += 0.01
        admitted += rate.admit("10.0.0.1")
    assert 99 <= admitted <= 101


def test_the_table_is_bounded_and_forgets_the_least_recently_seen_client_first() -> None:
    clock = Clock()
    rate = ClientRate(1, 1, max_clients=3, clock=clock)
    for client in ("a", "b", "c"):
        assert rate.admit(client)
    assert not rate.admit("a")  # a is now the most recently seen
    assert rate.admit("d")  # b, the least recently seen, is forgotten
    assert rate.admit("b")  # back with a full bucket (dropping c)
    assert not rate.admit("a")  # a stayed, still empty
