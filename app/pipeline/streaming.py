"""A complete answer and its stream, each made from the other: ``chat.completion`` and its
``chat.completion.chunk`` events, or a legacy ``text_completion`` and its ``text_completion`` events.

Both directions keep every field a provider sent, known or not: a stream folded into an answer
and an answer replayed as a stream say the same thing as the original (``reasoning_content``,
``logprobs``, ``refusal``, ``annotations``, tool calls of any type, ``service_tier``,
``system_fingerprint``, usage details, vendor fields such as ``x_groq``).

Folding follows what OpenAI's SDKs do with a delta: a string adds to the string before it, an
object merges key by key, a list of objects that carry an ``index`` (tool calls) merges entry by
entry and any other list grows; ``index``, ``type``, ``id`` and ``role`` name things and are set,
never added to. A text completion's choices carry ``text`` instead of a delta: the pieces are
joined, and its ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``)
grow list by list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import Any

import orjson

from app.shapes import RESPONSE_ENDS, ChatCompletion, ChatCompletionChunk, ChunkChoice, Events

#: a content-only chunk's event around its content, its key counts (chunk, choices, choice, delta) and the message it adds to
_Shape = tuple[bytes, bytes, tuple[int, int, int, int], dict[str, Any]]
#: keys whose value names something: a repeated one replaces, never concatenates
_NAMING = frozenset({"index", "type", "id", "role"})
#: per-chunk noise that is no part of the answer (OpenAI's stream obfuscation padding)
_CHUNK_ONLY = frozenset({"obfuscation"})
_CHOICE_OWN = frozenset({"index", "delta", "message", "finish_reason", "logprobs"})
_TEXT_CHOICE_OWN = _CHOICE_OWN | {"text"}
#: what a complete text completion and each of its stream events say they are
TEXT_COMPLETION = "text_completion"


def _merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            into.setdefault(key, None)
            continue
        have = into.get(key)
        if have is None or key in _NAMING:
            into[key] = _copy(value)
        elif isinstance(have, str) and isinstance(value, str):
            into[key] = have + value
        elif isinstance(have, dict) and isinstance(value, dict):
            _merge(have, value)
        elif isinstance(have, list) and isinstance(value, list):
            _merge_list(have, value)
        else:
            into[key] = _copy(value)


def _merge_list(into: list[Any], items: list[Any]) -> None:
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            slot = next((e for e in into if isinstance(e, dict) and e.get("index") == item["index"]), None)
            if slot is not None:
                _merge(slot, item)
                continue
        into.append(_copy(item))


def _overlay(into: dict[str, Any], later: dict[str, Any]) -> None:
    """A chunk's top-level object said again, maybe with more: no delta, so what it repeats is kept once."""
    for key, value in later.items():
        have = into.get(key)
        if isinstance(have, dict) and isinstance(value, dict):
            _overlay(have, value)
        elif value is not None or key not in into:
            into[key] = _copy(value)


