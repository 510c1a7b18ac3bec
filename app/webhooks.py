"""Event webhooks: each ``optimizer.*`` event POSTed as JSON to every configured URL, off the request path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from app.metrics import Metrics

log = logging.getLogger("admiral.webhooks")

_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class WebhookSender:
    """An ``EventSink``: ``deliver`` only queues (a full queue drops and counts); a task does the POSTs.

    Each URL gets up to ``attempts`` tries with doubling backoff; connection errors, timeouts,
    429 and 5xx are retried, any other status is final.
    """

    def __init__(
        self,
        urls: list[str],
        metrics: Metrics,
        *,
        timeout_s: float = 5.0,
        queue_size: int = 1000,
        attempts: int = 3,
        backoff_s: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._urls = list(urls)
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        for outcome in ("ok", "failed", "dropped"):
            metrics.webhook_deliveries.labels(outcome)

    def deliver(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._metrics.webhook_deliveries.labels("dropped").inc(len(self._urls))
            log.warning("webhook queue full: dropped %s", event.get("event"))

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"User-Agent": "admiral-optimizer"})
        self._task = asyncio.create_task(self._run(), name="event-webhooks")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Give queued events ``timeout_s`` to go out, then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout_s)  # queued and in-flight POSTs
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                body = orjson.dumps(event, default=str)
                results = await asyncio.gather(*(self._post(url, body, event) for url in self._urls), return_exceptions=True)
                for url, result in zip(self._urls, results, strict=True):
                    if isinstance(result, Exception):
                        self._metrics.webhook_deliveries.labels("failed").inc()
                        log.error("webhook %s: %s not delivered: %s", _origin(url), event.get("event"), type(result).__name__)
            finally:
                self._queue.task_done()

    async def _post(self, url: str, body: bytes, event: dict[str, Any]) -> None:
        assert self._session is not None
        problem = ""
        for attempt in range(self._attempts):
            if attempt:
                await self._sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                async with self._session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    if resp.status < 300:
                        self._metrics.webhook_deliveries.labels("ok").inc()
                        return
                    problem = f"HTTP {resp.status}"
                    if resp.status not in _RETRY_STATUSES:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
        self._metrics.webhook_deliveries.labels("failed").inc()
        log.warning("webhook %s: %s not delivered: %s", _origin(url), event.get("event"), problem)


def _origin(url: str) -> str:
    """Scheme and host only: webhook paths and queries often carry a secret token."""
    parsed = urlsplit(url)
    return f"{parsed.scheme}://{parsed.netloc.rpartition('@')[2]}"
