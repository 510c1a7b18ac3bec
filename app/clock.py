"""Time for the policies (limits, breaker, retries): one object, so tests can control it."""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Wall-clock seconds and sleeping.

    Wall-clock rather than monotonic: breaker deadlines are written to the shared state store
    and compared by every replica, and only wall clocks agree across machines.
    Tests pass a manual clock whose ``sleep`` advances ``now`` instead of waiting.
    """

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
