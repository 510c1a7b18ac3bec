"""An OpenAI-compatible provider spoken to through its Responses API (``responses: native``).

Some models are served only on ``/v1/responses`` (OpenAI's codex and pro models, for one). A
Responses request for such a provider comes forwarded (endpoint ``responses``, see
:mod:`app.pipeline.forward`): it goes to ``/responses`` as the client sent it, but for the model
and ``store: false``, and the provider's response object or event stream comes back as it was sent
(:class:`ForwardedEvents`). A chat request — a chat client's — goes as the Responses request it
means, and its answer (whole, or as events) comes back as the chat completion (or chunks) it
amounts to, so every layer above works unchanged. Completions and embeddings go to their usual
paths. The provider keeps nothing: each call sends the whole conversation with ``store: false``
(the gateway stores responses itself).

What a chat request can say that the Responses API cannot (``n`` > 1, ``stop``, ``seed``,
penalties, ``logit_bias``, audio) is refused with a 400 naming it, never dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from app.config import ProviderConfig
from app.errors import UpstreamBadResponseError, UpstreamClientError, UpstreamError
from app.providers.base import UpstreamRequest
from app.providers.openai_compat import OpenAICompatibleProvider, _lines
from app.shapes import RESPONSE_ENDS, Events, chat_usage

#: makes the error for what the Responses API cannot take: (param, why)
Refuse = Callable[[str, str], Exception]
#: the operation of a request forwarded as the client sent it (app/pipeline/forward.py)
RESPONSES = "responses"
#: chat fields the Responses API has no counterpart for
_NO_COUNTERPART = ("stop", "seed", "frequency_penalty", "presence_penalty", "logit_bias", "audio", "modalities", "prediction", "functions", "function_call")
#: chat fields that travel under the same name
_SAME = ("temperature", "top_p", "parallel_tool_calls", "user", "service_tier", "metadata", "prompt_cache_key", "safety_identifier")
#: chat fields this module handles (everything else is a vendor extra and travels on)
_HANDLED = frozenset(
    {"model", "messages", "stream", "stream_options", "n", "tools", "tool_choice", "response_format", "verbosity", "max_tokens", "max_completion_tokens"}
    | {"reasoning_effort", "logprobs", "top_logprobs", "store", *_NO_COUNTERPART, *_SAME}
)


class OpenAIResponsesProvider(OpenAICompatibleProvider):
    """Chat requests over the provider's ``/responses``; other endpoints as :class:`OpenAICompatibleProvider`."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self._responses_url = (config.base_url or "").rstrip("/") + "/responses"

    def _refused(self, param: str, why: str) -> UpstreamClientError:
        return UpstreamClientError(
            f"{self.name} is reached through its Responses API, which {why}", status=400, backend=self.name, param=param, code="unsupported_parameter"
        )

    async def complete(self, request: UpstreamRequest) -> dict[str, Any]:
        if request.endpoint == RESPONSES:
            return await self._response(forwarded(request.payload, request.model, stream=False))
        if request.endpoint != "chat":
            return await super().complete(request)
        return chat_completion(await self._response(self.responses_request(request.payload, request.model, stream=False)))

    async def _response(self, body: dict[str, Any]) -> dict[str, Any]:
        """The provider's response object for a Responses request (a failed one raised)."""
        session = self._session_or_fail()
        try:
            headers = self.trace_headers() if self.trace_headers is not None else None
            async with session.post(self._responses_url, data=orjson.dumps(body), timeout=self._timeout, headers=headers) as resp:
                self._answered(resp)
                if resp.status >= 400:
                    raise await self._error_for(resp)
                raw = await resp.read()
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._translate(exc) from exc
        try:
            response = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamBadResponseError(f"{self.name} answered a body that is not JSON", backend=self.name) from exc
        if not isinstance(response, dict) or not isinstance(response.get("output"), list):
            raise UpstreamBadResponseError(f"{self.name} answered JSON that is not a response", backend=self.name)
        if response.get("status") == "failed":
            raise self._failed(response.get("error"))
        return response

    def stream(self, request: UpstreamRequest) -> AsyncIterator[dict[str, Any]]:
        if request.endpoint == RESPONSES:
            return ForwardedEvents(self, self._responses_url, forwarded(request.payload, request.model, stream=True))
        if request.endpoint != "chat":
            return super().stream(request)
        return self._chat_stream(request)

    async def _chat_stream(self, request: UpstreamRequest) -> AsyncIterator[dict[str, Any]]:
        session = self._session_or_fail()
        body = self.responses_request(request.payload, request.model, stream=True)
        chunks = ChunksOfEvents()
        try:
            headers = self.trace_headers() if self.trace_headers is not None else None
            async with session.post(self._responses_url, data=orjson.dumps(body), timeout=self._stream_timeout, headers=headers) as resp:
                self._answered(resp)
                if resp.status >= 400:
                    raise await self._error_for(resp)
                async for lines in _lines(resp.content):
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        event = self._event(line[5:])
                        for chunk in chunks.feed(event):
                            yield chunk
                        if chunks.finished:
                            return
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._translate(exc) from exc
        raise UpstreamError(f"{self.name} ended the stream before it finished", backend=self.name)

    def _event(self, data: bytes) -> dict[str, Any]:
        """One streamed event; the provider's error (an ``error`` or ``response.failed`` event) raised."""
        event = self._event_object(data)
        kind = event.get("type")
        if kind == "error":
            raise self._failed(event)
        if kind == "response.failed":
            raise self._failed((event.get("response") or {}).get("error"))
        return event

    def _failed(self, error: Any) -> UpstreamError:
        """The provider's failure (an ``error`` event, a failed response's ``error``), with its code:
        a stream failed midway ends in an ``error`` event that should say what the provider said."""
        detail = str(error.get("message") or "") if isinstance(error, dict) else ""
        code = error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), str) else None
        message = f"{self.name} failed the response" + (f": {self._clean(detail)[:500]}" if detail else "")
        return UpstreamError(message, backend=self.name, code=code[:100] if code else None)

    # -- chat request -> Responses request -----------------------------------------------------

    def responses_request(self, payload: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
        for name in _NO_COUNTERPART:
            if payload.get(name) is not None:
                raise self._refused(name, f"has no '{name}'.")
        if (payload.get("n") or 1) != 1:
            raise self._refused("n", "gives one answer per request ('n' must be 1).")
        body: dict[str, Any] = {
            "model": model,
            "input": [item for i, m in enumerate(payload.get("messages") or ()) for item in self._items(m, i)],
            "store": False,
        }
        if stream:
            body["stream"] = True
        for name in _SAME:
            if payload.get(name) is not None:
                body[name] = payload[name]
        if payload.get("tools"):
            body["tools"] = [self._tool(t, i) for i, t in enumerate(payload["tools"])]
        choice = payload.get("tool_choice")
        if choice is not None:
            body["tool_choice"] = _tool_choice(choice)
        limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if limit is not None:
            body["max_output_tokens"] = limit
        if payload.get("reasoning_effort") is not None:
            body["reasoning"] = {"effort": payload["reasoning_effort"]}
        text: dict[str, Any] = {}
        fmt = payload.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            text["format"] = {"type": "json_object"} if fmt["type"] == "json_object" else {"type": "json_schema", **(fmt.get("json_schema") or {})}
        if payload.get("verbosity") is not None:
            text["verbosity"] = payload["verbosity"]
        if text:
            body["text"] = text
        if payload.get("logprobs"):
            body["top_logprobs"] = payload.get("top_logprobs") or 0
            body["include"] = ["message.output_text.logprobs"]
        for key, value in payload.items():
            if key not in _HANDLED:
                body[key] = value  # a vendor extra, as on chat
        return body

    def _items(self, message: dict[str, Any], index: int) -> list[dict[str, Any]]:
        return message_items(message, index, self._refused)

    def _tool(self, tool: dict[str, Any], index: int) -> dict[str, Any]:
        if tool.get("type") != "function":
            raise self._refused(f"tools[{index}].type", "takes only function tools from a chat request.")
        function = tool.get("function") or {}
        return {"type": "function", **{k: v for k, v in function.items() if v is not None}}


def message_items(message: dict[str, Any], index: int, refuse: Refuse) -> list[dict[str, Any]]:
    """A chat message as the Responses input items it amounts to (``refuse`` makes the error for a part that has none)."""
    role = message.get("role")
    content = message.get("content")
    if role == "tool":
        return [{"type": "function_call_output", "call_id": message.get("tool_call_id") or "", "output": _text_of(content)}]
    items: list[dict[str, Any]] = []
    if role == "assistant":
        if content:
            items.append({"role": "assistant", "content": _text_of(content)})
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            items.append(
                {"type": "function_call", "call_id": call.get("id") or "", "name": function.get("name") or "", "arguments": function.get("arguments") or ""}
            )
        return items
    if isinstance(content, list):
        content = [_part(p, index, n, refuse) for n, p in enumerate(content)]
    return [{"role": role, "content": content if content is not None else ""}]


def _part(part: dict[str, Any], index: int, n: int, refuse: Refuse) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"type": "input_text", "text": part.get("text") or ""}
    if kind == "image_url":
        image = part.get("image_url") or {}
        url = image.get("url") if isinstance(image, dict) else image
        out = {"type": "input_image", "image_url": url}
        if isinstance(image, dict) and image.get("detail"):
            out["detail"] = image["detail"]
        return out
    if kind == "file":
        return {"type": "input_file", **(part.get("file") or {})}
    raise refuse(f"messages[{index}].content[{n}].type", f"takes no {str(kind)[:50]!r} content part.")


