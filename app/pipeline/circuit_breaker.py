"""Circuit breaker per deployment, its state in the state store so every replica shares it.

closed ──(failure_threshold failures within window_s)──▶ open ──(cooldown_s)──▶ half-open
half-open: one probe call; success → closed (backend_up), failure → open again (backend_down).
A provider 429 is no failure: the deployment pauses for its Retry-After instead ("cooling").
"""

from __future__ import annotations

from dataclasses import dataclass

from app.clock import Clock
from app.config import Settings
from app.errors import (
    BackendRateLimitedError,
    BackendUnavailableError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimitError,
)
from app.events import EventBus
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, Handler, ModelRequest, RequestContext
from app.pipeline.policy import from_section
from app.state import StateStore

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}
#: an open record nobody probes is forgotten (back to closed) after its cooldown plus this
FORGET_AFTER_S = 86400.0


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a deployment's circuit opens, how long it stays open, how long a 429 pauses it."""

    failure_threshold: int = 5
    window_s: float = 60.0
    cooldown_s: float = 300.0
    rate_limit_cooldown_s: float = 5.0
    probe_timeout_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        return from_section(cls, settings.circuit_breaker, probe_timeout_s=settings.retry.deadline_s)


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """One deployment's breaker: state, seconds until half-open, seconds of 429 pause left, last error."""

    state: str
    open_for_s: float
    cooling_for_s: float
    last_error: str | None
    last_error_at: float | None


