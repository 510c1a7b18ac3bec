"""The Anthropic Messages API in the words of chat completions, and back.

A Messages request becomes the chat completion request it means; what has no counterpart on a
chat completions provider is refused with a 400 naming the field (Anthropic's server tools,
``document`` blocks, files) or dropped where it only concerns Anthropic's own service
(``thinking`` blocks sent back, ``cache_control``). A ``chat.completion`` becomes a Message;
the streamed form is written by :class:`app.api.messages.AnthropicEvents` with the helpers here.
Field paths in errors are written as Anthropic writes them (``messages.0.content.1.type``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from app.errors import BadRequestError

#: the operation as the request log and metrics name it
MESSAGES = "messages"
#: what an image counts in the token estimate: the most Anthropic charges for one, after resizing
IMAGE_TOKENS = 1600
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
#: assistant blocks that only Anthropic's service can read back (their signatures are its own)
_DROPPED = frozenset({"thinking", "redacted_thinking"})
_FINISH = {"length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use", "content_filter": "refusal"}


def _bad(path: str, problem: str) -> BadRequestError:
    return BadRequestError(f"{path}: {problem}", param=path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- request: Messages -> chat completions ---------------------------------------------------


def to_chat(body: dict[str, Any], *, need_max_tokens: bool = True) -> dict[str, Any]:
    """The chat completion request a Messages request means (``need_max_tokens``: False for count_tokens)."""
    chat: dict[str, Any] = {"model": _model(body.get("model"))}
    chat["messages"] = _system(body.get("system")) + _messages(body.get("messages"))
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if need_max_tokens:
            raise _bad("max_tokens", "Field required")
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens", "must be an integer of at least 1")
    else:
        chat["max_tokens"] = max_tokens
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop_sequences", "must be a list of non-empty strings")
        if stop:
            chat["stop"] = stop
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if not _is_number(value) or not 0 <= value <= 1:
                raise _bad(name, "must be a number from 0 to 1")
            chat[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise _bad("top_k", "must be an integer of at least 0")
        chat["top_k"] = top_k
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    _tool_choice(body.get("tool_choice"), {t["function"]["name"] for t in tools}, chat)
    _output_format(body.get("output_config"), chat)
    user = _user_id(body.get("metadata"))
    if user is not None:
        chat["user"] = user
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    if stream:
        # usage comes last in a chat stream, and only when asked; message_delta needs it
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _model(value: Any) -> str:
    if value is None:
        raise _bad("model", "Field required")
    if not isinstance(value, str) or not value or len(value) > 512:
        raise _bad("model", "must be a model name of 1 to 512 characters")
    # it is echoed in errors, logs and the x-admiral-route header
    if not value.isprintable():
        raise _bad("model", "must be printable text, without control characters")
    return value


def _text_of(block: dict[str, Any], path: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{path}.text", "a text block's 'text' must be a string")
    return text


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    if not isinstance(value, list):
        raise _bad("system", "must be a string or a list of text blocks")
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"system.{i}.type", "system blocks must be text blocks")
        texts.append(_text_of(block, f"system.{i}"))
    text = "\n".join(texts)
    return [{"role": "system", "content": text}] if text else []


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise _bad("messages", "Field required")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        path = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(path, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"{path}.role", "must be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif not isinstance(content, list) or not content:
            raise _bad(f"{path}.content", "must be a string or a non-empty list of content blocks")
        elif role == "user":
            out.extend(_user_turn(content, f"{path}.content"))
        else:
            out.append(_assistant_turn(content, f"{path}.content"))
    return out


def _block_type(block: Any, path: str) -> str:
    if not isinstance(block, dict):
        raise _bad(path, "must be a content block object")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise _bad(f"{path}.type", "Field required")
    return kind


def _unsupported(kind: str, path: str, allowed: str) -> BadRequestError:
    shown = kind if len(kind) <= 60 else kind[:60] + "..."
    return _bad(f"{path}.type", f"'{shown}' blocks have no chat completions counterpart; this gateway takes {allowed} here")


def _image(block: dict[str, Any], path: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{path}.source", "Field required")
    kind = source.get("type")
    if kind == "base64":
        media = source.get("media_type")
        if media not in _IMAGE_TYPES:
            raise _bad(f"{path}.source.media_type", "must be one of image/jpeg, image/png, image/gif, image/webp")
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise _bad(f"{path}.source.data", "must be the image's base64 text")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        given = source.get("url")
        if not isinstance(given, str) or not given.startswith(("http://", "https://")):
            raise _bad(f"{path}.source.url", "must be an http(s) URL")
        url = given
    else:
        raise _bad(f"{path}.source.type", "must be 'base64' or 'url' (files are not translated)")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_turn(blocks: list[Any], path: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as ``tool`` messages first (they must follow the assistant's
    tool calls), then what the user wrote (with any images the tool results held) as one message."""
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        where = f"{path}.{i}"
        kind = _block_type(block, where)
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, where)})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "tool_result":
            tools.append(_tool_result(block, where, parts))
        elif kind not in _DROPPED:
            raise _unsupported(kind, where, "text, image and tool_result blocks")
    out = tools
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _tool_result(block: dict[str, Any], path: str, images: list[dict[str, Any]]) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{path}.tool_use_id", "Field required")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            where = f"{path}.content.{i}"
            kind = _block_type(part, where)
            if kind == "text":
                texts.append(_text_of(part, where))
            elif kind == "image":
                # a tool message carries text only: the image goes to the user message that follows
                images.append(_image(part, where))
            else:
                raise _unsupported(kind, where, "text and image blocks")
        text = "\n".join(texts)
    else:
        raise _bad(f"{path}.content", "must be a string or a list of text and image blocks")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _bad(f"{path}.is_error", "must be a boolean")
    if is_error:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _assistant_turn(blocks: list[Any], path: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        where = f"{path}.{i}"
        kind = _block_type(block, where)
        if kind == "text":
            texts.append(_text_of(block, where))
        elif kind == "tool_use":
            call_id, name, args = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{where}.id", "Field required")
            if not isinstance(name, str) or not name:
                raise _bad(f"{where}.name", "Field required")
            if not isinstance(args, dict):
                raise _bad(f"{where}.input", "must be an object")
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": orjson.dumps(args).decode()}})
        elif kind not in _DROPPED:
            raise _unsupported(kind, where, "text and tool_use blocks")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("tools", "must be a list of tools")
    out = []
    for i, tool in enumerate(value):
        path = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad(path, "must be a tool object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            shown = str(kind)[:60]
            raise _bad(
                f"{path}.type",
                f"'{shown}' is a tool Anthropic defines and runs; a chat completions provider takes custom tools (name, description, input_schema) only",
            )
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description")
        if not isinstance(name, str) or not name:
            raise _bad(f"{path}.name", "Field required")
        if not isinstance(schema, dict):
            raise _bad(f"{path}.input_schema", "must be a JSON schema object")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{path}.description", "must be a string")
        function: dict[str, Any] = {"name": name}
        if description:
            function["description"] = description
        function["parameters"] = schema
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any, names: set[str], chat: dict[str, Any]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _bad("tool_choice", "must be an object with a 'type'")
    kind = value.get("type")
    choice: str | dict[str, Any]
    if kind == "auto":
        choice = "auto"
    elif kind == "any":
        choice = "required"
    elif kind == "none":
        choice = "none"
    elif kind == "tool":
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice.name", "Field required")
        if name not in names:
            raise _bad("tool_choice.name", f"no tool named '{name[:100]}' in tools")
        choice = {"type": "function", "function": {"name": name}}
    else:
        raise _bad("tool_choice.type", "must be 'auto', 'any', 'tool' or 'none'")
    no_parallel = value.get("disable_parallel_tool_use")
    if no_parallel is not None and not isinstance(no_parallel, bool):
        raise _bad("tool_choice.disable_parallel_tool_use", "must be a boolean")
    if not names:
        if kind == "any":
            raise _bad("tool_choice", "'any' needs tools to choose from")
        return  # auto or none without tools: nothing to say to the provider
    chat["tool_choice"] = choice
    if no_parallel:
        chat["parallel_tool_calls"] = False


def _output_format(value: Any, chat: dict[str, Any]) -> None:
    """``output_config.format`` (structured output) as a ``response_format``; ``effort`` has no
    chat counterpart every provider takes, and is left out."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise _bad("output_config", "must be an object")
    form = value.get("format")
    if form is None:
        return
    if not isinstance(form, dict) or form.get("type") != "json_schema":
        raise _bad("output_config.format.type", "must be 'json_schema'")
    schema = form.get("schema")
    if not isinstance(schema, dict):
        raise _bad("output_config.format.schema", "must be a JSON schema object")
    chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def _user_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("metadata", "must be an object")
    user = value.get("user_id")
    if user is not None and not isinstance(user, str):
        raise _bad("metadata.user_id", "must be a string")
    return user or None


def estimate_input_tokens(chat: dict[str, Any]) -> int:
    """The gateway's estimate of a translated request's input: about 4 characters a token over
    every text the model reads (system, messages, tool calls and results, tool definitions),
    plus :data:`IMAGE_TOKENS` an image."""
    chars = 0
    images = 0
    for message in chat["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    chars += len(part["text"])
                else:
                    images += 1
        for call in message.get("tool_calls") or ():
            chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    if chat.get("tools"):
        chars += len(orjson.dumps(chat["tools"]))
    return chars // 4 + 1 + images * IMAGE_TOKENS


# -- answer: chat completion -> Message --------------------------------------------------------


def message_id(chat_id: Any) -> str:
    """A Message id for a chat completion id (the same one each time: a cache hit keeps it)."""
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return "msg_" + uuid.uuid4().hex


def reasoning_of(fields: dict[str, Any]) -> str | None:
    """A provider's reasoning text in a message or a delta (DeepSeek ``reasoning_content``, vLLM and OpenRouter ``reasoning``)."""
    for name in ("reasoning_content", "reasoning"):
        value = fields.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _count(value: Any) -> int:
    return int(value) if _is_number(value) and value > 0 else 0


def usage_of(usage: Any) -> dict[str, int]:
    """Anthropic's usage for a chat usage: ``input_tokens`` leave out the prompt tokens read from
    the provider's cache, which ``cache_read_input_tokens`` counts (as Anthropic reports them)."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = _count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = min(prompt, cached or _count(usage.get("prompt_cache_hit_tokens")))  # DeepSeek names it so
    return {
        "input_tokens": prompt - cached,
        "output_tokens": _count(usage.get("completion_tokens")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def stop_reason(finish: Any, matched: Any, stop: list[str] | None, called_tools: bool) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a chat ``finish_reason``.

    Chat completions do not say which stop sequence ended the text; vLLM does (``stop_reason``
    on the choice), and only then is the answer ``stop_sequence`` rather than ``end_turn``.
    """
    if called_tools and finish in (None, "stop", "tool_calls", "function_call"):
        return "tool_use", None
    if finish in _FINISH:
        return _FINISH[finish], None
    if stop and isinstance(matched, str) and matched in stop:
        return "stop_sequence", matched
    return "end_turn", None


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's ``arguments`` as the ``input`` object a ``tool_use`` block holds; arguments
    that are not a JSON object (a model's slip) are kept whole under ``_arguments``."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_arguments": arguments}
    return value if isinstance(value, dict) else {"_arguments": arguments}


def to_message(completion: Mapping[str, Any], model: str, stop: list[str] | None) -> dict[str, Any]:
    """The Message a ``chat.completion`` (its first choice) says; ``model`` is the name the client asked for."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    refusal = message.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    elif isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    calls = [c for c in message.get("tool_calls") or () if isinstance(c, dict)]
    for call in calls:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or "toolu_" + uuid.uuid4().hex,
                "name": function.get("name") or "",
                "input": tool_input(function.get("arguments")),
            }
        )
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), stop, bool(calls))
    if reason == "end_turn" and not text and isinstance(refusal, str) and refusal:
        reason = "refusal"
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_of(completion.get("usage")),
    }
