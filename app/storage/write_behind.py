"""Write-behind: one background task that writes what requests left in memory, off the request path.

The request log, the stored responses and the semantic index keep their rows in memory and let
:class:`WriteBehind` call their ``flush`` when woken or every ``interval_s``; a failed flush is
retried after a backoff, and stopping lets a flush under way finish before the owner writes the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class WriteBehind:
    """Runs ``flush`` on a task of its own: when woken (``wake``), and every ``interval_s`` (None: only when woken).

    ``flush`` returns False when the database failed (the owner keeps what it could not write):
    the task waits ``backoff_s``, doubled after each failure in a row up to ``max_backoff_s``, then
    tries again. Waiting, for work or after a failure, is one task: no timer creates another.
    """

    def __init__(
        self, flush: Callable[[], Awaitable[bool]], *, name: str, interval_s: float | None = None, backoff_s: float = 0.5, max_backoff_s: float = 30.0
    ) -> None:
        self._flush = flush
        self._name = name
        self._interval_s = interval_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called: a flush writing batch after batch ends after its current one."""
        return self._stop.is_set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Let a flush under way finish (up to ``timeout_s``), then end the task; the owner writes what is left."""
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        # the flush finishes its current write rather than being cancelled halfway through it
        await asyncio.wait({task}, timeout=timeout_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        backoff = self._backoff_s
        while True:
            with contextlib.suppress(TimeoutError):
                # a timeout, not wait_for: waiting must not create a task each round
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            if await self._flush():
                backoff = self._backoff_s
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stop.wait()
            backoff = min(backoff * 2, self._max_backoff_s)
            self._wake.set()  # try again now, not at the next interval
