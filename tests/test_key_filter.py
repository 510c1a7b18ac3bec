"""The cache-key filter: a SQLite cache tier answers a miss without reading the file, and still finds every entry.

Reads are counted at the tier's :class:`SqliteReader` on real SQLite files: ``fetchone`` is an entry
read (what the filter saves), ``call`` is any read, the filter's own included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from app.storage.cache_tiers import CacheWrite, SqlCacheTier
from app.storage.db import create_engine
from app.storage.key_filter import KeyFilter, StoredKeys
from app.storage.sqlite_reader import SqliteReader
from tests.test_cache import _sqlite_url

REFRESH_S = 5.0


def key(name: str) -> str:
    """A cache key as the gateway makes them: a SHA-256 hex digest."""
    return hashlib.sha256(name.encode()).hexdigest()


def entry(k: str, expires_at: float = 2000.0) -> CacheWrite:
    return CacheWrite(k, "ns", k.encode(), 1000.0, expires_at)


class Reads:
    """Counts the reads of a tier's reader; replaces its methods on the instance (a private attribute of the tier)."""

    def __init__(self, reader: SqliteReader) -> None:
        self.entries = 0  # fetchone: one entry by key
        self.any = 0  # call: every read, the filter's and fetchone's included
        fetchone, call = reader.fetchone, reader.call

        async def counted_fetchone(sql: str, params: tuple[Any, ...]) -> Any:
            self.entries += 1
            return await fetchone(sql, params)

        async def counted_call(read: Callable[[sqlite3.Connection], Any]) -> Any:
            self.any += 1
            return await call(read)

        reader.fetchone = counted_fetchone  # type: ignore[method-assign]
        reader.call = counted_call  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def open_tier(url: str, clock: list[float] | None = None) -> AsyncIterator[SqlCacheTier]:
    """A tier on the file; with ``clock``, its filter refreshes on that clock (the test moves it) every REFRESH_S."""
    engine = create_engine(url)
    tier = SqlCacheTier(engine, max_total_bytes=1 << 20)
    if clock is not None:
        # private attributes: the tier builds its StoredKeys on the real clock; this one runs on the test's
        assert tier._reader is not None
        tier._stored = StoredKeys(tier._reader, "cache_entries", refresh_s=REFRESH_S, clock=lambda: clock[0])
    try:
        yield tier
    finally:
        await tier.aclose()
        await engine.dispose()


def path_of(url: str) -> str:
    return url.removeprefix("sqlite+aiosqlite:///")


def on_a_tier(body: Callable[[SqlCacheTier, Reads, list[float], str], Awaitable[None]]) -> None:
    """``body(tier, reads, clock, url)`` on a fresh SQLite file: the tier's reads counted, its filter
    on a clock that stands still until the test moves it."""
    url = _sqlite_url()

    async def run() -> None:
        clock = [0.0]
        async with open_tier(url, clock) as tier:
            assert tier._reader is not None
            await body(tier, Reads(tier._reader), clock, url)

    asyncio.run(run())


# -- the Bloom filter ---------------------------------------------------------------------------


def test_key_filter_holds_every_key_added_and_few_others() -> None:
    keys = KeyFilter()
    odd = ["k1", "k2", "", "x" * 64, "A" * 64, "0x" + "f" * 62]  # not SHA-256 hex (or hex of another form)
    added = [key(f"in-{i}") for i in range(keys.capacity - len(odd))] + odd
    for k in added:
        keys.add(k)
    assert keys.count == keys.capacity and not keys.full
    assert all(keys.may_hold(k) for k in added)  # no false negatives
    false_positives = sum(keys.may_hold(key(f"out-{i}")) for i in range(100_000))
    assert false_positives < 1_000  # under 1 % at capacity (about 0.25 % expected)
    keys.add(key("one more"))
    assert keys.full


@pytest.mark.parametrize("capacity", [1, 10_000, 65_537, 1_000_003])
def test_key_filter_capacity_is_at_least_asked(capacity: int) -> None:
    assert KeyFilter(capacity).capacity >= capacity


# -- the SQLite tier ------------------------------------------------------------------------------


def test_misses_do_not_read_the_file_and_entries_are_still_found() -> None:
    async def body(tier: SqlCacheTier, reads: Reads, clock: list[float], url: str) -> None:
        stored = [key(f"stored-{i}") for i in range(20)]
        await tier.put([entry(k, expires_at=1060.0) for k in stored])
        assert await tier.get(stored[0], 1001.0) == stored[0].encode()  # builds the filter from the table
        entries = reads.entries
        for i in range(1000):
            assert await tier.get(key(f"absent-{i}"), 1001.0) is None
        assert reads.entries == entries  # not one entry read for a key never stored
        for k in stored:
            assert await tier.get(k, 1059.9) == k.encode()
        assert await tier.get(stored[1], 1060.0) is None  # expired, before any sweep
        assert await tier.get("missing", 1001.0) is None  # a key of another form
        assert reads.entries == entries + len(stored) + 1

    on_a_tier(body)


