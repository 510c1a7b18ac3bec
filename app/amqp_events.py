"""Events on RabbitMQ: each ``optimizer.*`` event published to a durable topic exchange, off the request path.

The body is the JSON the webhooks get; the routing key is ``routing_key_prefix`` + the event name
(``optimizer.backend_down``), so a consumer binds ``optimizer.#`` or a single event. Messages are
persistent, published with publisher confirms, and carry a ``message_id`` (a consumer can drop the
rare duplicate: a message whose confirm was lost in a broken connection is published again).

``deliver`` only queues (bounded: a full queue drops the event and counts it). One task publishes
in order; when the broker is down or slow it keeps the event it holds, reconnects with doubling
backoff (up to ``max_backoff_s``) and publishes it again, so an event is only ever given up on
when the broker refuses it (``outcome="failed"``) or the queue overflows (``dropped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aio_pika.exceptions
import orjson
from aio_pika.abc import AbstractExchange

from app.config import AmqpConfig
from app.metrics import Metrics

log = logging.getLogger("admiral.amqp")

#: what a broken, refused or silent connection raises while connecting or publishing
_CONNECTION_TROUBLE = (
    aio_pika.exceptions.AMQPConnectionError,
    aio_pika.exceptions.AMQPChannelError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class AmqpPublisher:
    """An ``EventSink`` publishing to RabbitMQ (see the module docstring)."""

    def __init__(self, config: AmqpConfig, metrics: Metrics, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._config = config
        self._url = config.url.get_secret_value()
        self._where = _origin(self._url)
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=config.queue_size)
        self._sleep = sleep
        self._counts = {outcome: metrics.amqp_publishes.labels(outcome) for outcome in ("ok", "failed", "dropped")}
        self._task: asyncio.Task[None] | None = None
        #: the event being published: kept through reconnects until the broker confirms or refuses it
        self._holding: tuple[str, dict[str, Any]] | None = None
        self.connected = False

    def deliver(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((uuid.uuid4().hex, event))
        except asyncio.QueueFull:
            self._counts["dropped"].inc()
            log.warning("AMQP event queue full: dropped %s", event.get("event"))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-amqp")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Give queued events ``timeout_s`` to be confirmed, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        left = self._queue.qsize() + (self._holding is not None)
        if left:
            log.warning("stopping with %d event(s) not published to RabbitMQ at %s", left, self._where)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        backoff = 0.5
        down_since: float | None = None
        while True:
            try:
                connection = await aio_pika.connect(self._url, timeout=self._config.confirm_timeout_s)
            except _CONNECTION_TROUBLE as exc:
                down_since = self._down(down_since, exc)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._config.max_backoff_s)
                continue
            try:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.declare_exchange(self._config.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
                self.connected = True
                if down_since is not None:
                    log.warning("RabbitMQ at %s is reachable again after %.1f s", self._where, time.monotonic() - down_since)
                down_since = None
                backoff = 0.5
                await self._publish_all(exchange)
            except _CONNECTION_TROUBLE as exc:
                down_since = self._down(down_since, exc)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await connection.close()
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._config.max_backoff_s)

    def _down(self, since: float | None, exc: BaseException) -> float:
        if since is None:
            # once per outage; the URL's password is never logged
            log.warning("RabbitMQ at %s unreachable (%s); events wait in the queue (%d now)", self._where, type(exc).__name__, self._queue.qsize())
            return time.monotonic()
        return since

    async def _publish_all(self, exchange: AbstractExchange) -> None:
        prefix = self._config.routing_key_prefix
        while True:
            if self._holding is None:
                self._holding = await self._queue.get()
            message_id, event = self._holding
            name = str(event.get("event", "event"))
            message = aio_pika.Message(
                orjson.dumps(event, default=str),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                type=name,
                app_id="admiral-optimizer",
                timestamp=int(event.get("ts") or time.time()),
            )
            try:
                await exchange.publish(message, routing_key=prefix + name, mandatory=False, timeout=self._config.confirm_timeout_s)
            except aio_pika.exceptions.DeliveryError as exc:
                # the broker refused it (nack): publishing it again would be refused again
                self._counts["failed"].inc()
                log.error("RabbitMQ refused %s: %s", name, exc)
            else:
                self._counts["ok"].inc()
            self._holding = None
            self._queue.task_done()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or ''}:{parts.port or 5672}{parts.path if parts.path not in ('', '/') else ''}"
