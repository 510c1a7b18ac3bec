"""In-process state for a single replica; the clock is injectable so tests control time."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from app.pipeline.inflight import InflightCoordinator, LocalInflight
from app.state.base import Admission, QuotaTake, RateTake, RateWindow
from app.storage.cache_tiers import CacheTier, SqlCacheTier

#: what admitting into rate windows alone answers
_ADMITTED = Admission(-1, 0.0, ())


class MemoryStateStore:
    """Dicts on one event loop; each method runs without awaiting, so it is atomic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._events: dict[str, deque[float]] = {}
        self._values: dict[str, tuple[bytes, float | None]] = {}

    async def acquire_rate(self, key: str, limit: float, period_s: float, cost: float = 1.0) -> float:
        admission = await self.admit([(RateWindow(key, limit, period_s), cost)], [])
        return admission.wait_s

    async def admit(self, rates: Sequence[RateTake], quotas: Sequence[QuotaTake]) -> Admission:
        now = self._clock()
        known = self._tat
        used = tuple([self._quota(q.key) for q in quotas]) if quotas else ()
        taken: list[tuple[str, float]] = []
        for i, ((key, limit, period_s), cost) in enumerate(rates):
            # GCRA (conditionals rather than max(): this runs on every admission)
            tat = known.get(key, now)
            tat = (tat if tat > now else now) + cost * (period_s / limit)
            wait = tat - period_s - now
            # under 1 µs is float noise from summing intervals, not a wait (the Redis store agrees)
            if wait > 1e-6:
                return Admission(i, wait, used)
            taken.append((key, tat))
        if not quotas:
            # minute windows alone (every request of a key without daily limits)
            known.update(taken)
            return _ADMITTED
        for i, q in enumerate(quotas):
            if used[i] + q.cost > q.limit:
                return Admission(len(rates) + i, 0.0, used)
        known.update(taken)
        for q, before in zip(quotas, used, strict=True):
            self._values["quota:" + q.key] = (str(before + q.cost).encode(), now + q.ttl_s)
        return Admission(-1, 0.0, tuple([before + q.cost for q, before in zip(quotas, used, strict=True)]))

    def adjust_rate(self, key: str, limit: float, period_s: float, delta: float) -> None:
        now = self._clock()
        tat = self._tat.get(key, now)
        tat = (tat if tat > now else now) + delta * (period_s / limit)
        self._tat[key] = tat if tat > now else now

    def _quota(self, key: str) -> int:
        value = self._live("quota:" + key)
        return int(value) if value is not None else 0

    async def give_quota(self, key: str, delta: int, ttl_s: float) -> int:
        used = max(0, self._quota(key) + delta)
        self._values["quota:" + key] = (str(used).encode(), self._clock() + ttl_s)
        return used

    async def quota_used(self, key: str) -> int:
        return self._quota(key)

    async def record_event(self, key: str, window_s: float) -> int:
        now = self._clock()
        events = self._events.setdefault(key, deque())
        events.append(now)
        while events and events[0] <= now - window_s:
            events.popleft()
        return len(events)

    def _live(self, key: str) -> bytes | None:
        item = self._values.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._clock():
            del self._values[key]
            return None
        return value

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def get_cached(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._values[key] = (value, None if ttl_s is None else self._clock() + ttl_s)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        if self._live(key) is not None:
            return False
        self._values[key] = (value, self._clock() + ttl_s)
        return True

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)
        self._events.pop(key, None)

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def coordinator(self) -> InflightCoordinator:
        """Identical requests meet within this process."""
        return LocalInflight()

    def cache_tier(self, table: SqlCacheTier) -> CacheTier:
        """The table alone: nothing is shared that it does not already share."""
        return table
