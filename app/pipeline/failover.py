"""Retries and failover across a route's deployments, within one request deadline.

A round walks the deployments (config order, or fastest first for ``strategy: latency``); a
retryable failure moves on to the next at once. After a round with at least one real failure the
next round starts after exponential backoff with jitter — longer if every deployment asked to
wait (Retry-After) — up to ``retry.attempts`` rounds, never past ``retry.deadline_s``. A round
where every deployment was skipped uncalled (circuit open, budget spent, queue full) ends at once:
the client is told when to come back instead of being held.

A prompt too long for a deployment (its 400 says so, or the model's ``context_window`` for it is
smaller than the prompt's estimate plus ``max_tokens``, so it is skipped uncalled) moves on to
the next deployment and is not tried again; when no deployment can take it, the client gets that
400 ``context_length_exceeded``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from app.clock import Clock
from app.config import Settings
from app.errors import (
    BackendRateLimitedError,
    BackendUnavailableError,
    BadRequestError,
    ContextLengthError,
    GatewayError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
    as_context_length,
)
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, Handler, ModelRequest, RequestContext
from app.pipeline.forward import NativeCall
from app.pipeline.latency import LatencyTracker
from app.pipeline.params import context_needed
from app.pipeline.policy import from_section


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many rounds over the deployments, the backoff between them, the overall deadline."""

    attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 8.0
    deadline_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return from_section(cls, settings.retry)

    def backoff(self, after_round: int, rng: random.Random) -> float:
        """Exponential, with "equal jitter": half of it fixed, half random, so replicas spread out."""
        full: float = min(self.max_backoff_s, self.backoff_s * 2.0**after_round)
        return full / 2 + rng.uniform(0, full / 2)


class CallDeadline:
    """``asyncio.timeout(delay)`` for one call, as a plain ``with`` block: the same cancellation, turned
    into ``TimeoutError`` the same way (and ``expired()`` after it), without Python 3.11's Timeout
    machinery (an enum state, a coroutine to enter and one to leave), which failover paid on every call.
    """

    __slots__ = ("_cancelling", "_delay", "_expired", "_handle", "_task")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._expired = False

    def __enter__(self) -> Self:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a call deadline needs a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = task.get_loop()
        self._handle = loop.call_at(loop.time() + self._delay, self._on_timeout)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._handle.cancel()
        # as asyncio.Timeout: the cancellation is ours to turn into TimeoutError unless another was asked for meanwhile
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def _on_timeout(self) -> None:
        self._task.cancel()
        self._expired = True

    def expired(self) -> bool:
        return self._expired


class FailoverLayer:
    """Sets ``ctx.deployment`` for each try; answers the first success or one error naming every backend tried."""

    def __init__(
        self,
        next_handler: Handler,
        policy: RetryPolicy,
        latency: LatencyTracker,
        clock: Clock,
        metrics: Metrics,
        providers: list[str],
        rng: random.Random | None = None,
        windows: Mapping[str, Mapping[Deployment, int]] | None = None,
    ) -> None:
        self._next = next_handler
        #: public model -> its deployments' context windows (tokens), where the config gives them
        self._windows = windows or {}
        self._policy = policy
        self._latency = latency
        self._clock = clock
        self._rng = rng or random.Random()
        self._retries = {p: metrics.retries.labels(p) for p in providers}
        self._failovers = {p: metrics.failovers.labels(p) for p in providers}

    def _order(self, ctx: RequestContext) -> list[Deployment]:
        return self._latency.order(ctx.deployments) if ctx.strategy == "latency" else list(ctx.deployments)

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        policy = self._policy
        deadline = self._clock.now() + policy.deadline_s
        last: dict[Deployment, UpstreamError] = {}
        calls: dict[Deployment, int] = {}
        # a forwarded request is given to each deployment in the form it takes (app/pipeline/forward.py)
        native = request if type(request) is NativeCall else None
        windows = self._windows.get(ctx.route)
        if windows:
            self._skip_too_small(request if native is None else native.measured(), ctx, windows, last)
        for round_ in range(policy.attempts):
            # a provider that rejected our key will not accept it a second later, nor a prompt too long for it
            order = [d for d in self._order(ctx) if not isinstance(last.get(d), (UpstreamAuthError, ContextLengthError))]
            called = False
            for i, deployment in enumerate(order):
                remaining = deadline - self._clock.now()
                if remaining <= 0:
                    raise self._exhausted(ctx, last, calls, deadline_hit=True)
                ctx.deployment = deployment
                call = request if native is None else native.at(deployment)
                started = time.perf_counter()
                limit = CallDeadline(remaining)
                try:
                    with limit:
                        result = await self._next(call, ctx)
                except TimeoutError:
                    if not limit.expired():
                        raise
                    raise self._exhausted(ctx, last, calls, deadline_hit=True) from None
                except (UpstreamError, BadRequestError) as exc:
                    too_long = as_context_length(exc, call.endpoint)
                    if too_long is not None:
                        # another deployment may have room for it; this one will not, this round or the next
                        last[deployment] = too_long
                        ctx.tried.append(f"{deployment}: {exc.message}")
                        self._count_call(deployment, calls)
                        if i + 1 < len(order):
                            self._failovers[deployment.provider].inc()
                        continue
                    if not isinstance(exc, UpstreamError) or not exc.retryable:
                        raise
                    last[deployment] = exc
                    ctx.tried.append(f"{deployment}: {exc.message}")
                    if isinstance(exc, BackendUnavailableError):
                        continue
                    called = True
                    self._count_call(deployment, calls)
                    if isinstance(exc, UpstreamTimeoutError):
                        self._latency.observe(deployment, time.perf_counter() - started)
                    if i + 1 < len(order):
                        self._failovers[deployment.provider].inc()
                    continue
                self._count_call(deployment, calls)
                self._latency.observe(deployment, time.perf_counter() - started)
                return result
            if not called or round_ + 1 >= policy.attempts or not order:
                break
            wait = policy.backoff(round_, self._rng)
            # every deployment asked to wait: the earliest of them is the soonest a retry can help
            wait = max(wait, min(last[d].retry_after or 0.0 for d in order))
            if self._clock.now() + wait >= deadline:
                break
            await self._clock.sleep(wait)
        raise self._exhausted(ctx, last, calls)

    def _skip_too_small(self, request: ModelRequest, ctx: RequestContext, windows: Mapping[Deployment, int], last: dict[Deployment, UpstreamError]) -> None:
        """Mark the deployments whose context window is smaller than the request needs: not called."""
        needed = context_needed(request)
        for deployment in ctx.deployments:
            window = windows.get(deployment)
            if window is not None and needed > window:
                message = f"skipped: its context window is {window} tokens, the request needs about {needed}"
                skip = last[deployment] = ContextLengthError(message, backend=deployment.provider, endpoint=request.endpoint)
                skip.skipped = True
                ctx.tried.append(f"{deployment}: {message}")

    def _count_call(self, deployment: Deployment, calls: dict[Deployment, int]) -> None:
        calls[deployment] = calls.get(deployment, 0) + 1
        if calls[deployment] > 1:
            self._retries[deployment.provider].inc()

    def _exhausted(self, ctx: RequestContext, last: dict[Deployment, UpstreamError], calls: dict[Deployment, int], deadline_hit: bool = False) -> GatewayError:
        return exhausted(ctx.route, ctx.deployments, last, calls, self._policy.deadline_s if deadline_hit else None)


