"""A Responses API request, validated and translated to the chat completion request the pipeline
serves; and kept as it came, for a provider with the Responses API natively (:func:`forward_body`).

What maps, field by field (everything else the Responses API defines is refused with a 400
naming it, never silently dropped, unless the model has a native deployment, which takes it as it
is; fields it does not define travel on, as vLLM extras do on chat):

    input (string)                    one user message
    input items: message              a message; developer becomes system; parts:
                                        input_text/output_text -> text, input_image -> image_url,
                                        input_file -> file, input_audio -> input_audio
                 function_call        an assistant message's tool call (consecutive calls: one message)
                 function_call_output a tool message
                 reasoning            dropped (chat providers take no reasoning back)
    instructions                      a system message first (not carried over by previous_response_id)
    tools (type function)             tools
    tool_choice                       tool_choice (allowed_tools included)
    parallel_tool_calls, temperature, top_p, service_tier, user   the same
    text.format                       response_format (json_schema, json_object)
    text.verbosity                    verbosity
    max_output_tokens                 max_completion_tokens
    reasoning.effort                  reasoning_effort
    top_logprobs, include message.output_text.logprobs   logprobs (+ top_logprobs)
    store, metadata, previous_response_id   the gateway's own (stored responses), not sent upstream
    include (other values), truncation, prompt_cache_key, safety_identifier, reasoning.summary,
    stream_options                    accepted and echoed, not sent upstream: no effect
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from app.api.chat import json_object
from app.api.errors import validation_error
from app.api.schemas import ChatCompletionRequest
from app.errors import BadRequestError

_OPEN = ConfigDict(extra="allow", strict=True)

#: Responses fields the gateway takes care of itself or that change nothing on a chat provider
GATEWAY_FIELDS = frozenset(
    {"store", "metadata", "previous_response_id", "include", "truncation", "prompt_cache_key", "safety_identifier", "stream_options", "prompt_cache_retention"}
)
#: what a provider needs the Responses API natively for (``responses: native``)
_NATIVE = "; only a provider with the Responses API natively (responses: native) can serve it"
#: Responses features a chat completions provider cannot give: forwarded to a provider with the
#: Responses API natively, refused (naming the field) on a route without one
UNSUPPORTED_FIELDS = {
    "prompt": "stored prompt templates cannot be served by a chat completions provider" + _NATIVE,
    "max_tool_calls": "max_tool_calls limits built-in tools, which a chat completions provider does not offer" + _NATIVE,
    "context_management": "server-side context management cannot be served by a chat completions provider" + _NATIVE,
}
#: refused on every route: the gateway keeps conversations itself (previous_response_id)
_REFUSED_FIELDS = {
    "conversation": "the Conversations API is not supported by the gateway; use previous_response_id",
    # the provider stores nothing (store: false) and the gateway keeps no queue of its own to poll
    "background": "background responses are not supported by the gateway: it answers while the client waits",
}


class ResponsesRequest(BaseModel):
    """Validation of the Responses fields the gateway reads; the rest of the body is checked in translation."""

    model_config = _OPEN

    model: str = Field(min_length=1, max_length=512)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning: dict[str, Any] | None = None
    stream: StrictBool | None = None
    store: StrictBool | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=64)
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    service_tier: str | None = None

    @field_validator("model")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("must be printable text, without control characters")
        return v


def parse_responses_body(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, validated as a Responses request (400 naming the field otherwise)."""
    body = json_object(raw)
    try:
        ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None
    _refuse_fields(body, _REFUSED_FIELDS)
    if body.get("n") not in (None, 1):
        raise BadRequestError("Unsupported parameter: 'n': a response is one answer.", param="n", code="unsupported_parameter")
    if "messages" in body:
        raise BadRequestError(
            "Unknown parameter: 'messages': the Responses API takes 'input' (use /v1/chat/completions for messages).",
            param="messages",
            code="unknown_parameter",
        )
    if body.get("input") is None and not body.get("previous_response_id"):
        raise BadRequestError("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    return body


def _refuse_fields(body: dict[str, Any], fields: dict[str, str]) -> None:
    for name, why in fields.items():
        if body.get(name) not in (None, False, [], {}):
            raise BadRequestError(f"Unsupported parameter: '{name}': {why}.", param=name, code="unsupported_parameter")


def _bad(param: str, message: str, code: str = "invalid_value") -> BadRequestError:
    return BadRequestError(f"Invalid '{param}': {message}", param=param, code=code)


def _text_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    text = part.get("text")
    if not isinstance(text, str):
        raise _bad(f"{where}.text", "expected a string.")
    return {"type": "text", "text": text}


def _part(part: Any, where: str) -> dict[str, Any]:
    """One content part of an input message, as a chat content part."""
    if not isinstance(part, dict):
        raise _bad(where, "expected a content part object.")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return _text_part(part, where)
    if kind == "refusal":
        refusal = part.get("refusal")
        if not isinstance(refusal, str):
            raise _bad(f"{where}.refusal", "expected a string.")
        return {"type": "text", "text": refusal}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            what = (
                "image file ids are not supported by the gateway; send image_url (a URL or a data: URL)"
                if part.get("file_id")
                else "expected image_url (a URL or a data: URL)"
            )
            raise _bad(f"{where}.image_url", what + ".")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {k: part[k] for k in ("file_data", "file_id", "filename") if part.get(k) is not None}
        if not file.get("file_data") and not file.get("file_id"):
            raise _bad(where, "an input_file needs file_data or file_id (file_url is not supported by the gateway).")
        return {"type": "file", "file": file}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": part.get("input_audio") or {k: part.get(k) for k in ("data", "format")}}
    raise _bad(f"{where}.type", f"unsupported content part type {str(kind)[:50]!r} (input_text, input_image, input_file, input_audio).")


def _content(content: Any, role: str, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "expected a string or a list of content parts.")
    parts = [_part(p, f"{where}[{i}]") for i, p in enumerate(content)]
    if role in ("assistant", "system") and all(p["type"] == "text" for p in parts):
        # chat providers take an assistant's or a system message's text as one string most reliably
        return "".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any, where: str) -> str:
    """A function call's output as the tool message's text."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for i, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise _bad(f"{where}[{i}]", "a chat provider takes only text in a function call's output.")
            texts.append(_text_part(part, f"{where}[{i}]")["text"])
        return "".join(texts)
    raise _bad(where, "expected a string or a list of input_text parts.")


def input_messages(items: str | list[Any] | None, where: str = "input") -> list[dict[str, Any]]:
    """Input items as chat messages."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise _bad(at, "expected an input item object.")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{at}.role", "expected user, assistant, system or developer.")
            # chat providers beyond OpenAI know no developer role; OpenAI reads system the same way
            chat_role = "system" if role == "developer" else role
            messages.append({"role": chat_role, "content": _content(item.get("content"), chat_role, f"{at}.content")})
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, str):
                raise _bad(at, "a function_call needs call_id, name and arguments (strings).")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # the calls of one turn (and the text before them) are one assistant message in chat
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise _bad(f"{at}.call_id", "expected a string.")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output_text(item.get("output"), f"{at}.output")})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(f"{at}.type", "item references are not supported by the gateway; send the item itself or use previous_response_id.")
        else:
            raise _bad(f"{at}.type", f"unsupported input item type {str(kind)[:50]!r} (message, function_call, function_call_output, reasoning).")
    return messages


