"""A clock that moves only when a test says so; the gateway's limits, breakers and retries run on it."""

from __future__ import annotations

import asyncio
import threading

from app.clock import Clock


class ManualClock(Clock):
    """``now()`` stands still until ``advance(s)``; ``sleep(s)`` advances instead of waiting (and is recorded)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()  # the test thread advances while the gateway's loop reads
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)
