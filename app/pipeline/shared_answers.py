"""The response cache as single flight's :class:`~app.pipeline.inflight.SharedAnswers`: no gap between replicas.

A flight's leader stores its complete answer in the cache's shared tier (Redis) before it gives
the flight up, instead of a moment later with the cache's batched writes; a request that is about
to lead the next flight for the same key reads that tier first. An identical request on any
replica is then answered from the flight while it runs and from the cache from the moment it ends.
"""

from __future__ import annotations

from typing import Any, cast

from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, RequestContext
from app.pipeline.cache import is_complete
from app.shapes import ChatCompletion
from app.storage.response_cache import ResponseCache


class CacheAnswers:
    """Publishes to and looks up in a :class:`ResponseCache`, honouring the request's ``Cache-Control``."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def publish(self, key: str, ctx: RequestContext, body: ChatCompletion) -> None:
        data = cast(dict[str, Any], body)
        if ctx.cache_write and is_complete(data):
            await self.cache.publish(key, ctx.cache_namespace, data, ctx.backend, str(ctx.deployment) if ctx.deployment else None)

    async def lookup(self, key: str, ctx: RequestContext) -> Answer | None:
        if not ctx.cache_read:
            return None
        stored = await self.cache.get_shared(key)
        if stored is None:
            return None
        ctx.cache_status = "hit"
        ctx.backend = stored.backend
        if stored.deployment:
            ctx.deployment = Deployment.parse(stored.deployment)
        return Answer.stored(stored.payload, stored.usage)
