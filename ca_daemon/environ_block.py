"""Blank a variable's value in the environment block the process started with, which the kernel shows as /proc/PID/environ.

Taking a variable out of os.environ (unsetenv) drops libc's pointer to it, not the bytes: the kernel
reads /proc/PID/environ from the start-up block itself, so a PIN given in the environment stayed
readable there (same user and root) for the daemon's whole life. Hand-written because no library does
it: we walk libc's `environ` while the pointer is still there and overwrite the value in place with
NULs, as setproctitle overwrites argv. Linux with glibc or musl; elsewhere, or if anything fails, a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes


def blank_value(name: str) -> bool:
    """Overwrite NAME's value in the process's environment block with NULs; True if it was there. Call before unsetenv."""
    prefix = name.encode() + b"="
    with contextlib.suppress(Exception):
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
        index = 0
        while (address := environ[index]) is not None:
            entry = ctypes.string_at(address)
            if entry.startswith(prefix):
                ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
                return True
            index += 1
    return False


__all__ = ["blank_value"]
