"""A chat completion (whole, or as chunks) told as a Responses API response: its object and its event stream.

    chat message                         Responses output items, in this order
    reasoning_content / reasoning        reasoning item, its text as a reasoning_text part
    content (+ annotations, logprobs)    message item with an output_text part
    refusal                              the message item's refusal part
    tool_calls                           one function_call item each (call_id = the call's id)
    finish_reason length / content_filter   status incomplete, incomplete_details.reason
                                            max_output_tokens / content_filter
    usage prompt/completion tokens       usage input/output tokens (cached, reasoning details)

Only the first choice is told: the Responses API has no ``n``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import orjson

from app.errors import GatewayError
from app.shapes import Events

if TYPE_CHECKING:
    from app.pipeline.answer import Batch

#: what the finish reason makes of the response: (status, incomplete_details.reason)
_ENDINGS = {"length": ("incomplete", "max_output_tokens"), "content_filter": ("incomplete", "content_filter")}


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def usage_of(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached)},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def ending(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    status, reason = _ENDINGS.get(finish_reason or "", ("completed", None))
    return status, {"reason": reason} if reason else None


def response_object(
    origin: dict[str, Any],
    rid: str,
    created_at: int,
    *,
    model: str | None,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``response`` object, echoing the request's settings as OpenAI does."""
    text = origin.get("text") or {}
    reasoning = origin.get("reasoning") or {}
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": origin.get("instructions"),
        "max_output_tokens": origin.get("max_output_tokens"),
        "model": model or origin["model"],
        "output": output,
        "parallel_tool_calls": origin.get("parallel_tool_calls", True),
        "previous_response_id": origin.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": origin.get("service_tier"),
        "store": origin.get("store", True),
        "temperature": origin.get("temperature", 1.0),
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": origin.get("tool_choice", "auto"),
        "tools": origin.get("tools") or [],
        "top_logprobs": origin.get("top_logprobs", 0),
        "top_p": origin.get("top_p", 1.0),
        "truncation": origin.get("truncation", "disabled"),
        "usage": usage,
        "user": origin.get("user"),
        "metadata": origin.get("metadata") or {},
    }


def _annotation(note: Any) -> Any:
    # chat nests a citation's fields under its type's name; Responses has them flat
    if isinstance(note, dict) and note.get("type") == "url_citation" and isinstance(note.get("url_citation"), dict):
        return {"type": "url_citation", **note["url_citation"]}
    return note


def _item_id(prefix: str, rid: str, index: int) -> str:
    return f"{prefix}_{rid.removeprefix('resp_')}_{index}"


