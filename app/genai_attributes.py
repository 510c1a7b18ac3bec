"""What spans say about a request and its answer, in the OpenTelemetry GenAI semantic conventions (``gen_ai.*``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from opentelemetry.trace import Span, StatusCode

from app.errors import BackendUnavailableError, GatewayError
from app.pipeline.answer import Answer
from app.pipeline.base import COMPLETIONS, EMBEDDINGS, ModelRequest
from app.shapes import RESPONSE_ENDS, chat_usage

#: gen_ai.operation.name of each pipeline endpoint
OPERATIONS = {"chat": "chat", COMPLETIONS: "text_completion", EMBEDDINGS: "embeddings"}
#: request fields that become gen_ai.request.* attributes (numbers only)
_NUMERIC_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def request_attributes(request: ModelRequest) -> dict[str, Any]:
    """gen_ai.operation.name, gen_ai.request.model and the request's parameters."""
    body = request.body
    attrs: dict[str, Any] = {"gen_ai.operation.name": OPERATIONS.get(request.endpoint, request.endpoint)}
    model = body.get("model")
    if isinstance(model, str):
        attrs["gen_ai.request.model"] = model
    for field, name in _NUMERIC_PARAMS.items():
        value = body.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attrs[name] = value
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool):
        attrs["gen_ai.request.max_tokens"] = limit
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n != 1:
        attrs["gen_ai.request.choice.count"] = n
    stop = body.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = stop
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("type"), str):
        attrs["gen_ai.output.type"] = "json" if fmt["type"] in ("json_object", "json_schema") else fmt["type"]
    encoding = body.get("encoding_format")
    if request.endpoint == EMBEDDINGS and isinstance(encoding, str):
        attrs["gen_ai.request.encoding_formats"] = [encoding]
    if request.stream:
        attrs["admiral.stream"] = True
    return attrs


def input_messages(request: ModelRequest) -> str:
    """The prompt as gen_ai.input.messages (only with ``capture_content``)."""
    body = request.body
    if request.endpoint == "chat":
        messages = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts: list[dict[str, Any]] = [{"type": "text", "content": content}]
            elif isinstance(content, list):
                parts = [
                    {"type": "text", "content": p["text"]}
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                    else {"type": str(p.get("type") if isinstance(p, dict) else "unknown")}
                    for p in content
                ]
            else:
                parts = []
            if message.get("tool_calls"):
                parts.extend(
                    {"type": "tool_call", "id": c.get("id"), "name": (c.get("function") or {}).get("name")}
                    for c in message["tool_calls"]
                    if isinstance(c, dict)
                )
            messages.append({"role": message.get("role"), "parts": parts})
        return _json(messages)
    return _json([{"role": "user", "parts": [{"type": "text", "content": request.prompt_text()}]}])


def usage_attributes(usage: Mapping[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    prompt = usage.get("prompt_tokens")
    if isinstance(prompt, int):
        attrs["gen_ai.usage.input_tokens"] = prompt
    completion = usage.get("completion_tokens")
    if isinstance(completion, int):
        attrs["gen_ai.usage.output_tokens"] = completion
    return attrs


class AnswerNotes:
    """What a span says about an answer: response model and id, finish reasons, usage, and (when captured) the text."""

    __slots__ = ("capture", "finish", "id", "model", "texts", "usage")

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.model: str | None = None
        self.id: str | None = None
        self.finish: dict[int, str] = {}
        self.usage: Mapping[str, Any] | None = None
        self.texts: dict[int, list[str]] = {}

    def body(self, body: Mapping[str, Any]) -> None:
        self._head(body)
        if body.get("object") == "response":
            self._response(body)
            return
        for i, choice in enumerate(body.get("choices") or ()):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", i)
            if choice.get("finish_reason"):
                self.finish[index] = str(choice["finish_reason"])
            if self.capture:
                text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
                if isinstance(text, str):
                    self.texts[index] = [text]
        if isinstance(body.get("usage"), dict):
            self.usage = body["usage"]

    def chunk(self, chunk: Mapping[str, Any]) -> None:
        if chunk.get("type") in RESPONSE_ENDS:
            # a forwarded Responses stream: its last event carries the whole response
            response = chunk.get("response")
            if isinstance(response, dict):
                self._head(response)
                self._response(response)
            return
        if self.model is None:
            self._head(chunk)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if choice.get("finish_reason"):
                self.finish[index] = str(choice["finish_reason"])
            if self.capture:
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str) and text:
                    self.texts.setdefault(index, []).append(text)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]

    def _response(self, response: Mapping[str, Any]) -> None:
        """A Responses API response (forwarded to a provider that has the API): its status as the
        finish reason, its usage in chat's words, its output text."""
        if isinstance(response.get("status"), str):
            self.finish[0] = response["status"]
        self.usage = chat_usage(response.get("usage"))
        if self.capture:
            texts = [
                part["text"]
                for item in response.get("output") or ()
                if isinstance(item, dict) and item.get("type") == "message"
                for part in item.get("content") or ()
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            ]
            if texts:
                self.texts[0] = texts

    def _head(self, obj: Mapping[str, Any]) -> None:
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if isinstance(obj.get("id"), str):
            self.id = obj["id"]

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        if self.model:
            attrs["gen_ai.response.model"] = self.model
        if self.id:
            attrs["gen_ai.response.id"] = self.id
        if self.finish:
            attrs["gen_ai.response.finish_reasons"] = [self.finish[i] for i in sorted(self.finish)]
        if self.usage:
            attrs.update(usage_attributes(self.usage))
        if self.texts:
            attrs["gen_ai.output.messages"] = _json(
                [
                    {"role": "assistant", "parts": [{"type": "text", "content": "".join(self.texts[i])}], "finish_reason": self.finish.get(i)}
                    for i in sorted(self.texts)
                ]
            )
        return attrs


async def note_answer(span: Span, answer: Answer, capture: bool, end: bool) -> None:
    """Put what ``answer`` says on ``span`` (for a stream, when it is over); end the span then if ``end``."""
    notes = AnswerNotes(capture)
    if not answer.is_stream:
        body = answer.body
        if isinstance(body, dict):
            notes.body(body)
        span.set_attributes(notes.attributes())
        if end:
            span.end()
        return
    answer.on_chunk(notes.chunk)

    async def over(outcome: BaseException | None) -> None:
        span.set_attributes(notes.attributes())
        if outcome is not None:
            failed(span, outcome)
        if end:
            span.end()

    await answer.when_done(over)


def failed(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc``: its kind (never a secret: gateway messages are cleaned at the boundary)."""
    if isinstance(exc, GeneratorExit):
        span.set_attribute("admiral.outcome", "client_left")
        return
    if isinstance(exc, GatewayError):
        span.set_attribute("error.type", exc.code or exc.error_type)
        span.set_attribute("admiral.error.status", exc.status)
        skipped = isinstance(exc, BackendUnavailableError)
        span.set_attribute("admiral.outcome", "skipped" if skipped else "error")
        if skipped:
            span.set_attribute("admiral.skipped", True)
        span.set_status(StatusCode.ERROR, exc.message[:500])
    else:
        span.set_attribute("admiral.outcome", "cancelled" if isinstance(exc, asyncio.CancelledError) else "error")
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(StatusCode.ERROR, type(exc).__name__)
