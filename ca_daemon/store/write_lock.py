"""The SQLite store's write lock: an exclusive flock on a file next to the database, taken within a bound.

Writers of every process queue on it before BEGIN IMMEDIATE. A blocking flock hands the
lock to the next waiter as soon as it is released (SQLite's busy handler polls with sleeps
of up to 100 ms, which under several worker processes made p99 latencies of seconds); but
a holder that never releases it (an operator's command suspended with Ctrl-Z in the middle
of a write) kept every writer waiting for ever, and Sign calls hung with no answer.

So the wait is bounded. The lock is first tried without blocking, which is all an
uncontended commit costs. When it is busy, a dedicated thread of this lock makes the
blocking flock and hands the lock over the moment it gets it, while the writer waits on a
condition with a deadline; a writer that gives up leaves the thread waiting, and whatever
the thread gets then goes to the next writer, or is released at once if none is waiting.
Past the deadline the write is StoreUnavailable, naming the holder when /proc/locks shows it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ca_daemon.errors import StoreUnavailable
from ca_daemon.thread_names import name_os_thread


class FileWriteLock:
    """An exclusive flock on path, shared by every writer of every process; `held()` waits at most wait_ms for it.

    Thread-safe: the threads of this process take it one at a time (a flock belongs to the
    open file, not to a thread).
    """

    def __init__(self, path: str, wait_ms: int) -> None:
        self.path = path
        self._wait_s = max(wait_ms, 0) / 1000
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._threads = threading.Lock()  # one thread of this process holds, or waits for, the flock at a time
        self._state = threading.Condition(threading.Lock())
        # Set by a writer (holding _threads) that hands the wait to the waiter thread; cleared by that thread once it no
        # longer holds or waits for the flock for nobody. While it is set, no writer may flock the file itself: the
        # thread's flock would succeed on the same open file and its release would release the writer's lock.
        self._waiting = False
        self._wanted = False  # a writer waits for the thread's flock
        self._granted = False  # the thread took the flock for that writer
        self._closed = False
        self._waiter: threading.Thread | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block, or raise StoreUnavailable after waiting wait_ms for it."""
        deadline = time.monotonic() + self._wait_s
        if not self._threads.acquire(timeout=self._wait_s):
            raise self._timed_out()
        try:
            self._acquire(deadline)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def close(self) -> None:
        """Close the lock file; a waiter thread still in its flock closes it when that returns."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.notify_all()
            if self._waiting:
                return
        os.close(self._fd)

    def _acquire(self, deadline: float) -> None:
        if not self._waiting:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
        with self._state:
            if self._closed:
                raise StoreUnavailable("the database is closed")
            self._wanted, self._granted = True, False
            if not self._waiting:
                self._waiting = True
                if self._waiter is None:
                    self._waiter = threading.Thread(target=self._wait_for_lock, name="sqlite-lock", daemon=True)
                    self._waiter.start()
                self._state.notify_all()
            while not self._granted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._state.wait(remaining)
            granted, self._wanted, self._granted = self._granted, False, False
        if not granted:
            raise self._timed_out()

    def _wait_for_lock(self) -> None:
        """The waiter thread: a blocking flock whenever a writer asks for one, handed over the moment it is had."""
        name_os_thread()
        while True:
            with self._state:
                while not self._waiting and not self._closed:
                    self._state.wait()
                if self._closed:
                    if self._waiting:  # close() left the file to this thread
                        self._waiting = False
                        os.close(self._fd)
                    return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            with self._state:
                if self._closed:
                    self._waiting = False
                    os.close(self._fd)
                    return
                if self._wanted:
                    self._granted = True
                    self._state.notify_all()
                else:  # the writer gave up: release it at once, before anyone may take it through this file
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                self._waiting = False

    def _timed_out(self) -> StoreUnavailable:
        holders = _flock_holders(self.path, None if self._closed else self._fd)
        if holders is None:
            who, advice = "another process (/proc/locks is not readable; `fuser -v` on the file names it)", "that process"
        elif not holders:
            who, advice = "another process (gone from /proc/locks by now; `fuser -v` on the file names it)", "that process"
        else:
            who = ", ".join(_describe_process(pid) for pid in holders)
            advice = f"pid {holders[0]}" if len(holders) == 1 else "that process"
        return StoreUnavailable(
            f"the database's write lock {self.path} has been held for over {self._wait_s:g} s by {who}, so nothing was "
            f"written; a process stopped in the middle of a write (Ctrl-Z, SIGSTOP, a debugger) holds it until it "
            f"continues or ends: resume {advice} (fg in its shell, or kill -CONT) or end it, then retry",
            caller_message=f"the database's write lock has been held by another process for over {self._wait_s:g} s, so "
            "nothing was written; retry later (the daemon's log names the holder)",
        )


def _flock_holders(path: str, fd: int | None) -> list[int] | None:
    """The pids holding a flock on path, from /proc/locks (waiters left out); None if it cannot be read."""
    try:
        info = os.fstat(fd) if fd is not None else os.stat(path)
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders: dict[int, None] = {}
    for line in locks.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; a waiter's line has "->" after the number.
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
            holders[int(fields[4])] = None
    return list(holders)


def _describe_process(pid: int) -> str:
    """'pid 123 (ca-daemon db backup ..., stopped)': its command line and, if it is not running normally, its state."""
    if pid == os.getpid():
        return f"pid {pid} (this process: another of its own connections to the database)"
    try:
        command = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return f"pid {pid}"
    states = {"T": "stopped", "t": "stopped by a debugger", "D": "waiting for I/O", "Z": "a zombie"}
    shown = command if len(command) <= 120 else command[:120] + "…"
    return f"pid {pid} ({shown or '?'}{', ' + states[state] if state in states else ''})"


__all__ = ["FileWriteLock"]
