"""The shared-state interface: limits, breaker state, locks and small values.

One replica uses :class:`~app.state.memory.MemoryStateStore`; several replicas share
:class:`~app.state.redis.RedisStateStore`. Every operation is atomic in both. A store also makes
what reaches as far as it does: the single-flight coordinator and the cache tier in front of the
SQL table (in-process for memory, across replicas for Redis), so nothing else looks at the URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from app.pipeline.inflight import InflightCoordinator
from app.storage.cache_tiers import CacheTier, SqlCacheTier


class RateWindow(NamedTuple):
    """A GCRA window: ``limit`` units per ``period_s``, its state under ``key``."""

    key: str
    limit: float
    period_s: float


#: one GCRA window of an admission and the units it takes from it (a plain pair: one is made per
#: request, and a NamedTuple is slow to make)
RateTake = tuple[RateWindow, float]


class QuotaTake(NamedTuple):
    """One fixed window of an admission (a day's requests or tokens): ``cost`` units against ``limit``.

    The window's count expires after ``ttl_s`` (keys name their window, so a new one starts from zero).
    """

    key: str
    limit: int
    cost: int
    ttl_s: float


class Admission(NamedTuple):
    """What :meth:`StateStore.admit` decided.

    ``refused`` is the index of the first window without room (rates first, then quotas), or -1 when
    every window took its units; ``wait_s`` is how long until a refusing rate window has room;
    ``used`` holds each quota's units after the call (taken when admitted, as they were when refused).
    """

    refused: int
    wait_s: float
    used: tuple[int, ...]


class StateStore(Protocol):
    """Atomic operations on named state; keys are short strings without secrets."""

    async def acquire_rate(self, key: str, limit: float, period_s: float, cost: float = 1.0) -> float:
        """GCRA admission of ``cost`` units against ``limit`` per ``period_s`` (a full burst allowed).

        Returns 0.0 when admitted (the units are taken), else the seconds until it would be.
        """
        ...

    def adjust_rate(self, key: str, limit: float, period_s: float, delta: float) -> None:
        """Settle an earlier admission: take ``delta`` more units, or give back when negative.

        Not a coroutine: it needs no answer, so it never waits. A store may apply it a moment later
        (the Redis store sends it with its next admission, or within ``ADJUST_DELAY_S``), never
        after a later admission on the same store.
        """
        ...

    async def admit(self, rates: Sequence[RateTake], quotas: Sequence[QuotaTake]) -> Admission:
        """Take every window's units at once, or none of them when one has no room (one round trip)."""
        ...

    async def give_quota(self, key: str, delta: int, ttl_s: float) -> int:
        """Settle a quota: take ``delta`` more units, or give back when negative (never below zero,
        never refused). Returns the units used after the call."""
        ...

    async def quota_used(self, key: str) -> int:
        """The units a quota window has used so far."""
        ...

    async def record_event(self, key: str, window_s: float) -> int:
        """Record one event now; return how many happened in the last ``window_s``."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_cached(self, key: str) -> bytes | None:
        """``get`` for values that rarely change (breaker records): may answer from a local copy that
        writes on other replicas invalidate a moment after they happen."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Set only when no live value exists (a lock or a once-only token)."""
        ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...

    def coordinator(self) -> InflightCoordinator:
        """A new single-flight coordinator: identical in-flight requests meet as far as this store reaches.

        The caller owns it (and closes it with ``aclose``).
        """
        ...

    def cache_tier(self, table: SqlCacheTier) -> CacheTier:
        """The response cache's persistent tier: ``table``, with whatever this store puts in front of it.

        The caller owns the returned tier (its ``aclose`` closes ``table`` too).
        """
        ...
