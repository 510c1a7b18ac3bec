"""The exact response cache as a pipeline layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.errors import UpstreamBadResponseError
from app.metrics import Metrics
from app.pipeline.answer import Answer, Batch
from app.pipeline.base import Deployment, Handler, ModelRequest, RequestContext
from app.pipeline.cache_key import ensure_cache_key
from app.pipeline.streaming import ChunkAssembler
from app.shapes import Events
from app.storage.response_cache import CachedAnswer, ResponseCache


def is_complete(body: Mapping[str, Any]) -> bool:
    """A whole answer: at least one choice, and every choice says why it ended (a Responses
    ``response``: completed, or incomplete as a choice cut by its token limit is)."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return body.get("object") == "response" and body.get("status") in ("completed", "incomplete")
    return all(isinstance(c, dict) and bool(c.get("finish_reason")) for c in choices)


class CacheLayer:
    """Answers repeated requests from the cache; stores complete successful answers.

    A hit sets ``ctx.backend`` to the backend that produced the stored answer. A stream is stored
    of one choice as the provider's events, unparsed, and a hit replays them (folded into the answer
    they amount to for a plain request, every field kept: see :mod:`app.pipeline.streaming`); any
    other stream (several choices or tool calls, one from an in-process engine, one too big as
    events) as that answer.
    ``Cache-Control: no-cache`` skips the read (status ``bypass``) but still stores the fresh
    answer; ``no-store`` skips the write.
    """

    def __init__(self, next_handler: Handler, cache: ResponseCache, metrics: Metrics) -> None:
        self._next = next_handler
        self._cache = cache
        self._hits = metrics.cache_hits
        self._misses = metrics.cache_misses

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        key = ensure_cache_key(request, ctx)
        if ctx.cache_read:
            stored = await self._cache.get(key)
            if stored is not None:
                self._hits.inc()
                ctx.cache_status = "hit"
                ctx.backend = stored.backend
                if stored.deployment:
                    ctx.deployment = Deployment.parse(stored.deployment)
                return Answer.stored(stored.payload, stored.usage)
            self._misses.inc()
            ctx.cache_status = "miss"
        else:
            ctx.cache_status = "bypass"
        answer = await self._next(request, ctx)
        if not ctx.cache_write or answer.from_cache:
            # stored already, under the request it answered: a semantic hit kept under this
            # request's exact key would answer a caller that has the semantic cache off
            return answer
        if not answer.is_stream:
            if is_complete(answer.body):
                kept = self._store(key, ctx, answer.body)
                if kept is not None:
                    # the client gets the bytes just encoded for the cache rather than a second encoding
                    answer.encoded = kept.payload
            return answer
        # stored only when the stream ran to its end with a finish_reason: never a cut or failed one
        batches = answer.kept()

        async def store(outcome: BaseException | None) -> None:
            if outcome is None:
                self._store_stream(key, ctx, batches)

        await answer.when_done(store)
        return answer

    def _store(self, key: str, ctx: RequestContext, body: dict[str, Any]) -> CachedAnswer | None:
        return self._cache.put(key, ctx.cache_namespace, body, ctx.backend, str(ctx.deployment) if ctx.deployment else None)

    def _store_stream(self, key: str, ctx: RequestContext, kept: list[Batch]) -> None:
        """A stream of one choice (and at most one tool call) as the provider's events, unparsed,
        when it sent events (and they fit); any other as the answer it folds into, which a hit
        replays with each choice and tool call whole."""
        try:
            if kept and all(type(batch) is Events for batch in kept):
                events = Events.joined(kept)  # type: ignore[arg-type]
                if _single(events.raw):
                    if not events.finishes() and not _responded(events):
                        return
                    deployment = str(ctx.deployment) if ctx.deployment else None
                    if self._cache.put_events(key, ctx.cache_namespace, events.raw, events.usage(), ctx.backend, deployment) is not None:
                        return
            folded = ChunkAssembler()
            for batch in kept:
                folded.add_all(batch)
            if folded.finished and is_complete(body := folded.result()):
                self._store(key, ctx, body)  # type: ignore[arg-type]
        except UpstreamBadResponseError:
            return  # an event that is not a chunk: not an answer to keep


def _responded(events: Events) -> bool:
    """Whether Responses events end with a response that is whole (not failed, not cut)."""
    if not events or b'"response.' not in events.raw:
        return False
    last = events[-1]
    return last.get("type") in ("response.completed", "response.incomplete") and is_complete(last.get("response") or {})


def _single(raw: bytes) -> bool:
    """Whether every ``index`` in the events is 0: one choice, and at most one tool call (a key is
    quoted as is: in a string a quote is escaped)."""
    return raw.count(b'"index"') == raw.count(b'"index":0') + raw.count(b'"index": 0')