def chat_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as the Responses input items they amount to; a content part the Responses
    API has no counterpart for leaves its message as text."""
    items: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        try:
            items += message_items(message, index, _no_counterpart)
        except ValueError:
            items += message_items({**message, "content": _text_of(message.get("content"))}, index, _no_counterpart)
    return items


def _no_counterpart(param: str, why: str) -> Exception:
    return ValueError(f"{param}: {why}")


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            return {"type": "function", "name": (choice.get("function") or {}).get("name")}
        if choice.get("type") == "allowed_tools":
            allowed = choice.get("allowed_tools") or {}
            tools = [{"type": "function", "name": (t.get("function") or {}).get("name")} for t in allowed.get("tools") or ()]
            return {"type": "allowed_tools", "mode": allowed.get("mode", "auto"), "tools": tools}
    return choice


# -- Responses answer -> chat answer --------------------------------------------------------------


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    return chat_usage(usage) if isinstance(usage, dict) else None  # type: ignore[return-value]


def _finish(response: dict[str, Any], has_calls: bool) -> str:
    reason = (response.get("incomplete_details") or {}).get("reason")
    if response.get("status") == "incomplete":
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if has_calls else "stop"


def _annotation(note: Any) -> Any:
    if isinstance(note, dict) and note.get("type") == "url_citation":
        return {"type": "url_citation", "url_citation": {k: v for k, v in note.items() if k != "type"}}
    return note


def chat_completion(response: dict[str, Any]) -> dict[str, Any]:
    """The ``chat.completion`` a Responses API response amounts to."""
    text: list[str] = []
    reasoning: list[str] = []
    refusal: list[str] = []
    annotations: list[Any] = []
    logprobs: list[Any] = []
    calls: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or ():
                if part.get("type") == "output_text":
                    text.append(part.get("text") or "")
                    annotations.extend(_annotation(a) for a in part.get("annotations") or ())
                    logprobs.extend(part.get("logprobs") or ())
                elif part.get("type") == "refusal":
                    refusal.append(part.get("refusal") or "")
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or ()
            reasoning.append("".join(p.get("text") or "" for p in parts))
        elif kind == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if refusal:
        message["refusal"] = "".join(refusal)
    if annotations:
        message["annotations"] = annotations
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "logprobs": {"content": logprobs} if logprobs else None, "finish_reason": _finish(response, bool(calls))}
    body: dict[str, Any] = {
        "id": response.get("id"),
        "object": "chat.completion",
        "created": int(response.get("created_at") or 0),
        "model": response.get("model"),
        "choices": [choice],
    }
    usage = _usage(response.get("usage"))
    if usage:
        body["usage"] = usage
    return body


class ChunksOfEvents:
    """Turns the Responses API's events into the ``chat.completion.chunk`` stream they amount to."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {"object": "chat.completion.chunk"}
        self._calls: dict[str, int] = {}
        self.finished = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**self._head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "response.created":
            response = event.get("response") or {}
            self._head = {
                "id": response.get("id"),
                "object": "chat.completion.chunk",
                "created": int(response.get("created_at") or 0),
                "model": response.get("model"),
            }
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "response.output_text.delta":
            logprobs = event.get("logprobs")
            return [self._chunk({"content": event.get("delta") or ""}, logprobs={"content": logprobs} if logprobs else None)]
        if kind == "response.refusal.delta":
            return [self._chunk({"refusal": event.get("delta") or ""})]
        if kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            return [self._chunk({"reasoning_content": event.get("delta") or ""})]
        if kind == "response.output_text.annotation.added":
            return [self._chunk({"annotations": [_annotation(event.get("annotation"))]})]
        if kind == "response.output_item.added" and (event.get("item") or {}).get("type") == "function_call":
            item = event["item"]
            index = self._calls[item.get("id") or str(len(self._calls))] = len(self._calls)
            call = {
                "index": index,
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        if kind == "response.function_call_arguments.delta" and event.get("item_id") in self._calls:
            return [self._chunk({"tool_calls": [{"index": self._calls[event["item_id"]], "function": {"arguments": event.get("delta") or ""}}]})]
        if kind in ("response.completed", "response.incomplete"):
            response = event.get("response") or {}
            self.finished = True
            out = [self._chunk({}, _finish(response, bool(self._calls)))]
            usage = _usage(response.get("usage"))
            if usage:
                out.append({**self._head, "choices": [], "usage": usage})
            return out
        return []


# -- a Responses request forwarded -----------------------------------------------------------------


def forwarded(payload: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """The client's Responses request as the provider gets it: its model, ``store: false`` (the
    gateway stores responses itself), streamed or not as this call is; everything else as sent."""
    body = {**payload, "model": model, "store": False}
    if stream:
        body["stream"] = True
    else:
        body.pop("stream", None)
        body.pop("stream_options", None)
    return body


class ForwardedEvents:
    """A forwarded request's event stream as the provider sent it, a network read at a time.

    :meth:`batch` gives what a read brought as :class:`~app.shapes.Events` (each event's JSON as it
    came, parsed once here); the stream ends after the event that ends the response. An ``error``
    or ``response.failed`` event is raised once the events before it are handed over; an end
    before the response ended is an :class:`UpstreamError`."""

    __slots__ = ("_error", "_finished", "_held", "_payload", "_provider", "_resp", "_rest", "_url")

    def __init__(self, provider: OpenAIResponsesProvider, url: str, payload: dict[str, Any]) -> None:
        self._provider = provider
        self._url = url
        self._payload = payload
        self._resp: aiohttp.ClientResponse | None = None
        self._rest = b""
        self._finished = False
        self._error: UpstreamError | None = None
        #: what ``__anext__`` has not handed over yet
        self._held: list[dict[str, Any]] = []

    def __aiter__(self) -> ForwardedEvents:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._held:
            batch = await self.batch()
            if not batch:
                raise StopAsyncIteration
            self._held = list(batch)  # type: ignore[arg-type]
        return self._held.pop(0)

    async def batch(self) -> Events | list[dict[str, Any]]:
        provider = self._provider
        while True:
            if self._error is not None or self._finished:
                await self.aclose()
                if self._error is not None:
                    raise self._error
                return []
            try:
                if self._resp is None:
                    self._resp = await provider._open(self._url, self._payload)
                data = await self._resp.content.readany()
            except (TimeoutError, aiohttp.ClientError) as exc:
                await self.aclose()
                raise provider._translate(exc) from exc
            except BaseException:
                await self.aclose()
                raise
            if not data:
                await self.aclose()
                raise UpstreamError(f"{provider.name} ended the stream before it finished", backend=provider.name)
            *lines, self._rest = (self._rest + data).split(b"\n")
            datas: list[bytes] = []
            events: list[dict[str, Any]] = []
            for line in lines:
                if not line.startswith(b"data:") or self._finished:
                    continue
                data = line[5:].strip()
                try:
                    event = provider._event(data)
                except UpstreamError as exc:
                    self._error = exc
                    break
                datas.append(data)
                events.append(event)
                self._finished = event.get("type") in RESPONSE_ENDS
            if events:
                return Events(datas, provider.name, chunks=events)

    async def aclose(self) -> None:
        resp, self._resp = self._resp, None
        if resp is not None:
            await resp.__aexit__(None, None, None)
