"""The exact response cache: a byte-bounded in-process LRU in front of a persistent tier.

Reads try memory first, then the persistent tier (loading what it finds into memory). Writes go
to memory at once and to the persistent tier from a background task, so a request never waits
for the database; the queue of pending writes is bounded and coalesces writes of the same key.
A periodic sweep drops expired entries and keeps the persistent tier under its size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import zlib
from collections import OrderedDict
from typing import Any, NamedTuple, cast

import orjson

from app.clock import Clock
from app.config import CacheConfig
from app.shapes import Usage
from app.storage.cache_tiers import CacheTier, CacheWrite

log = logging.getLogger("admiral.cache")

#: pending persistent writes kept at most (bytes); beyond it a write is dropped, memory still has it
MAX_PENDING_BYTES = 32 * 1024 * 1024
#: entries per persistent write (one transaction). Large, because entries land on random pages of
#: the key index: a second of misses at a few thousand a second written in one SQLite transaction
#: writes each page it touches once (measured with sqlite3 alone, upserts into 100k entries: 10.7 µs a row in batches
#: of 4096 against 15.1 in batches of 256)
WRITE_BATCH = 4096
_WARN_EVERY_S = 60.0


def _compact(data: bytes) -> bytes:
    """``data`` in an allocation of its own size, for bytes that are kept.

    orjson hands back its output in the buffer it wrote into: measured with orjson 3.13
    (tracemalloc), a 339-byte answer held 4 KiB, and a gateway serving cache misses with the
    default 64 MiB memory tier grew past 1 GB.
    """
    return memoryview(data).tobytes()


class CachedAnswer(NamedTuple):
    """A complete answer, kept as the JSON a hit sends, or a stream, kept as the provider's events
    (``data: ...`` and a blank line each: :attr:`is_events`), and the backend that produced it.

    A tuple of bytes, strings and a float, so the garbage collector stops tracking it after its
    first pass: the memory tier holds tens of thousands of them for an hour, and a full collection
    that walked each one would stop the event loop for a time growing with the cache (the usage is
    kept encoded for the same reason: a nested usage dict is a tracked object).
    """

    #: the body, encoded once when stored, or the stream's events: a hit sends these bytes as they are
    payload: bytes
    usage_json: bytes | None
    backend: str
    deployment: str | None
    expires_at: float

    @classmethod
    def of(cls, body: dict[str, Any], backend: str, deployment: str | None, expires_at: float) -> CachedAnswer:
        usage = body.get("usage")
        return cls(_compact(orjson.dumps(body)), _compact(orjson.dumps(usage)) if usage is not None else None, backend, deployment, expires_at)

    @classmethod
    def of_events(cls, raw: bytes, usage: Usage | dict[str, Any] | None, backend: str, deployment: str | None, expires_at: float) -> CachedAnswer:
        return cls(_compact(raw), _compact(orjson.dumps(usage)) if usage is not None else None, backend, deployment, expires_at)

    @property
    def is_events(self) -> bool:
        """A stream kept as the provider's events (a body is a JSON object)."""
        return self.payload.startswith(b"data: ")

    @property
    def usage(self) -> Usage | None:
        """The answer's usage (a new dict on every use), or None."""
        return cast(Usage, orjson.loads(self.usage_json)) if self.usage_json is not None else None

    @property
    def body(self) -> dict[str, Any]:
        """The body decoded (a new dict on every use)."""
        return orjson.loads(self.payload)  # type: ignore[no-any-return]

    def encode(self) -> bytes:
        """The persistent tier's form: the body (or the events' chunks, as a JSON array, and the
        usage) inside an envelope with the rest."""
        envelope: dict[str, Any] = {"expires_at": self.expires_at, "backend": self.backend, "deployment": self.deployment}
        if self.is_events:
            # each event's JSON as it came (an event is one line): one that is not JSON spoils the
            # envelope, which then reads as no entry, as it should
            envelope["events"] = orjson.Fragment(b"[" + self.payload[6:-2].replace(b"\n\ndata: ", b",") + b"]")
            envelope["usage"] = orjson.Fragment(self.usage_json) if self.usage_json is not None else None
            # every event repeats the chunk's id, model and fields: the benchmark's 40-chunk stream
            # is 372 bytes at zlib's fastest level against 6 952 (about 60 µs, once, after the answer
            # was sent), which keeps the table's and Redis's writes near those of a folded answer
            return zlib.compress(orjson.dumps(envelope), 1)
        envelope["body"] = orjson.Fragment(self.payload)
        # compact too: pending writes are bounded by their length (MAX_PENDING_BYTES)
        return _compact(orjson.dumps(envelope))

    @classmethod
    def decode(cls, raw: bytes) -> CachedAnswer | None:
        try:
            # zlib's header byte (0x78) never starts JSON: compressed events, or an envelope as stored
            data = orjson.loads(zlib.decompress(raw) if raw[:1] == b"\x78" else raw)
            backend, deployment, expires_at = data.get("backend") or "", data.get("deployment"), float(data["expires_at"])
            if "events" in data:
                if not data["events"]:
                    return None
                raw = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in data["events"])
                return cls.of_events(raw, data.get("usage"), backend, deployment, expires_at)
            return cls.of(data["body"], backend, deployment, expires_at)
        except (orjson.JSONDecodeError, zlib.error, KeyError, TypeError, ValueError, AttributeError):
            return None


