"""Single-flight dedupe as a pipeline layer: identical requests in flight share one upstream call."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from app.metrics import Metrics
from app.pipeline.base import ChatRequest, ChatResult, Handler, RequestContext
from app.pipeline.cache_key import ensure_cache_key
from app.pipeline.inflight import InflightCoordinator, Ticket


class DedupeLayer:
    """Joins requests with the same cache key (namespace included) onto one upstream call.

    The first is the leader: the call runs with its context. Later ones follow and get the same
    body, the same chunks or the same error, whether they asked for a stream or not (the API
    turns one form into the other). ``x-admiral-dedupe`` is ``follower`` on followers, and
    ``leader`` on a leader that had followers by the time its headers went out; the request log
    records ``leader`` when any follower joined at all.
    """

    def __init__(self, next_handler: Handler, coordinator: InflightCoordinator, metrics: Metrics) -> None:
        self._next = next_handler
        self._coordinator = coordinator
        self._coalesced = metrics.dedupe_coalesced

    async def __call__(self, request: ChatRequest, ctx: RequestContext) -> ChatResult:
        key = ensure_cache_key(request, ctx)
        ticket = await self._coordinator.join(key, ctx, lambda shared: self._next(request, shared))
        joined = time.perf_counter()
        if not ticket.leader:
            ctx.dedupe_role = "follower"
            self._coalesced.inc()
        result = await ticket.result()
        settle(ticket, ctx, joined, result.body)
        if result.body is not None:
            return result
        assert result.chunks is not None
        return ChatResult(chunks=SettledStream(result.chunks, ticket, ctx, joined))


def settle(ticket: Ticket, ctx: RequestContext, joined: float, body: dict[str, Any] | None) -> None:
    """Bring a waiter's context in step with the shared call."""
    if ticket.leader:
        if ticket.followers:
            ctx.dedupe_role = "leader"
        return
    shared = ticket.context
    ctx.backend = shared.backend
    ctx.deployment = shared.deployment
    ctx.usage = body.get("usage") if body is not None else shared.usage
    # a follower's wait is upstream time, not gateway overhead
    ctx.upstream_seconds = time.perf_counter() - joined


class SettledStream:
    """A waiter's shared stream that settles its context when the stream ends or is closed."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], ticket: Ticket, ctx: RequestContext, joined: float) -> None:
        self._chunks = chunks
        self._ticket = ticket
        self._ctx = ctx
        self._joined = joined

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await anext(self._chunks)
        except BaseException:
            settle(self._ticket, self._ctx, self._joined, None)
            raise

    async def aclose(self) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()
        self._ticket.leave()
