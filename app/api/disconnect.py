"""Noticing a client that leaves while its request is still being answered."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive

#: how long a request runs before a task starts watching for its client leaving
WATCH_AFTER_S = 0.05


class DisconnectWatcher:
    """Cancels ``task`` when the client disconnects, watching from a task started after ``WATCH_AFTER_S``.

    A request answered sooner (a cache hit, a fast backend) never pays for the task; one whose
    client leaves is cancelled at most that much later than it could be. The timer itself is set
    on the loop's next turn, so a request answered without waiting does not even pay for that.
    """

    __slots__ = ("_loop", "_receive", "_start", "_task", "_watcher")

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self._receive = receive
        self._task = task
        # the task's loop rather than asyncio.get_running_loop() (a system call: see Services.loop)
        self._loop = task.get_loop()
        self._watcher: asyncio.Task[None] | None = None
        self._start: asyncio.Handle = self._loop.call_soon(self._arm)

    def _arm(self) -> None:
        self._start = self._loop.call_later(WATCH_AFTER_S, self._begin)

    def _begin(self) -> None:
        self._watcher = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._task.cancel()
                return

    @property
    def fired(self) -> bool:
        """Whether the client went away (and so cancelled the task)."""
        return self._watcher is not None and self._watcher.done() and not self._watcher.cancelled()

    def stop(self) -> None:
        self._start.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
