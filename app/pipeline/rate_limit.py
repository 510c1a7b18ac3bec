"""Rate limits: per-agent admission (``keys[].rpm/tpm/rpd/tpd``) and the budgets it shares with providers.

A budget is ``rpm`` requests and ``tpm`` tokens per minute, admitted by GCRA in the state store
(a full minute's burst is allowed, then one unit every ``60/limit`` seconds), and ``rpd`` requests
and ``tpd`` tokens per day, counted in a fixed window that starts at midnight in
``limits.day_timezone``. Tokens are reserved as an estimate before the call (prompt size +
``max_tokens``, at most the whole ``tpm``/``tpd``) and settled with the real usage after it — for
a stream, when the stream ends. A request is admitted only when every window has room; a refusal
by a later window gives back what the earlier ones took.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from app.clock import Clock
from app.config import Settings
from app.errors import RateLimitError
from app.events import EventBus
from app.metrics import Metrics
from app.pipeline.answer import Answer, spent_tokens
from app.pipeline.base import Handler, ModelRequest, RequestContext
from app.providers.announced import Announced, announced_limits
from app.state import StateStore
from app.state.base import QuotaTake, RateTake, RateWindow

PERIOD_S = 60.0
#: at most one optimizer.rate_limit event per budget in this many seconds
ANNOUNCE_EVERY_S = 60.0


#: a day window's count outlives the day by this much (replicas' clocks differ a little)
_DAY_GRACE_S = 3600.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests and tokens per minute and per day for one agent or provider; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None

    def __bool__(self) -> bool:
        return bool(self.rpm or self.tpm or self.rpd or self.tpd)


class _Left:
    """An announced window as this replica counts it down until the provider's next answer."""

    __slots__ = ("limit", "remaining", "resets_at")

    def __init__(self, window: Announced) -> None:
        self.limit = window.limit
        self.remaining = window.remaining
        self.resets_at = window.resets_at


class _Budget:
    """One name's budget as every admission and settlement use it, made once; and this replica's
    mirror of its minute windows' TATs (for :meth:`RateLimiter.usage`)."""

    __slots__ = ("limit", "one_request", "rpm_key", "rpm_tat", "tpm", "tpm_key", "tpm_tat", "windows")

    def __init__(self, limit: RateLimit, rpm_key: str, tpm_key: str) -> None:
        self.limit = limit
        self.rpm_key = rpm_key
        self.tpm_key = tpm_key
        #: the take of one request from the rpm window, the same on every admission
        self.one_request: RateTake | None = (RateWindow(rpm_key, limit.rpm, PERIOD_S), 1) if limit.rpm else None
        #: the tpm window (each admission takes its own number of tokens from it)
        self.tpm = RateWindow(tpm_key, limit.tpm, PERIOD_S) if limit.tpm else None
        #: the windows an admission checks, in the store's order (rates, then quotas)
        self.windows = tuple(unit for unit in ("rpm", "tpm", "rpd", "tpd") if getattr(limit, unit))
        # no TAT before the first admission: 0 is never after now
        self.rpm_tat = 0.0
        self.tpm_tat = 0.0


def _mirror(tat: float, now: float, delta: float, limit: int) -> float:
    """A minute window's TAT after ``delta`` units more (fewer when negative), never before ``now``."""
    # conditionals rather than max(): this runs on every admission and settlement
    tat = (tat if tat > now else now) + delta * PERIOD_S / limit
    return tat if tat > now else now


class Days:
    """Calendar days in one time zone: which day it is, and how long until the next starts."""

    def __init__(self, timezone: str = "UTC") -> None:
        self.timezone = timezone
        self._zone = ZoneInfo(timezone)

    def today(self, now: float) -> tuple[str, float]:
        """(the day's date as YYYY-MM-DD, seconds until its end) at unix time ``now``."""
        local = datetime.fromtimestamp(now, self._zone)
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), self._zone)
        return local.date().isoformat(), max(0.001, midnight.timestamp() - now)


@dataclass(slots=True)
class Reservation:
    """What one admission took: a request and ``tokens``; ``wait_s`` > 0 means refused (nothing taken)."""

    name: str
    limit: RateLimit | None
    tokens: int = 0
    wait_s: float = 0.0
    settled: bool = False
    #: the window that refused it (rpm, tpm, rpd, tpd)
    refused_by: str = ""
    #: the day whose window the daily units came from (settled there even after midnight)
    day: str = ""
    day_tokens: int = 0


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """One budget as this replica sees it (the state store holds the shared truth)."""

    rpm: int | None
    rpm_used: float
    tpm: int | None
    tpm_used: float
    refused_total: int
    retry_after_s: float
    rpd: int | None = None
    rpd_used: int = 0
    tpd: int | None = None
    tpd_used: int = 0
    #: seconds until the daily windows start over
    day_resets_in_s: float | None = None


