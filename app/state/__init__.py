"""Shared state behind one interface: memory for one replica, Redis for several."""

from __future__ import annotations

from app.config import StateConfig
from app.state.base import StateStore
from app.state.memory import MemoryStateStore

__all__ = ["MemoryStateStore", "StateStore", "build_state_store"]


def build_state_store(config: StateConfig) -> StateStore:
    if config.url.startswith("memory://"):
        return MemoryStateStore()
    from app.state.redis import RedisStateStore

    return RedisStateStore(config.url, prefix=config.key_prefix)
