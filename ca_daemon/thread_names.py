"""OS-level names for the daemon's threads, so `top -H`, `ps -L` and /proc show which one uses the CPU.

Python (3.11) names its threads only for itself; every thread of a worker showed as `python3`.
Hand-written because the standard library has no call for it (Python 3.14 adds one): prctl(PR_SET_NAME)
names the calling thread, so each thread calls this first.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

_PR_SET_NAME = 15
_NAME_MAX = 15  # the kernel keeps 15 bytes and a NUL


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread name (default: its Python name) in the OS, cut to 15 bytes; a no-op where prctl is missing."""
    text = (name or threading.current_thread().name).encode("ascii", "replace")[:_NAME_MAX]
    # Any failure is swallowed: this runs first in the token's thread and the group commit, and a name is not worth them.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