class RateLimiter:
    """Budgets per name (agent or provider) kept in the :class:`StateStore`.

    Read API (for ``/admin/backends`` and tests): ``limits`` (name → :class:`RateLimit`) and
    ``usage(name) -> BudgetUse | None`` — units used in the current minute and day, refusals so far
    and seconds until the last refusal clears. The minute figures mirror this replica's
    admissions (the store enforces the shared budget); the day figures are the shared count as
    the store last reported it (``await refresh(name)`` reads it afresh).
    """

    def __init__(
        self,
        scope: str,
        limits: Mapping[str, RateLimit],
        state: StateStore,
        clock: Clock,
        metrics: Metrics,
        events: EventBus,
        days: Days | None = None,
        low_share: float = 0.8,
    ) -> None:
        self.scope = scope
        self.limits = {name: limit for name, limit in limits.items() if limit}
        self._state = state
        self._clock = clock
        self._events = events
        self._days = days or Days()
        self._low_share = low_share
        self._remaining = metrics.budget_remaining
        #: what each provider announced in its last answer's headers: name -> (unit, window) -> what is left
        self._announced: dict[str, dict[tuple[str, str], _Left]] = {}
        #: the last shared count of each daily window: (name, unit) -> (day, used)
        self._day_used: dict[tuple[str, str], tuple[str, int]] = {}
        self._rejections = metrics.ratelimit_rejections.labels(scope)
        self._budgets = {name: _Budget(limit, self._key(name, "rpm"), self._key(name, "tpm")) for name, limit in self.limits.items()}
        self._refused: dict[str, int] = {}
        self._refused_until: dict[str, float] = {}

    # -- what providers announce in their headers ---------------------------------------------

    def learn(self, name: str, headers: Mapping[str, str]) -> None:
        """Take in the limits a provider's answer announced (``x-ratelimit-*`` headers)."""
        found = announced_limits(headers, self._clock.now())
        if found:
            known = self._announced.setdefault(name, {})
            for window in found:
                known[(window.unit, window.window)] = _Left(window)

    def announces(self, name: str) -> bool:
        """Whether ``name``'s answers have announced limits."""
        return name in self._announced

    def announced_wait(self, name: str, tokens: int) -> float:
        """Seconds until ``name`` has room by what it announced (0: it has), counting the calls
        admitted since its last answer; an admission takes one request and ``tokens`` from them."""
        known = self._announced.get(name)
        if not known:
            return 0.0
        now = self._clock.now()
        wait = 0.0
        for (unit, _), left in known.items():
            if left.remaining is None or left.resets_at is None or left.resets_at <= now:
                continue
            if left.remaining < (1 if unit == "requests" else max(tokens, 1)):
                wait = max(wait, left.resets_at - now)
        if wait > 0:
            return wait
        for (unit, _), left in known.items():
            if left.remaining is not None and left.resets_at is not None and left.resets_at > now:
                left.remaining -= 1 if unit == "requests" else max(tokens, 1)
        return 0.0

    def announced(self, name: str) -> list[dict[str, object]]:
        """What ``name`` announced, for ``/admin/backends``."""
        now = self._clock.now()
        return [
            {"unit": unit, "window": window or None, "limit": left.limit, "remaining": left.remaining, "resets_in_s": round(max(0.0, left.resets_at - now), 1) if left.resets_at else None}
            for (unit, window), left in self._announced.get(name, {}).items()
        ]

    @property
    def timezone(self) -> str:
        return self._days.timezone

    def _key(self, name: str, unit: str) -> str:
        return f"rl:{self.scope}:{name}:{unit}"

    async def reserve(self, name: str, tokens: int) -> Reservation:
        """Take one request and ``tokens`` (capped at the tpm and tpd) from ``name``'s budget, or refuse.

        Every window is checked and taken in one call to the store (one round trip on Redis).
        """
        budget = self._budgets.get(name)
        if budget is None:
            return Reservation(name, None)
        limit = budget.limit
        tokens = tokens if tokens > 1 else 1
        tpm = limit.tpm
        minute_tokens = (tokens if tokens < tpm else tpm) if tpm else 0
        rates = [budget.one_request] if budget.one_request is not None else []
        if budget.tpm is not None:
            rates.append((budget.tpm, minute_tokens))
        quotas: list[QuotaTake] = []
        day, left_s, day_tokens = "", 0.0, 0
        if limit.rpd or limit.tpd:
            day, left_s = self._days.today(self._clock.now())
            day_tokens = min(tokens, limit.tpd) if limit.tpd else 0
            for unit, per_day, cost in (("rpd", limit.rpd, 1), ("tpd", limit.tpd, day_tokens)):
                if per_day:
                    quotas.append(QuotaTake(self._key(name, unit) + ":" + day, per_day, cost, left_s + _DAY_GRACE_S))
        admission = await self._state.admit(rates, quotas)
        if quotas:
            for quota, unit, used in zip(quotas, budget.windows[len(rates) :], admission.used, strict=True):
                await self._saw_day(name, unit, quota.limit, day, used, left_s)
        if admission.refused >= 0:
            window = budget.windows[admission.refused]
            return await self._refuse(name, limit, admission.wait_s if admission.refused < len(rates) else left_s, window)
        now = self._clock.now()
        if limit.rpm:
            budget.rpm_tat = _mirror(budget.rpm_tat, now, 1, limit.rpm)
        if tpm:
            budget.tpm_tat = _mirror(budget.tpm_tat, now, minute_tokens, tpm)
        return Reservation(name, limit, minute_tokens, day=day, day_tokens=day_tokens)

    async def _saw_day(self, name: str, unit: str, limit: int, day: str, used: int, left_s: float) -> None:
        """Keep the shared count a daily window reported; announce once a day when a provider runs low."""
        before = self._day_used.get((name, unit))
        self._day_used[(name, unit)] = (day, used)
        self._remaining.labels(self.scope, name, unit).set(max(0, limit - used))
        low = used >= self._low_share * limit
        was_low = before is not None and before[0] == day and before[1] >= self._low_share * limit
        if self.scope == "provider" and low and not was_low:
            if await self._state.set_if_absent(f"evt:budget_low:{name}:{unit}:{day}", b"1", left_s + _DAY_GRACE_S):
                self._events.emit("optimizer.budget_low", scope=self.scope, provider=name, window=unit, limit=limit, used=used, resets_in_s=round(left_s, 1))

    async def _refuse(self, name: str, limit: RateLimit, wait: float, window: str) -> Reservation:
        self._rejections.inc()
        self._refused[name] = self._refused.get(name, 0) + 1
        self._refused_until[name] = self._clock.now() + wait
        if await self._state.set_if_absent(f"evt:rate_limit:{self.scope}:{name}", b"1", ANNOUNCE_EVERY_S):
            unit = "requests" if window[0] == "r" else "tokens"
            per = "min" if window.endswith("m") else "day"
            shown = f"{getattr(limit, window)} {unit}/{per}"
            self._events.emit("optimizer.rate_limit", scope=self.scope, **{self.scope: name}, limit=shown, retry_after_s=round(wait, 3))
        return Reservation(name, limit, wait_s=wait, refused_by=window)

    async def settle(self, reservation: Reservation, used_tokens: int | None, *, called: bool = True) -> None:
        """Replace the estimate by ``used_tokens`` (None keeps it); ``called=False`` returns the request too."""
        limit = reservation.limit
        if limit is None or reservation.wait_s > 0 or reservation.settled:
            return
        reservation.settled = True
        name = reservation.name
        budget = self._budgets[name]
        if limit.tpm and used_tokens is not None and used_tokens != reservation.tokens:
            delta = used_tokens - reservation.tokens
            self._state.adjust_rate(budget.tpm_key, limit.tpm, PERIOD_S, delta)
            budget.tpm_tat = _mirror(budget.tpm_tat, self._clock.now(), delta, limit.tpm)
        if limit.rpm and not called:
            self._state.adjust_rate(budget.rpm_key, limit.rpm, PERIOD_S, -1)
            budget.rpm_tat = _mirror(budget.rpm_tat, self._clock.now(), -1, limit.rpm)
        day = reservation.day
        if not day:
            return
        _, left_s = self._days.today(self._clock.now())
        ttl = left_s + _DAY_GRACE_S
        if limit.tpd and used_tokens is not None and used_tokens != reservation.day_tokens:
            used = await self._state.give_quota(self._key(name, "tpd") + ":" + day, used_tokens - reservation.day_tokens, ttl)
            await self._saw_day(name, "tpd", limit.tpd, day, used, left_s)
        if limit.rpd and not called:
            used = await self._state.give_quota(self._key(name, "rpd") + ":" + day, -1, ttl)
            await self._saw_day(name, "rpd", limit.rpd, day, used, left_s)

    async def refresh(self, name: str) -> None:
        """Read the daily windows' shared counts afresh (for ``/admin/backends``)."""
        limit = self.limits.get(name)
        if limit is None:
            return
        day, _ = self._days.today(self._clock.now())
        for unit, per_day in (("rpd", limit.rpd), ("tpd", limit.tpd)):
            if per_day:
                used = await self._state.quota_used(self._key(name, unit) + ":" + day)
                self._day_used[(name, unit)] = (day, used)
                self._remaining.labels(self.scope, name, unit).set(max(0, per_day - used))

    def usage(self, name: str) -> BudgetUse | None:
        budget = self._budgets.get(name)
        if budget is None:
            return None
        limit = budget.limit
        now = self._clock.now()

        def used(tat: float, per_minute: int | None) -> float:
            if not per_minute:
                return 0.0
            return min(float(per_minute), max(0.0, tat - now) * per_minute / PERIOD_S)

        day, left_s = self._days.today(now)

        def used_today(unit: str) -> int:
            seen = self._day_used.get((name, unit))
            return seen[1] if seen is not None and seen[0] == day else 0

        return BudgetUse(
            rpm=limit.rpm,
            rpm_used=used(budget.rpm_tat, limit.rpm),
            tpm=limit.tpm,
            tpm_used=used(budget.tpm_tat, limit.tpm),
            refused_total=self._refused.get(name, 0),
            retry_after_s=max(0.0, self._refused_until.get(name, now) - now),
            rpd=limit.rpd,
            rpd_used=used_today("rpd"),
            tpd=limit.tpd,
            tpd_used=used_today("tpd"),
            day_resets_in_s=round(left_s, 1) if limit.rpd or limit.tpd else None,
        )

    @classmethod
    def for_agents(cls, settings: Settings, state: StateStore, clock: Clock, metrics: Metrics, events: EventBus) -> RateLimiter:
        limits = {k.agent: RateLimit(k.rpm, k.tpm, k.rpd, k.tpd) for k in settings.keys}
        return cls("agent", limits, state, clock, metrics, events, Days(settings.limits.day_timezone), settings.limits.budget_low_share)

    @classmethod
    def for_providers(cls, settings: Settings, state: StateStore, clock: Clock, metrics: Metrics, events: EventBus) -> RateLimiter:
        limits = {name: RateLimit(p.rpm, p.tpm, p.rpd, p.tpd) for name, p in settings.providers.items()}
        return cls("provider", limits, state, clock, metrics, events, Days(settings.limits.day_timezone), settings.limits.budget_low_share)