#: the id prefix OpenAI gives each kind of input item
_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def as_items(value: str | list[Any] | None, rid: str) -> list[dict[str, Any]]:
    """A request's (translated, so valid) input as Responses items, as ``input_items`` lists them:
    a string as a user message, a message's text content as one part, each item with an id."""
    if value is None:
        return []
    items: list[Any] = [{"role": "user", "content": value}] if isinstance(value, str) else value
    out = []
    for n, given in enumerate(items):
        item = {"type": "message", **given}
        if item["type"] == "message":
            if isinstance(item.get("content"), str):
                kind = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": kind, "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{_ITEM_PREFIX.get(item['type'], 'item')}_{rid.removeprefix('resp_')}_in{n}")
        out.append(item)
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise _bad(f"tools[{i}].type", f"only function tools can be served by a chat completions provider, not {str(tool.get('type'))[:50]!r}.")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name", "expected a non-empty string.")
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad("tool_choice", "expected none, auto, required or a function.")
        return choice
    kind = choice.get("type")
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        allowed = []
        for i, tool in enumerate(choice["tools"]):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise _bad(f"tool_choice.tools[{i}]", "only function tools can be allowed.")
            allowed.append({"type": "function", "function": {"name": tool["name"]}})
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": allowed}}
    raise _bad("tool_choice", "expected none, auto, required, {type: function, name} or {type: allowed_tools, ...}.")


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict):
        raise _bad("text.format", "expected an object.")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format", "a json_schema format needs name (a string) and schema (an object).")
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("text.format.type", "expected text, json_object or json_schema.")


