"""A small memo for pure work the hot path repeats: agents send the same keys and bodies again."""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: request bodies longer than this are not remembered: with ``size`` 1024 a memo of bodies stays near 8 MiB
BODY_MAX_BYTES = 8192


class Recent(Generic[K, V]):
    """Up to ``size`` results by key; when full, all are forgotten at once (no bookkeeping per use).

    Only for results that depend on the key alone, so a forgotten one is merely computed again.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._items: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        if len(self._items) >= self._size:
            self._items.clear()
        self._items[key] = value
