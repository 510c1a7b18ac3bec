"""Daily budgets (``rpd``/``tpd``) of keys and providers: refusals until midnight in the configured
time zone, skips to the next deployment, shared exactly across replicas, the low-budget event."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest

from app.events import EventBus
from app.metrics import Metrics
from app.pipeline.rate_limit import Days, RateLimit, RateLimiter
from app.state import MemoryStateStore
from app.state.redis import RedisStateStore
from tests.fake_upstream import FakeUpstream
from tests.manual_clock import ManualClock
from tests.resilience_support import AGENT_KEY, HI, OTHER_KEY, client, listen, post, two_upstreams
from tests.support import GatewayServer, gateway

REDIS_URL = "redis://127.0.0.1:6379/0"
#: 2026-03-10 22:00:00 UTC: two hours before a UTC midnight
EVENING = datetime(2026, 3, 10, 22, 0, tzinfo=ZoneInfo("UTC")).timestamp()


def remaining(gw: GatewayServer, scope: str, name: str, window: str) -> float | None:
    return gw.services.metrics.registry.get_sample_value("admiral_budget_remaining", {"scope": scope, "name": name, "window": window})


def test_days_follow_the_time_zone() -> None:
    assert Days("UTC").today(EVENING) == ("2026-03-10", pytest.approx(7200))
    # 22:00 UTC is already the 11th in Tokyo (07:00), 17 h before its midnight
    assert Days("Asia/Tokyo").today(EVENING) == ("2026-03-11", pytest.approx(17 * 3600))
    # a day with a daylight-saving change is 23 h long in New York (2026-03-08)
    start = datetime(2026, 3, 8, 0, 0, tzinfo=ZoneInfo("America/New_York")).timestamp()
    assert Days("America/New_York").today(start)[1] == pytest.approx(23 * 3600)


def test_an_agent_out_of_its_daily_requests_waits_for_midnight(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock(EVENING)
    with gateway(two_upstreams(upstream, upstream2, tmp_path, key_extra=", rpd: 3"), clock=clock) as gw:
        events = listen(gw)
        sdk = client(gw)
        for _ in range(3):
            sdk.chat.completions.create(model="fast", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as info:
            sdk.chat.completions.create(model="fast", messages=HI)  # type: ignore[arg-type]
        assert info.value.response.headers["retry-after"] == "7200"
        assert "Daily request budget of agent 'tester'" in info.value.body["message"]  # type: ignore[index]
        assert "midnight (UTC)" in info.value.body["message"]  # type: ignore[index]
        assert upstream.calls == 3
        assert post(gw, key=OTHER_KEY).status_code == 200  # another agent has its own day
        assert events.named("optimizer.rate_limit")[0]["limit"] == "3 requests/day"
        assert remaining(gw, "agent", "tester", "rpd") == 0
        clock.advance(7199)
        assert post(gw).status_code == 429
        clock.advance(1)  # midnight: a new day
        assert post(gw).status_code == 200
        assert remaining(gw, "agent", "tester", "rpd") == 2


def test_daily_tokens_are_reserved_then_settled(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock(EVENING)
    with gateway(two_upstreams(upstream, upstream2, tmp_path, key_extra=", tpd: 1000"), clock=clock) as gw:
        limits = gw.services.resilience.agent_limits
        # each reserves ~901 tokens and uses 3 (the fake upstream's usage): settled, the next fits
        assert post(gw, max_tokens=900).status_code == 200
        assert post(gw, max_tokens=900).status_code == 200
        usage = limits.usage("tester")
        assert usage is not None and usage.tpd == 1000 and usage.tpd_used == 6
        refused = post(gw, max_tokens=995)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "7200"
        assert "Daily token budget" in refused.json()["error"]["message"]
        assert limits.usage("tester").tpd_used == 6  # type: ignore[union-attr]  # the refusal took nothing


def test_a_provider_out_of_its_day_is_skipped_then_503_until_midnight(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock(EVENING)
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", rpd: 2", up2_extra=", rpd: 1")
    with gateway(config, clock=clock) as gw:
        backends = [post(gw).headers.get("x-admiral-backend") for _ in range(3)]
        assert backends == ["up", "up", "up2"]
        refused = post(gw)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) == 7200
        assert (upstream.calls, upstream2.calls) == (2, 1)
        admin = gw.services.resilience
        status = gw.call(admin.provider_status("up"))
        assert status["budget"]["rpd"] == 2 and status["budget"]["rpd_used"] == 2
        assert status["budget"]["day_resets_in_s"] == pytest.approx(7200, abs=1)
        clock.advance(7200)
        assert post(gw).headers["x-admiral-backend"] == "up"


def test_budget_low_fires_once_a_day_at_the_configured_share(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock(EVENING)
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", rpd: 10") + "limits: {budget_low_share: 0.5}\n"
    with gateway(config, clock=clock) as gw:
        events = listen(gw)
        for _ in range(4):
            post(gw)
        assert events.named("optimizer.budget_low") == []
        post(gw)  # 5 of 10
        post(gw)
        low = events.named("optimizer.budget_low")
        assert len(low) == 1
        assert low[0]["provider"] == "up" and low[0]["window"] == "rpd" and low[0]["used"] == 5 and low[0]["limit"] == 10
        clock.advance(7200)
        for _ in range(5):
            post(gw)
        assert len(events.named("optimizer.budget_low")) == 2  # once more on the new day


def test_a_bad_time_zone_fails_at_start(tmp_path: Path) -> None:
    from app.config import ConfigError, build_settings

    with pytest.raises(ConfigError) as caught:
        build_settings({"limits": {"day_timezone": "Mars/Olympus"}}, source="g.yaml", env={})
    assert "limits.day_timezone" in str(caught.value) and "unknown time zone 'Mars/Olympus'" in str(caught.value)


@pytest.mark.asyncio
async def test_a_refusal_by_the_day_gives_back_the_minute() -> None:
    clock = ManualClock(EVENING)
    metrics = Metrics()
    limiter = RateLimiter("agent", {"a": RateLimit(rpm=100, tpm=10_000, rpd=1)}, MemoryStateStore(clock.now), clock, metrics, EventBus(metrics))
    assert (await limiter.reserve("a", 50)).wait_s == 0
    refused = await limiter.reserve("a", 50)
    assert refused.wait_s == pytest.approx(7200) and refused.refused_by == "rpd"
    usage = limiter.usage("a")
    assert usage is not None and usage.rpm_used == pytest.approx(1) and usage.tpm_used == pytest.approx(50)


@pytest.mark.redis
@pytest.mark.asyncio
async def test_two_replicas_share_a_day_exactly(prefix: str) -> None:
    clock = ManualClock(EVENING)
    metrics = Metrics()
    stores = [RedisStateStore(REDIS_URL, prefix), RedisStateStore(REDIS_URL, prefix)]
    limits = {"p": RateLimit(rpd=7, tpd=1000)}
    try:
        replicas = [RateLimiter("provider", limits, store, clock, metrics, EventBus(metrics)) for store in stores]
        reservations = await asyncio.gather(*(replicas[i % 2].reserve("p", 10) for i in range(20)))
        admitted = [r for r in reservations if r.wait_s == 0]
        assert len(admitted) == 7
        for r in admitted:
            await replicas[0].settle(r, 100)
        await replicas[1].refresh("p")
        usage = replicas[1].usage("p")
        assert usage is not None and (usage.rpd_used, usage.tpd_used) == (7, 700)
        assert not any(store.degraded for store in stores)
    finally:
        for store in stores:
            await store.aclose()


def test_admin_backends_shows_the_daily_budget(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock(EVENING)
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", rpd: 100, tpd: 50000") + "admin_key: admin-key-daily-0001\n"
    with gateway(config, clock=clock) as gw:
        assert post(gw).status_code == 200
        backends = httpx.get(f"{gw.url}/admin/backends", headers={"Authorization": "Bearer admin-key-daily-0001"}, timeout=10).json()
        text = str(backends)
        assert "'rpd': 100" in text and "'rpd_used': 1" in text and "'tpd': 50000" in text
        assert AGENT_KEY not in text
