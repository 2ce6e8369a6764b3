"""What `audit verify` keeps while it reads a log: one 32-byte hash per event, not a dict entry.

Checkpoints may stand anywhere in an export, so every event's chain hash is held until the
last event is read. With a dict of bytes that was about 190 bytes an event (408 MB peak for
`audit verify --live` over 2.1 million events, measured by the scale review).
"""

from __future__ import annotations

import hashlib
import tracemalloc

from ca_daemon.audit import _ChainHashes


def _hash(seq: int) -> bytes:
    return hashlib.sha256(seq.to_bytes(8, "big")).digest()


def test_a_log_in_order_costs_32_bytes_an_event() -> None:
    events = 200_000
    hashes = [_hash(seq) for seq in range(1, events + 1)]  # made before measuring: the records' own memory
    tracemalloc.start()
    try:
        held = _ChainHashes()
        for seq, chain_hash in enumerate(hashes, 1):
            held.add(seq, chain_hash)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert used < 40 * events, f"{used / events:.0f} bytes an event"
    assert held[1] == hashes[0] and held[events] == hashes[-1] and events in held and events + 1 not in held


def test_a_tampered_order_keeps_the_first_hash_of_each_seq() -> None:
    held = _ChainHashes()
    for seq in (1, 2, 3):
        held.add(seq, _hash(seq))
    held.add(2, _hash(99))  # a duplicate seq (an inserted event): the first one read counts
    held.add(6, _hash(6))  # a gap (deleted events 4 and 5), then the log goes on
    held.add(4, _hash(4))  # reordered
    held.add(6, _hash(98))
    assert [held[seq] for seq in (1, 2, 3, 4, 6)] == [_hash(1), _hash(2), _hash(3), _hash(4), _hash(6)]
    assert 5 not in held and 0 not in held and held.lowest(default=7) == 1
    only_late = _ChainHashes()
    only_late.add(40, _hash(40))  # an export cut at its start
    assert only_late.lowest(default=1) == 40 and 40 in only_late
