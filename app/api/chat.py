"""``POST /v1/chat/completions``: parse, run the pipeline, answer JSON or SSE."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.errors import UNAVAILABLE, database_unavailable, error_response, method_not_allowed, validation_error
from app.api.middleware import RequestIds, declared_too_large, too_large
from app.api.schemas import ChatCompletionRequest, request_body_schema
from app.errors import BadRequestError, GatewayError, UpstreamBadResponseError, UpstreamError
from app.memo import BODY_MAX_BYTES, Recent
from app.pipeline.base import ChatRequest, ChatResult, RequestContext
from app.pipeline.streaming import ChunkAssembler, chunks_from_completion

if TYPE_CHECKING:
    from app.recorder import RequestRecorder
    from app.services import Services

log = logging.getLogger("admiral.api")

#: nginx and other proxies must not buffer the event stream
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"
CLIENT_CLOSED = 499
#: nesting orjson can write back (it reads deeper)
_MAX_DEPTH = 254
#: what clients send JSON as: curl -d says form-urlencoded, some SDKs say text/plain
_JSON_MEDIA_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded", "text/plain"})


def check_content_type(value: str | None) -> None:
    media = (value or "").split(";", 1)[0].strip().lower()
    if media and media not in _JSON_MEDIA_TYPES and not media.endswith("+json"):
        shown = media if len(media) <= 100 else media[:100] + "..."
        raise BadRequestError(f"Unsupported Content-Type '{shown}': send the request body as application/json.", code="unsupported_media_type")


#: bodies that passed validation lately: validation depends on the bytes alone, so a repeat skips it
_valid_recently: Recent[bytes, bool] = Recent()


def parse_body(raw: bytes) -> dict[str, Any]:
    if _valid_recently.get(raw):
        return orjson.loads(raw)  # type: ignore[no-any-return]
    if not raw.strip():
        raise BadRequestError("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc.msg} (at position {exc.pos}).") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    # fail here, not when calling the provider; a body with fewer brackets cannot nest that deep
    # and costs no second encoding
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH:
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise BadRequestError("The request body nests too deeply (over 254 levels).") from None
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None
    if len(raw) <= BODY_MAX_BYTES:
        _valid_recently.put(raw, True)
    return body


def _cache_directives(value: str | None) -> tuple[bool, bool]:
    if not value:
        return True, True
    directives = {d.strip().lower() for d in value.split(",")}
    return "no-cache" not in directives, "no-store" not in directives


def _header_value(text: str) -> str:
    # a provider/model-id route may hold any unicode; header values must be printable latin-1
    return text if text.isascii() and text.isprintable() else quote(text, safe="/:@!$&'()*+,;=~")


def _headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """The ``x-admiral-*`` response headers, as ASGI sends them."""
    headers = [(b"x-admiral-cache", ctx.cache_status.encode()), (b"x-admiral-route", _header_value(ctx.route).encode("latin-1"))]
    if ctx.backend:
        headers.append((b"x-admiral-backend", ctx.backend.encode("latin-1")))
    if ctx.dedupe_role:
        headers.append((b"x-admiral-dedupe", ctx.dedupe_role.encode()))
    return headers


#: how long a request runs before a task starts watching for its client leaving
WATCH_AFTER_S = 0.05


class DisconnectWatcher:
    """Cancels ``task`` when the client disconnects, watching from a task started after ``WATCH_AFTER_S``.

    A request answered sooner (a cache hit, a fast backend) never pays for the task; one whose
    client leaves is cancelled at most that much later than it could be. The timer itself is set
    on the loop's next turn, so a request answered without waiting does not even pay for that.
    """

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self._receive = receive
        self._task = task
        # the task's loop rather than asyncio.get_running_loop() (a system call: see Services.loop)
        self._loop = task.get_loop()
        self._watcher: asyncio.Task[None] | None = None
        self._start: asyncio.Handle = self._loop.call_soon(self._arm)

    def _arm(self) -> None:
        self._start = self._loop.call_later(WATCH_AFTER_S, self._begin)

    def _begin(self) -> None:
        self._watcher = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._task.cancel()
                return

    @property
    def fired(self) -> bool:
        """Whether the client went away (and so cancelled the task)."""
        return self._watcher is not None and self._watcher.done() and not self._watcher.cancelled()

    def stop(self) -> None:
        self._start.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def _collect(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    assembler = ChunkAssembler()
    async for chunk in chunks:
        assembler.add(chunk)
    return assembler.result()


class SSEResponse(Response):
    """Relays chunks as they arrive; a client that leaves cancels the upstream side at once."""

    def __init__(
        self,
        first: dict[str, Any],
        rest: AsyncIterator[dict[str, Any]],
        include_usage: bool,
        headers: list[tuple[bytes, bytes]],
        on_finish: Callable[[int, str | None], None],
        task: asyncio.Task[Any],
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.raw_headers = [*(h for h in self.raw_headers if h[0] != b"content-length"), *_SSE_HEADERS, *headers]
        self._first = first
        self._rest = rest
        self._include_usage = include_usage
        self._on_finish = on_finish
        #: the request's task, which also sends the response (a client leaving cancels it)
        self._task = task

    def _encode(self, chunk: dict[str, Any]) -> bytes | None:
        if self._include_usage or "usage" not in chunk:
            return _sse(chunk)
        if not chunk.get("choices"):
            return None
        return _sse({k: v for k, v in chunk.items() if k != "usage"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self._task
        watcher = DisconnectWatcher(receive, task)
        status = 200
        text: list[str] = []
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            chunk: dict[str, Any] | None = self._first
            while chunk is not None:
                data = self._encode(chunk)
                if data is not None:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content and choice.get("index", 0) == 0:
                        text.append(content)
                chunk = await anext(self._rest, None)
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        except GatewayError as exc:
            # the client already has a 200: the failure travels as one error event, then [DONE]
            status = exc.status
            log.warning("stream failed after the first chunk: %s", exc.message)
            await send({"type": "http.response.body", "body": _sse(exc.body()) + _DONE, "more_body": False})
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            task.uncancel()
            status = CLIENT_CLOSED
        except OSError:
            status = CLIENT_CLOSED
        finally:
            watcher.stop()
            await self._rest.aclose()
            self._on_finish(status, "".join(text))


PATH = "/v1/chat/completions"


class ChatCompletions:
    """``POST /v1/chat/completions`` as plain ASGI, served before FastAPI's middleware and router.

    The gateway's busiest path skips FastAPI's request objects, dependency solving, middleware
    and exception handlers (a third of a cache hit's CPU) and does their work itself: the
    request id, the body limit, errors in OpenAI's shape. The operation still appears in the
    OpenAPI document (:func:`document`).
    """

    def __init__(self, app: FastAPI, ids: RequestIds, max_body_bytes: int) -> None:
        self._app = app
        self._ids = ids
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = _Head(scope["headers"])
        request_id = self._ids.of(head.request_id)
        answer: Response | JSONBytes
        if scope["method"] != "POST":
            answer = error_response(method_not_allowed(scope["method"], PATH, "POST"))
        elif declared_too_large(head.content_length, self._max_body_bytes):
            answer = error_response(too_large(self._max_body_bytes))
        else:
            try:
                answer = await _answer(self._app.state.services, request_id, head, receive, self._max_body_bytes)
            except Exception:
                log.exception("unhandled error on POST %s", PATH)
                answer = error_response(GatewayError("The gateway hit an internal error."))
        answer.raw_headers.append((b"x-request-id", request_id.encode()))
        await answer(scope, receive, send)


class _Head:
    """The request headers the lane reads, found in one pass (the first of each counts)."""

    __slots__ = ("authorization", "cache_control", "content_length", "content_type", "request_id")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.request_id: bytes | None = None
        self.content_length: bytes | None = None
        self.authorization: str | None = None
        self.content_type: str | None = None
        self.cache_control: str | None = None
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


async def _answer(services: Services, request_id: str, head: _Head, receive: Receive, max_body_bytes: int) -> Response | JSONBytes:
    recorder = services.recorder
    authorization, content_type, cache_control = head.authorization, head.content_type, head.cache_control
    ctx = RequestContext(request_id=request_id, authorization=authorization)
    recorder.start()
    chat: ChatRequest | None = None
    task = asyncio.current_task(services.loop)
    assert task is not None
    watcher: DisconnectWatcher | None = None
    try:
        # the key first: a caller without one learns nothing about the body
        services.authenticator.identify(authorization)
        check_content_type(content_type)
        raw = await _read_body(receive, max_body_bytes)
        chat = ChatRequest(parse_body(raw), raw)
        ctx.cache_read, ctx.cache_write = _cache_directives(cache_control)
        watcher = DisconnectWatcher(receive, task)
        result: ChatResult = await services.pipeline(chat, ctx)
        if not chat.stream:
            payload = result.encoded
            if payload is None:
                payload = orjson.dumps(result.body if result.body is not None else await _collect(result.chunks))  # type: ignore[arg-type]
            watcher.stop()
            recorder.finish(chat, ctx, 200, _content_of(payload) if recorder.log_content else None)
            return JSONBytes(payload, _headers(ctx))
        chunks = result.chunks if result.chunks is not None else chunks_from_completion(result.complete_body() or {})
        first = await anext(chunks, None)
        if first is None:
            raise UpstreamBadResponseError(f"{ctx.backend or 'the backend'} sent an empty stream")
        watcher.stop()
        request_ctx, request_chat = ctx, chat
        return SSEResponse(first, chunks, chat.include_usage, _headers(ctx), lambda status, text: recorder.finish(request_chat, request_ctx, status, text), task)
    except GatewayError as exc:
        return _failed(recorder, chat, ctx, exc)
    except UNAVAILABLE as exc:
        log.warning("request %s: the database is unavailable: %s: %s", ctx.request_id, type(exc).__name__, str(exc)[:200])
        return _failed(recorder, chat, ctx, database_unavailable())
    except asyncio.CancelledError:
        if watcher is None or not watcher.fired:
            raise
        task.uncancel()
        recorder.finish(chat, ctx, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    except ClientDisconnect:
        # gone while sending the body: nobody to answer
        recorder.finish(chat, ctx, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        recorder.finish(chat, ctx, 500)
        raise
    finally:
        if watcher is not None:
            watcher.stop()


def _failed(recorder: RequestRecorder, chat: ChatRequest | None, ctx: RequestContext, exc: GatewayError) -> Response:
    ctx.error_type = exc.error_type
    if isinstance(exc, UpstreamError) or exc.status >= 500:
        log.warning("request %s answered %d: %s", ctx.request_id, exc.status, exc.message)
    recorder.finish(chat, ctx, exc.status)
    return error_response(exc)


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
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
    """A 200 with an already-encoded JSON body: two ASGI messages and nothing else."""

    __slots__ = ("body", "raw_headers")

    def __init__(self, payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.body = payload
        self.raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def document(app: FastAPI) -> None:
    """Put the route's operation in the app's OpenAPI document (the route is not one of FastAPI's)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        if PATH not in schema["paths"]:
            body = {"required": True, "content": {"application/json": {"schema": request_body_schema()}}}
            schema["paths"] = {PATH: {"post": {**_OPERATION, "requestBody": body}}, **schema["paths"]}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_OPERATION: dict[str, Any] = {
    "summary": "Chat Completions",
    "operationId": "chat_completions_v1_chat_completions_post",
    "responses": {
        "200": {"description": "A chat.completion, or with stream: true an SSE stream of chat.completion.chunk events", "content": {"application/json": {"schema": {}}}}
    },
}


def _content_of(payload: bytes) -> str | None:
    choices = orjson.loads(payload).get("choices") or ()
    return (choices[0].get("message") or {}).get("content") if choices else None
