"""Events: webhook delivery (queue, timeout, retries, drops) to a real receiver, and ``optimizer.degraded``."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from app.degraded import HitRateWatch
from app.events import EventBus
from app.metrics import Metrics
from app.webhooks import WebhookSender
from tests.fake_upstream import FakeUpstream
from tests.support import gateway

AGENT_KEY = "sk-agent-events-0001"


class HookReceiver:
    """An aiohttp server on loopback that records every POST; ``script`` holds statuses to answer (or "hang")."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.script: list[int | str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str = "/hooks/admiral") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.posts.append({"path": request.path, "headers": dict(request.headers), "json": await request.json()})
        answer = self.script.pop(0) if self.script else 204
        if answer == "hang":
            await self._released.wait()
        return web.Response(status=int(answer))

    async def _start(self) -> None:
        self._released = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> HookReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._loop.call_soon_threadsafe(self._released.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait_for(self, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.posts) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} webhook posts, got {len(self.posts)}: {self.posts}")
            time.sleep(0.02)
        return self.posts


@pytest.fixture
def receiver() -> Iterator[HookReceiver]:
    with HookReceiver() as r:
        yield r


async def no_wait(_: float) -> None:
    return None


async def until(check: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


def delivered(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("admiral_webhook_deliveries_total", {"outcome": outcome}) or 0.0


async def deliver_until_failed(receiver: HookReceiver, event: str, **options: Any) -> None:
    """Send one ``event`` to the receiver (no backoff waits) until its delivery counts as failed."""
    metrics = Metrics()
    sender = WebhookSender([receiver.url()], metrics, sleep=no_wait, **options)
    sender.start()
    sender.deliver({"event": event})
    await until(lambda: delivered(metrics, "failed") == 1)
    await sender.close()


@pytest.mark.asyncio
async def test_event_is_posted_as_json_to_every_url(receiver: HookReceiver) -> None:
    metrics = Metrics()
    sender = WebhookSender([receiver.url("/a"), receiver.url("/b")], metrics, sleep=no_wait)
    bus = EventBus(metrics)
    bus.sinks.append(sender)
    sender.start()
    bus.emit("optimizer.backend_down", backend="cerebras", reason="5 failures")
    await until(lambda: delivered(metrics, "ok") == 2)
    await sender.close()
    assert sorted(p["path"] for p in receiver.posts) == ["/a", "/b"]
    body = receiver.posts[0]["json"]
    assert body["event"] == "optimizer.backend_down" and body["backend"] == "cerebras" and isinstance(body["ts"], float)
    assert receiver.posts[0]["headers"]["Content-Type"] == "application/json"
    assert metrics.registry.get_sample_value("admiral_events_total", {"event": "optimizer.backend_down"}) == 1


@pytest.mark.asyncio
async def test_failures_are_retried_with_backoff(receiver: HookReceiver) -> None:
    metrics = Metrics()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    receiver.script = [500, 503]
    sender = WebhookSender([receiver.url()], metrics, backoff_s=0.5, sleep=sleep)
    sender.start()
    sender.deliver({"event": "optimizer.rate_limit", "scope": "agent"})
    await until(lambda: delivered(metrics, "ok") == 1)
    await sender.close()
    assert len(receiver.posts) == 3 and waits == [0.5, 1.0]
    assert delivered(metrics, "failed") == 0


@pytest.mark.asyncio
async def test_gives_up_after_three_tries_and_hides_the_url_path(receiver: HookReceiver, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    receiver.script = [500, 500, 500, 500]
    sender = WebhookSender([receiver.url("/hooks/secret-token-123")], metrics, sleep=no_wait)
    sender.start()
    with caplog.at_level(logging.WARNING, logger="admiral.webhooks"):
        sender.deliver({"event": "optimizer.degraded"})
        await until(lambda: delivered(metrics, "failed") == 1)
    await sender.close()
    assert len(receiver.posts) == 3
    assert "HTTP 500" in caplog.text and "secret-token-123" not in caplog.text


@pytest.mark.asyncio
async def test_a_client_error_is_not_retried(receiver: HookReceiver) -> None:
    receiver.script = [404]
    await deliver_until_failed(receiver, "optimizer.degraded")
    assert len(receiver.posts) == 1


@pytest.mark.asyncio
async def test_a_hanging_receiver_times_out(receiver: HookReceiver) -> None:
    receiver.script = ["hang", "hang", "hang"]
    await deliver_until_failed(receiver, "optimizer.all_backends_down", timeout_s=0.2)
    assert len(receiver.posts) == 3


@pytest.mark.asyncio
async def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    metrics = Metrics()
    sender = WebhookSender(["http://127.0.0.1:9/x", "http://127.0.0.1:9/y"], metrics, queue_size=2)
    started = time.monotonic()
    for i in range(5):
        sender.deliver({"event": "optimizer.rate_limit", "n": i})  # nothing consumes: the sender is not started
    assert time.monotonic() - started < 1
    assert delivered(metrics, "dropped") == 6  # 3 events x 2 URLs
    await sender.close()


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(events: list[dict[str, Any]], clock: ManualClock, threshold: float = 0.5, window_s: float = 60, min_requests: int = 4) -> HitRateWatch:
    bus = EventBus(Metrics())

    class Sink:
        def deliver(self, event: dict[str, Any]) -> None:
            events.append(event)

    bus.sinks.append(Sink())
    return HitRateWatch(bus, threshold, window_s, min_requests, clock=clock)


def test_degraded_needs_enough_lookups_and_fires_once_per_window() -> None:
    events: list[dict[str, Any]] = []
    clock = ManualClock()
    w = watch(events, clock)
    for status in ("miss", "bypass", "miss", "bypass", "miss"):
        w.observe(status)  # bypasses are not lookups
    assert events == []
    w.observe("miss")
    assert [e["event"] for e in events] == ["optimizer.degraded"]
    assert events[0]["hit_rate"] == 0.0 and events[0]["lookups"] == 4
    for _ in range(10):
        clock.now += 1
        w.observe("miss")
    assert len(events) == 1  # at most once per window
    clock.now += 60
    w.observe("miss")
    assert len(events) == 1  # the old lookups left the window: only one counted now
    for _ in range(3):
        w.observe("miss")
    assert len(events) == 2


def test_degraded_stays_quiet_above_the_threshold() -> None:
    events: list[dict[str, Any]] = []
    clock = ManualClock()
    w = watch(events, clock)
    for i in range(40):
        clock.now += 0.5
        w.observe("miss" if i % 2 else "hit")  # never under 50%
    assert events == []
    for _ in range(3):
        w.observe("miss")
    assert len(events) == 1 and events[0]["hit_rate"] < 0.5


def webhook_config(up: FakeUpstream, hook: str) -> str:
    dead = FakeUpstream()
    dead.start()
    dead_url = dead.base_url
    dead.stop()
    return f"""
keys: [{{key: {AGENT_KEY}, agent: quality}}]
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: k, timeout_s: 5}}
  dead: {{kind: openai, base_url: "{dead_url}", api_key: k, timeout_s: 2}}
models: {{fast: [dead/m, up/fake-model], solid: [up/fake-model]}}
retry: {{attempts: 1}}
circuit_breaker: {{failure_threshold: 1}}
events: {{webhooks: ["{hook}"], degraded_min_requests: 3, degraded_hit_rate: 0.5, degraded_window_s: 600}}
"""


def test_gateway_events_reach_the_webhook(upstream: FakeUpstream, receiver: HookReceiver) -> None:
    with gateway(webhook_config(upstream, receiver.url())) as gw:
        headers = {"Authorization": f"Bearer {AGENT_KEY}"}
        for i in range(3):  # three different questions: three cache misses
            r = httpx.post(f"{gw.base_url}/chat/completions", headers=headers, json={"model": "fast", "messages": [{"role": "user", "content": f"q{i}"}]})
            assert r.status_code == 200
        posts = receiver.wait_for(2)
        by_event = {p["json"]["event"]: p["json"] for p in posts}
        assert by_event["optimizer.backend_down"]["backend"] == "dead"
        assert by_event["optimizer.degraded"]["hit_rate"] == 0.0 and by_event["optimizer.degraded"]["lookups"] == 3
        metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'admiral_events_total{event="optimizer.degraded"} 1.0' in metrics
    assert 'admiral_webhook_deliveries_total{outcome="ok"}' in metrics
