"""Single-flight dedupe as a pipeline layer: identical requests in flight share one upstream call."""

from __future__ import annotations

import time

from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import Handler, ModelRequest, RequestContext
from app.pipeline.cache_key import ensure_cache_key
from app.pipeline.inflight import InflightCoordinator, Ticket


class DedupeLayer:
    """Joins requests with the same cache key (namespace included) onto one upstream call.

    The first is the leader: the call runs with its context. Later ones follow and get the same
    answer, the same chunks or the same error, whether they asked for a stream or not (the API
    turns one form into the other). ``x-admiral-dedupe`` is ``follower`` on followers, and
    ``leader`` on a leader that had followers by the time its headers went out; the request log
    records ``leader`` when any follower joined at all.
    """

    def __init__(self, next_handler: Handler, coordinator: InflightCoordinator, metrics: Metrics) -> None:
        self._next = next_handler
        self._coordinator = coordinator
        self._coalesced = metrics.dedupe_coalesced

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        key = ensure_cache_key(request, ctx)
        ticket = await self._coordinator.join(key, ctx, lambda shared: self._next(request, shared))
        joined = time.perf_counter()
        if not ticket.leader:
            ctx.dedupe_role = "follower"
            self._coalesced.inc()
        answer = await ticket.result()
        settle(ticket, ctx, joined)
        if answer.is_stream:

            async def settled(_: BaseException | None) -> None:
                settle(ticket, ctx, joined)

            await answer.when_done(settled)
        return answer


def settle(ticket: Ticket, ctx: RequestContext, joined: float) -> None:
    """Bring a waiter's context in step with the shared call."""
    if ticket.leader:
        if ticket.followers:
            ctx.dedupe_role = "leader"
        return
    shared = ticket.context
    ctx.backend = shared.backend
    ctx.deployment = shared.deployment
    # a follower's wait is upstream time, not gateway overhead
    ctx.upstream_seconds = time.perf_counter() - joined
