"""Rate limits: per-agent admission (``keys[].rpm/tpm``) and the GCRA budgets it shares with providers.

A budget is ``rpm`` requests and ``tpm`` tokens per minute, admitted by GCRA in the state store
(a full minute's burst is allowed, then one unit every ``60/limit`` seconds). Tokens are reserved
as an estimate before the call (prompt size + ``max_tokens``, at most the whole ``tpm``) and
settled with the real usage after it — for a stream, when the stream ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.clock import Clock
from app.config import Settings
from app.errors import RateLimitError
from app.events import EventBus
from app.metrics import Metrics
from app.pipeline.answer import Answer, spent_tokens
from app.pipeline.base import Handler, ModelRequest, RequestContext
from app.state import StateStore

PERIOD_S = 60.0
#: at most one optimizer.rate_limit event per budget in this many seconds
ANNOUNCE_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests and tokens per minute for one agent or provider; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(slots=True)
class Reservation:
    """What one admission took: a request and ``tokens``; ``wait_s`` > 0 means refused (nothing taken)."""

    name: str
    limit: RateLimit | None
    tokens: int = 0
    wait_s: float = 0.0
    settled: bool = False


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """One budget as this replica sees it (the state store holds the shared truth)."""

    rpm: int | None
    rpm_used: float
    tpm: int | None
    tpm_used: float
    refused_total: int
    retry_after_s: float


class RateLimiter:
    """GCRA budgets per name (agent or provider) kept in the :class:`StateStore`.

    Read API (for ``/admin/backends`` and tests): ``limits`` (name → :class:`RateLimit`) and
    ``usage(name) -> BudgetUse | None`` — units used in the current minute, refusals so far and
    seconds until the last refusal clears. ``usage`` mirrors this replica's admissions; with
    several replicas the store enforces the shared budget and each replica sees its own share.
    """

    def __init__(self, scope: str, limits: Mapping[str, RateLimit], state: StateStore, clock: Clock, metrics: Metrics, events: EventBus) -> None:
        self.scope = scope
        self.limits = {name: limit for name, limit in limits.items() if limit.rpm or limit.tpm}
        self._state = state
        self._clock = clock
        self._events = events
        self._rejections = metrics.ratelimit_rejections.labels(scope)
        #: each budget's (rpm, tpm) keys in the state store, built once
        self._keys = {name: (self._key(name, "rpm"), self._key(name, "tpm")) for name in self.limits}
        self._tat: dict[str, float] = {}
        self._refused: dict[str, int] = {}
        self._refused_until: dict[str, float] = {}

    def _key(self, name: str, unit: str) -> str:
        return f"rl:{self.scope}:{name}:{unit}"

    def _mirror(self, key: str, limit: int, delta: float) -> None:
        now = self._clock.now()
        self._tat[key] = max(now, max(self._tat.get(key, now), now) + delta * PERIOD_S / limit)

    async def _give(self, key: str, limit: int, delta: float) -> None:
        await self._state.adjust_rate(key, limit, PERIOD_S, delta)
        self._mirror(key, limit, delta)

    async def reserve(self, name: str, tokens: int) -> Reservation:
        """Take one request and ``tokens`` (capped at the tpm) from ``name``'s budget, or refuse."""
        limit = self.limits.get(name)
        if limit is None:
            return Reservation(name, None)
        rpm_key, tpm_key = self._keys[name]
        if limit.rpm:
            wait = await self._state.acquire_rate(rpm_key, limit.rpm, PERIOD_S, 1)
            if wait > 0:
                return await self._refuse(name, limit, wait, "requests")
            self._mirror(rpm_key, limit.rpm, 1)
        if not limit.tpm:
            return Reservation(name, limit)
        tokens = min(max(tokens, 1), limit.tpm)
        wait = await self._state.acquire_rate(tpm_key, limit.tpm, PERIOD_S, tokens)
        if wait > 0:
            if limit.rpm:
                await self._give(rpm_key, limit.rpm, -1)
            return await self._refuse(name, limit, wait, "tokens")
        self._mirror(tpm_key, limit.tpm, tokens)
        return Reservation(name, limit, tokens)

    async def _refuse(self, name: str, limit: RateLimit, wait: float, unit: str) -> Reservation:
        self._rejections.inc()
        self._refused[name] = self._refused.get(name, 0) + 1
        self._refused_until[name] = self._clock.now() + wait
        if await self._state.set_if_absent(f"evt:rate_limit:{self.scope}:{name}", b"1", ANNOUNCE_EVERY_S):
            per_minute = limit.rpm if unit == "requests" else limit.tpm
            self._events.emit("optimizer.rate_limit", scope=self.scope, **{self.scope: name}, limit=f"{per_minute} {unit}/min", retry_after_s=round(wait, 3))
        return Reservation(name, limit, wait_s=wait)

    async def settle(self, reservation: Reservation, used_tokens: int | None, *, called: bool = True) -> None:
        """Replace the estimate by ``used_tokens`` (None keeps it); ``called=False`` returns the request too."""
        limit = reservation.limit
        if limit is None or reservation.wait_s > 0 or reservation.settled:
            return
        reservation.settled = True
        rpm_key, tpm_key = self._keys[reservation.name]
        if limit.tpm and used_tokens is not None and used_tokens != reservation.tokens:
            await self._give(tpm_key, limit.tpm, used_tokens - reservation.tokens)
        if limit.rpm and not called:
            await self._give(rpm_key, limit.rpm, -1)

    def usage(self, name: str) -> BudgetUse | None:
        limit = self.limits.get(name)
        if limit is None:
            return None
        now = self._clock.now()

        def used(unit: str, per_minute: int | None) -> float:
            if not per_minute:
                return 0.0
            return min(float(per_minute), max(0.0, self._tat.get(self._key(name, unit), now) - now) * per_minute / PERIOD_S)

        return BudgetUse(
            rpm=limit.rpm,
            rpm_used=used("rpm", limit.rpm),
            tpm=limit.tpm,
            tpm_used=used("tpm", limit.tpm),
            refused_total=self._refused.get(name, 0),
            retry_after_s=max(0.0, self._refused_until.get(name, now) - now),
        )

    @classmethod
    def for_agents(cls, settings: Settings, state: StateStore, clock: Clock, metrics: Metrics, events: EventBus) -> RateLimiter:
        limits = {k.agent: RateLimit(k.rpm, k.tpm) for k in settings.keys}
        return cls("agent", limits, state, clock, metrics, events)

    @classmethod
    def for_providers(cls, settings: Settings, state: StateStore, clock: Clock, metrics: Metrics, events: EventBus) -> RateLimiter:
        limits = {name: RateLimit(p.rpm, p.tpm) for name, p in settings.providers.items()}
        return cls("provider", limits, state, clock, metrics, events)


