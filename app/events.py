"""Operational events (``optimizer.*``): logged, counted, and handed to the webhook sender."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from app.metrics import Metrics

log = logging.getLogger("admiral.events")

EVENT_NAMES = frozenset(
    {"optimizer.degraded", "optimizer.rate_limit", "optimizer.backend_down", "optimizer.backend_up", "optimizer.all_backends_down", "optimizer.budget_low"}
)


class EventSink(Protocol):
    """Receives each event without blocking the caller."""

    def deliver(self, event: dict[str, Any]) -> None: ...


class EventBus:
    """The one hook every layer emits events through."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.sinks: list[EventSink] = []

    def emit(self, name: str, **data: Any) -> None:
        assert name in EVENT_NAMES, name
        event = {"event": name, "ts": time.time(), **data}
        log.warning("%s %s", name, " ".join(f"{k}={v}" for k, v in data.items()))
        self._metrics.events.labels(name).inc()
        for sink in self.sinks:
            sink.deliver(event)
