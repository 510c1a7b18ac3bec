"""The shared-state interface: limits, breaker state, locks and small values.

One replica uses :class:`~app.state.memory.MemoryStateStore`; several replicas share
:class:`~app.state.redis.RedisStateStore`. Every operation is atomic in both.
"""

from __future__ import annotations

from typing import Protocol


class StateStore(Protocol):
    """Atomic operations on named state; keys are short strings without secrets."""

    async def acquire_rate(self, key: str, limit: float, period_s: float, cost: float = 1.0) -> float:
        """GCRA admission of ``cost`` units against ``limit`` per ``period_s`` (a full burst allowed).

        Returns 0.0 when admitted (the units are taken), else the seconds until it would be.
        """
        ...

    async def adjust_rate(self, key: str, limit: float, period_s: float, delta: float) -> None:
        """Settle an earlier admission: take ``delta`` more units, or give back when negative."""
        ...

    async def record_event(self, key: str, window_s: float) -> int:
        """Record one event now; return how many happened in the last ``window_s``."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Set only when no live value exists (a lock or a once-only token)."""
        ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...
