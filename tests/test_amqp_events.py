"""Events on RabbitMQ, against the real broker on 127.0.0.1:5672 (guest/guest).

Events reach a queue bound to the exchange, as the webhooks' JSON, persistent, with a message id;
a broker that goes away mid-run (connections closed, or the app stopped and started) loses none
of them while the gateway keeps serving; an event the broker refuses counts as failed (the confirm
says so); a broker that cannot be reached costs requests nothing and a full queue drops and counts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aio_pika
import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.support import GatewayServer, free_port, gateway

pytestmark = pytest.mark.rabbitmq

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
KEY = "sk-agent-amqp-00001"

T = TypeVar("T")


def on_broker(work: Callable[[aio_pika.abc.AbstractChannel], Awaitable[T]]) -> T:
    """What ``work`` gives, run on a channel of its own connection to the broker."""

    async def run() -> T:
        connection = await aio_pika.connect(BROKER)
        async with connection:
            return await work(await connection.channel())

    return asyncio.run(run())


@pytest.fixture
def exchange() -> Iterator[tuple[str, str]]:
    """A fresh exchange and a durable queue bound to every ``optimizer.*`` event on it; deleted afterwards."""
    name = f"admiral-test-{uuid.uuid4().hex[:12]}"
    queue = f"{name}-events"

    async def declare(channel: aio_pika.abc.AbstractChannel) -> None:
        ex = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await channel.declare_queue(queue, durable=True)
        await q.bind(ex, "agents.optimizer.#")

    async def delete(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.queue_delete(queue)
        await channel.exchange_delete(name)

    on_broker(declare)
    try:
        yield name, queue
    finally:
        broker_running()
        on_broker(delete)


def received(queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message waiting in ``queue`` (acknowledged, so it is emptied)."""

    async def drain(channel: aio_pika.abc.AbstractChannel) -> list[aio_pika.abc.AbstractIncomingMessage]:
        q = await channel.get_queue(queue)
        messages = []
        while (message := await q.get(no_ack=False, fail=False)) is not None:
            await message.ack()
            messages.append(message)
        return messages

    return on_broker(drain)


def config(up: FakeUpstream, exchange: str, url: str = BROKER, extra: str = "") -> str:
    return f"""
keys:
  - {{key: {KEY}, agent: tester, rpm: 1}}
providers:
  up: {{kind: openai, base_url: "{up.base_url}", api_key: sk-provider-key, timeout_s: 10}}
models:
  fast: [up/fake-model]
routing: {{default: fast}}
events: {{amqp: {{url: "{url}", exchange: {exchange}, routing_key_prefix: "agents.", max_backoff_s: 0.5{extra}}}}}
"""


def published(gw: GatewayServer, outcome: str = "ok") -> float:
    return gw.services.metrics.registry.get_sample_value("admiral_amqp_publishes_total", {"outcome": outcome}) or 0.0


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.02)


def emit(gw: GatewayServer, name: str, **data: Any) -> None:
    async def run() -> None:
        gw.services.events.emit(name, **data)

    gw.call(run())


def chat(gw: GatewayServer, text: str) -> httpx.Response:
    return httpx.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "fast", "messages": [{"role": "user", "content": text}]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def broker_running() -> None:
    """Start the broker's app again if a test stopped it (idempotent), and wait for it."""
    if broker_controllable():
        subprocess.run(["rabbitmqctl", "start_app"], check=False, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "await_startup"], check=False, capture_output=True, timeout=120)


