"""Group commit: many concurrent issuances share one transaction and one fsync.

A single writer thread takes whatever records are waiting (up to a batch limit), stores
them in one transaction, and only then resolves each caller's future. Records come one
at a time (`submit`, from the event loop) or a batch at a time from another thread
(`enqueue`: the Sign batches of authority.py), and a batch's answers go back in one hop.
So a certificate is returned only after its record is durable, and under load one commit
covers many certificates instead of one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from ca_daemon.errors import CaError, StoreUnavailable
from ca_daemon.thread_names import name_os_thread

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger(__name__)


# (items, the futures that wait for them, their event loop, whether the sender has more on the way)
_Entry = tuple[list[Any], list["asyncio.Future[Any]"], asyncio.AbstractEventLoop, bool]
# While a sender says more is on the way, a commit waits this many lingers for it.
BUSY_LINGER_FACTOR = 5


class GroupCommitter(Generic[Item, Result]):
    """Batches items for `commit_batch` on one thread and hands each caller its result."""

    def __init__(
        self,
        commit_batch: Callable[[Sequence[Item]], Sequence[Result | CaError]],
        batch_max: int,
        linger_s: float = 0.0,
        name: str = "group-commit",
    ) -> None:
        self._commit_batch = commit_batch
        self._batch_max = batch_max
        self._linger = linger_s
        self._queue: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()  # None: stop
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, item: Item) -> Result:
        """Queue item for the next commit and wait until it is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put(([item], [future], loop, False))
        return await future

    def enqueue(
        self, items: Sequence[Item], futures: Sequence[asyncio.Future[Any]], loop: asyncio.AbstractEventLoop, *, more_coming: bool = False
    ) -> None:
        """From any thread: commit items, then resolve futures[i] with item i's result, on loop, in one hop.

        more_coming: the sender already holds more work that will follow (requests queued for
        signing); the commit then waits a little longer for it, so that under load one commit
        covers several signed batches, while a lone request is committed without delay.
        """
        self._queue.put((list(items), list(futures), loop, more_coming))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        name_os_thread()
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            count, more_coming = len(first[0]), first[3]
            stop = False
            # Linger a moment for company: when signing is the slower stage, records arrive
            # one at a time and a commit per record costs more CPU than the signing itself
            # (a commit's fixed cost is several statements; each further record adds little).
            started = time.monotonic()
            while count < self._batch_max:
                limit = self._linger * (BUSY_LINGER_FACTOR if more_coming else 1)
                remaining = started + limit - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                pending.append(nxt)
                count, more_coming = count + len(nxt[0]), nxt[3]
            self._commit(pending)
            if stop:
                return

    def _commit(self, pending: list[_Entry]) -> None:
        items = [item for entry_items, _, _, _ in pending for item in entry_items]
        try:
            results: Sequence[Any] = self._commit_batch(items)
        except CaError as exc:
            results = [exc] * len(items)
        except Exception as exc:
            log.exception("group commit of %d records failed", len(items))
            results = [StoreUnavailable(f"the database refused the commit ({type(exc).__name__}); retry")] * len(items)
        start = 0
        for entry_items, futures, loop, _ in pending:
            answers = list(zip(futures, results[start : start + len(entry_items)], strict=True))
            start += len(entry_items)
            loop.call_soon_threadsafe(resolve_all, answers)


def resolve_all(answers: Sequence[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the loop: give each future its result, or its exception if the result is one."""
    for future, result in answers:
        _resolve(future, result)


def _resolve(future: asyncio.Future[Result], result: Result | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
