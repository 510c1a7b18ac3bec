"""A plain-ASGI lane for a model endpoint, served before FastAPI's middleware and router.

The gateway's busiest paths skip FastAPI's request objects, dependency solving, middleware and
exception handlers (a third of a cache hit's CPU) and do their HTTP work here, once for every
model endpoint: the head read in one pass, the request id, the body read within its limit, the
gateway key, ``Cache-Control``, errors in OpenAI's shape, and the answer written as JSON or SSE.
What to do with the request is the serving step's business (:mod:`app.serving`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.disconnect import DisconnectWatcher
from app.api.errors import error_response, method_not_allowed
from app.api.middleware import RequestIds, declared_too_large, too_large
from app.api.sse import OpenAIEvents, SSEResponse, StreamWriter
from app.api.transport import received_body, send_complete
from app.errors import BadRequestError, GatewayError, UpstreamBadResponseError
from app.pipeline.answer import Answer
from app.pipeline.base import CHAT, ModelRequest, RequestContext
from app.serving import CLIENT_CLOSED

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger("admiral.api")

#: what clients send JSON as: curl -d says form-urlencoded, some SDKs say text/plain
_JSON_MEDIA_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded", "text/plain"})
#: turns a request's body into the protocol-neutral request the serving step takes
Parse = Callable[[bytes], ModelRequest]


class Dialect:
    """One client protocol on one path: how its requests are read and its answers and errors
    written. This one speaks OpenAI's model endpoints; another protocol (Responses, Anthropic
    Messages) overrides what differs and translates to and from the chat request it serves."""

    def __init__(self, path: str, parse: Parse, name: str = CHAT) -> None:
        self.path = path
        self._parse = parse
        #: the endpoint as the request log and metrics name it
        self.name = name

    async def read(self, raw: bytes, ctx: RequestContext) -> ModelRequest:
        """The request the pipeline serves, from the body (the caller is known by now)."""
        return self._parse(raw)

    def body(self, answer: Answer, request: ModelRequest, ctx: RequestContext) -> bytes:
        """A complete answer's response body."""
        return answer.encoded

    def writer(self, request: ModelRequest, ctx: RequestContext) -> StreamWriter:
        """What writes a streamed answer's events."""
        return OpenAIEvents(request.include_usage)

    def error(self, exc: GatewayError) -> Response:
        return error_response(exc)


def check_content_type(value: str | None) -> None:
    if value is None or value in _JSON_MEDIA_TYPES:
        return  # what clients send most, accepted without taking it apart
    media = (value or "").split(";", 1)[0].strip().lower()
    if media and media not in _JSON_MEDIA_TYPES and not media.endswith("+json"):
        shown = media if len(media) <= 100 else media[:100] + "..."
        raise BadRequestError(f"Unsupported Content-Type '{shown}': send the request body as application/json.", code="unsupported_media_type")


def cache_directives(value: str | None) -> tuple[bool, bool]:
    """(read, write) from a ``Cache-Control`` header: ``no-cache`` skips the read, ``no-store`` the write."""
    if not value:
        return True, True
    directives = {d.strip().lower() for d in value.split(",")}
    return "no-cache" not in directives, "no-store" not in directives


def _header_value(text: str) -> str:
    # a provider/model-id route may hold any unicode; header values must be printable latin-1
    return text if text.isascii() and text.isprintable() else quote(text, safe="/:@!$&'()*+,;=~")


def admiral_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """The ``x-admiral-*`` response headers, as ASGI sends them."""
    route = _header_value(ctx.route)
    if ctx.route_score is not None:
        # how the learned router's auto chose: "code; by=classifier; confidence=0.91" (or by=rule, by=default below its confidence)
        route += f"; by={ctx.route_by}; confidence={ctx.route_score:.2f}"
    headers = [(b"x-admiral-cache", ctx.cache_status.encode()), (b"x-admiral-route", route.encode("latin-1"))]
    if ctx.backend:
        headers.append((b"x-admiral-backend", ctx.backend.encode("latin-1")))
    if ctx.dedupe_role:
        headers.append((b"x-admiral-dedupe", ctx.dedupe_role.encode()))
    if ctx.cache_similarity is not None:
        headers.append((b"x-admiral-cache-similarity", f"{ctx.cache_similarity:.4f}".encode()))
    return headers