def test_another_process_entries_are_found_once_refresh_s_passed() -> None:
    async def body(tier: SqlCacheTier, reads: Reads, clock: list[float], url: str) -> None:
        async with open_tier(url) as other:  # another worker process
            await tier.put([entry(key("mine-0"))])
            assert await tier.get(key("mine-0"), 1001.0) is not None  # the filter is built at 0
            for n in range(2):
                theirs = key(f"theirs-{n}")
                await other.put([entry(theirs)])
                clock[0] += REFRESH_S - 0.1
                before = reads.any
                assert await tier.get(theirs, 1001.0) is None
                assert reads.any == before  # not looked for: neither the entry nor the table's new rows
                mine = key(f"mine-{n + 1}")
                await tier.put([entry(mine)])
                assert await tier.get(mine, 1001.0) == mine.encode()  # what this process writes is known at once
                clock[0] += 0.1  # REFRESH_S since the last look
                assert await tier.get(theirs, 1001.0) == theirs.encode()

    on_a_tier(body)


@pytest.mark.parametrize(
    ("where", "added"),
    [("", 1), (" WHERE rowid = 5", 1), ("", 6)],
    ids=["emptied, one new row", "largest row replaced", "emptied then refilled past the rowid seen"],
)
def test_rows_deleted_elsewhere_whose_rowids_came_back_are_found(where: str, added: int) -> None:
    """Rows deleted elsewhere whose rowids SQLite handed out again before this process looked."""

    async def body(tier: SqlCacheTier, reads: Reads, clock: list[float], url: str) -> None:
        old = [key(f"old-{i}") for i in range(5)]
        await tier.put([entry(k) for k in old])
        assert await tier.get(old[0], 1001.0) is not None  # the filter has seen rowids up to 5
        new = [key(f"new-{i}") for i in range(added)]
        with contextlib.closing(sqlite3.connect(path_of(url))) as conn, conn:
            conn.execute("DELETE FROM cache_entries" + where)
            for k in new:
                conn.execute("INSERT INTO cache_entries VALUES (?, 'ns', ?, 3, 1000.0, 2000.0)", (k, b"new"))
        clock[0] += REFRESH_S
        assert [await tier.get(k, 1001.0) for k in new] == [b"new"] * added
        entries = reads.entries
        for k in old if not where else old[4:]:
            assert await tier.get(k, 1001.0) is None
        assert reads.entries == entries  # the filter was built afresh, without the deleted keys

    on_a_tier(body)


def test_swept_keys_are_not_read() -> None:
    async def body(tier: SqlCacheTier, reads: Reads, clock: list[float], url: str) -> None:
        short = [key(f"short-{i}") for i in range(10)]
        long = [key(f"long-{i}") for i in range(10)]
        await tier.put([entry(k, expires_at=1060.0) for k in short] + [entry(k, expires_at=2000.0) for k in long])
        assert await tier.get(short[0], 1001.0) is not None  # builds the filter
        assert await tier.sweep(1061.0) == len(short)
        entries = reads.entries
        for k in short:
            assert await tier.get(k, 1001.0) is None  # gone from the table, so from the filter
        assert reads.entries == entries
        for k in long:
            assert await tier.get(k, 1061.0) == k.encode()

    on_a_tier(body)


def test_own_write_while_the_filter_is_first_built_is_found() -> None:
    """A put whose commit lands after the first build read the table, but before the build finished."""

    async def body(tier: SqlCacheTier, reads: Reads, clock: list[float], url: str) -> None:
        reader = tier._reader
        assert reader is not None
        read_done, release = asyncio.Event(), asyncio.Event()
        call = reader.call

        async def held_call(read: Callable[[sqlite3.Connection], Any]) -> Any:
            result = await call(read)
            read_done.set()
            await release.wait()
            return result

        reader.call = held_call  # type: ignore[method-assign]
        build = asyncio.create_task(tier.get(key("anything"), 1001.0))  # the first use: builds the filter
        await read_done.wait()
        reader.call = call  # type: ignore[method-assign]
        mine = key("mine")
        await tier.put([entry(mine)])
        release.set()
        assert await build is None
        assert await tier.get(mine, 1001.0) == mine.encode()

    on_a_tier(body)


def test_full_filter_grows_from_the_table() -> None:
    async def body(tier: SqlCacheTier, reads: Reads, clock: list[float], url: str) -> None:
        assert await tier.get(key("anything"), 1001.0) is None  # builds an empty filter
        stored = tier._stored  # private: the filter's size is not seen otherwise
        assert stored is not None and stored._filter is not None
        many = [key(f"many-{i}") for i in range(stored._filter.capacity + 1)]
        await tier.put([entry(k) for k in many])
        assert stored._filter.full and stored._growing is not None  # rebuilt in the background
        await stored._growing
        assert stored._filter.capacity >= 2 * len(many) and not stored._filter.full
        assert all(stored._filter.may_hold(k) for k in many)

    on_a_tier(body)
