"""Group commit: many concurrent issuances share one transaction and one fsync.

A single writer thread takes whatever records are waiting (up to a batch limit), stores
them in one transaction, and only then resolves each caller's future. So a certificate
is returned only after its record is durable, and under load one commit covers many
certificates instead of one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ca_daemon.errors import CaError, StoreUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger(__name__)
_STOP = object()


class GroupCommitter(Generic[Item, Result]):
    """Batches items for `commit_batch` on one thread and hands each caller its result."""

    def __init__(self, commit_batch: Callable[[Sequence[Item]], Sequence[Result | CaError]], batch_max: int, linger_s: float = 0.0) -> None:
        self._commit_batch = commit_batch
        self._batch_max = batch_max
        self._linger = linger_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    async def submit(self, item: Item) -> Result:
        """Queue item for the next commit and wait until it is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put((item, future, loop))
        return await future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            pending = [first]
            stop = False
            # Linger a moment for company: when signing is the slower stage, records arrive
            # one at a time and a commit per record costs more CPU than the signing itself.
            deadline = time.monotonic() + self._linger
            while len(pending) < self._batch_max:
                try:
                    remaining = deadline - time.monotonic()
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                pending.append(nxt)
            self._commit(pending)  # type: ignore[arg-type]
            if stop:
                return

    def _commit(self, pending: list[tuple[Item, asyncio.Future[Result], asyncio.AbstractEventLoop]]) -> None:
        try:
            results: Sequence[Result | BaseException] = self._commit_batch([item for item, _, _ in pending])
        except CaError as exc:
            results = [exc] * len(pending)
        except Exception as exc:
            log.exception("group commit of %d records failed", len(pending))
            results = [StoreUnavailable(f"the database refused the commit ({type(exc).__name__}); retry")] * len(pending)
        for (_, future, loop), result in zip(pending, results, strict=True):
            loop.call_soon_threadsafe(_resolve, future, result)


def _resolve(future: asyncio.Future[Result], result: Result | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
