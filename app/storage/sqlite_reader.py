"""Reads from a SQLite file on a thread of its own, handed back to the loop in batches."""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
#: one read: what to run with the connection, and the future its result goes to
_Job = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
#: rows (or errors) for the loop to hand out, one call for a whole batch
_Results = list[tuple[asyncio.Future[Any], Any, BaseException | None]]


class SqliteReader:
    """One read-only connection, used only by its thread; ``call`` awaits a function run with it.

    The thread takes every read queued since it last looked, runs them, and wakes the loop once
    for all of them: with many requests in flight, a read costs the loop a future and a queue put
    rather than an executor hop. The connection is in autocommit mode, so every read sees the
    latest commit of any writer (in this process or another).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return await self.call(lambda conn: conn.execute(sql, params).fetchone())

    async def call(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """``read(connection)``'s result, run on the reader's thread (it must only read)."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="sqlite-read", daemon=True)
            self._thread.start()
        assert self._loop is not None
        future = self._loop.create_future()
        self._jobs.put((read, future))
        return await future  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA query_only=1")
            while True:
                batch = [self._jobs.get()]
                while not self._jobs.empty():
                    batch.append(self._jobs.get_nowait())
                results: _Results = []
                for job in batch:
                    if job is None:
                        continue
                    read, future = job
                    try:
                        results.append((future, read(conn), None))
                    except Exception as exc:  # handed to the waiting reader, which decides
                        results.append((future, None, exc))
                if results:
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(_settle, results)
                if None in batch:
                    return
        finally:
            conn.close()


def _settle(results: _Results) -> None:
    for future, row, error in results:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(row)
