"""Failover, circuit breakers, retries, timeouts and backpressure against real fake upstreams.

Time that policies wait on (cooldowns, backoff, Retry-After) runs on a manual clock; the only
real waits are the short provider timeouts that the timeout tests are about.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from app.pipeline.base import Deployment
from tests.fake_upstream import FakeUpstream
from tests.manual_clock import ManualClock
from tests.resilience_support import AGENT_KEY, HI, PROVIDER_KEY, EventLog, client, listen, post, sample, two_upstreams, wait_until
from tests.support import GatewayServer, gateway

UP = Deployment("up", "m1")


def circuit(gw: GatewayServer, backend: str = "up") -> tuple[float | None, float | None]:
    return sample(gw, "admiral_circuit_state", backend=backend), sample(gw, "admiral_backend_up", backend=backend)


@pytest.mark.parametrize("behaviour", ["500", "status:503", "hang", "badjson", "wrongshape", "429-noretry"])
def test_failover_to_the_next_backend(behaviour: str, upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = behaviour
    config = two_upstreams(upstream, upstream2, tmp_path, up_extra=", first_byte_timeout_s: 0.3")
    with gateway(config, clock=ManualClock()) as gw:
        raw = client(gw).chat.completions.with_raw_response.create(model="fast", messages=HI)  # type: ignore[arg-type]
        assert raw.headers["x-admiral-backend"] == "up2"
        assert raw.parse().choices[0].message.content == "echo: hi"
        assert (upstream.calls, upstream2.calls) == (1, 1)
        assert sample(gw, "admiral_failovers_total", from_backend="up") == 1
        status = gw.call(gw.services.resilience.breaker.status(UP))
        assert status.last_error and status.last_error.startswith("up ")


def test_breaker_opens_after_5_failures_and_the_backend_is_not_called_during_cooldown(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "500"
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path), clock=clock) as gw:
        events = listen(gw)
        for _ in range(5):
            assert post(gw).headers["x-admiral-backend"] == "up2"
        assert upstream.calls == 5
        assert circuit(gw) == (2, 0)
        (down,) = events.named("optimizer.backend_down")
        assert down["backend"] == "up" and down["deployment"] == "up/m1" and "500" in down["reason"]
        for _ in range(5):
            assert post(gw).headers["x-admiral-backend"] == "up2"
        clock.advance(299)
        assert post(gw).headers["x-admiral-backend"] == "up2"
        assert upstream.calls == 5  # skipped for the whole cooldown
        status = gw.call(gw.services.resilience.breaker.status(UP))
        assert status.state == "open" and status.open_for_s == pytest.approx(1)
        assert not events.named("optimizer.all_backends_down")  # up2 still serves


@contextmanager
def cooled_down_circuit(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> Iterator[tuple[GatewayServer, EventLog]]:
    """A gateway whose breaker for ``up`` opened on 5 failures and has just become half-open."""
    upstream.behaviour = "500"
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path), clock=clock) as gw:
        events = listen(gw)
        for _ in range(5):
            post(gw)
        clock.advance(300)
        assert gw.call(gw.services.resilience.breaker.status(UP)).state == "half_open"
        yield gw, events


def test_half_open_probe_success_closes_the_circuit(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    with cooled_down_circuit(upstream, upstream2, tmp_path) as (gw, events):
        upstream.behaviour = "ok"
        assert post(gw).headers["x-admiral-backend"] == "up"
        assert upstream.calls == 6
        assert circuit(gw) == (0, 1)
        assert [e["deployment"] for e in events.named("optimizer.backend_up")] == ["up/m1"]
        # closed again: failures count from zero
        upstream.behaviour = "500"
        for _ in range(4):
            post(gw)
        assert circuit(gw) == (0, 1)


def test_half_open_probe_failure_reopens_the_circuit(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    with cooled_down_circuit(upstream, upstream2, tmp_path) as (gw, events):
        assert post(gw).headers["x-admiral-backend"] == "up2"
        assert upstream.calls == 6  # the one probe
        assert post(gw).headers["x-admiral-backend"] == "up2"
        assert upstream.calls == 6  # open again for another cooldown
        assert circuit(gw) == (2, 0)
        assert len(events.named("optimizer.backend_down")) == 2
        assert not events.named("optimizer.backend_up")


def test_provider_429_pauses_the_deployment_for_its_retry_after(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.script(["429:30"])
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path), clock=clock) as gw:
        events = listen(gw)
        assert post(gw).headers["x-admiral-backend"] == "up2"
        clock.advance(29)
        assert post(gw).headers["x-admiral-backend"] == "up2"
        assert upstream.calls == 1  # cooling: not called
        assert gw.call(gw.services.resilience.breaker.status(UP)).cooling_for_s == pytest.approx(1)
        clock.advance(1)
        assert post(gw).headers["x-admiral-backend"] == "up"
        assert upstream.calls == 2
        assert circuit(gw) == (0, 1)  # a 429 is no failure
        assert not events.named("optimizer.backend_down")


def test_retry_waits_for_retry_after_when_every_backend_asked_to_wait(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.script(["429:20", "ok"])
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path, fast="[up/m1]", retry="{attempts: 3}"), clock=clock) as gw:
        r = post(gw)
        assert r.status_code == 200 and r.headers["x-admiral-backend"] == "up"
        assert upstream.calls == 2
        assert len(clock.sleeps) == 1 and clock.sleeps[0] >= 20
        assert sample(gw, "admiral_retries_total", backend="up") == 1


def test_rounds_back_off_exponentially_with_jitter(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = upstream2.behaviour = "500"
    clock = ManualClock()
    retry = "{attempts: 4, backoff_s: 1.0, max_backoff_s: 3.0}"
    with gateway(two_upstreams(upstream, upstream2, tmp_path, retry=retry, breaker="{failure_threshold: 10}"), clock=clock) as gw:
        r = post(gw)
        assert r.status_code == 502
        assert (upstream.calls, upstream2.calls) == (4, 4)
        first, second, third = clock.sleeps
        assert 0.5 <= first <= 1.0 and 1.0 <= second <= 2.0 and 1.5 <= third <= 3.0  # capped at max_backoff_s
        message = r.json()["error"]["message"]
        assert "up/m1 (4 calls): up answered 500" in message and "up2/m2 (4 calls)" in message
        assert sample(gw, "admiral_retries_total", backend="up") == 3
        assert sample(gw, "admiral_failovers_total", from_backend="up") == 4


def test_no_round_is_started_past_the_deadline(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "500"
    clock = ManualClock()
    retry = "{attempts: 5, backoff_s: 16, max_backoff_s: 16, deadline_s: 7.5}"
    with gateway(two_upstreams(upstream, upstream2, tmp_path, fast="[up/m1]", retry=retry), clock=clock) as gw:
        assert post(gw).status_code == 502
        assert upstream.calls == 1 and clock.sleeps == []


def test_all_failing_is_502_naming_each_backend_without_secrets(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "500"
    upstream2.behaviour = "badjson"
    with gateway(two_upstreams(upstream, upstream2, tmp_path), clock=ManualClock()) as gw:
        with pytest.raises(openai.InternalServerError) as info:
            client(gw).chat.completions.create(model="fast", messages=HI)  # type: ignore[arg-type]
        assert info.value.status_code == 502
        err = info.value.body
        assert err["type"] == "upstream_error"  # type: ignore[index]
        message = err["message"]  # type: ignore[index]
        assert "up/m1: up answered 500" in message and "up2/m2: up2 answered a body that is not JSON" in message
        assert PROVIDER_KEY not in message and AGENT_KEY not in message


def test_all_timing_out_is_504(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = upstream2.behaviour = "hang"
    timeouts = ", first_byte_timeout_s: 0.2"
    with gateway(two_upstreams(upstream, upstream2, tmp_path, up_extra=timeouts, up2_extra=timeouts), clock=ManualClock()) as gw:
        r = post(gw)
        assert r.status_code == 504
        assert r.json()["error"]["type"] == "timeout"
        assert "up/m1: up timed out" in r.json()["error"]["message"]


def test_all_circuits_open_is_503_with_retry_after_and_not_ready(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = upstream2.behaviour = "500"
    clock = ManualClock()
    with gateway(two_upstreams(upstream, upstream2, tmp_path, breaker="{failure_threshold: 1, cooldown_s: 120}"), clock=clock) as gw:
        events = listen(gw)
        assert post(gw).status_code == 502
        assert len(events.named("optimizer.all_backends_down")) == 1
        clock.advance(20)
        r = post(gw)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "100"
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "up/m1: circuit open" in r.json()["error"]["message"] and "up2/m2: circuit open" in r.json()["error"]["message"]
        assert (upstream.calls, upstream2.calls) == (1, 1)
        assert httpx.get(f"{gw.url}/health/ready").status_code == 503


def test_provider_401_counts_as_failure_and_the_event_says_the_key_is_bad(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "status:401"
    with gateway(two_upstreams(upstream, upstream2, tmp_path, breaker="{failure_threshold: 1}", retry="{attempts: 3}"), clock=ManualClock()) as gw:
        events = listen(gw)
        assert post(gw).headers["x-admiral-backend"] == "up2"
        (down,) = events.named("optimizer.backend_down")
        assert down["bad_key"] is True and "providers.up.api_key" in down["hint"]
        assert PROVIDER_KEY not in repr(events.events)


def test_client_mistakes_are_neither_retried_nor_failures(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "refuse"  # a prompt too long is another matter: tests/test_context_fallback.py
    with gateway(two_upstreams(upstream, upstream2, tmp_path, retry="{attempts: 3}"), clock=ManualClock()) as gw:
        for _ in range(6):
            r = post(gw)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert (upstream.calls, upstream2.calls) == (6, 0)
        assert circuit(gw) == (0, 1)


def _stream(gw: GatewayServer) -> tuple[int, dict[str, str], list[str]]:
    body = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "one two"}]}
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json=body, timeout=10) as r:
        return r.status_code, dict(r.headers), [line for line in r.iter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("behaviour", ["500", "hang", "429:5"])
def test_stream_fails_over_before_the_first_chunk(behaviour: str, upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = behaviour
    with gateway(two_upstreams(upstream, upstream2, tmp_path, up_extra=", first_byte_timeout_s: 0.3"), clock=ManualClock()) as gw:
        chunks = client(gw).chat.completions.create(model="fast", messages=[{"role": "user", "content": "one two"}], stream=True)  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: one two"
        assert (upstream.calls, upstream2.calls) == (1, 1)


def test_stream_failure_after_the_first_chunk_is_an_error_event_then_done(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "cut"
    with gateway(two_upstreams(upstream, upstream2, tmp_path, breaker="{failure_threshold: 1}"), clock=ManualClock()) as gw:
        status, headers, lines = _stream(gw)
        assert status == 200 and headers["x-admiral-backend"] == "up"
        assert '"role":"assistant"' in lines[0]
        assert lines[-1] == "data: [DONE]"
        assert '"error"' in lines[-2] and "upstream_error" in lines[-2]
        assert upstream2.calls == 0  # too late to fail over
        wait_until(lambda: circuit(gw) == (2, 0))  # the mid-stream failure counted against up
        assert post(gw).headers["x-admiral-backend"] == "up2"
        assert upstream.calls == 1
        assert sample(gw, "admiral_requests_total", agent="tester", model="fast", backend="up", status="502", cache="bypass", endpoint="chat") == 1


def test_latency_strategy_prefers_the_faster_deployment(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    models = "  quick: {deployments: [up/m1, up2/m2], strategy: latency}"
    upstream.latency = 0.3
    with gateway(two_upstreams(upstream, upstream2, tmp_path, models_extra=models), clock=ManualClock()) as gw:
        # unmeasured deployments go first (config order), then the fastest measured one
        assert [post(gw, model="quick").headers["x-admiral-backend"] for _ in range(4)] == ["up", "up2", "up2", "up2"]
        latency = gw.services.resilience.latency
        assert latency.latency(UP) is not None and latency.latency(UP) >= 0.3  # type: ignore[operator]
        # the ordered model keeps its order whatever the latency
        assert post(gw).headers["x-admiral-backend"] == "up"


def test_backends_read_api(upstream: FakeUpstream, upstream2: FakeUpstream, tmp_path: Path) -> None:
    upstream.behaviour = "500"
    with gateway(two_upstreams(upstream, upstream2, tmp_path, up_extra=", rpm: 60", breaker="{failure_threshold: 1}"), clock=ManualClock()) as gw:
        post(gw)
        rows = {row["deployment"]: row for row in gw.call(gw.services.resilience.backends())}
        assert rows["up/m1"]["circuit"] == "open" and rows["up/m1"]["open_for_s"] == pytest.approx(300)
        assert "500" in rows["up/m1"]["last_error"]
        assert rows["up/m1"]["budget"]["rpm"] == 60 and rows["up/m1"]["budget"]["rpm_used"] == pytest.approx(1)
        assert rows["up2/m2"]["circuit"] == "closed" and rows["up2/m2"]["latency_s"] is not None
        assert rows["up2/m2"]["load"] == {"in_flight": 0, "waiting": 0, "max_concurrency": 256}
        detail = gw.call(gw.services.resilience.provider_status("up"))
        assert detail["circuit"] == "open" and [d["deployment"] for d in detail["deployments"]] == ["up/m1"]
        assert PROVIDER_KEY not in repr(rows)