class CircuitBreaker:
    """Breaker state per deployment, through ``StateStore`` get/set/set_if_absent/delete/record_event.

    Store keys: ``cb:<deployment>`` holds ``open|<until>|<reason>`` or ``cool|<until>|<reason>``
    (absent = closed); ``cb:<deployment>:fails`` the failure window; ``cb:<deployment>:probe`` the
    half-open probe lock. Deployments not in ``models`` share one breaker per provider
    (``<provider>/*``) so clients cannot grow the state with made-up model ids.

    Read API (for ``/admin/backends``): ``deployments`` (configured, in config order),
    ``await status(deployment) -> BreakerStatus`` (reads the store), ``known_state(deployment)``
    (0/1/2 as this replica last saw it, no I/O) and ``any_usable()`` (not every circuit open).
    """

    def __init__(self, policy: BreakerPolicy, deployments: list[Deployment], providers: list[str], state: StateStore, clock: Clock, metrics: Metrics, events: EventBus) -> None:
        self.policy = policy
        self.deployments = list(dict.fromkeys(deployments))
        self._configured = {str(d) for d in self.deployments}
        self._state = state
        self._clock = clock
        self._events = events
        self._known: dict[str, int] = {str(d): CLOSED for d in self.deployments}
        self._keys_of: dict[str, set[str]] = {p: set() for p in providers}
        for d in self.deployments:
            self._keys_of.setdefault(d.provider, set()).add(str(d))
        self._gauge_state = {p: metrics.circuit_state.labels(p) for p in self._keys_of}
        self._gauge_up = {p: metrics.backend_up.labels(p) for p in self._keys_of}
        for p in self._keys_of:
            self._gauge_state[p].set(CLOSED)
            self._gauge_up[p].set(1)
        self._last_error: dict[str, tuple[float, str]] = {}
        self._all_down = False

    def key(self, deployment: Deployment) -> str:
        text = str(deployment)
        return text if text in self._configured else f"{deployment.provider}/*"

    async def _read(self, key: str, *, cached: bool = False) -> tuple[str, float, str] | None:
        raw = await (self._state.get_cached if cached else self._state.get)(f"cb:{key}")
        if raw is None:
            return None
        kind, until, reason = raw.decode("utf-8", "replace").split("|", 2)
        return kind, float(until), reason

    def _record(self, kind: str, seconds: float, reason: str) -> bytes:
        return f"{kind}|{self._clock.now() + seconds:.3f}|{reason[:300]}".encode()

    def _observe(self, key: str, provider: str, state: int) -> None:
        if self._known.get(key) == state:
            return
        self._known[key] = state
        if state != OPEN:
            self._all_down = False
        keys = self._keys_of.setdefault(provider, set())
        keys.add(key)
        if provider in self._gauge_state:
            states = [self._known.get(k, CLOSED) for k in keys]
            self._gauge_state[provider].set(max(states))
            self._gauge_up[provider].set(0 if all(s == OPEN for s in states) else 1)

    def known_state(self, deployment: Deployment) -> int:
        return self._known.get(self.key(deployment), CLOSED)

    def any_usable(self) -> bool:
        return not self._known or any(s != OPEN for s in self._known.values())

    async def status(self, deployment: Deployment) -> BreakerStatus:
        key = self.key(deployment)
        entry = await self._read(key)
        now = self._clock.now()
        state, open_for, cooling_for = CLOSED, 0.0, 0.0
        if entry is not None:
            kind, until, _ = entry
            if kind == "cool":
                cooling_for = max(0.0, until - now)
            else:
                state, open_for = (OPEN, until - now) if now < until else (HALF_OPEN, 0.0)
        self._observe(key, deployment.provider, state)
        last = self._last_error.get(key)
        return BreakerStatus(STATE_NAMES[state], open_for, cooling_for, last[1] if last else None, last[0] if last else None)

    async def admit(self, deployment: Deployment) -> bool:
        """Raise a skip error when the deployment must not be called now; True when this call is the probe."""
        key = self.key(deployment)
        # read on every call: a local copy, which writes on any replica invalidate (no round trip while nothing changes)
        entry = await self._read(key, cached=True)
        if entry is None:
            self._observe(key, deployment.provider, CLOSED)
            return False
        kind, until, reason = entry
        now = self._clock.now()
        if kind == "cool":
            if now < until:
                raise BackendRateLimitedError(f"asked us to wait ({reason}), {until - now:.0f} s left", backend=deployment.provider, retry_after=until - now)
            self._observe(key, deployment.provider, CLOSED)
            return False
        if now < until:
            self._observe(key, deployment.provider, OPEN)
            raise BackendUnavailableError(f"circuit open after: {reason}; retry in {until - now:.0f} s", backend=deployment.provider, retry_after=until - now)
        self._observe(key, deployment.provider, HALF_OPEN)
        if await self._state.set_if_absent(f"cb:{key}:probe", b"1", self.policy.probe_timeout_s):
            return True
        raise BackendUnavailableError("circuit half-open, its probe call is in flight", backend=deployment.provider, retry_after=1.0)

    async def success(self, deployment: Deployment, probe: bool) -> None:
        if probe:
            await self._close(deployment)

    async def release_probe(self, deployment: Deployment) -> None:
        await self._state.delete(f"cb:{self.key(deployment)}:probe")

    async def failure(self, deployment: Deployment, exc: UpstreamError, probe: bool) -> None:
        """Count a failed call; a skip or the client's own mistake only frees the probe slot."""
        key = self.key(deployment)
        if isinstance(exc, UpstreamRateLimitError):
            self._last_error[key] = (self._clock.now(), exc.message)
            await self._cool(deployment, exc, probe)
            return
        if not exc.breaker_failure:
            if probe:
                await self.release_probe(deployment)
            return
        self._last_error[key] = (self._clock.now(), exc.message)
        if probe:
            await self._state.set(f"cb:{key}", self._record("open", self.policy.cooldown_s, exc.message), ttl_s=self.policy.cooldown_s + FORGET_AFTER_S)
            await self.release_probe(deployment)
            self._opened(deployment, exc, "the half-open probe failed")
            return
        count = await self._state.record_event(f"cb:{key}:fails", self.policy.window_s)
        if count < self.policy.failure_threshold:
            return
        record = self._record("open", self.policy.cooldown_s, exc.message)
        if await self._state.set_if_absent(f"cb:{key}", record, self.policy.cooldown_s + FORGET_AFTER_S):
            self._opened(deployment, exc, f"{count} failures within {self.policy.window_s:g} s")

    async def _cool(self, deployment: Deployment, exc: UpstreamRateLimitError, probe: bool) -> None:
        key = self.key(deployment)
        if probe:
            await self._close(deployment)  # it answered: reachable, only busy
        else:
            entry = await self._read(key)
            if entry is not None and entry[0] == "open":
                return
        wait = min(exc.retry_after if exc.retry_after is not None else self.policy.rate_limit_cooldown_s, self.policy.cooldown_s)
        if wait > 0:
            reason = f"429, Retry-After {exc.retry_after:g} s" if exc.retry_after is not None else "429"
            await self._state.set(f"cb:{key}", self._record("cool", wait, reason), ttl_s=wait)

    async def _close(self, deployment: Deployment) -> None:
        key = self.key(deployment)
        for suffix in ("", ":fails", ":probe"):
            await self._state.delete(f"cb:{key}{suffix}")
        self._observe(key, deployment.provider, CLOSED)
        self._events.emit("optimizer.backend_up", backend=deployment.provider, deployment=key)

    def _opened(self, deployment: Deployment, exc: UpstreamError, why: str) -> None:
        key = self.key(deployment)
        self._observe(key, deployment.provider, OPEN)
        data = {"backend": deployment.provider, "deployment": key, "reason": exc.message, "why": why, "cooldown_s": self.policy.cooldown_s}
        if isinstance(exc, UpstreamAuthError):
            data["bad_key"] = True
            data["hint"] = f"the provider rejects the gateway's API key: check providers.{deployment.provider}.api_key"
        self._events.emit("optimizer.backend_down", **data)
        if not self._all_down and all(s == OPEN for s in self._known.values()):
            self._all_down = True
            self._events.emit("optimizer.all_backends_down", deployments=sorted(self._known))


class CircuitBreakerLayer:
    """Skips a deployment whose circuit is open and reports every outcome, mid-stream failures too."""

    def __init__(self, next_handler: Handler, breaker: CircuitBreaker) -> None:
        self._next = next_handler
        self._breaker = breaker

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        deployment = ctx.deployment
        assert deployment is not None
        breaker = self._breaker
        probe = await breaker.admit(deployment)
        try:
            answer = await self._next(request, ctx)
        except UpstreamError as exc:
            await breaker.failure(deployment, exc, probe)
            raise
        except BaseException:
            if probe:
                await breaker.release_probe(deployment)
            raise
        await breaker.success(deployment, probe)
        if answer.is_stream:

            async def failed_midway(outcome: BaseException | None) -> None:
                if isinstance(outcome, UpstreamError):
                    await breaker.failure(deployment, outcome, False)

            await answer.when_done(failed_midway)
        return answer