def _copy(value: Any) -> Any:
    # folding adds to what it holds: a chunk's own objects must not change under the one who sent it
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class ChunkAssembler:
    """Folds chunks into one ``chat.completion`` (or ``text_completion``, when the chunks' choices
    carry ``text``); ``finished`` once every choice has a finish_reason."""

    __slots__ = ("_choices", "_head", "_response", "_settled", "_shape", "_text", "usage")

    def __init__(self) -> None:
        #: a Responses stream's response as its events tell it (see :class:`ResponseFold`)
        self._response: ResponseFold | None = None
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        #: the chunks are a text completion's
        self._text = False
        #: the keys of a chunk whose top-level fields can add nothing more (each held already, none an object)
        self._settled: frozenset[str] = frozenset()
        #: a content-only chunk's event around its content (before, after) and the choice it adds to:
        #: an event that is those bytes around a string adds that string and nothing else
        self._shape: _Shape | None = None

    def add(self, chunk: ChatCompletionChunk | dict[str, Any]) -> None:
        self.add_all((chunk,))

    def add_all(self, chunks: Iterable[ChatCompletionChunk | dict[str, Any]]) -> None:
        """Fold chunks in their order (a batch of them: one call for what one read brought)."""
        states = self._choices
        shape = self._shape
        # a batch as the provider sent it has each chunk's bytes
        datas = chunks.datas if type(chunks) is Events else repeat(None)
        for chunk, raw in zip(chunks, datas):
            if shape is not None and raw is not None:
                # the shape's bytes around something, and as many keys at each level as the shape
                # (what is between adds no key, no choice): only the content is new
                before, after, sizes, message = shape
                if len(raw) > len(before) + len(after) and raw.startswith(before) and raw.endswith(after):
                    choices = chunk["choices"]
                    choice = choices[0]
                    delta = choice["delta"]
                    content = delta.get("content")
                    have = message.get("content")
                    if (len(chunk), len(choices), len(choice), len(delta)) == sizes and type(content) is str and type(have) is str:
                        message["content"] = have + content
                        continue
            if chunk.keys() != self._settled:
                self._add_head(chunk)
            choices = chunk.get("choices")
            if choices:
                if len(choices) == 1:
                    # the common chunk: a piece of content and nothing else, added to content begun
                    choice = choices[0]
                    delta = choice.get("delta")
                    if delta is not None and len(delta) == 1 and not choice.get("finish_reason") and not choice.get("logprobs") and choice.keys() <= _CHOICE_OWN:
                        content = delta.get("content")
                        state = states.get(choice.get("index", 0))
                        if state is not None and type(content) is str:
                            message = state["message"]
                            have = message.get("content")
                            if type(have) is str:
                                message["content"] = have + content
                                choices = None
                                if shape is None and raw is not None and chunk.keys() == self._settled and not chunk.get("usage"):
                                    shape = self._shape = _shape_of(chunk, raw, content, message)
                for choice in choices or ():
                    self._add_choice(choice)
            usage: Any = chunk.get("usage")
            if usage:
                self.usage = usage

    def _add_head(self, chunk: ChatCompletionChunk | dict[str, Any]) -> None:
        if "choices" not in chunk and "type" in chunk:
            # a Responses API event (a forwarded request's stream): no chunk's fields to gather
            if self._response is None:
                self._response = ResponseFold()
            self._response.add(chunk)  # type: ignore[arg-type]
            return
        head = self._head
        settled = True
        for key, value in chunk.items():
            if key in ("choices", "usage", "object") or key in _CHUNK_ONLY:
                continue
            have = head.get(key)
            if have is None:
                head[key] = have = _copy(value)
            elif isinstance(have, dict) and isinstance(value, dict):
                _overlay(have, value)  # e.g. x_groq: {id} first, {id, usage} last
            settled = settled and have is not None and not isinstance(have, dict)
        if settled:
            # the stream's next chunks mostly carry the same fields: they skip this loop
            self._settled = frozenset(chunk.keys())

    def _add_choice(self, choice: ChunkChoice | dict[str, Any]) -> None:
        index = choice.get("index", 0)
        state = self._choices.get(index)
        delta = choice.get("delta")
        if state is None:
            state = self._choices[index] = {"message": {}, "rest": {}, "finish_reason": None, "logprobs": None, "text": []}
        if delta:
            _merge(state["message"], delta)
        elif delta is None:
            text = choice.get("text")
            if isinstance(text, str):
                self._text = True
                state["text"].append(text)
        logprobs = choice.get("logprobs")
        if logprobs:
            if state["logprobs"] is None:
                state["logprobs"] = {}
            if self._text:
                _extend(state["logprobs"], logprobs)
            else:
                _merge(state["logprobs"], logprobs)
        if choice.get("finish_reason"):
            state["finish_reason"] = choice["finish_reason"]
        own = _TEXT_CHOICE_OWN if self._text else _CHOICE_OWN
        for key, value in choice.items():
            if key not in own and value is not None:
                state["rest"][key] = value

    @property
    def finished(self) -> bool:
        if self._response is not None:
            return self._response.final is not None
        return bool(self._choices) and all(c["finish_reason"] for c in self._choices.values())

    def result(self) -> ChatCompletion:
        if self._response is not None:
            return self._response.result()  # type: ignore[return-value]
        if self._text:
            return self._text_result()  # type: ignore[return-value]
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message = dict(state["message"])
            message.setdefault("role", "assistant")
            message.setdefault("content", None)
            if message.get("tool_calls"):
                message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in message["tool_calls"]]
            choices.append({"index": index, "message": message, "logprobs": state["logprobs"], "finish_reason": state["finish_reason"], **state["rest"]})
        body: dict[str, Any] = {**self._head, "object": "chat.completion", "choices": choices}
        if self.usage:
            body["usage"] = self.usage
        return body  # type: ignore[return-value]

    def _text_result(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            choices.append({"index": index, "text": "".join(state["text"]), "logprobs": state["logprobs"], "finish_reason": state["finish_reason"], **state["rest"]})
        body: dict[str, Any] = {**self._head, "object": TEXT_COMPLETION, "choices": choices}
        if self.usage:
            body["usage"] = self.usage
        return body


class ResponseFold:
    """A Responses event stream folded into its ``response``: the one its last event carries
    whole (``response.completed``, ``.incomplete``, ``.failed``); before that, the one it began
    with and the items done so far."""

    __slots__ = ("_items", "_shell", "final")

    def __init__(self) -> None:
        self.final: dict[str, Any] | None = None
        self._shell: dict[str, Any] = {}
        self._items: dict[int, Any] = {}

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in RESPONSE_ENDS:
            self.final = event.get("response")
        elif kind == "response.created" and isinstance(event.get("response"), dict):
            self._shell = event["response"]
        elif kind == "response.output_item.done" and isinstance(event.get("output_index"), int):
            self._items[event["output_index"]] = event.get("item")

    def result(self) -> dict[str, Any]:
        if self.final is not None:
            return self.final
        return {**self._shell, "output": [self._items[i] for i in sorted(self._items)]}


def _shape_of(chunk: ChatCompletionChunk | dict[str, Any], raw: bytes, content: str, message: dict[str, Any]) -> _Shape | None:
    """A content-only chunk's event split around its content, when the content's JSON is in it
    once, as the value of a ``content`` key (a provider that escapes otherwise gets no shape).

    Another event with the same bytes around, and the same number of keys in the chunk, its
    choice and its delta and one choice, holds a new content and nothing else: whatever stood
    between would have added a key or a choice (a delta's logprobs, a second choice)."""
    encoded = orjson.dumps(content)
    if raw.count(encoded) != 1:
        return None
    at = raw.index(encoded)
    before = raw[:at]
    if not before.rstrip().endswith(b'"content":'):
        return None
    choices = chunk["choices"]
    sizes = (len(chunk), len(choices), len(choices[0]), len(choices[0]["delta"]))
    return before, raw[at + len(encoded) :], sizes, message


def _extend(into: dict[str, Any], logprobs: dict[str, Any]) -> None:
    """A text completion's logprobs: parallel lists, one entry per token, each list grown."""
    for key, value in logprobs.items():
        have = into.get(key)
        if isinstance(have, list) and isinstance(value, list):
            have.extend(_copy(value))
        elif value is not None or key not in into:
            into[key] = _copy(value)


def is_text_completion(body: ChatCompletion | dict[str, Any]) -> bool:
    """Whether a complete answer is a legacy ``text_completion`` rather than a ``chat.completion``."""
    if body.get("object") == TEXT_COMPLETION:
        return True
    choices: Any = body.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return isinstance(first, dict) and "message" not in first and isinstance(first.get("text"), str)


def replay(body: ChatCompletion | dict[str, Any]) -> Iterator[ChatCompletionChunk]:
    """A complete answer as chunks: a role chunk, each choice's whole delta (with its logprobs),
    a finish chunk, and a usage chunk when the answer has usage (a text completion: see :func:`replay_text`)."""
    if is_text_completion(body):
        yield from replay_text(body)  # type: ignore[misc, arg-type]
        return
    if body.get("object") == "response":
        yield from replay_response(body)  # type: ignore[misc, arg-type]
        return
    base = {k: v for k, v in body.items() if k not in ("choices", "usage", "object")}
    base["object"] = "chat.completion.chunk"
    choices = body.get("choices") or []
    opening = []
    for i, choice in enumerate(choices):
        message = choice.get("message") or {}
        content = message.get("content")
        opening.append({"index": choice.get("index", i), "delta": {"role": message.get("role") or "assistant", "content": "" if isinstance(content, str) else None}, "logprobs": None, "finish_reason": None})
    yield {**base, "choices": opening}  # type: ignore[misc]
    for i, choice in enumerate(choices):
        message = choice.get("message") or {}
        # the content's start went out with the role
        delta = {k: v for k, v in message.items() if k != "role" and v is not None and not (k == "content" and v == "")}
        if "tool_calls" in delta:
            delta["tool_calls"] = [{"index": n, **call} for n, call in enumerate(delta["tool_calls"])]
        if delta or choice.get("logprobs"):
            yield {**base, "choices": [{"index": choice.get("index", i), "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None}]}  # type: ignore[misc]
    closing = []
    for i, choice in enumerate(choices):
        rest = {k: v for k, v in choice.items() if k not in _CHOICE_OWN}
        closing.append({"index": choice.get("index", i), "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason") or "stop", **rest})
    yield {**base, "choices": closing}  # type: ignore[misc]
    if body.get("usage"):
        yield {**base, "choices": [], "usage": body["usage"]}  # type: ignore[misc]


def replay_text(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A complete ``text_completion`` as its stream: each choice's whole text (with its logprobs),
    a finish event, and a usage event when the answer has usage."""
    base = {k: v for k, v in body.items() if k not in ("choices", "usage")}
    base["object"] = TEXT_COMPLETION
    choices = body.get("choices") or []
    for i, choice in enumerate(choices):
        yield {**base, "choices": [{"index": choice.get("index", i), "text": choice.get("text") or "", "logprobs": choice.get("logprobs"), "finish_reason": None}]}
    closing = []
    for i, choice in enumerate(choices):
        rest = {k: v for k, v in choice.items() if k not in _TEXT_CHOICE_OWN}
        closing.append({"index": choice.get("index", i), "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason") or "stop", **rest})
    yield {**base, "choices": closing}
    if body.get("usage"):
        yield {**base, "choices": [], "usage": body["usage"]}


def replay_response(response: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A complete Responses API ``response`` as the events OpenAI streams for it: created and in
    progress (no output yet), then each item added, its text or arguments in one delta each, done,
    and the response whole at the end (``response.completed``, or its status's event)."""
    events: list[dict[str, Any]] = []
    shell = {**response, "status": "in_progress", "output": [], "usage": None}
    events += [{"type": "response.created", "response": shell}, {"type": "response.in_progress", "response": shell}]
    for n, item in enumerate(response.get("output") or ()):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message" and isinstance(item.get("content"), list):
            events.append({"type": "response.output_item.added", "output_index": n, "item": {**item, "status": "in_progress", "content": []}})
            for c, part in enumerate(item["content"]):
                where = {"item_id": item.get("id"), "output_index": n, "content_index": c}
                key = "refusal" if part.get("type") == "refusal" else "text"
                empty = {**part, key: ""}
                if key == "text" and "logprobs" in part:
                    empty["logprobs"] = []
                events.append({"type": "response.content_part.added", **where, "part": empty})
                name = "response.refusal" if key == "refusal" else "response.output_text"
                delta = {"type": name + ".delta", **where, "delta": part.get(key) or ""}
                done = {"type": name + ".done", **where, key: part.get(key) or ""}
                if key == "text":
                    delta["logprobs"] = done["logprobs"] = part.get("logprobs") or []
                events += [delta, done, {"type": "response.content_part.done", **where, "part": part}]
        elif kind == "function_call":
            events.append({"type": "response.output_item.added", "output_index": n, "item": {**item, "status": "in_progress", "arguments": ""}})
            where = {"item_id": item.get("id"), "output_index": n}
            events.append({"type": "response.function_call_arguments.delta", **where, "delta": item.get("arguments") or ""})
            events.append({"type": "response.function_call_arguments.done", **where, "arguments": item.get("arguments") or ""})
        else:
            # any other item (reasoning, a built-in tool's call) as it is
            events.append({"type": "response.output_item.added", "output_index": n, "item": item})
        events.append({"type": "response.output_item.done", "output_index": n, "item": item})
    status = response.get("status")
    end = "response.failed" if status == "failed" else "response.incomplete" if status == "incomplete" else "response.completed"
    events.append({"type": end, "response": response})
    for n, event in enumerate(events):
        event["sequence_number"] = n
        yield event
