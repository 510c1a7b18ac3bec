"""The opt-in semantic cache as a pipeline layer, behind the exact cache (see :mod:`app.semantic`)."""

from __future__ import annotations

from collections.abc import Callable

from app.classifier import BatchingEncoder
from app.config import SemanticCacheConfig, Settings
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, Handler, ModelRequest, RequestContext
from app.pipeline.cache import is_complete
from app.pipeline.cache_key import ensure_cache_key
from app.semantic import SemanticIndex, eligible, features, scope_of
from app.storage.response_cache import ResponseCache


class SemanticCacheLayer:
    """After an exact miss: answers from a stored request that means the same and agrees in every
    number, negation, name and quoted string (``x-admiral-cache: semantic-hit``); indexes each
    answer the exact cache keeps, so later paraphrases find it."""

    def __init__(
        self,
        next_handler: Handler,
        cache: ResponseCache,
        index: SemanticIndex,
        encoder: BatchingEncoder,
        config: SemanticCacheConfig,
        applies: Callable[[RequestContext], bool],
        metrics: Metrics,
    ) -> None:
        self._next = next_handler
        self._cache = cache
        self._index = index
        self._encoder = encoder
        self._threshold = config.threshold
        self._max_temperature = config.max_temperature
        self._applies = applies
        self._hits = metrics.semantic_lookups.labels("hit")
        self._misses = metrics.semantic_lookups.labels("miss")

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        text = eligible(request, self._max_temperature) if self._applies(ctx) else None
        if text is None:
            return await self._next(request, ctx)
        vector = await self._encoder.encode(text)
        wanted = features(text)
        scope = scope_of(request, ctx)
        if ctx.cache_read:
            match = self._index.nearest(scope, vector, self._threshold, wanted)
            stored = await self._cache.get(match.cache_key) if match is not None else None
            if match is not None and stored is None:
                self._index.forget(scope, match.cache_key)  # its answer expired or was evicted
            if match is not None and stored is not None:
                self._hits.inc()
                ctx.cache_status = "semantic-hit"
                ctx.cache_similarity = match.similarity
                ctx.backend = stored.backend
                if stored.deployment:
                    ctx.deployment = Deployment.parse(stored.deployment)
                return Answer.stored(stored.payload, stored.usage)
            self._misses.inc()
        answer = await self._next(request, ctx)
        if not ctx.cache_write:
            return answer
        key = ensure_cache_key(request, ctx)  # the exact cache's entry for this answer
        if not answer.is_stream:
            if is_complete(answer.body):
                self._index.add(scope, key, vector, wanted)
            return answer
        assembler = answer.fold()

        async def index(outcome: BaseException | None) -> None:
            if outcome is None and assembler.finished and is_complete(assembler.result()):
                self._index.add(scope, key, vector, wanted)

        await answer.when_done(index)
        return answer


def semantic_switch(settings: Settings) -> Callable[[RequestContext], bool]:
    """Whether a request may use the semantic cache: its key's ``semantic_cache`` if set, else its
    public model's, else ``cache.semantic.enabled``."""
    default = settings.cache.semantic.enabled
    by_model = {name: model.semantic_cache for name, model in settings.models.items() if model.semantic_cache is not None}

    def applies(ctx: RequestContext) -> bool:
        if ctx.key is not None and ctx.key.semantic_cache is not None:
            return ctx.key.semantic_cache
        return by_model.get(ctx.route, default)

    return applies


def semantic_wanted(settings: Settings) -> bool:
    """Whether anything in the config turns the semantic cache on (else its model is never loaded)."""
    return settings.cache.enabled and (
        settings.cache.semantic.enabled or any(m.semantic_cache for m in settings.models.values()) or any(k.semantic_cache for k in settings.keys)
    )
