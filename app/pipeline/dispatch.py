"""The end of the line: one call to the deployment chosen by the layers above.

Here the client's body becomes the one the provider takes (its parameter profile, calls split by
``max_n``; see :mod:`app.pipeline.params`): the layers above, the cache key and dedupe among them,
see the request as the client sent it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from app.config import ProviderConfig
from app.errors import UpstreamBadResponseError
from app.pipeline.answer import Answer, Batch
from app.pipeline.base import ModelRequest, RequestContext
from app.pipeline.params import ParamProfile, gathered, interleaved, joined, metered, missing_usage, with_n, with_usage
from app.providers.base import Provider, UpstreamRequest
from app.shapes import last_usage


class Dispatcher:
    """Calls ``ctx.deployment``; a stream is returned only once its first chunk has arrived.

    ``configs`` (the providers' config sections) give each provider its parameter profile and say
    which ones are HTTP APIs whose answers without usage get it estimated.
    """

    def __init__(self, providers: dict[str, Provider], configs: Mapping[str, ProviderConfig] | None = None) -> None:
        self._providers = providers
        configs = configs or {}
        self._profiles = {name: p for name, c in configs.items() if (p := ParamProfile.of(c)) is not None}
        #: providers asked for usage over HTTP: what they leave out is estimated
        self._metered = frozenset(name for name, c in configs.items() if c.kind == "openai")

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        deployment = ctx.deployment
        assert deployment is not None, "failover sets ctx.deployment before dispatch"
        name = deployment.provider
        provider = self._providers[name]
        profile = self._profiles.get(name)
        payload = request.body if profile is None else profile.apply(request.body)
        sizes = profile.splits(payload) if profile is not None else None
        call = UpstreamRequest(model=deployment.model, payload=payload, request_id=ctx.request_id, endpoint=request.endpoint)
        ctx.attempts += 1
        started = time.perf_counter()
        if not request.stream:
            if sizes is None:
                body = await provider.complete(call)
            else:
                bodies = await gathered([provider.complete(_part(call, n)) for n in sizes])
                body = joined(bodies)
            if not body.get("usage") and name in self._metered:
                body = with_usage(body, request)
            ctx.upstream_seconds = time.perf_counter() - started
            ctx.backend = name
            return Answer(body=body)  # type: ignore[arg-type]
        if sizes is None:
            chunks = provider.stream(call)
        else:
            # each call metered on its own: the prompt it paid counts once per call
            parts = [provider.stream(_part(call, n)) for n in sizes]
            chunks = interleaved([metered(p, request) for p in parts] if name in self._metered else parts, sizes)
        try:
            first = await _first(chunks)
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise
        if not first:
            raise UpstreamBadResponseError(f"{name} sent an empty stream", backend=name)
        ctx.ttft_seconds = time.perf_counter() - started
        ctx.backend = name
        rest = _Rest(first, chunks, request if name in self._metered else None)
        answer = Answer(chunks=rest)

        async def timed(_: BaseException | None) -> None:
            ctx.upstream_seconds = time.perf_counter() - started

        await answer.when_done(timed)
        return answer


def _part(call: UpstreamRequest, n: int) -> UpstreamRequest:
    return UpstreamRequest(model=call.model, payload=with_n(call.payload, n), request_id=call.request_id, endpoint=call.endpoint)


async def _first(chunks: AsyncIterator[dict[str, Any]]) -> Batch:
    """The stream's first batch (its first chunk, from a stream without batches); [] when it is empty."""
    batch = getattr(chunks, "batch", None)
    if batch is not None:
        return await batch()  # type: ignore[no-any-return]
    chunk = await anext(chunks, None)
    return [] if chunk is None else [chunk]  # type: ignore[list-item]


class _Rest:
    """A stream from its first batch (read already), then batch by batch as the provider's stream
    gives them (chunk by chunk from a stream without batches); for ``metered``'s request, ended
    with the usage chunk the provider did not send (see :func:`~app.pipeline.params.missing_usage`)."""

    __slots__ = ("_batch", "_first", "_kept", "_metered", "_source")

    def __init__(self, first: Batch, source: AsyncIterator[dict[str, Any]], metered: ModelRequest | None) -> None:
        self._first = first
        self._source = source
        self._batch: Callable[[], Awaitable[Batch]] | None = getattr(source, "batch", None)
        self._metered = metered
        #: every batch, for the usage the provider may not have sent (only when metered)
        self._kept: list[Batch] | None = [first] if metered is not None else None

    async def batch(self) -> Batch:
        chunks = self._first
        if chunks:
            self._first = []
            return chunks
        chunks = await self._batch() if self._batch is not None else await _first(self._source)
        if not chunks:
            tail = self._tail()
            return [tail] if tail is not None else []  # type: ignore[list-item]
        if self._kept is not None:
            self._kept.append(chunks)
        return chunks

    def _tail(self) -> dict[str, Any] | None:
        kept, self._kept = self._kept, None
        if kept is None or self._metered is None or any(map(last_usage, reversed(kept))):
            return None
        return missing_usage([chunk for batch in kept for chunk in batch], self._metered)  # type: ignore[misc]

    async def aclose(self) -> None:
        await self._source.aclose()  # type: ignore[attr-defined]
