"""The write-behind task the request log, the stored responses and the semantic index share."""

from __future__ import annotations

import asyncio

import pytest

from app.storage.write_behind import WriteBehind

pytestmark = pytest.mark.asyncio


async def test_a_failed_flush_is_tried_again_until_it_succeeds() -> None:
    outcomes = [False, False, True]
    calls: list[bool] = []
    done = asyncio.Event()

    async def flush() -> bool:
        calls.append(outcomes[len(calls)])
        if calls[-1]:
            done.set()
        return calls[-1]

    behind = WriteBehind(flush, name="test-writer", backoff_s=0.001, max_backoff_s=0.002)
    behind.start()
    behind.wake()  # once: the retries need no other wake
    await asyncio.wait_for(done.wait(), 10)
    await behind.stop()
    assert calls == [False, False, True]


async def test_nothing_is_flushed_unless_woken_when_there_is_no_interval() -> None:
    calls = 0

    async def flush() -> bool:
        nonlocal calls
        calls += 1
        return True

    behind = WriteBehind(flush, name="test-writer")
    behind.start()
    for _ in range(20):
        await asyncio.sleep(0)
    assert calls == 0
    await behind.stop()
    assert calls == 0  # stopping leaves the last flush to the owner


async def test_stop_lets_the_flush_under_way_finish() -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []

    async def flush() -> bool:
        entered.set()
        await release.wait()
        finished.append(True)
        return True

    behind = WriteBehind(flush, name="test-writer")
    behind.start()
    behind.wake()
    await asyncio.wait_for(entered.wait(), 10)
    stopping = asyncio.create_task(behind.stop(timeout_s=10))
    await asyncio.sleep(0)
    assert behind.stopping and not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert finished == [True]


async def test_stop_gives_up_on_a_flush_that_hangs() -> None:
    async def flush() -> bool:
        await asyncio.Event().wait()  # never returns
        return True

    behind = WriteBehind(flush, name="test-writer")
    behind.start()
    behind.wake()
    await asyncio.sleep(0)
    await asyncio.wait_for(behind.stop(timeout_s=0.01), 10)
    assert [t for t in asyncio.all_tasks() if t.get_name() == "test-writer"] == []