class _Head:
    """The request headers a lane reads, found in one pass (the first of each counts)."""

    __slots__ = ("api_key", "authorization", "cache_control", "content_length", "content_type", "request_id")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.request_id: bytes | None = None
        self.content_length: bytes | None = None
        self.authorization: str | None = None
        self.content_type: str | None = None
        self.cache_control: str | None = None
        self.api_key: str | None = None
        for name, value in reversed(headers):
            if name == b"authorization":
                self.authorization = value.decode("latin-1")
            elif name == b"content-type":
                self.content_type = value.decode("latin-1")
            elif name == b"content-length":
                self.content_length = value
            elif name == b"cache-control":
                self.cache_control = value.decode("latin-1")
            elif name == b"x-request-id":
                self.request_id = value
            elif name == b"x-api-key":
                self.api_key = value.decode("latin-1")

    @property
    def credentials(self) -> str | None:
        """The gateway key as an ``Authorization`` value: that header, else ``x-api-key`` (Anthropic's SDK sends it)."""
        if self.authorization is None and self.api_key is not None:
            return "Bearer " + self.api_key
        return self.authorization


async def read_body(receive: Receive, max_bytes: int) -> bytes:
    whole = received_body(receive)
    if whole is not None:
        if len(whole) > max_bytes:
            raise too_large(max_bytes)
        return whole
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        part: bytes = message.get("body", b"")
        size += len(part)
        if size > max_bytes:
            raise too_large(max_bytes)
        if not parts and not message.get("more_body"):
            return part
        parts.append(part)
        if not message.get("more_body"):
            return b"".join(parts)


class JSONBytes:
    """A 200 with an already-encoded JSON body, written in one go (:func:`send_complete`) right after the answer's bookkeeping."""

    __slots__ = ("_answer", "body", "raw_headers")

    def __init__(self, payload: bytes, headers: list[tuple[bytes, bytes]], answer: Answer) -> None:
        self.body = payload
        self.raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
        self._answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send_complete(send, 200, self.raw_headers, self.body, self._answer.sent)
        finally:
            self._answer.sent()  # once only: this runs it when the answer could not be sent


class ModelLane:
    """``POST`` on one model endpoint as plain ASGI: HTTP in, the serving step, HTTP out, in the
    words of the endpoint's client protocol (its :class:`Dialect`)."""

    def __init__(self, dialect: Dialect, services: Callable[[], Services], ids: RequestIds, max_body_bytes: int) -> None:
        self.path = dialect.path
        self._dialect = dialect
        self._services = services
        self._ids = ids
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = _Head(scope["headers"])
        request_id = self._ids.of(head.request_id)
        answer: Response | JSONBytes
        dialect = self._dialect
        if scope["method"] != "POST":
            answer = dialect.error(method_not_allowed(scope["method"], self.path, "POST"))
        elif declared_too_large(head.content_length, self._max_body_bytes):
            answer = dialect.error(too_large(self._max_body_bytes))
        else:
            try:
                answer = await self._answer(request_id, head, receive)
            except Exception:
                log.exception("unhandled error on POST %s", self.path)
                answer = dialect.error(GatewayError("The gateway hit an internal error."))
        answer.raw_headers.append((b"x-request-id", request_id.encode()))
        await answer(scope, receive, send)

    async def _answer(self, request_id: str, head: _Head, receive: Receive) -> Response | JSONBytes:
        services = self._services()
        dialect = self._dialect
        ctx = RequestContext(request_id=request_id, endpoint=dialect.name)
        task = asyncio.current_task(services.loop)
        assert task is not None
        watcher: DisconnectWatcher | None = None
        request: ModelRequest | None = None

        async def read() -> ModelRequest:
            nonlocal watcher, request
            # the key first: a caller without one learns nothing about the body
            ctx.identify(services.authenticator.identify(head.credentials))
            check_content_type(head.content_type)
            request = await dialect.read(await read_body(receive, self._max_body_bytes), ctx)
            ctx.cache_read, ctx.cache_write = cache_directives(head.cache_control)
            watcher = DisconnectWatcher(receive, task)
            return request

        try:
            answer = await services.serving(ctx, read)
            assert request is not None
            if not answer.is_stream:
                try:
                    return JSONBytes(dialect.body(answer, request, ctx), admiral_headers(ctx), answer)
                except BaseException:
                    answer.sent()
                    raise
            return await _first_of(answer, ctx, task, dialect.writer(request, ctx))
        except GatewayError as exc:
            return dialect.error(exc)
        except asyncio.CancelledError:
            if watcher is None or not watcher.fired:
                raise
            task.uncancel()
            return Response(status_code=CLIENT_CLOSED)
        except ClientDisconnect:
            # gone while sending the body: nobody to answer
            return Response(status_code=CLIENT_CLOSED)
        finally:
            if watcher is not None:
                watcher.stop()


async def _first_of(answer: Answer, ctx: RequestContext, task: asyncio.Task[Any], writer: StreamWriter) -> SSEResponse:
    """The SSE response, once the stream's first chunk is there (an error before it is a plain error answer)."""
    try:
        first = await answer.batch()
    except BaseException:
        await answer.aclose()
        raise
    if not first:
        raise UpstreamBadResponseError(f"{ctx.backend or 'the backend'} sent an empty stream")
    return SSEResponse(first, answer, writer, admiral_headers(ctx), task)