async def settle_when_done(limiter: RateLimiter, reservation: Reservation, answer: Answer, paid: bool) -> Answer:
    """Settle with the tokens the answer cost once it is over (a stream that failed or was left
    still cost what it used: the estimate stands when the provider never said)."""
    if not answer.is_stream:
        # over already: settled at once (what when_done would do, without a hook to make and await)
        await limiter.settle(reservation, _spent(paid, answer))
        return answer

    async def settle(_: BaseException | None) -> None:
        await limiter.settle(reservation, _spent(paid, answer))

    await answer.when_done(settle)
    return answer


def _spent(paid: bool, answer: Answer) -> int | None:
    spent = spent_tokens(paid, answer.usage)
    return spent.total if spent is not None else None


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
            if reservation.refused_by in ("rpd", "tpd"):
                unit = "request" if reservation.refused_by == "rpd" else "token"
                message = (
                    f"Daily {unit} budget of agent '{ctx.agent}' is spent ({reservation.refused_by} {getattr(limit, reservation.refused_by)}); "
                    f"it starts over at midnight ({self._limiter.timezone}), in {reservation.wait_s:.0f} s."
                )
            else:
                message = (
                    f"Rate limit reached for agent '{ctx.agent}' (rpm {limit.rpm or 'unlimited'}, tpm {limit.tpm or 'unlimited'}). "
                    f"Retry after {reservation.wait_s:.1f} s."
                )
            raise RateLimitError(message, retry_after=reservation.wait_s)
        try:
            answer = await self._next(request, ctx)
        except BaseException:
            # no answer, no tokens spent
            await self._limiter.settle(reservation, 0)
            raise
        return await settle_when_done(self._limiter, reservation, answer, ctx.paid_upstream)
