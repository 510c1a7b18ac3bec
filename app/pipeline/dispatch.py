"""The end of the line: one call to the deployment chosen by the layers above.

Here the client's body becomes the one the provider takes (its parameter profile, calls split by
``max_n``; see :mod:`app.pipeline.params`): the layers above, the cache key and dedupe among them,
see the request as the client sent it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from app.config import ProviderConfig
from app.errors import UpstreamBadResponseError
from app.pipeline.answer import Answer
from app.pipeline.base import ModelRequest, RequestContext
from app.pipeline.params import ParamProfile, gathered, interleaved, joined, metered, missing_usage, with_n, with_usage
from app.providers.base import Provider, UpstreamRequest
from app.shapes import ChatCompletionChunk


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
            first = await anext(chunks)
        except StopAsyncIteration:
            raise UpstreamBadResponseError(f"{name} sent an empty stream", backend=name) from None
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise
        ctx.ttft_seconds = time.perf_counter() - started
        ctx.backend = name
        rest = _Rest(first, chunks, request if name in self._metered else None)
        answer = Answer(chunks=cast("AsyncIterator[ChatCompletionChunk]", rest))

        async def timed(_: BaseException | None) -> None:
            ctx.upstream_seconds = time.perf_counter() - started

        await answer.when_done(timed)
        return answer


def _part(call: UpstreamRequest, n: int) -> UpstreamRequest:
    return UpstreamRequest(model=call.model, payload=with_n(call.payload, n), request_id=call.request_id, endpoint=call.endpoint)


class _Rest:
    """A stream from its first chunk (read already), batches passed on as the provider's stream
    gives them (``ready``); for ``metered``'s request, ended with the usage chunk the provider did
    not send (see :func:`~app.pipeline.params.missing_usage`)."""

    __slots__ = ("_first", "_kept", "_metered", "_ready", "_source")

    def __init__(self, first: dict[str, Any], source: AsyncIterator[dict[str, Any]], metered: ModelRequest | None) -> None:
        self._first: dict[str, Any] | None = first
        self._source = source
        self._ready: Callable[[], list[dict[str, Any]]] | None = getattr(source, "ready", None)
        self._metered = metered
        #: every chunk, for the usage the provider may not have sent (only when metered)
        self._kept: list[dict[str, Any]] | None = [] if metered is not None else None

    def __aiter__(self) -> _Rest:
        return self

    async def __anext__(self) -> dict[str, Any]:
        chunk = self._first
        if chunk is not None:
            self._first = None
        else:
            try:
                chunk = await anext(self._source)
            except StopAsyncIteration:
                chunk = self._tail()
                if chunk is None:
                    raise
                return chunk
        if self._kept is not None:
            self._kept.append(chunk)
        return chunk

    def ready(self) -> list[dict[str, Any]]:
        """The chunks the provider's stream has already read, without waiting."""
        chunks = self._ready() if self._ready is not None and self._first is None else []
        if chunks and self._kept is not None:
            self._kept.extend(chunks)
        return chunks

    def _tail(self) -> dict[str, Any] | None:
        kept, self._kept = self._kept, None
        if kept is None or self._metered is None:
            return None
        return missing_usage(kept, self._metered)

    async def aclose(self) -> None:
        await self._source.aclose()  # type: ignore[attr-defined]
