"""Devices provisioned per second, end to end, against the daemon's served Sign rate from the same run.

One throwaway CA (EC P-256, SoftHSM, SQLite, `server.workers` processes). First the served
Sign rate with bench/sign.py's load generator (CSRs made before the clock starts); then the
factory simulator through `CaClient` against the same CA: once with each device generating its
key and CSR while others are being signed (key generation included), once with every key made
first (the signing phase alone: key generation excluded). Devices are not installed on disk
(`out_dir=None`), so the numbers are the line's, not the file system's.

The simulator is one Python process with blocking gRPC calls on threads: on a small machine it
shares the cores with the daemon, so the ratio to the served rate says how much of the CA's
capacity one programming station can use.
"""

from __future__ import annotations

import os
import time
import uuid

from bench.sign import BenchCa, make_csrs, scratch_softhsm, served_rate, stop


def main(seconds: float = 6.0, devices: int = 1500, concurrency: int = 16) -> None:
    from ca_daemon.client import CaClient
    from ca_daemon.simulate import simulate

    workers = int(os.environ.get("BENCH_WORKERS", "2"))
    with scratch_softhsm("ca-bench-factory-") as root:
        print(
            f"# factory benchmark: {devices} devices per simulator run, {concurrency} in flight, "
            f"{workers} daemon worker processes, {os.cpu_count()} cores"
        )
        ca = BenchCa(root, "ec-p256", workers)
        csrs = make_csrs(int(seconds * 3000) + 1000, f"bench-served-{uuid.uuid4().hex[:6]}")
        served = served_rate(ca, csrs, concurrency=32, seconds=seconds)

        process = ca.serve()
        try:
            with CaClient(f"127.0.0.1:{ca.port}", timeout=30, connections=8) as client:  # as `ca-daemon factory simulate` does
                simulate(client, devices=50, out_dir=None, concurrency=concurrency)  # warm-up: channel, workers, caches
                t0 = time.perf_counter()
                pipelined = simulate(client, devices=devices, out_dir=None, concurrency=concurrency)
                t_pipelined = time.perf_counter() - t0
                phased = simulate(client, devices=devices, out_dir=None, concurrency=concurrency, pregenerate=True)
        finally:
            stop(process)

        excluding = phased.rate_excluding_keygen or 0.0
        print(f"served Sign rate (bench.sign load generator)     {served.rate:8.0f} /s   p99 {served.p99_ms:.1f} ms")
        print(
            f"provisioned, key generation included            {pipelined.rate:8.0f} /s   ({pipelined.rate / served.rate:.2f} x served)"
            f"   {pipelined.issued} issued in {t_pipelined:.2f} s, {pipelined.failed + pipelined.refused} not"
        )
        print(f"  same, key generation as its own phase          {phased.rate:8.0f} /s   ({phased.rate / served.rate:.2f} x served)")
        print(
            f"provisioned, key generation excluded            {excluding:8.0f} /s   ({excluding / served.rate:.2f} x served)"
            f"   key phase {phased.keygen_phase_s:.2f} s for {devices} devices"
        )
        print(f"device key + CSR, per device (phase wall time)    {1000 * phased.keygen_phase_s / devices:8.3f} ms")


if __name__ == "__main__":
    main()