def chat_body(body: dict[str, Any], history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chat completion request for a Responses request, and the conversation it continues
    (``history``, the previous response's messages, then this input: no instructions).

    What chat cannot say is a 400 naming it (a route with a provider that has the Responses API
    natively forwards the request instead: :mod:`app.pipeline.forward`)."""
    _refuse_fields(body, UNSUPPORTED_FIELDS)
    conversation = [*history, *input_messages(body.get("input"))]
    instructions = body.get("instructions")
    system = (
        input_messages(instructions, "instructions")
        if isinstance(instructions, list)
        else [{"role": "system", "content": instructions}]
        if instructions
        else []
    )
    messages = [*system, *conversation]
    if not messages:
        raise BadRequestError("Missing required parameter: 'input' (there is nothing to answer).", param="input", code="missing_required_parameter")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    for same in ("parallel_tool_calls", "temperature", "top_p", "user", "service_tier"):
        if body.get(same) is not None:
            chat[same] = body[same]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("top_logprobs") or "message.output_text.logprobs" in (body.get("include") or ()):
        chat["logprobs"] = True
        if body.get("top_logprobs"):
            chat["top_logprobs"] = body["top_logprobs"]
    text = body.get("text") or {}
    if text.get("format") is not None:
        fmt = _response_format(text["format"])
        if fmt is not None:
            chat["response_format"] = fmt
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    reasoning = body.get("reasoning") or {}
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream"):
        chat["stream"] = True
        # the events close with the response's usage, so the provider is asked for it
        chat["stream_options"] = {"include_usage": True}
    extras = [key for key in body if key not in _NOT_EXTRAS and key not in chat]
    if extras:
        for key in extras:
            chat[key] = body[key]  # a field the Responses API does not define: a provider extra (top_k, seed, ...)
        # what this module wrote is valid chat; an extra may not be (``"seed": "x"``)
        try:
            ChatCompletionRequest.model_validate(chat)
        except ValidationError as exc:
            raise validation_error(list(exc.errors())) from None
    return chat, conversation


#: the body fields that are the Responses API's own, never passed on as extras
_NOT_EXTRAS = frozenset({*ResponsesRequest.model_fields, *GATEWAY_FIELDS, *UNSUPPORTED_FIELDS, *_REFUSED_FIELDS})


# -- the request as a provider with the Responses API natively takes it ------------------------------


def given_items(value: str | list[Any] | None) -> list[Any]:
    """A request's input as the list of items it amounts to (a string is one user message)."""
    if value is None:
        return []
    return [{"role": "user", "content": value}] if isinstance(value, str) else list(value)


def forward_body(body: dict[str, Any], history: list[Any] | None) -> dict[str, Any]:
    """The request to forward: as the client sent it, but for ``previous_response_id``, which is the
    gateway's and stands for ``history`` (the items of the stored conversation) before the input."""
    forward = {k: v for k, v in body.items() if k != "previous_response_id"}
    if history is not None:
        forward["input"] = [*history, *resolved(given_items(body.get("input")), history)]
    return forward


def resolved(items: list[Any], history: list[Any]) -> list[Any]:
    """``items`` with each ``item_reference`` to an item of ``history`` replaced by that item: the
    provider is sent ``store: false`` and keeps no item a reference could name, the gateway does.
    A reference to an item ``history`` lacks goes on as it came (the provider answers for it)."""
    if not any(isinstance(i, dict) and i.get("type") == "item_reference" for i in items):
        return items
    known = {i["id"]: i for i in history if isinstance(i, dict) and isinstance(i.get("id"), str)}
    return [known.get(i.get("id"), i) if isinstance(i, dict) and i.get("type") == "item_reference" else i for i in items]


def estimate_body(body: dict[str, Any], history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """For a request chat cannot say: the chat request near enough to it for the limits' estimates
    and the request log (never sent), and the conversation as far as chat can tell it (an item
    chat cannot say left out)."""
    conversation = list(history)
    for item in given_items(body.get("input")):
        try:
            conversation += input_messages([item])
        except BadRequestError:
            continue
    instructions = body.get("instructions")
    system = [{"role": "system", "content": instructions}] if isinstance(instructions, str) and instructions else []
    chat: dict[str, Any] = {"model": body["model"], "messages": [*system, *conversation] or [{"role": "user", "content": ""}]}
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("stream"):
        chat["stream"] = True
    return chat, conversation