def _live(raw: bytes, now: float) -> CachedAnswer | None:
    answer = CachedAnswer.decode(raw)
    return answer if answer is not None and answer.expires_at > now else None


#: what an entry of the memory tier costs besides its JSON: the key, the objects, the usage dict
#: and the LRU's own slot (tracemalloc: 467 bytes for the benchmark's answer; 600 leaves room for
#: longer deployment names and usage details)
ENTRY_OVERHEAD_BYTES = 600


#: a memory entry: a CachedAnswer's fields in a plain tuple (the garbage collector untracks exact
#: tuples of untracked values, not tuple subclasses)
_Entry = tuple[bytes, bytes | None, str, str | None, float]


def _size(entry: _Entry | CachedAnswer) -> int:
    return len(entry[0]) + ENTRY_OVERHEAD_BYTES


class MemoryLRU:
    """Answers by key; the least recently used go first once their sizes (JSON + ``ENTRY_OVERHEAD_BYTES``) pass ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, now: float) -> CachedAnswer | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        if entry[4] <= now:  # expires_at
            self.discard(key)
            return None
        self._items.move_to_end(key)
        return tuple.__new__(CachedAnswer, entry)

    def put(self, key: str, answer: CachedAnswer) -> None:
        self.discard(key)
        if _size(answer) > self.max_bytes:
            return
        self._items[key] = (answer.payload, answer.usage_json, answer.backend, answer.deployment, answer.expires_at)
        self.bytes += _size(answer)
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _size(old)

    def discard(self, key: str) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self.bytes -= _size(entry)

    def sweep(self, now: float) -> int:
        expired = [k for k, entry in self._items.items() if entry[4] <= now]
        for key in expired:
            self.discard(key)
        return len(expired)


class ResponseCache:
    """Memory in front of a :class:`CacheTier`; ``clock`` is public so tests can move time."""

    def __init__(self, tier: CacheTier, *, ttl_s: float, memory_max_bytes: int, max_entry_bytes: int, sweep_interval_s: float, clock: Clock | None = None) -> None:
        self.tier = tier
        self.clock = clock or Clock()
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.sweep_interval_s = sweep_interval_s
        self.memory = MemoryLRU(memory_max_bytes)
        self.dropped_writes = 0
        self._pending: dict[str, CacheWrite] = {}
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_warning = float("-inf")

    @classmethod
    def from_config(cls, config: CacheConfig, tier: CacheTier, clock: Clock | None = None) -> ResponseCache:
        return cls(tier, ttl_s=config.ttl_s, memory_max_bytes=config.memory_max_bytes, max_entry_bytes=config.max_entry_bytes, sweep_interval_s=config.sweep_interval_s, clock=clock)

    def start(self) -> None:
        """Start the background writer and the periodic sweep (needs a running loop)."""
        self._tasks = [asyncio.create_task(self._write_loop(), name="cache-writer"), asyncio.create_task(self._sweep_loop(), name="cache-sweep")]

    async def aclose(self) -> None:
        """Finish pending writes (bounded wait), then stop the background tasks."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.flush(), timeout=5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.tier.aclose()

    async def get(self, key: str) -> CachedAnswer | None:
        now = self.clock.now()
        answer = self.memory.get(key, now)
        if answer is not None:
            return answer
        pending = self._pending.get(key)
        if pending is not None:
            return _live(pending.body, now)
        try:
            raw = await self.tier.get(key, now)
        except Exception as exc:
            self._warn("cache read failed, answering as a miss", exc)
            raw = None
        if raw is None:
            # an identical request may have finished and stored its answer while this one read
            return self.memory.get(key, now)
        answer = _live(raw, now)
        if answer is not None:
            self.memory.put(key, answer)
        return answer

    def put(self, key: str, namespace: str, body: dict[str, Any], backend: str, deployment: str | None) -> CachedAnswer | None:
        """Store a complete answer: in memory now, persistently soon. None when it is too big."""
        now = self.clock.now()
        return self._keep(key, namespace, CachedAnswer.of(body, backend, deployment, now + self.ttl_s), now)

    def put_events(self, key: str, namespace: str, raw: bytes, usage: Usage | None, backend: str, deployment: str | None) -> CachedAnswer | None:
        """Store a finished stream as the provider's events (``data: ...`` and a blank line each), as :meth:`put` does."""
        now = self.clock.now()
        return self._keep(key, namespace, CachedAnswer.of_events(raw, usage, backend, deployment, now + self.ttl_s), now)

    def _keep(self, key: str, namespace: str, answer: CachedAnswer, now: float) -> CachedAnswer | None:
        held = self.memory.get(key, now)
        if held is not None and held.payload == answer.payload and held.backend == answer.backend:
            return held  # stored already (a flight's leader publishes before the cache layer stores)
        data = answer.encode()
        if len(data) > self.max_entry_bytes:
            return None
        self.memory.put(key, answer)
        previous = self._pending.pop(key, None)
        if previous is not None:
            self._pending_bytes -= len(previous.body)
        if self._pending_bytes + len(data) > MAX_PENDING_BYTES:
            self.dropped_writes += 1
            log.debug("cache write queue full; entry kept in memory only")
            return answer
        self._pending[key] = CacheWrite(key, namespace, data, now, answer.expires_at)
        self._pending_bytes += len(data)
        self._wake.set()
        return answer

    async def publish(self, key: str, namespace: str, body: dict[str, Any], backend: str, deployment: str | None) -> None:
        """Store an answer as :meth:`put` does, and in the tier's shared part (what every replica reads) now."""
        self.put(key, namespace, body, backend, deployment)
        entry = self._pending.get(key)
        if entry is None:
            return  # too big to store, or already stored with this payload
        try:
            await self.tier.put_shared([entry])
        except Exception as exc:
            self._warn("shared cache write failed; the entry is written with the next batch", exc)

    async def get_shared(self, key: str) -> CachedAnswer | None:
        """The answer for ``key`` from memory or the tier's shared part (no slower read: the caller is on the request path)."""
        now = self.clock.now()
        answer = self.memory.get(key, now)
        if answer is not None:
            return answer
        pending = self._pending.get(key)
        if pending is not None:
            return _live(pending.body, now)
        raw = await self.tier.get_shared(key, now)
        return _live(raw, now) if raw is not None else None

    async def flush(self) -> None:
        """Write everything pending to the persistent tier now."""
        async with self._drain_lock:
            while self._pending:
                batch = [self._pending.pop(key) for key in list(itertools.islice(self._pending, WRITE_BATCH))]
                self._pending_bytes -= sum(len(e.body) for e in batch)
                try:
                    await self.tier.put(batch)
                except Exception as exc:
                    self._warn("cache write failed; the entries stay in memory only", exc)

    async def sweep(self) -> int:
        """Drop expired entries from both tiers and trim the persistent one to its size limit."""
        now = self.clock.now()
        removed = self.memory.sweep(now)
        try:
            removed += await self.tier.sweep(now)
        except Exception as exc:
            self._warn("cache sweep failed", exc)
        return removed

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            # the tier says how long to gather writes after the first pending one, so they go in batches
            await asyncio.sleep(self.tier.write_delay_s)
            self._wake.clear()
            await self.flush()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            await self.sweep()

    def _warn(self, message: str, exc: Exception) -> None:
        # a database outage must not turn into one log line per request
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("%s: %s: %s", message, type(exc).__name__, exc)
