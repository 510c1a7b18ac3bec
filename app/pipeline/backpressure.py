"""Per-provider backpressure: at most ``max_concurrency`` calls at once, a bounded wait for a slot."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from app.config import Settings
from app.errors import BackendUnavailableError
from app.pipeline.answer import Answer
from app.pipeline.base import Handler, ModelRequest, RequestContext


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """How many calls a provider takes at once, and how long a call may wait for a slot."""

    max_concurrency: int
    queue_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> dict[str, ConcurrencyLimit]:
        return {name: cls(p.max_concurrency, p.queue_timeout_s) for name, p in settings.providers.items()}


@dataclass(frozen=True, slots=True)
class Load:
    """A provider's slots right now: calls (and streams) in flight, calls waiting, the cap."""

    in_flight: int
    waiting: int
    max_concurrency: int


class ProviderSlots:
    """One semaphore per provider, in-process: each replica caps its own calls.

    Read API: ``load(provider) -> Load | None``.
    """

    def __init__(self, limits: Mapping[str, ConcurrencyLimit]) -> None:
        self._limits = dict(limits)
        self._slots = {name: asyncio.Semaphore(limit.max_concurrency) for name, limit in limits.items()}
        self._in_flight = dict.fromkeys(limits, 0)
        self._waiting = dict.fromkeys(limits, 0)

    def __contains__(self, provider: str) -> bool:
        return provider in self._slots

    def load(self, provider: str) -> Load | None:
        limit = self._limits.get(provider)
        if limit is None:
            return None
        return Load(self._in_flight[provider], self._waiting[provider], limit.max_concurrency)

    async def acquire(self, provider: str) -> None:
        """Take a slot, waiting at most ``queue_timeout_s``; else raise a skip (503 with Retry-After)."""
        slot, limit = self._slots[provider], self._limits[provider]
        if not slot.locked():
            await slot.acquire()  # free: returns without suspending
        elif limit.queue_timeout_s > 0:
            self._waiting[provider] += 1
            try:
                async with asyncio.timeout(limit.queue_timeout_s):
                    await slot.acquire()
            except TimeoutError:
                raise self._busy(provider, limit) from None
            finally:
                self._waiting[provider] -= 1
        else:
            raise self._busy(provider, limit)
        self._in_flight[provider] += 1

    def release(self, provider: str) -> None:
        self._in_flight[provider] -= 1
        self._slots[provider].release()

    @staticmethod
    def _busy(provider: str, limit: ConcurrencyLimit) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"{provider} is at its concurrency limit ({limit.max_concurrency}); no slot within {limit.queue_timeout_s:g} s",
            backend=provider,
            retry_after=max(1.0, limit.queue_timeout_s),
        )


class BackpressureLayer:
    """Holds a provider slot for the whole call (a stream until it ends); no slot in time → skip (503)."""

    def __init__(self, next_handler: Handler, slots: ProviderSlots) -> None:
        self._next = next_handler
        self._slots = slots

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        assert ctx.deployment is not None
        provider = ctx.deployment.provider
        slots = self._slots
        if provider not in slots:
            return await self._next(request, ctx)
        await slots.acquire(provider)
        try:
            answer = await self._next(request, ctx)
        except BaseException:
            slots.release(provider)
            raise
        if not answer.is_stream:
            slots.release(provider)
            return answer

        async def release(_: BaseException | None) -> None:
            slots.release(provider)

        await answer.when_done(release)
        return answer
