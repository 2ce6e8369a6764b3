"""The cost of policy and pre-issuance lint on the served Sign rate.

Three daemons on the same machine in one run, identical but for `[lint] mode`: "off",
"template" (the default: pkilint once per certificate shape, the varying fields checked
directly) and "full" (pkilint on every certificate). The target: lint on costs no more
than half the served rate (template / off >= 0.50). Also the in-process cost of one
pkilint run and of one template-mode check, so the ratio can be explained.

Every CSR has its own key and device ID: the default profile refuses a second active
certificate per device and a key certified for another device.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.sign import BenchCa, Served, scratch_softhsm, served_rate


def unique_csrs(count: int, prefix: str) -> list[bytes]:
    csrs = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{prefix}-{index}")])
        csrs.append(
            x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        )
    return csrs


def lint_costs(samples: int = 300) -> tuple[float, float]:
    """(ms per full pkilint, ms per template-mode check of a known shape), one thread."""
    from ca_daemon import issuer, policy
    from ca_daemon.config import ProfileConfig
    from ca_daemon.lint import Linter

    ca_key = ec.generate_private_key(ec.SECP256R1())
    root = issuer.build_root(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]), ca_key.public_key(), datetime.now(UTC), timedelta(days=9)
    )
    root_cert = root.sign(ca_key, hashes.SHA256())
    profile = policy.build_profile(ProfileConfig(name="device"))
    drafts = []
    for index in range(samples):
        csr = policy.parse_csr(unique_csrs(1, f"lint-{index}")[0], 65536)
        builder = issuer.build_leaf(
            policy.decide(csr, profile), root_cert, issuer.new_serial(), datetime.now(UTC), timedelta(minutes=1), issuer.LeafUrls()
        )
        drafts.append(builder.sign(ca_key, hashes.SHA256()))
    results = []
    for mode in ("full", "template"):
        linter = Linter(mode)
        linter.check(drafts[0])
        started = time.perf_counter()
        for draft in drafts:
            linter.check(draft)
        results.append((time.perf_counter() - started) / samples * 1000)
    return results[0], results[1]


def main(seconds: float = 6.0, concurrency: int = 32) -> None:
    workers = int(os.environ.get("BENCH_WORKERS", "2"))
    full_ms, template_ms = lint_costs()
    print(f"# Policy and lint: {seconds:.0f} s windows, {concurrency} in flight, {workers} worker processes, {os.cpu_count()} cores")
    print(f"pkilint, full lint of one certificate      {full_ms:8.2f} ms")
    print(f"template-mode check of a known shape       {template_ms:8.2f} ms")
    with scratch_softhsm("ca-bench-policy-") as root:
        started = time.perf_counter()
        csrs = unique_csrs(int(seconds * 2500) + 2000, f"bench-policy-{uuid.uuid4().hex[:6]}")
        print(f"prepared {len(csrs)} CSRs, each with its own key, in {time.perf_counter() - started:.1f} s (not timed)")
        rates: dict[str, Served] = {}
        for mode in ("off", "template", "full"):
            ca = BenchCa(root, "ec-p256", workers, {'mode = "template"': f'mode = "{mode}"'})
            rates[mode] = served_rate(ca, csrs, concurrency, seconds)
        off = rates["off"].rate or 1.0
        print("\n## served Sign rate, EC P-256 CA, default device profile")
        for mode, served in rates.items():
            print(
                f"lint {mode:9s} {served.rate:8.0f} /s  ({served.rate / off:.2f} x lint off)  "
                f"p50 {served.p50_ms:5.1f} ms  p99 {served.p99_ms:5.1f} ms  errors {served.errors}"
            )
        ratio = rates["template"].rate / off
        print(f"\ntemplate lint keeps {ratio:.2f} of the lint-off rate (target >= 0.50): {'met' if ratio >= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
