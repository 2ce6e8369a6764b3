"""`make bench`: every benchmark of the project, in one run, printing ratios from that run."""

from __future__ import annotations

import importlib
import sys

SECTIONS = ["bench.sign", "bench.policy", "bench.crl", "bench.factory", "bench.replicas", "bench.audit"]


def main() -> None:
    only = sys.argv[1:]
    for name in SECTIONS:
        if only and name.split(".")[-1] not in only:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        print(f"\n======== {name} ========", flush=True)
        module.main()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