async def settle_when_done(limiter: RateLimiter, reservation: Reservation, answer: Answer, paid: bool) -> Answer:
    """Settle with the tokens the answer cost once it is over (a stream that failed or was left
    still cost what it used: the estimate stands when the provider never said)."""

    async def settle(_: BaseException | None) -> None:
        spent = spent_tokens(paid, answer.usage)
        await limiter.settle(reservation, spent.total if spent is not None else None)

    await answer.when_done(settle)
    return answer


class AgentRateLimitLayer:
    """Refuses an agent over its ``rpm``/``tpm`` with 429 and ``Retry-After``; settles tokens after."""

    def __init__(self, next_handler: Handler, limiter: RateLimiter) -> None:
        self._next = next_handler
        self._limiter = limiter

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        if ctx.key is None or ctx.agent not in self._limiter.limits:
            return await self._next(request, ctx)
        reservation = await self._limiter.reserve(ctx.agent, request.estimated_tokens())
        if reservation.wait_s > 0:
            limit = self._limiter.limits[ctx.agent]
            raise RateLimitError(
                f"Rate limit reached for agent '{ctx.agent}' (rpm {limit.rpm or 'unlimited'}, tpm {limit.tpm or 'unlimited'}). "
                f"Retry after {reservation.wait_s:.1f} s.",
                retry_after=reservation.wait_s,
            )
        try:
            answer = await self._next(request, ctx)
        except BaseException:
            # no answer, no tokens spent
            await self._limiter.settle(reservation, 0)
            raise
        return await settle_when_done(self._limiter, reservation, answer, ctx.paid_upstream)
