"""The shapes of OpenAI chat answers as the gateway handles them.

Only the fields the gateway itself reads are named; every other field a provider sends
(``reasoning_content``, ``service_tier``, ``x_groq``, ...) travels along untouched, which is
why the dictionaries are not closed.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, Any]
    completion_tokens_details: dict[str, Any]


class Message(TypedDict, total=False):
    role: str
    content: str | None
    refusal: str | None
    tool_calls: list[dict[str, Any]]


class Choice(TypedDict):
    index: int
    message: Message
    finish_reason: str | None
    logprobs: NotRequired[dict[str, Any] | None]


class ChatCompletion(TypedDict):
    """``object: chat.completion``."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: NotRequired[Usage | None]
    system_fingerprint: NotRequired[str | None]


class ChunkChoice(TypedDict):
    index: int
    delta: dict[str, Any]
    finish_reason: str | None
    logprobs: NotRequired[dict[str, Any] | None]


class ChatCompletionChunk(TypedDict):
    """``object: chat.completion.chunk``; the usage chunk has ``choices: []``."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: NotRequired[Usage | None]
    system_fingerprint: NotRequired[str | None]


class RawChunk(dict):  # type: ignore[type-arg]
    """A chunk as parsed from a provider's event, with the event's JSON bytes (``raw``): a client
    that gets the chunk as sent is written those bytes, not a second encoding of them. Whoever
    changes a chunk makes a new dict (as every layer does), so the bytes always say what it says."""

    __slots__ = ("raw",)

    raw: bytes
