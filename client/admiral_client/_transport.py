"""httpx transports that try the gateway, then the fallbacks (sync and async, one logic).

The decisions live in :func:`_calls`, a generator that does no I/O: it yields what to send (a
request, whose response is sent back in, or whose ``UNREACHABLE`` error is thrown in) or a
:class:`_Close` of a response it will not return, and returns the answer. Each transport only drives
it with its own way of sending and closing.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

from admiral_client._routing import UNREACHABLE, ProxyAnswered, Route, httpx, mark, unreachable_behind_proxy


class _Close(NamedTuple):
    response: Any


def _judge(route: Route, response: Any) -> bool:
    """Whether the gateway answered (rather than a proxy in front of it saying it could not)."""
    if unreachable_behind_proxy(response):
        route.outage.failed(route.gateway, ProxyAnswered(f"HTTP {response.status_code} from a proxy in front of it"))
        return False
    route.outage.answered(route.gateway)
    return True


def _calls(route: Route, request: Any, suffix: bytes) -> Generator[Any, Any, Any]:
    extensions = route.for_gateway(request)
    failure: BaseException | None = None
    proxied = None  # a proxy's 502/503/504 for the gateway: the answer if no fallback takes the call
    if route.outage.gateway_usable():
        try:
            response = yield request
        except UNREACHABLE as exc:
            route.outage.failed(route.gateway, exc)
            failure = exc
        else:
            if _judge(route, response):
                return response
            proxied = response
    alternatives = route.alternatives(request, suffix, extensions)
    if proxied is not None:
        if not alternatives:
            return proxied
        yield _Close(proxied)
    if not alternatives:
        if failure is not None:
            raise failure
        # skipped while down, yet no fallback takes this model: the gateway is the only chance
        try:
            response = yield request
        except UNREACHABLE as exc:
            route.outage.failed(route.gateway, exc)
            raise
        _judge(route, response)
        return response
    for fallback, alternative in alternatives:
        try:
            return mark((yield alternative), fallback)
        except UNREACHABLE as exc:
            failure = exc
    raise failure  # type: ignore[misc]  # set: every alternative failed


class FallbackTransport(httpx.BaseTransport):  # type: ignore[misc]
    """Sends to the gateway through ``inner``; while it cannot be reached, to the fallbacks."""

    def __init__(self, route: Route, inner: Any) -> None:
        self.route = route
        self.inner = inner

    def handle_request(self, request: Any) -> Any:
        suffix = self.route.suffix(request)
        if suffix is None or not self.route.fallbacks:
            return self.inner.handle_request(request)
        request.read()
        calls = _calls(self.route, request, suffix)
        step, error = next(calls), None
        while True:
            if isinstance(step, _Close):
                step.response.close()
                sent, error = None, None
            else:
                try:
                    sent, error = self.inner.handle_request(step), None
                except UNREACHABLE as exc:
                    sent, error = None, exc
            try:
                step = calls.throw(error) if error is not None else calls.send(sent)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        self.inner.close()


class AsyncFallbackTransport(httpx.AsyncBaseTransport):  # type: ignore[misc]
    """:class:`FallbackTransport` for the async client."""

    def __init__(self, route: Route, inner: Any) -> None:
        self.route = route
        self.inner = inner

    async def handle_async_request(self, request: Any) -> Any:
        suffix = self.route.suffix(request)
        if suffix is None or not self.route.fallbacks:
            return await self.inner.handle_async_request(request)
        await request.aread()
        calls = _calls(self.route, request, suffix)
        step, error = next(calls), None
        while True:
            if isinstance(step, _Close):
                await step.response.aclose()
                sent, error = None, None
            else:
                try:
                    sent, error = await self.inner.handle_async_request(step), None
                except UNREACHABLE as exc:
                    sent, error = None, exc
            try:
                step = calls.throw(error) if error is not None else calls.send(sent)
            except StopIteration as done:
                return done.value

    async def aclose(self) -> None:
        await self.inner.aclose()
