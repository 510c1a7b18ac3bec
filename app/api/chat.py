"""``POST /v1/chat/completions``: parse, run the pipeline, answer JSON or SSE."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.errors import error_response, validation_error
from app.api.middleware import request_id_of
from app.api.schemas import ChatCompletionRequest, request_body_schema
from app.errors import BadRequestError, GatewayError, UpstreamBadResponseError, UpstreamError
from app.pipeline.base import ChatRequest, ChatResult, RequestContext
from app.pipeline.streaming import ChunkAssembler, chunks_from_completion

log = logging.getLogger("admiral.api")
router = APIRouter()

#: nginx and other proxies must not buffer the event stream
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
CLIENT_CLOSED = 499
#: what clients send JSON as: curl -d says form-urlencoded, some SDKs say text/plain
_JSON_MEDIA_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded", "text/plain"})


def check_content_type(value: str | None) -> None:
    media = (value or "").split(";", 1)[0].strip().lower()
    if media and media not in _JSON_MEDIA_TYPES and not media.endswith("+json"):
        shown = media if len(media) <= 100 else media[:100] + "..."
        raise BadRequestError(f"Unsupported Content-Type '{shown}': send the request body as application/json.", code="unsupported_media_type")


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequestError("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc.msg} (at position {exc.pos}).") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    try:
        # orjson reads 1024 levels but writes only 254: fail here, not when calling the provider
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise BadRequestError("The request body nests too deeply (over 254 levels).") from None
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None
    return body


def _cache_directives(value: str | None) -> tuple[bool, bool]:
    if not value:
        return True, True
    directives = {d.strip().lower() for d in value.split(",")}
    return "no-cache" not in directives, "no-store" not in directives


def _header_value(text: str) -> str:
    # a provider/model-id route may hold any unicode; header values must be printable latin-1
    return text if text.isascii() and text.isprintable() else quote(text, safe="/:@!$&'()*+,;=~")


def _headers(ctx: RequestContext) -> dict[str, str]:
    headers = {"x-admiral-cache": ctx.cache_status, "x-admiral-route": _header_value(ctx.route)}
    if ctx.backend:
        headers["x-admiral-backend"] = ctx.backend
    if ctx.dedupe_role:
        headers["x-admiral-dedupe"] = ctx.dedupe_role
    return headers


class DisconnectWatcher:
    """Cancels ``task`` when the client disconnects, watching from a task started on the loop's next turn.

    A request answered without waiting (a cache hit) is done before that turn and never pays for the task.
    """

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self._receive = receive
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self._start = asyncio.get_running_loop().call_soon(self._begin)

    def _begin(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

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

    def __init__(self, first: dict[str, Any], rest: AsyncIterator[dict[str, Any]], include_usage: bool, headers: dict[str, str], on_finish: Callable[[int, str | None], None]) -> None:
        super().__init__(status_code=200, headers={**_SSE_HEADERS, **headers}, media_type="text/event-stream")
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._first = first
        self._rest = rest
        self._include_usage = include_usage
        self._on_finish = on_finish

    def _encode(self, chunk: dict[str, Any]) -> bytes | None:
        if self._include_usage or "usage" not in chunk:
            return _sse(chunk)
        if not chunk.get("choices"):
            return None
        return _sse({k: v for k, v in chunk.items() if k != "usage"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
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


@router.post(
    "/v1/chat/completions",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_body_schema()}}}},
)
async def chat_completions(request: Request) -> Response:
    services = request.app.state.services
    recorder = services.recorder
    ctx = RequestContext(request_id=request_id_of(request.scope), authorization=request.headers.get("authorization"))
    recorder.start()
    chat: ChatRequest | None = None
    task = asyncio.current_task()
    assert task is not None
    watcher: DisconnectWatcher | None = None
    try:
        # the key first: a caller without one learns nothing about the body
        services.authenticator.identify(ctx.authorization)
        check_content_type(request.headers.get("content-type"))
        chat = ChatRequest(parse_body(await request.body()))
        ctx.cache_read, ctx.cache_write = _cache_directives(request.headers.get("cache-control"))
        watcher = DisconnectWatcher(request.receive, task)
        result: ChatResult = await services.pipeline(chat, ctx)
        if not chat.stream:
            payload = result.encoded
            if payload is None:
                payload = orjson.dumps(result.body if result.body is not None else await _collect(result.chunks))  # type: ignore[arg-type]
            watcher.stop()
            recorder.finish(chat, ctx, 200, _content_of(payload) if recorder.log_content else None)
            return Response(payload, media_type="application/json", headers=_headers(ctx))
        chunks = result.chunks if result.chunks is not None else chunks_from_completion(result.complete_body() or {})
        first = await anext(chunks, None)
        if first is None:
            raise UpstreamBadResponseError(f"{ctx.backend or 'the backend'} sent an empty stream")
        watcher.stop()
        request_ctx, request_chat = ctx, chat
        return SSEResponse(first, chunks, chat.include_usage, _headers(ctx), lambda status, text: recorder.finish(request_chat, request_ctx, status, text))
    except GatewayError as exc:
        ctx.error_type = exc.error_type
        if isinstance(exc, UpstreamError) or exc.status >= 500:
            log.warning("request %s answered %d: %s", ctx.request_id, exc.status, exc.message)
        recorder.finish(chat, ctx, exc.status)
        return error_response(exc)
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


def _content_of(payload: bytes) -> str | None:
    choices = orjson.loads(payload).get("choices") or ()
    return (choices[0].get("message") or {}).get("content") if choices else None
