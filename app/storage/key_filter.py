"""Which keys a SQLite cache table may hold, known without reading it: a miss then costs no read.

Under the benchmark's cache-miss load on a 2-core VM (``bench/cpu_per_request.py``, the code
before and after this filter, two rounds each), skipping the read halved the context switches per
miss (0.73-0.77 to 0.35-0.36) and saved 3 of 25 system calls; CPU per miss moved less than the
VM's noise (231-234 against 221-236 µs). :class:`KeyFilter` is a Bloom filter (never wrong about a
key it holds, wrong about others a fraction of a percent of the time, which costs only the read it
would have made anyway); :class:`StoredKeys` keeps one in step with the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable

from app.storage.sqlite_reader import SqliteReader

#: bits set per key (double hashing: the two halves of the key's 64-bit hash make them all)
_HASHES = 4
#: 16 bits a key with 4 hashes: a key never added looks present ~0.25 % of the time when full (measured)
_BITS_PER_KEY = 16
_MIN_CAPACITY = 1 << 16
#: positions come from 32-bit halves of the hash, so the filter has at most 2**32 bits
_MAX_BITS = 1 << 32
_LOW32 = (1 << 32) - 1
#: rows a rebuild reads per job of the reader's thread, so reads of entries go on in between
_CHUNK = 20_000


def _halves(key: str) -> tuple[int, int]:
    """Two 32-bit hashes of ``key``: the halves of Python's string hash (SipHash, keyed per
    process, cached on the string), which is all a filter that lives in one process needs."""
    h = hash(key)
    return h & _LOW32, (h >> 32 & _LOW32) | 1


class KeyFilter:
    """A Bloom filter of keys: ``may_hold`` is True for every key added, and for about 0.25 % of
    the others while no more than ``capacity`` keys were added (more beyond that)."""

    __slots__ = ("_bits", "_mask", "capacity", "count")

    def __init__(self, capacity: int = _MIN_CAPACITY) -> None:
        bits = min(1 << (max(capacity, _MIN_CAPACITY) * _BITS_PER_KEY - 1).bit_length(), _MAX_BITS)
        self.capacity = bits // _BITS_PER_KEY
        self.count = 0
        self._mask = bits - 1
        self._bits = bytearray(bits // 8)

    def add(self, key: str) -> None:
        h, step = _halves(key)
        bits, mask = self._bits, self._mask
        for _ in range(_HASHES):
            pos = h & mask
            bits[pos >> 3] |= 1 << (pos & 7)
            h += step
        self.count += 1

    def may_hold(self, key: str) -> bool:
        h, step = _halves(key)
        bits, mask = self._bits, self._mask
        for _ in range(_HASHES):
            pos = h & mask
            if not bits[pos >> 3] & (1 << (pos & 7)):
                return False
            h += step
        return True

    @property
    def full(self) -> bool:
        return self.count > self.capacity


class StoredKeys:
    """A :class:`KeyFilter` of the keys in ``table`` of the SQLite file ``reader`` reads.

    Built from the table on first use (until then every key may be there). Keys this process
    writes are added as it writes them. Rows any process adds are picked up by rowid, at most
    ``refresh_s`` after they were committed: when a key looks absent and the last look is older
    than that, the rows past the largest rowid seen are read first. SQLite gives a new row the
    largest rowid plus one, so a rowid is handed out again only after the row holding the largest
    one was deleted: when that row is gone (or holds another key), the look rebuilds instead.
    ``rebuild`` starts afresh from the table, dropping deleted keys (the tier calls it after a
    sweep that deleted rows); it also runs when the filter is full.
    """

    def __init__(self, reader: SqliteReader, table: str, *, refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._reader = reader
        self._table = table
        self._refresh_s = refresh_s
        self._clock = clock
        self._filter: KeyFilter | None = None
        #: the largest rowid read so far, and the key it held
        self._seen = 0
        self._seen_key: str | None = None
        self._looked_at = float("-inf")
        self._lock = asyncio.Lock()
        #: keys added while a rebuild reads the table, for the new filter too
        self._during_rebuild: list[str] | None = None
        self._growing: asyncio.Task[None] | None = None

    async def may_hold(self, key: str) -> bool:
        keys = self._filter
        if keys is None:
            if self._lock.locked():
                return True  # being built: read the table meanwhile
            async with self._lock:
                if self._filter is None:
                    await self._rebuild()
            keys = self._filter
            assert keys is not None
        if keys.may_hold(key):
            return True
        if self._clock() - self._looked_at < self._refresh_s or self._lock.locked():
            return False
        async with self._lock:
            await self._refresh()
        assert self._filter is not None
        return self._filter.may_hold(key)

    def add(self, keys: Iterable[str]) -> None:
        if self._during_rebuild is not None:
            keys = list(keys)
            self._during_rebuild.extend(keys)  # the table may have been read before they were in it
        if self._filter is None:
            return  # the first build reads the table (or has them from above)
        for key in keys:
            self._filter.add(key)
        if self._filter.full and self._growing is None:
            self._growing = asyncio.create_task(self.rebuild(), name="cache-key-filter")
            self._growing.add_done_callback(self._grown)

    async def rebuild(self) -> None:
        async with self._lock:
            await self._rebuild()

    async def aclose(self) -> None:
        if self._growing is not None:
            self._growing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._growing

    def _grown(self, task: asyncio.Task[None]) -> None:
        self._growing = None
        if not task.cancelled() and task.exception() is not None:
            self._filter = None  # unknown: the next use builds it again

    async def _rebuild(self) -> None:
        self._during_rebuild = []
        try:
            self._looked_at = self._clock()
            count = await self._reader.call(lambda conn: conn.execute(f"SELECT count(*) FROM {self._table}").fetchone()[0])
            keys = KeyFilter(2 * count)
            seen, seen_key, more = 0, None, True
            while more:
                after = seen
                last, last_key, more = await self._reader.call(lambda conn: self._read_chunk(conn, keys, after))
                if last_key is not None:
                    seen, seen_key = last, last_key
            for key in self._during_rebuild:
                keys.add(key)
            self._filter, self._seen, self._seen_key = keys, seen, seen_key
        finally:
            self._during_rebuild = None

    async def _refresh(self) -> None:
        self._looked_at = self._clock()
        seen, seen_key = self._seen, self._seen_key
        rows = await self._reader.call(lambda conn: self._read_since(conn, seen, seen_key))
        if rows is None:
            await self._rebuild()
            return
        assert self._filter is not None
        for _, key in rows:
            self._filter.add(key)
        if rows:
            self._seen, self._seen_key = rows[-1]

    # -- on the reader's thread --------------------------------------------------------------

    def _read_chunk(self, conn: sqlite3.Connection, keys: KeyFilter, after: int) -> tuple[int, str | None, bool]:
        """Add up to ``_CHUNK`` keys past rowid ``after``; the last rowid and key read (None: none), and whether there may be more."""
        rows = conn.execute(f"SELECT rowid, key FROM {self._table} WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, _CHUNK)).fetchall()
        for _, key in rows:
            keys.add(key)
        last, last_key = rows[-1] if rows else (after, None)
        return last, last_key, len(rows) == _CHUNK

    def _read_since(self, conn: sqlite3.Connection, seen: int, seen_key: str | None) -> list[tuple[int, str]] | None:
        """Rows past rowid ``seen`` in rowid order; None when the row at ``seen`` no longer holds ``seen_key``."""
        if seen:
            row = conn.execute(f"SELECT key FROM {self._table} WHERE rowid = ?", (seen,)).fetchone()
            if row is None or row[0] != seen_key:
                return None
        return conn.execute(f"SELECT rowid, key FROM {self._table} WHERE rowid > ? ORDER BY rowid", (seen,)).fetchall()
