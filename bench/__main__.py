"""`make bench`: every benchmark of the project, each section printing ratios from its own run.

Each section runs in a fresh interpreter: a PKCS#11 module is initialised once per process
with one SoftHSM configuration, and every section makes its own throwaway token directory.
`python -m bench sign crl` runs only the named sections.
"""

from __future__ import annotations

import subprocess
import sys

SECTIONS = ["sign", "policy", "audit", "crl", "factory", "replicas"]


def main() -> None:
    only = sys.argv[1:]
    failed = []
    for name in SECTIONS:
        if only and name not in only:
            continue
        print(f"\n======== bench.{name} ========", flush=True)
        result = subprocess.run([sys.executable, "-c", f"import bench.{name} as m; m.main()"], check=False)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmark sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