def _reasoning_text(message: dict[str, Any]) -> str | None:
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def from_completion(completion: dict[str, Any], origin: dict[str, Any], rid: str, created_at: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The response object for a ``chat.completion``, and the assistant message it adds to the conversation."""
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    status, incomplete = ending(choice.get("finish_reason"))
    item_status = "completed" if status == "completed" else "incomplete"
    output: list[dict[str, Any]] = []
    reasoning = _reasoning_text(message)
    if reasoning:
        output.append(
            {
                "id": _item_id("rs", rid, len(output)),
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": reasoning}],
                "status": item_status,
            }
        )
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    if isinstance(content, str) and (content or not message.get("tool_calls")):
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        parts.append({"type": "output_text", "text": content, "annotations": [_annotation(a) for a in message.get("annotations") or ()], "logprobs": logprobs})
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        parts.append({"type": "refusal", "refusal": message["refusal"]})
    if parts or not message.get("tool_calls"):
        output.append({"id": _item_id("msg", rid, len(output)), "type": "message", "status": item_status, "role": "assistant", "content": parts})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        output.append(
            {
                "id": _item_id("fc", rid, len(output)),
                "type": "function_call",
                "status": "completed",
                "call_id": call.get("id") or _item_id("call", rid, len(output)),
                "name": function.get("name") or "",
                "arguments": function.get("arguments") or "",
            }
        )
    response = response_object(
        origin, rid, created_at, model=completion.get("model"), status=status, output=output, usage=usage_of(completion.get("usage")), incomplete=incomplete
    )
    return response, assistant_turn(output)


def assistant_turn(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat assistant message a response's output amounts to (reasoning and built-in tools'
    items left out: chat providers take none back)."""
    text = "".join(
        p.get("text") or ""
        for item in output
        if item.get("type") == "message"
        for p in item.get("content") or ()
        if isinstance(p, dict) and p.get("type") == "output_text"
    )
    calls = [
        {"id": i.get("call_id"), "type": "function", "function": {"name": i.get("name"), "arguments": i.get("arguments") or ""}}
        for i in output
        if i.get("type") == "function_call"
    ]
    turn: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        turn["tool_calls"] = calls
    return turn


#: called once a streamed response has completed: (the response object, the assistant message)
Finished = Callable[[dict[str, Any], dict[str, Any]], None]


def plain_items(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A translated response's output as the input items that continue from it on a provider with
    the Responses API natively: its text and calls, without the gateway's item ids (the provider
    knows none) and without its reasoning (text a provider cannot take back)."""
    turn = assistant_turn(output)
    items: list[dict[str, Any]] = [{"role": "assistant", "content": turn["content"]}] if turn["content"] else []
    for call in turn.get("tool_calls") or ():
        items.append({"type": "function_call", "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]})
    return items


def as_gateways(response: dict[str, Any], origin: dict[str, Any], rid: str) -> dict[str, Any]:
    """A provider's response to a forwarded request, as the gateway tells it: every item and field
    the provider sent, but the id (the gateway's store answers for it) and what the gateway settled
    itself (``previous_response_id``, ``store``: the provider was sent neither)."""
    return {**response, "id": rid, "previous_response_id": origin.get("previous_response_id"), "store": origin.get("store", True)}


def is_response_event(chunk: Any) -> bool:
    """Whether a streamed answer is a forwarded request's Responses events (not chat chunks)."""
    return isinstance(chunk, dict) and "choices" not in chunk and isinstance(chunk.get("type"), str)


class _EventsOut:
    """What the two Responses event writers share: the response they tell (its request, id and
    creation time), the hook its end calls, and the events' numbering."""

    def __init__(self, origin: dict[str, Any], rid: str, created_at: int, finished: Finished | None = None) -> None:
        self._origin = origin
        self._rid = rid
        self._created_at = created_at
        self._finished = finished
        self._seq = 0

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class RelayedEvents(_EventsOut):
    """A provider's Responses events, relayed as it sent them (``event:`` and ``data:`` lines, its
    own sequence numbers): each event unchanged, but a whole response in one, which is told as the
    gateway's (:func:`as_gateways`). A failure midway ends with ``error`` and ``response.failed``,
    numbered on."""

    def __init__(self, origin: dict[str, Any], rid: str, created_at: int, finished: Finished | None = None) -> None:
        super().__init__(origin, rid, created_at, finished)
        #: the response as the events have told it so far, and as it ended
        self._response: dict[str, Any] | None = None
        self._final: dict[str, Any] | None = None

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        return self.chunks([chunk])  # type: ignore[list-item]

    def chunks(self, batch: Batch) -> bytes:
        out: list[bytes] = []
        datas = batch.datas if type(batch) is Events else None
        for n, event in enumerate(cast("list[dict[str, Any]]", batch)):
            kind = event.get("type")
            if not isinstance(kind, str):
                continue  # not an event (the usage the dispatcher adds when the provider said none)
            if isinstance(event.get("sequence_number"), int):
                self._seq = event["sequence_number"] + 1
            response = event.get("response")
            if isinstance(response, dict):
                response = self._response = as_gateways(response, self._origin, self._rid)
                if kind in ("response.completed", "response.incomplete"):
                    self._final = response
                data = orjson.dumps({**event, "response": response})
            else:
                data = datas[n] if datas is not None else orjson.dumps(event)
            out.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
        return b"".join(out)

    def end(self) -> bytes:
        if self._final is not None and self._finished is not None:
            self._finished(self._final, assistant_turn(self._final.get("output") or []))
        return b""

    def failed(self, exc: GatewayError) -> bytes:
        code = exc.code or exc.error_type
        error = self._event("error", code=code, message=exc.message, param=exc.param)
        shell = self._response or response_object(self._origin, self._rid, self._created_at, model=None, status="failed", output=[], usage=None)
        failed = self._event("response.failed", response={**shell, "status": "failed", "error": {"code": code, "message": exc.message}})
        return error + failed


class EitherEvents:
    """The Responses event stream of an answer that is either a provider's Responses events (a
    forwarded request: relayed) or chat chunks (a translated one: written as events), told apart
    by its first chunk."""

    def __init__(self, relayed: RelayedEvents, translated: ResponsesEvents) -> None:
        self._relayed = relayed
        self._translated = translated
        self._writer: RelayedEvents | ResponsesEvents | None = None

    def _for(self, chunk: Any) -> RelayedEvents | ResponsesEvents:
        if self._writer is None:
            self._writer = self._relayed if is_response_event(chunk) else self._translated
        return self._writer

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        return self._for(chunk).chunk(chunk)

    def chunks(self, batch: Batch) -> bytes:
        return self._for(batch[0] if batch else None).chunks(batch)

    def end(self) -> bytes:
        return (self._writer or self._translated).end()

    def failed(self, exc: GatewayError) -> bytes:
        return (self._writer or self._translated).failed(exc)


class ResponsesEvents(_EventsOut):
    """Writes chat chunks as the Responses API's server-sent events (``event:`` and ``data:`` lines,
    every event numbered by ``sequence_number``), from ``response.created`` to ``response.completed``
    (``response.incomplete`` when the answer was cut by its token limit or a content filter); a
    failure midway ends with an ``error`` event and ``response.failed``."""

    def __init__(self, origin: dict[str, Any], rid: str, created_at: int, finished: Finished | None = None) -> None:
        super().__init__(origin, rid, created_at, finished)
        self._started = False
        self._model: str | None = None
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None
        self._output: list[dict[str, Any]] = []
        #: each item's place in the output, by its id
        self._positions: dict[str, int] = {}
        #: the reasoning or message item taking deltas now, its part taking them, where that part
        #: is (item_id, output_index, content_index) and its text so far, in pieces (joined once,
        #: when the part closes: adding to one string would copy it for every delta)
        self._open: dict[str, Any] | None = None
        self._part: dict[str, Any] | None = None
        self._where: dict[str, Any] = {}
        self._prefix = b""
        self._pieces: list[str] = []
        #: function call items by the chat tool call's index (open until the end), and their arguments in pieces
        self._calls: dict[int, dict[str, Any]] = {}
        self._arguments: dict[int, list[str]] = {}

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(
            self._origin, self._rid, self._created_at, model=self._model, status=status, output=self._output, usage=usage_of(self._usage), **extra
        )

    def _start(self) -> list[bytes]:
        self._started = True
        shell = self._response("in_progress")
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        out = [] if self._started else self._start()
        if self._model is None and isinstance(chunk.get("model"), str):
            self._model = chunk["model"]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = _reasoning_text(delta)
            if reasoning:
                out += self._delta("reasoning_text", reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                out += self._delta("output_text", content, (choice.get("logprobs") or {}).get("content") or [])
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                out += self._delta("refusal", refusal)
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            for note in delta.get("annotations") or ():
                out += self._annotation(note)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    # -- items --------------------------------------------------------------------------------

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        self._positions[item["id"]] = len(self._output)
        self._output.append(item)
        return [self._event("response.output_item.added", output_index=len(self._output) - 1, item=item)]

    def _delta(self, kind: str, text: str, logprobs: list[Any] | None = None) -> list[bytes]:
        """One piece of a reasoning text, an output text or a refusal; opens its item and part first when needed."""
        out: list[bytes] = []
        part = self._part
        if part is None or part["type"] != kind:
            item = self._open
            item_type = "reasoning" if kind == "reasoning_text" else "message"
            if item is None or item["type"] != item_type:
                out += self._close_open()
                if item_type == "reasoning":
                    item = {"id": _item_id("rs", self._rid, len(self._output)), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
                else:
                    item = {"id": _item_id("msg", self._rid, len(self._output)), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
                self._open = item
                out += self._add(item)
            else:
                out += self._close_part()
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "output_text" else {"type": kind, _TEXT[kind]: ""}
            out += self._open_part(part)
        if not text:
            return out
        self._pieces.append(text)
        # the busiest event, written from a prefix made when the part opened (no dict per delta)
        tail = b"}\n\n"
        if kind == "output_text":
            if logprobs:
                part["logprobs"].extend(logprobs)
            tail = b',"logprobs":' + (orjson.dumps(logprobs) if logprobs else b"[]") + tail
        out.append(self._prefix + orjson.dumps(text) + b',"sequence_number":' + str(self._seq).encode() + tail)
        self._seq += 1
        return out

    def _annotation(self, note: Any) -> list[bytes]:
        part = self._part
        if part is None or part["type"] != "output_text":
            return []
        note = _annotation(note)
        part["annotations"].append(note)
        return [self._event("response.output_text.annotation.added", **self._where, annotation_index=len(part["annotations"]) - 1, annotation=note)]

    def _open_part(self, part: dict[str, Any]) -> list[bytes]:
        item = self._open
        assert item is not None
        item["content"].append(part)
        self._part = part
        self._pieces = []
        self._where = {"item_id": item["id"], "output_index": self._positions[item["id"]], "content_index": len(item["content"]) - 1}
        self._prefix = _delta_prefix(_DELTAS[part["type"]], self._where)
        return [self._event("response.content_part.added", **self._where, part=dict(part))]

    def _gather(self) -> None:
        """Put the open part's pieces into its text (before the part or the response is shown whole)."""
        if self._part is not None:
            self._part[_TEXT[self._part["type"]]] = "".join(self._pieces)
        for index, pieces in self._arguments.items():
            self._calls[index]["arguments"] = "".join(pieces)

    def _close_part(self) -> list[bytes]:
        part = self._part
        if part is None:
            return []
        self._gather()
        self._part = None
        where = self._where
        if part["type"] == "output_text":
            done = self._event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
        elif part["type"] == "refusal":
            done = self._event("response.refusal.done", **where, refusal=part["refusal"])
        else:
            done = self._event("response.reasoning_text.done", **where, text=part["text"])
        return [done, self._event("response.content_part.done", **where, part=part)]

    def _close_open(self, status: str = "completed") -> list[bytes]:
        item = self._open
        if item is None:
            return []
        out = self._close_part()
        self._open = None
        item["status"] = status
        out.append(self._event("response.output_item.done", output_index=self._positions[item["id"]], item=item))
        return out

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            out += self._close_open()
            position = len(self._output)
            item = {
                "id": _item_id("fc", self._rid, position),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.get("id") or _item_id("call", self._rid, position),
                "name": function.get("name") or "",
                "arguments": "",
            }
            self._calls[index] = item
            self._arguments[index] = []
            out += self._add(item)
        elif function.get("name") and not item["name"]:
            item["name"] = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._arguments[index].append(arguments)
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=self._positions[item["id"]], delta=arguments))
        return out

    # -- the end ------------------------------------------------------------------------------

    def _close_all(self, status: str) -> list[bytes]:
        out = self._close_open(status)
        self._gather()
        for item in self._calls.values():
            index = self._positions[item["id"]]
            item["status"] = "completed"
            out.append(
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index, name=item["name"], arguments=item["arguments"])
            )
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        self._calls = {}
        self._arguments = {}
        return out

    def chunks(self, batch: Batch) -> bytes:
        # the chunks as plain dicts: this writer reads them by key, as it reads every chunk
        return b"".join(map(self.chunk, cast("list[dict[str, Any]]", batch)))

    def end(self) -> bytes:
        out = [] if self._started else self._start()
        status, incomplete = ending(self._finish)
        if not self._output:
            # an answer with nothing in it is still one (empty) message
            out += self._delta("output_text", "")
        out += self._close_all("completed" if status == "completed" else "incomplete")
        response = self._response(status, incomplete=incomplete)
        out.append(self._event("response.completed" if status == "completed" else "response.incomplete", response=response))
        if self._finished is not None:
            self._finished(response, assistant_turn(self._output))
        return b"".join(out)

    def failed(self, exc: GatewayError) -> bytes:
        out = [] if self._started else self._start()
        self._gather()
        code = exc.code or exc.error_type
        out.append(self._event("error", code=code, message=exc.message, param=exc.param))
        out.append(self._event("response.failed", response=self._response("failed", error={"code": code, "message": exc.message})))
        return b"".join(out)


#: the key of each streamed part's text, and the event its pieces come in
_TEXT = {"output_text": "text", "refusal": "refusal", "reasoning_text": "text"}
_DELTAS = {"output_text": "response.output_text.delta", "refusal": "response.refusal.delta", "reasoning_text": "response.reasoning_text.delta"}


def _delta_prefix(kind: str, where: dict[str, Any]) -> bytes:
    """A delta event up to its ``delta`` value: ``event:`` line, then the JSON's first fields."""
    head = orjson.dumps({"type": kind, **where})
    return b"event: " + kind.encode() + b"\ndata: " + head[:-1] + b',"delta":'


def now() -> int:
    return int(time.time())
