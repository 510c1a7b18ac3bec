"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic Messages API.

A Messages request is served as the chat completion it translates to (:mod:`app.translate.anthropic`),
through every layer a chat request goes through; the answer, its stream and every error are
written back in Anthropic's words. The key comes from ``x-api-key`` (what Anthropic's SDK sends)
or ``Authorization``; ``anthropic-version`` and ``anthropic-beta`` are accepted and not needed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api import errors
from app.api.chat import json_object
from app.api.errors import method_not_allowed
from app.api.lane import Dialect, check_content_type, read_body
from app.api.middleware import RequestIds, declared_too_large, too_large
from app.api.responses import json_response
from app.api.sse import StreamWriter
from app.errors import ANTHROPIC_PATH, GatewayError
from app.pipeline.answer import Answer
from app.pipeline.base import ModelRequest, RequestContext
from app.serving import CLIENT_CLOSED
from app.shapes import ChatCompletionChunk
from app.translate.anthropic import MESSAGES, estimate_input_tokens, message_id, reasoning_of, stop_reason, to_chat, to_message, usage_of

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger("admiral.api")

PATH = ANTHROPIC_PATH
COUNT_TOKENS_PATH = ANTHROPIC_PATH + "/count_tokens"


def error_response(exc: GatewayError) -> Response:
    """``exc`` in Anthropic's shape, as every error under ``/v1/messages``."""
    return errors.error_response(exc, PATH)


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_PING = _event(b"ping", {"type": "ping"})
_MESSAGE_STOP = _event(b"message_stop", {"type": "message_stop"})


