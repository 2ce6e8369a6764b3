"""What the hash-chained audit log costs: the served Sign rate with and without the chain.

Both daemons are the same development set-up (EC P-256 CA, same workers, same load, CSRs
made before the clock starts, each with its own key and device ID); the only difference is
`[audit] chain` (false is accepted in development mode only, for this comparison). The
target: auditing costs at most a third of the served rate (with / without >= 0.67).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid

from bench.sign import BenchCa, make_csrs, scratch_softhsm, served_rate

NO_CHAIN = {"checkpoint_interval_seconds = 300": "checkpoint_interval_seconds = 300\nchain = false"}


def store_cost(events: int = 3200, batch: int = 32) -> tuple[float, float]:
    """Events/s appended by the store in group-commit-sized transactions, chain off and on (one thread)."""
    from datetime import UTC, datetime

    from ca_daemon.model import AuditEvent
    from ca_daemon.store import open_store

    rates = []
    for chain in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(f"sqlite:///{tmp}/audit.db")
            store.audit_chain = chain
            event = AuditEvent(
                time=datetime.now(UTC),
                actor="bench",
                action="certificate.issue",
                outcome="issued",
                serial=2**150,
                device_id="device-1",
                key_id="ca-1",
                request_digest=b"\x11" * 32,
                details={"profile": "device", "request_id": "r"},
            )
            started = time.perf_counter()
            for _ in range(events // batch):
                store.append_audit([event] * batch)
            rates.append(events / (time.perf_counter() - started))
            store.close()
    return rates[0], rates[1]


def main(seconds: float = 5.0, concurrency: int = 32) -> None:
    """Alternates chain off / on twice (load from other processes on a shared machine drifts) and reports the medians."""
    workers = int(os.environ.get("BENCH_WORKERS", "2"))
    with scratch_softhsm("ca-bench-audit-") as root:
        print(f"# Audit chain cost: {seconds:.0f} s windows, {concurrency} requests in flight, {workers} worker processes")
        plain, chained = store_cost()
        per_event_us = (1 / chained - 1 / plain) * 1e6
        print(
            f"store appends (32 per commit)       off {plain:8.0f} /s   on {chained:8.0f} /s   chain cost {per_event_us:.1f} us per event"
        )
        need = int(seconds * 3000) + 2000
        cas = {"off": BenchCa(root, "ec-p256", workers, NO_CHAIN), "on": BenchCa(root, "ec-p256", workers)}
        results: dict[str, list[float]] = {"off": [], "on": []}
        for round_ in range(2):
            for mode in ("off", "on") if round_ == 0 else ("on", "off"):
                csrs = make_csrs(need, f"bench-{mode}-{uuid.uuid4().hex[:6]}")
                served = served_rate(cas[mode], csrs, concurrency, seconds)
                results[mode].append(served.rate)
                line = f"  round {round_ + 1} chain {mode:3}  {served.rate:8.0f} /s   p50 {served.p50_ms:.1f} ms p99 {served.p99_ms:.1f} ms"
                print(f"{line}  errors {served.errors}")
        off, on = statistics.median(results["off"]), statistics.median(results["on"])
        print(f"served Sign rate, audit chain off   {off:10.0f} /s (median)")
        print(f"served Sign rate, audit chain on    {on:10.0f} /s (median)")
        print(f"with / without                      {on / off if off else 0.0:10.2f}      (target >= 0.67: auditing costs at most a third)")


if __name__ == "__main__":
    main()
