"""Shared state behind one interface: memory for one replica, Redis for several."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from app.config import StateConfig
from app.state.base import StateStore
from app.state.memory import MemoryStateStore

if TYPE_CHECKING:
    from app.metrics import Metrics

__all__ = ["MemoryStateStore", "StateStore", "build_state_store"]


def build_state_store(config: StateConfig, metrics: Metrics | None = None, clock: Callable[[], float] | None = None) -> StateStore:
    """``clock`` (seconds) drives the in-process store, so tests control its time."""
    if config.url.startswith("memory://"):
        return MemoryStateStore() if clock is None else MemoryStateStore(clock)
    from app.state.redis import RedisStateStore

    return RedisStateStore(config.url, prefix=config.key_prefix, metrics=metrics)
