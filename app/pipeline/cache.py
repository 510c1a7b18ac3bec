"""The exact response cache as a pipeline layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from app.metrics import Metrics
from app.pipeline.base import ChatRequest, ChatResult, Deployment, Handler, RequestContext
from app.pipeline.cache_key import ensure_cache_key
from app.pipeline.streaming import ChunkAssembler
from app.storage.response_cache import CachedAnswer, ResponseCache


def is_complete(body: dict[str, Any]) -> bool:
    """A whole answer: at least one choice, and every choice says why it ended."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and bool(c.get("finish_reason")) for c in choices)


class CacheLayer:
    """Answers repeated requests from the cache; stores complete successful answers.

    A hit sets ``ctx.backend`` to the backend that produced the stored answer and ``ctx.usage``
    to its usage (the recorder counts no tokens for hits). ``Cache-Control: no-cache`` skips the
    read (status ``bypass``) but still stores the fresh answer; ``no-store`` skips the write.
    """

    def __init__(self, next_handler: Handler, cache: ResponseCache, metrics: Metrics) -> None:
        self._next = next_handler
        self._cache = cache
        self._hits = metrics.cache_hits
        self._misses = metrics.cache_misses

    async def __call__(self, request: ChatRequest, ctx: RequestContext) -> ChatResult:
        key = ensure_cache_key(request, ctx)
        if ctx.cache_read:
            answer = await self._cache.get(key)
            if answer is not None:
                self._hits.inc()
                ctx.cache_status = "hit"
                ctx.backend = answer.backend
                if answer.deployment:
                    ctx.deployment = Deployment.parse(answer.deployment)
                ctx.usage = answer.usage
                return ChatResult(encoded=answer.payload)
            self._misses.inc()
            ctx.cache_status = "miss"
        else:
            ctx.cache_status = "bypass"
        result = await self._next(request, ctx)
        if not ctx.cache_write:
            return result
        if result.body is not None:
            if is_complete(result.body):
                stored = self._store(key, ctx, result.body)
                if stored is not None:
                    # the client gets the bytes just encoded for the cache rather than a second encoding
                    result.encoded = stored.payload
            return result
        assert result.chunks is not None
        return ChatResult(chunks=self._store_when_finished(result.chunks, key, ctx))

    def _store(self, key: str, ctx: RequestContext, body: dict[str, Any]) -> CachedAnswer | None:
        return self._cache.put(key, ctx.cache_namespace, body, ctx.backend, str(ctx.deployment) if ctx.deployment else None)

    async def _store_when_finished(self, chunks: AsyncIterator[dict[str, Any]], key: str, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        # stored only when the stream ran to its end with a finish_reason: never a cut or failed one
        assembler = ChunkAssembler()
        try:
            async for chunk in chunks:
                assembler.add(chunk)
                yield chunk
        finally:
            await _aclose(chunks)
        if assembler.finished:
            body = assembler.result()
            if is_complete(body):
                self._store(key, ctx, body)


async def _aclose(chunks: AsyncIterator[dict[str, Any]]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()
