"""Per-agent limits and per-provider budgets: GCRA in the state store, on a manual clock."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.manual_clock import ManualClock
from tests.resilience_support import AGENT_KEY, HI, OTHER_KEY, client, listen, post, sample, two_upstreams, wait_until
from tests.support import gateway


def test_31st_call_of_an_rpm_30_agent_is_refused_with_retry_after(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path, key_extra=", rpm: 30"), clock=clock) as gw:
        events = listen(gw)
        sdk = client(gw)
        for _ in range(30):
            sdk.chat.completions.create(model="fast", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as info:
            sdk.chat.completions.create(model="fast", messages=HI)  # type: ignore[arg-type]
        assert info.value.response.headers["retry-after"] == "2"  # one request every 60/30 s
        assert info.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        assert "tester" in info.value.body["message"]  # type: ignore[index]
        assert upstream.calls == 30
        # another agent has its own budget
        assert post(gw, key=OTHER_KEY).status_code == 200
        again = post(gw)
        assert again.status_code == 429
        assert sample(gw, "admiral_ratelimit_rejections_total", scope="agent") == 2
        assert len(events.named("optimizer.rate_limit")) == 1  # announced once, not per refusal
        clock.advance(2)
        assert post(gw).status_code == 200
        assert post(gw).status_code == 429


def test_tokens_are_reserved_then_settled_with_real_usage(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path, key_extra=", tpm: 1000"), clock=clock) as gw:
        limits = gw.services.resilience.agent_limits
        # each reserves ~901 tokens and uses 3: without settlement the second would not fit
        assert post(gw, max_tokens=900).status_code == 200
        assert post(gw, max_tokens=900).status_code == 200
        usage = limits.usage("tester")
        assert usage is not None and usage.tpm_used == pytest.approx(6)
        refused = post(gw, max_tokens=995)  # 6 used + 996 reserved > 1000
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert upstream.calls == 2


def test_a_stream_holds_its_reservation_until_it_ends(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "dribble:0.3"
    with gateway(two_upstreams(upstream, upstream2, tmp_path, key_extra=", tpm: 1000"), clock=ManualClock()) as gw:
        limits = gw.services.resilience.agent_limits
        body = {"model": "fast", "stream": True, "max_tokens": 900, "messages": HI}
        with httpx.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json=body, timeout=10) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert post(gw, max_tokens=900).status_code == 429  # the stream's estimate is still reserved
            assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
        wait_until(lambda: (u := limits.usage("tester")) is not None and u.tpm_used < 10)
        assert post(gw, max_tokens=900).status_code == 200


def test_spent_provider_is_skipped_then_all_spent_is_429_with_earliest_retry_after(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    clock = ManualClock()
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", rpm: 2", up2_extra=", rpm: 1", retry="{attempts: 3}")
    with gateway(config, clock=clock) as gw:
        backends = [post(gw).headers["x-admiral-backend"] for _ in range(3)]
        assert backends == ["up", "up", "up2"]
        assert (upstream.calls, upstream2.calls) == (2, 1)
        refused = post(gw)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"  # up frees a request in 30 s, up2 in 60 s
        err = refused.json()["error"]
        assert err["type"] == "rate_limit_error"
        assert "up/m1" in err["message"] and "up2/m2" in err["message"] and "budget" in err["message"]
        assert (upstream.calls, upstream2.calls) == (2, 1)
        assert clock.sleeps == []  # nothing was called, so nothing was retried
        assert sample(gw, "admiral_ratelimit_rejections_total", scope="provider") == 3
        budget = gw.services.resilience.provider_budgets.usage("up")
        assert budget is not None and budget.rpm_used == pytest.approx(2) and budget.refused_total == 2
        clock.advance(30)
        assert post(gw).headers["x-admiral-backend"] == "up"


def test_provider_tokens_settle_to_real_usage(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", tpm: 1000")
    with gateway(config, clock=ManualClock()) as gw:
        assert [post(gw, max_tokens=900).headers["x-admiral-backend"] for _ in range(3)] == ["up", "up", "up"]
        budget = gw.services.resilience.provider_budgets.usage("up")
        assert budget is not None and budget.tpm_used == pytest.approx(9)
        assert post(gw, max_tokens=995).headers["x-admiral-backend"] == "up2"


def test_unlimited_agents_and_providers_pass(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    with gateway(two_upstreams(upstream, upstream2, tmp_path), clock=ManualClock()) as gw:
        assert all(post(gw).status_code == 200 for _ in range(40))
        assert gw.services.resilience.agent_limits.usage("tester") is None
