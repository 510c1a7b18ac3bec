"""The resilience policies on their own: breaker states, failover rules, budgets — on a manual clock."""

from __future__ import annotations

import random

import pytest

from app.errors import (
    BackendRateLimitedError,
    BackendUnavailableError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamAuthError,
    UpstreamClientError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from app.events import EventBus
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, ModelRequest, RequestContext
from app.pipeline.circuit_breaker import BreakerPolicy, CircuitBreaker
from app.pipeline.failover import FailoverLayer, RetryPolicy, exhausted
from app.pipeline.latency import LatencyTracker
from app.pipeline.rate_limit import RateLimit, RateLimiter
from app.state import MemoryStateStore
from tests.manual_clock import ManualClock

A, B, C = Deployment("a", "m"), Deployment("b", "m"), Deployment("c", "m")


def breaker(clock: ManualClock, events: list[str] | None = None) -> CircuitBreaker:
    metrics = Metrics()
    bus = EventBus(metrics)
    if events is not None:

        class Sink:
            def deliver(self, event: dict[str, object]) -> None:
                events.append(str(event["event"]))

        bus.sinks.append(Sink())
    return CircuitBreaker(BreakerPolicy(), [A, B], ["a", "b"], MemoryStateStore(clock.now), clock, metrics, bus)


@pytest.mark.asyncio
async def test_half_open_admits_exactly_one_probe() -> None:
    clock = ManualClock()
    events: list[str] = []
    cb = breaker(clock, events)
    for _ in range(5):
        assert await cb.admit(A) is False
        await cb.failure(A, UpstreamError("a answered 500", backend="a"), probe=False)
    with pytest.raises(BackendUnavailableError, match="circuit open"):
        await cb.admit(A)
    clock.advance(300)
    assert await cb.admit(A) is True
    with pytest.raises(BackendUnavailableError, match="probe"):
        await cb.admit(A)
    await cb.release_probe(A)  # e.g. the probe's client went away: another request may probe
    assert await cb.admit(A) is True
    await cb.success(A, probe=True)
    assert await cb.admit(A) is False
    assert events == ["optimizer.backend_down", "optimizer.backend_up"]


@pytest.mark.asyncio
async def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = ManualClock()
    cb = breaker(clock)
    for _ in range(4):
        await cb.failure(A, UpstreamError("boom"), probe=False)
    clock.advance(61)
    await cb.failure(A, UpstreamError("boom"), probe=False)
    assert await cb.admit(A) is False
    assert cb.known_state(A) == 0


@pytest.mark.asyncio
async def test_client_errors_and_skips_are_not_failures() -> None:
    clock = ManualClock()
    cb = breaker(clock)
    for _ in range(10):
        await cb.failure(A, UpstreamClientError("bad request", status=400), probe=False)
        await cb.failure(A, BackendRateLimitedError("budget spent", retry_after=3), probe=False)
    assert await cb.admit(A) is False


@pytest.mark.asyncio
async def test_all_backends_down_is_announced_once() -> None:
    clock = ManualClock()
    events: list[str] = []
    cb = breaker(clock, events)
    for d in (A, B):
        for _ in range(5):
            await cb.failure(d, UpstreamError("boom"), probe=False)
    assert events.count("optimizer.all_backends_down") == 1
    assert not cb.any_usable()


class Scripted:
    """A next handler that fails for the listed deployments and answers for the rest."""

    def __init__(self, clock: ManualClock, failures: dict[Deployment, UpstreamError], takes_s: float = 0.0) -> None:
        self.clock, self.failures, self.takes_s = clock, failures, takes_s
        self.calls: list[Deployment] = []

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        assert ctx.deployment is not None
        self.calls.append(ctx.deployment)
        self.clock.advance(self.takes_s)
        if ctx.deployment in self.failures:
            raise self.failures[ctx.deployment]
        return Answer(body={"choices": []})  # type: ignore[typeddict-item]


def failover(handler: Scripted, clock: ManualClock, **policy: float) -> FailoverLayer:
    return FailoverLayer(handler, RetryPolicy(**policy), LatencyTracker([A, B, C]), clock, Metrics(), ["a", "b", "c"], rng=random.Random(7))  # type: ignore[arg-type]


def context(*deployments: Deployment) -> RequestContext:
    return RequestContext(request_id="t", route="fast", deployments=list(deployments))


@pytest.mark.asyncio
async def test_a_passed_deadline_stops_with_504() -> None:
    clock = ManualClock()
    handler = Scripted(clock, {A: UpstreamError("a answered 500"), B: UpstreamError("b answered 500")}, takes_s=70)
    with pytest.raises(UpstreamTimeoutError, match="deadline of 120 s"):
        await failover(handler, clock, deadline_s=120)(ModelRequest({}), context(A, B, C))
    assert handler.calls == [A, B]


@pytest.mark.asyncio
async def test_a_rejected_key_is_not_retried_in_later_rounds() -> None:
    clock = ManualClock()
    handler = Scripted(clock, {A: UpstreamAuthError("a rejected the gateway's provider key (401)"), B: UpstreamError("b answered 500")})
    with pytest.raises(UpstreamError):
        await failover(handler, clock, attempts=3)(ModelRequest({}), context(A, B))
    assert handler.calls == [A, B, B, B]


def test_backoff_grows_exponentially_within_its_cap() -> None:
    policy, rng = RetryPolicy(backoff_s=1.0, max_backoff_s=8.0), random.Random(1)
    for after_round, full in enumerate([1, 2, 4, 8, 8]):
        assert full / 2 <= policy.backoff(after_round, rng) <= full


@pytest.mark.parametrize(
    ("errors", "kind", "status"),
    [
        ([BackendRateLimitedError("spent", retry_after=9), UpstreamRateLimitError("429", retry_after=4)], RateLimitError, 429),
        ([BackendUnavailableError("circuit open", retry_after=100), BackendRateLimitedError("spent", retry_after=9)], ServiceUnavailableError, 503),
        ([UpstreamTimeoutError("timed out"), BackendUnavailableError("circuit open", retry_after=5)], UpstreamTimeoutError, 504),
        ([UpstreamTimeoutError("timed out"), UpstreamError("answered 500")], UpstreamError, 502),
    ],
)
def test_the_final_status_says_what_went_wrong(errors: list[UpstreamError], kind: type, status: int) -> None:
    err = exhausted("fast", [A, B], dict(zip([A, B], errors, strict=True)), {})
    assert type(err) is kind and err.status == status
    assert "a/m: " in err.message and "b/m: " in err.message
    if status in (429, 503):
        assert err.retry_after == min(e.retry_after for e in errors if e.retry_after is not None)


def test_latency_order_measures_the_unmeasured_first() -> None:
    tracker = LatencyTracker([A, B, C])
    tracker.observe(A, 2.0)
    tracker.observe(B, 0.5)
    assert tracker.order([A, B, C]) == [C, B, A]
    tracker.observe(C, 1.0)
    tracker.observe(B, 10.0)  # EWMA: 0.5 + 0.3 * 9.5 = 3.35
    assert tracker.latency(B) == pytest.approx(3.35)
    assert tracker.order([A, B, C]) == [C, A, B]


@pytest.mark.asyncio
async def test_a_reservation_larger_than_the_tpm_waits_for_a_full_bucket() -> None:
    clock = ManualClock()
    metrics = Metrics()
    limiter = RateLimiter("agent", {"x": RateLimit(tpm=1000)}, MemoryStateStore(clock.now), clock, metrics, EventBus(metrics))
    first = await limiter.reserve("x", 5000)
    assert first.wait_s == 0 and first.tokens == 1000  # capped: it could never fit otherwise
    await limiter.settle(first, 400)
    refused = await limiter.reserve("x", 5000)
    assert refused.wait_s == pytest.approx(24)  # 400 tokens drain at 1000 per minute
    clock.advance(24)
    assert (await limiter.reserve("x", 5000)).wait_s == 0
