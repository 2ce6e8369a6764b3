"""Served Sign rate with one and with three daemon replicas on one PostgreSQL and one token.

Every replica is a `ca-daemon serve` with one worker process and its own port; they share
a throwaway PostgreSQL cluster (or CA_DAEMON_TEST_PG_URL) and the SoftHSM token. The load
generator spreads the same number of requests in flight over the replicas, one loader
process per replica (each CSR has its own key and device ID). On a machine with fewer cores
than replicas + loaders the three-replica number measures contention, not scaling: the
report prints the core count beside it.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid

from bench.sign import BenchCa, Served, _load_main, make_csrs, scratch_softhsm, served_rate, stop


def _replica_configs(first: BenchCa, count: int) -> list[BenchCa]:
    """Copies of first's configuration with their own state directory and port (same token, PIN and database)."""
    from bench.sign import free_port

    replicas = [first]
    template = first.config.read_text().replace('pin_file = "pins/user.pin"', f'pin_file = "{first.root / "pins" / "user.pin"}"')
    first.config.write_text(template)
    for index in range(1, count):
        clone = object.__new__(BenchCa)
        clone.root = first.root.parent / f"{first.root.name}-replica-{index}"
        clone.root.mkdir(mode=0o700)
        clone.config = clone.root / "ca-daemon.toml"
        clone.port = free_port()
        clone.softhsm_conf = first.softhsm_conf
        clone.tls = None
        text = template.replace(f"127.0.0.1:{first.port}", f"127.0.0.1:{clone.port}")
        text = text.replace('http_listen = "127.0.0.1:8080"', 'http_listen = ""')
        clone.config.write_text(text)
        replicas.append(clone)
    return replicas


def _spread(replicas: list[BenchCa], csrs: list[bytes], concurrency: int, seconds: float) -> Served:
    """Start every replica, load them all at once (one loader each), sum the rates."""
    processes = [r.serve() for r in replicas]
    try:
        context = multiprocessing.get_context("spawn")
        queue: multiprocessing.Queue[Served] = context.Queue()
        share = len(csrs) // len(replicas)
        loaders = [
            context.Process(
                target=_load_main,
                args=(f"127.0.0.1:{r.port}", csrs[i * share : (i + 1) * share], max(1, concurrency // len(replicas)), seconds, queue),
            )
            for i, r in enumerate(replicas)
        ]
        for loader in loaders:
            loader.start()
        results = [queue.get(timeout=seconds + 120) for _ in loaders]
        for loader in loaders:
            loader.join()
    finally:
        for process in processes:
            stop(process)
    completed = sum(r.completed for r in results)
    return Served(
        rate=sum(r.rate for r in results),
        p50_ms=max(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
        completed=completed,
    )


def main(seconds: float = 8.0, concurrency: int = 32) -> None:
    from tests.pg import ENV_URL, ThrowawayCluster, create_database, drop_database

    cluster = None if os.environ.get(ENV_URL) else ThrowawayCluster()
    server = os.environ.get(ENV_URL) or cluster.start()  # type: ignore[union-attr]
    try:
        with scratch_softhsm("ca-bench-replicas-") as root:
            print(f"# Replicas: {seconds:.0f} s windows, {concurrency} requests in flight, 1 worker per replica, {os.cpu_count()} cores")
            t0 = time.perf_counter()
            csrs = make_csrs(int(seconds * 3000) + 2000, f"bench-rep-{uuid.uuid4().hex[:6]}")
            print(f"prepared {len(csrs)} device CSRs in {time.perf_counter() - t0:.1f} s (not timed)")
            rows = []
            for count in (1, 3):
                database = create_database(server, "ca_bench")
                try:
                    first = BenchCa(root, "ec-p256", 1, {'url = "sqlite:///ca.db"': f'url = "{database}"'})
                    if count == 1:
                        result = served_rate(first, csrs, concurrency, seconds)
                    else:
                        result = _spread(_replica_configs(first, count), csrs, concurrency, seconds)
                finally:
                    drop_database(server, database)
                rows.append((count, result))
            base = rows[0][1].rate or 1.0
            print("\n## EC P-256 CA on PostgreSQL, served Sign rate over gRPC, durable")
            for count, r in rows:
                print(
                    f"{count} replica(s)   {r.rate:8.0f} /s   ({r.rate / base:.2f} x one)   "
                    f"p50 / p99 {r.p50_ms:6.1f} / {r.p99_ms:6.1f} ms   completed / errors {r.completed} / {r.errors}"
                )
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
