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


def verify_cost(events: int = 20_000, rounds: int = 3) -> tuple[float, float]:
    """CPU us per event of `audit verify --live` (chain, checkpoint and tables, as the CLI runs it) and `audit verify --file`.

    A SQLite log of events chained by the store and one checkpoint of its head, signed with a
    software key (verify needs only the public key); the best of rounds runs, in CPU time
    (process_time: other work on a shared machine moves wall time far more).
    """
    import io
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ca_daemon import audit
    from ca_daemon.audit_hash import checkpoint_message
    from ca_daemon.model import AuditEvent
    from ca_daemon.store import open_store
    from ca_daemon.store.audit_store import AuditStore, Checkpoint

    batch = [
        AuditEvent(
            time=datetime.now(UTC),
            actor="programmer:line3",
            action="access.deny",
            outcome="denied",
            serial=2**150 + n,
            device_id=f"device-{n}",
            key_id="ca-1",
            request_digest=bytes([n % 256]) * 32,
            reason="role",
            details={"method": "Sign", "request_id": f"r-{n}"},
        )
        for n in range(500)
    ]
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/audit.db")
        try:
            for _ in range(events // len(batch)):
                store.append_audit(batch)
            log = AuditStore(store)
            head = log.head()
            assert head is not None
            now = datetime.now(UTC)
            message = checkpoint_message(seq=head.seq, count=head.count, head=head.hash, time=now, key_id="audit")
            log.add_checkpoint(Checkpoint(head.seq, head.count, head.hash, now, "audit", key.sign(message, ec.ECDSA(hashes.SHA256()))))
            exported = io.StringIO()
            audit.export(store, exported)
            live, offline = [], []
            for _ in range(rounds):
                started = time.process_time()
                report = audit.verify(audit.live_records(store), public)
                audit.reconcile(store, report)
                live.append(time.process_time() - started)
                assert report.ok and report.events == head.seq, report.summary()
                started = time.process_time()
                report = audit.verify(audit.read_export(io.StringIO(exported.getvalue())), public, export_file=True)
                offline.append(time.process_time() - started)
                assert report.ok and report.events == head.seq, report.summary()
        finally:
            store.close()
    live_us, file_us = min(live) / head.seq * 1e6, min(offline) / head.seq * 1e6
    print(f"audit verify --live ({head.seq} events)   {live_us:8.1f} us per event (CPU, best of {rounds})")
    print(f"audit verify --file ({head.seq} events)   {file_us:8.1f} us per event (CPU, best of {rounds})")
    return live_us, file_us


def main(seconds: float = 5.0, concurrency: int = 32) -> None:
    """Alternates chain off / on twice (load from other processes on a shared machine drifts) and reports the medians."""
    workers = int(os.environ.get("BENCH_WORKERS", "2"))
    with scratch_softhsm("ca-bench-audit-") as root:
        print(f"# Audit chain cost: {seconds:.0f} s windows, {concurrency} requests in flight, {workers} worker processes")
        verify_cost()
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