@functools.cache
def broker_controllable() -> bool:
    """Whether ``rabbitmqctl`` is here and may talk to the node (it needs the node's Erlang cookie)."""
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        return subprocess.run(["rabbitmqctl", "status"], check=False, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture
def broker_control() -> None:
    """Skips a test that interrupts the broker where ``rabbitmqctl`` is missing or has no access to the node."""
    if not broker_controllable():
        pytest.skip("needs rabbitmqctl with access to the node to interrupt the broker")


needs_rabbitmqctl = pytest.mark.usefixtures("broker_control")


def test_a_real_event_reaches_the_queue_as_the_webhooks_json(upstream: FakeUpstream, exchange: tuple[str, str]) -> None:
    name, queue = exchange
    with gateway(config(upstream, name)) as gw:
        assert chat(gw, "one").status_code == 200
        assert chat(gw, "two").status_code == 429  # rpm: 1 -> optimizer.rate_limit
        wait_until(lambda: published(gw) == 1, what="the rate_limit event confirmed")
        messages = received(queue)
    assert len(messages) == 1
    message = messages[0]
    body = json.loads(message.body)
    assert body["event"] == "optimizer.rate_limit" and body["agent"] == "tester" and isinstance(body["ts"], float)
    assert message.routing_key == "agents.optimizer.rate_limit"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json" and message.type == "optimizer.rate_limit"
    assert message.message_id and len(message.message_id) == 32
    assert "sk-" not in message.body.decode()


def test_events_arrive_in_order(upstream: FakeUpstream, exchange: tuple[str, str]) -> None:
    name, queue = exchange
    with gateway(config(upstream, name)) as gw:
        for i in range(20):
            emit(gw, "optimizer.backend_down", backend="up", seq=i)
        wait_until(lambda: published(gw) == 20)
    bodies = [json.loads(m.body) for m in received(queue)]
    assert [b["seq"] for b in bodies] == list(range(20))


def test_an_event_the_broker_refuses_is_counted_failed(upstream: FakeUpstream, exchange: tuple[str, str]) -> None:
    """Only the confirm tells a refused publish from a delivered one: a full ``reject-publish``
    queue makes the broker nack the second event, which without confirms would count as ``ok``."""
    name, _ = exchange
    full = f"{name}-one-only"

    async def declare(channel: aio_pika.abc.AbstractChannel) -> None:
        q = await channel.declare_queue(full, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        await q.bind(name, "agents.optimizer.#")

    on_broker(declare)
    try:
        with gateway(config(upstream, name)) as gw:
            emit(gw, "optimizer.backend_down", backend="up", seq=0)
            emit(gw, "optimizer.backend_down", backend="up", seq=1)
            wait_until(lambda: published(gw) + published(gw, "failed") == 2, what="both publishes settled")
            assert published(gw) == 1 and published(gw, "failed") == 1
    finally:
        on_broker(lambda channel: channel.queue_delete(full))


@needs_rabbitmqctl
def test_connections_closed_mid_run_lose_nothing(upstream: FakeUpstream, exchange: tuple[str, str]) -> None:
    name, queue = exchange
    with gateway(config(upstream, name, extra=", queue_size: 1000")) as gw:
        for i in range(5):
            emit(gw, "optimizer.backend_down", backend="up", seq=i)
        wait_until(lambda: published(gw) == 5)
        rabbitmqctl("close_all_connections", "admiral test: broker outage")
        for i in range(5, 15):
            emit(gw, "optimizer.backend_up", backend="up", seq=i)
        wait_until(lambda: published(gw) == 15, what="every event confirmed after reconnecting")
        assert chat(gw, "still serving").status_code == 200
    seqs = {json.loads(m.body)["seq"] for m in received(queue)}
    assert seqs == set(range(15))


@needs_rabbitmqctl
def test_a_broker_restart_mid_run_loses_nothing_and_requests_go_on(upstream: FakeUpstream, exchange: tuple[str, str]) -> None:
    name, queue = exchange
    with gateway(config(upstream, name, extra=", queue_size: 1000").replace("rpm: 1", "rpm: 1000")) as gw:
        for i in range(5):
            emit(gw, "optimizer.degraded", hit_rate=0.1, seq=i)
        wait_until(lambda: published(gw) == 5)
        try:
            rabbitmqctl("stop_app")
            # the broker is down: requests are answered as ever, events wait in the queue
            for i in range(5, 15):
                emit(gw, "optimizer.degraded", hit_rate=0.1, seq=i)
                started = time.monotonic()
                assert chat(gw, f"during the outage {i}").status_code == 200
                assert time.monotonic() - started < 5
            assert published(gw) == 5
        finally:
            broker_running()
        wait_until(lambda: published(gw) == 15, timeout=60, what="every event confirmed after the restart")
        assert published(gw, "dropped") == 0
    seqs = [json.loads(m.body)["seq"] for m in received(queue)]
    assert set(seqs) == set(range(15))  # confirmed before the restart: kept; queued during it: delivered after


def test_an_unreachable_broker_costs_requests_nothing_and_a_full_queue_drops(upstream: FakeUpstream) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    with gateway(config(upstream, "nowhere", url=dead, extra=", queue_size: 2").replace("rpm: 1", "rpm: 1000")) as gw:
        for i in range(5):
            emit(gw, "optimizer.backend_down", backend="up", seq=i)
            assert chat(gw, f"request {i}").status_code == 200
        assert published(gw, "dropped") == 3
        assert published(gw) == 0 and not gw.services.amqp.connected  # type: ignore[union-attr]
