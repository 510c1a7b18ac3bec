"""The end of the line: one call to the deployment chosen by the layers above."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from app.errors import UpstreamBadResponseError
from app.pipeline.answer import Answer
from app.pipeline.base import ModelRequest, RequestContext
from app.providers.base import Provider, UpstreamRequest
from app.shapes import ChatCompletionChunk


class Dispatcher:
    """Calls ``ctx.deployment``; a stream is returned only once its first chunk has arrived."""

    def __init__(self, providers: dict[str, Provider]) -> None:
        self._providers = providers

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        deployment = ctx.deployment
        assert deployment is not None, "failover sets ctx.deployment before dispatch"
        provider = self._providers[deployment.provider]
        call = UpstreamRequest(model=deployment.model, payload=request.body, request_id=ctx.request_id, endpoint=request.endpoint)
        ctx.attempts += 1
        started = time.perf_counter()
        if not request.stream:
            body = await provider.complete(call)
            ctx.upstream_seconds = time.perf_counter() - started
            ctx.backend = deployment.provider
            return Answer(body=body)
        chunks = provider.stream(call)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise UpstreamBadResponseError(f"{deployment.provider} sent an empty stream", backend=deployment.provider) from None
        except BaseException:
            await chunks.aclose()
            raise
        ctx.ttft_seconds = time.perf_counter() - started
        ctx.backend = deployment.provider
        answer = Answer(chunks=_after(first, chunks))

        async def timed(_: BaseException | None) -> None:
            ctx.upstream_seconds = time.perf_counter() - started

        await answer.when_done(timed)
        return answer


async def _after(first: ChatCompletionChunk, rest: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[ChatCompletionChunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
