"""``optimizer.degraded``: the cache hit rate over a sliding window, watched from the recorder."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from app.config import EventsConfig
from app.events import EventBus

_BUCKETS = 10


class HitRateWatch:
    """Counts cache lookups in time buckets; emits ``optimizer.degraded`` at most once per window.

    The event fires when, over the last ``window_s``, at least ``min_requests`` lookups (hits and
    misses; bypasses are not lookups) hit less than ``threshold`` of the time.
    """

    def __init__(self, events: EventBus, threshold: float, window_s: float, min_requests: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._events = events
        self._threshold = threshold
        self._window_s = window_s
        self._min_requests = min_requests
        self._clock = clock
        self._bucket_s = window_s / _BUCKETS
        self._buckets: deque[list[int]] = deque()  # [bucket number, hits, lookups]
        self._hits = self._lookups = 0
        self._last_emit = float("-inf")

    @classmethod
    def from_config(cls, events: EventBus, config: EventsConfig) -> HitRateWatch:
        return cls(events, config.degraded_hit_rate, config.degraded_window_s, config.degraded_min_requests)

    def observe(self, cache_status: str) -> None:
        if cache_status not in ("hit", "semantic-hit", "miss"):
            return
        now = self._clock()
        number = int(now // self._bucket_s)
        buckets = self._buckets
        while buckets and buckets[0][0] <= number - _BUCKETS:
            _, hits, lookups = buckets.popleft()
            self._hits -= hits
            self._lookups -= lookups
        if not buckets or buckets[-1][0] != number:
            buckets.append([number, 0, 0])
        hit = cache_status != "miss"
        buckets[-1][1] += hit
        buckets[-1][2] += 1
        self._hits += hit
        self._lookups += 1
        if self._lookups < self._min_requests or now - self._last_emit < self._window_s:
            return
        rate = self._hits / self._lookups
        if rate < self._threshold:
            self._last_emit = now
            self._events.emit("optimizer.degraded", hit_rate=round(rate, 4), lookups=self._lookups, threshold=self._threshold, window_s=self._window_s)