class AnthropicEvents(StreamWriter):
    """A chat stream as Anthropic's event sequence: ``message_start``, ``ping``, per content block
    ``content_block_start`` / ``content_block_delta`` (``thinking_delta``, ``text_delta``,
    ``input_json_delta``) / ``content_block_stop``, then ``message_delta`` (stop reason, usage)
    and ``message_stop``; a failure after the start is an ``error`` event.

    ``message_start`` carries the gateway's estimate of the input tokens (a chat stream reports
    usage only at its end); ``message_delta`` carries the provider's counts.
    """

    __slots__ = ("_blocks", "_finish", "_input_estimate", "_matched", "_model", "_open", "_refused", "_started", "_stop", "_tools", "_usage")

    def __init__(self, model: str, stop: list[str] | None, input_estimate: int) -> None:
        self._model = model
        self._stop = stop
        self._input_estimate = input_estimate
        self._started = False
        self._blocks = 0
        #: the open block: (its kind, its index)
        self._open: tuple[str, int] | None = None
        #: tool call index -> its block's index and the call's id
        self._tools: dict[int, tuple[int, str]] = {}
        self._finish: Any = None
        self._matched: Any = None
        self._refused = False
        self._usage: Any = None

    def _start(self, chunk: ChatCompletionChunk) -> bytes:
        self._started = True
        usage = {"input_tokens": self._input_estimate, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        message: dict[str, Any] = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return _event(b"message_start", {"type": "message_start", "message": message}) + _PING

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(_event(b"content_block_stop", {"type": "content_block_stop", "index": self._open[1]}))
            self._open = None

    def _begin(self, kind: str, block: dict[str, Any], out: list[bytes]) -> int:
        self._close(out)
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        out.append(_event(b"content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _text(self, kind: str, text: str, out: list[bytes]) -> None:
        if self._open is not None and self._open[0] == kind:
            index = self._open[1]
        elif kind == "thinking":
            index = self._begin(kind, {"type": "thinking", "thinking": "", "signature": ""}, out)
        else:
            index = self._begin(kind, {"type": "text", "text": ""}, out)
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta", "text": text}
        out.append(_event(b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))

    def _tool(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index", 0)
        function = call.get("function") or {}
        known = self._tools.get(position)
        call_id = call.get("id")
        # some providers (Gemini's OpenAI endpoint) send each call whole without an index: a new id is a new call
        if known is None or (call_id and call_id != known[1]):
            call_id = call_id or "toolu_" + uuid.uuid4().hex
            block: dict[str, Any] = {"type": "tool_use", "id": call_id, "name": function.get("name") or "", "input": {}}
            known = self._tools[position] = (self._begin("tool_use", block, out), call_id)
        index = known[0]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(_event(b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        out: list[bytes] = []
        if not self._started:
            out.append(self._start(chunk))
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = reasoning_of(delta)
            if reasoning:
                self._text("thinking", reasoning, out)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._text("text", content, out)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._refused = True
                self._text("text", refusal, out)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    self._tool(call, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._matched = choice.get("stop_reason")
        return b"".join(out)

    def end(self) -> bytes:
        out: list[bytes] = []
        self._close(out)
        reason, sequence = stop_reason(self._finish, self._matched, self._stop, bool(self._tools))
        if reason == "end_turn" and self._refused:
            reason = "refusal"
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage_of(self._usage)}
        out.append(_event(b"message_delta", delta))
        out.append(_MESSAGE_STOP)
        return b"".join(out)

    def failed(self, exc: GatewayError) -> bytes:
        return _event(b"error", exc.anthropic_body())


def parse_request(raw: bytes) -> ModelRequest:
    # raw stays empty: the bytes are Anthropic's, and memos keyed by a chat body's bytes must not
    # mistake them for a chat request that happens to read the same
    return ModelRequest(to_chat(json_object(raw)))


class MessagesDialect(Dialect):
    """Anthropic's Messages protocol on ``/v1/messages``, served as chat completions."""

    def __init__(self) -> None:
        super().__init__(PATH, parse_request, MESSAGES)

    def body(self, answer: Answer, request: ModelRequest, ctx: RequestContext) -> bytes:
        return orjson.dumps(to_message(answer.body, request.model, request.body.get("stop")))

    def writer(self, request: ModelRequest, ctx: RequestContext) -> AnthropicEvents:
        return AnthropicEvents(request.model, request.body.get("stop"), estimate_input_tokens(request.body))

    def error(self, exc: GatewayError) -> Response:
        return error_response(exc)


#: the request headers count_tokens reads (the first of each counts)
_HEADERS = frozenset({b"authorization", b"x-api-key", b"content-type", b"content-length", b"x-request-id"})


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


class CountTokensLane:
    """``POST /v1/messages/count_tokens`` as plain ASGI: the key checked as on every model
    endpoint, the request validated as for ``/v1/messages`` (``max_tokens`` not needed), the
    model known to the gateway, and ``{"input_tokens": N}`` by the gateway's estimate. No
    provider is called and nothing is recorded."""

    def __init__(self, services: Callable[[], Services], ids: RequestIds, max_body_bytes: int) -> None:
        self.path = COUNT_TOKENS_PATH
        self._services = services
        self._ids = ids
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _HEADERS:
                head.setdefault(name, value)
        request_id = self._ids.of(head.get(b"x-request-id"))
        response: Response
        try:
            if scope["method"] != "POST":
                raise method_not_allowed(scope["method"], self.path, "POST")
            if declared_too_large(head.get(b"content-length"), self._max_body_bytes):
                raise too_large(self._max_body_bytes)
            response = await self._count(head, receive)
        except GatewayError as exc:
            response = error_response(exc)
        except ClientDisconnect:
            response = Response(status_code=CLIENT_CLOSED)
        except Exception:
            log.exception("unhandled error on POST %s", self.path)
            response = error_response(GatewayError("The gateway hit an internal error."))
        response.raw_headers.append((b"x-request-id", request_id.encode()))
        await response(scope, receive, send)

    async def _count(self, head: dict[bytes, bytes], receive: Receive) -> Response:
        services = self._services()
        authorization = _text(head.get(b"authorization"))
        api_key = _text(head.get(b"x-api-key"))
        if authorization is None and api_key is not None:
            authorization = "Bearer " + api_key
        key = services.authenticator.identify(authorization)
        check_content_type(_text(head.get(b"content-type")))
        chat = to_chat(json_object(await read_body(receive, self._max_body_bytes)), need_max_tokens=False)
        # an unknown model is a 404 here as on /v1/messages, one outside the key's list a 403
        services.router.resolve(ModelRequest(chat), key.agent if key is not None else "anonymous", key)
        return json_response({"input_tokens": estimate_input_tokens(chat)})
