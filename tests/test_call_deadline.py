"""Failover's per-call deadline behaves as ``asyncio.timeout`` does."""

from __future__ import annotations

import asyncio

import pytest

from app.pipeline.failover import CallDeadline


def test_a_call_past_its_deadline_ends_with_timeout_error() -> None:
    async def main() -> None:
        limit = CallDeadline(0.01)
        with pytest.raises(TimeoutError), limit:
            await asyncio.sleep(5)
        assert limit.expired()
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_call_within_its_deadline_is_left_alone() -> None:
    async def main() -> None:
        limit = CallDeadline(5)
        with limit:
            await asyncio.sleep(0.01)
        assert not limit.expired()
        await asyncio.sleep(0.02)  # the timer is gone: nothing cancels the task later

    asyncio.run(main())


def test_an_error_of_the_call_passes_through() -> None:
    async def main() -> None:
        with pytest.raises(ValueError), CallDeadline(5):
            raise ValueError("boom")

    asyncio.run(main())


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def call() -> None:
        with CallDeadline(5):
            await asyncio.sleep(5)

    async def main() -> None:
        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_cancellation_from_outside_at_the_deadline_is_not_swallowed() -> None:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(asyncio.CancelledError), CallDeadline(0):
            # the deadline and another cancellation both land before the call wakes up
            asyncio.get_running_loop().call_soon(task.cancel)
            await asyncio.sleep(1)
        task.uncancel()

    asyncio.run(main())