def context_windows(settings: Settings) -> dict[str, dict[Deployment, int]]:
    """Public model -> deployment -> context window, for the models whose config gives any."""
    out: dict[str, dict[Deployment, int]] = {}
    for public, model in settings.models.items():
        sized = {Deployment.parse(d): w for d in model.deployments if (w := model.window_of(d)) is not None}
        if sized:
            out[public] = sized
    return out


def too_long_everywhere(route: str, detail: str, errors: list[UpstreamError]) -> ContextLengthError:
    """The 400 for a prompt no deployment has room for, with the provider's own type, code and param."""
    said = next((e for e in errors if not (isinstance(e, ContextLengthError) and e.skipped)), None)
    return ContextLengthError(
        f"The prompt is too long for every deployment of '{route}': {detail}",
        error_type=said.error_type if said is not None else None,
        code=said.code if said is not None else None,
        # a skip names the field holding the prompt on the request's endpoint
        param=(said or errors[0]).param,
    )


def exhausted(route: str, deployments: list[Deployment], last: dict[Deployment, UpstreamError], calls: dict[Deployment, int], deadline_s: float | None = None) -> GatewayError:
    """The error for a request no deployment answered, naming each backend tried and why.

    429 when every one is rate limited (its budget spent or it answered 429), 503 when every one
    was skipped uncalled (circuits open, queues full), 504 when the calls made all timed out or the
    deadline passed, else 502. 429 and 503 carry ``Retry-After``: the earliest one frees up.
    """
    parts = []
    for d in dict.fromkeys(deployments):
        if d in last:
            n = calls.get(d, 0)
            parts.append(f"{d}{f' ({n} calls)' if n > 1 else ''}: {last[d].message}")
    detail = "; ".join(parts) or "no deployment was tried"
    message = f"No backend could answer for '{route}': {detail}"
    if deadline_s is not None:
        return UpstreamTimeoutError(f"{message}; the request deadline of {deadline_s:g} s passed")
    errors = [e for e in last.values() if not isinstance(e, ContextLengthError)]
    if last and not errors:
        return too_long_everywhere(route, detail, list(last.values()))
    waits = [e.retry_after for e in errors if e.retry_after is not None]
    retry_after = min(waits) if waits else 1.0
    if errors and all(isinstance(e, (BackendRateLimitedError, UpstreamRateLimitError)) for e in errors):
        return RateLimitError(message, retry_after=retry_after, code="backends_rate_limited")
    if errors and all(isinstance(e, (BackendUnavailableError, UpstreamRateLimitError)) for e in errors):
        return ServiceUnavailableError(message, retry_after=retry_after, code="backends_unavailable")
    made = [e for e in errors if not isinstance(e, BackendUnavailableError)]
    if made and all(isinstance(e, UpstreamTimeoutError) for e in made):
        return UpstreamTimeoutError(message)
    return UpstreamError(message, code="backends_failed")
