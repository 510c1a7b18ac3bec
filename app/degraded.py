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
        # running totals, and where they stood as each bucket of the window began: the window's
        # counts are differences, so a lookup adds to two numbers and only a new bucket does more
        self._hits = self._lookups = 0
        self._starts: deque[tuple[int, int, int]] = deque()  # (bucket number, hits, lookups) before it
        self._bucket: int | None = None
        self._hits_before = self._lookups_before = 0
        self._last_emit = float("-inf")

    @classmethod
    def from_config(cls, events: EventBus, config: EventsConfig) -> HitRateWatch:
        return cls(events, config.degraded_hit_rate, config.degraded_window_s, config.degraded_min_requests)

    def observe(self, cache_status: str) -> None:
        if cache_status not in ("hit", "semantic-hit", "miss"):
            return
        now = self._clock()
        number = int(now // self._bucket_s)
        if number != self._bucket:
            self._begin(number)
        self._hits += cache_status != "miss"
        self._lookups += 1
        lookups = self._lookups - self._lookups_before
        if lookups < self._min_requests or now - self._last_emit < self._window_s:
            return
        rate = (self._hits - self._hits_before) / lookups
        if rate < self._threshold:
            self._last_emit = now
            self._events.emit("optimizer.degraded", hit_rate=round(rate, 4), lookups=lookups, threshold=self._threshold, window_s=self._window_s)

    def _begin(self, number: int) -> None:
        """Bucket ``number`` begins: the buckets it pushes out of the window no longer count."""
        self._bucket = number
        starts = self._starts
        starts.append((number, self._hits, self._lookups))
        while starts[0][0] <= number - _BUCKETS:
            starts.popleft()
        _, self._hits_before, self._lookups_before = starts[0]
