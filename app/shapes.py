"""The shapes of OpenAI chat answers as the gateway handles them.

Only the fields the gateway itself reads are named; every other field a provider sends
(``reasoning_content``, ``service_tier``, ``x_groq``, ...) travels along untouched, which is
why the dictionaries are not closed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NotRequired, TypedDict

import orjson

from app.errors import UpstreamBadResponseError


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


class Events:
    """A run of a provider's events kept as they came, read as the sequence of the chunks they hold.

    ``raw`` is the events as server-sent events (``data: ``, an event's JSON, a blank line, each)
    and ``datas`` each event's JSON. The chunks are parsed, all in one go, only when something
    reads them: a stream relayed to a client that asked for it as it came, and stored as it came,
    is never parsed; what the gateway needs of it (its usage, whether it finished) is found in the
    bytes first and only the events that may hold it are parsed. Whoever changes a chunk makes a
    new dict, and whoever takes some of the chunks or adds one makes a list: the bytes always say
    what the chunks say.
    """

    __slots__ = ("_chunks", "_usage", "datas", "origin", "raw")

    def __init__(self, datas: list[bytes], origin: str, raw: bytes | None = None, chunks: list[Any] | None = None) -> None:
        self.datas = datas
        if raw is None:
            raw = b"data: " + b"\n\ndata: ".join(datas) + b"\n\n" if datas else b""
        self.raw = raw
        #: who sent them: named when one is not a chunk
        self.origin = origin
        #: the events parsed, when whoever read them had to (a provider's Responses events)
        self._chunks: list[ChatCompletionChunk] | None = chunks
        #: what :meth:`usage` found (several layers ask)
        self._usage: Usage | None | bool = False

    @classmethod
    def joined(cls, runs: list[Events]) -> Events:
        """Runs of events one after the other, as one run."""
        if len(runs) == 1:
            return runs[0]
        return cls([data for run in runs for data in run.datas], runs[0].origin if runs else "", b"".join(run.raw for run in runs))

    @classmethod
    def of_raw(cls, raw: bytes, origin: str) -> Events:
        """Events kept as :attr:`raw` (one event a line, as this class writes them)."""
        return cls(raw[6:-2].split(b"\n\ndata: ") if raw else [], origin, raw)

    @property
    def chunks(self) -> list[ChatCompletionChunk]:
        if self._chunks is None:
            self._chunks = _parsed(self.datas, self.origin)
        return self._chunks

    def __len__(self) -> int:
        return len(self.datas)

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return iter(self.chunks)

    def __reversed__(self) -> Iterator[ChatCompletionChunk]:
        return reversed(self.chunks)

    def __getitem__(self, index: Any) -> Any:
        return self.chunks[index]

    def usage(self) -> Usage | None:
        """The usage the last event that has one says, or None."""
        if self._usage is False:
            self._usage = self._usage_said()
        return self._usage  # type: ignore[return-value]

    def _usage_said(self) -> Usage | None:
        if self._chunks is not None:
            return last_usage(self._chunks)
        if b'"usage"' not in self.raw:
            return None
        for data in reversed(self.datas):
            if b'"usage"' in data:
                usage = _parsed([data], self.origin)[0].get("usage")
                if usage:
                    return usage
        if b'"response.' in self.raw:
            # Responses events: the last one carries the response, its usage inside
            return last_usage(self.chunks)
        return None

    def finishes(self) -> bool:
        """Whether a choice says why it ended (a ``finish_reason`` that is not null); only the
        events that may say so are parsed."""
        if self._chunks is not None:
            return any(map(finishes, reversed(self._chunks)))
        if not _may_finish(self.raw):
            return False
        return any(finishes(_parsed([data], self.origin)[0]) for data in reversed(self.datas) if _may_finish(data))


def _may_finish(data: bytes) -> bool:
    # a key is quoted as is (in a string a quote is escaped): unless each is followed by null, one may say a reason
    return data.count(b'"finish_reason"') != data.count(b'"finish_reason":null')


def _parsed(datas: list[bytes], origin: str) -> list[ChatCompletionChunk]:
    """The events' chunks, parsed in one go (one JSON array); an event that is not one JSON object is the provider's fault."""
    try:
        values = orjson.loads(b"[" + b",".join(datas) + b"]")
    except orjson.JSONDecodeError:
        values = None
    # commas inside an event make more values than events
    if values is None or len(values) != len(datas) or (values and set(map(type, values)) != {dict}):
        raise UpstreamBadResponseError(f"{origin} sent a stream event that is not a JSON object", backend=origin)
    return values  # type: ignore[no-any-return]


def last_usage(chunks: Sequence[ChatCompletionChunk | dict[str, Any]] | Events) -> Usage | None:
    """The usage the last chunk that has one says (the usage chunk is the last), or None."""
    if type(chunks) is Events:
        return chunks.usage()
    for chunk in reversed(chunks):
        usage = chunk.get("usage")
        if usage:
            return usage  # type: ignore[return-value]
    last: Any = chunks[-1] if chunks else None
    if last is not None and last.get("type") in RESPONSE_ENDS:
        return chat_usage((last.get("response") or {}).get("usage"))
    return None


#: the Responses events that end a stream, each with the whole response
RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def chat_usage(usage: Any) -> Usage | None:
    """A usage as chat says it: a Responses API usage (``input_tokens``, ``output_tokens`` and
    their details) told in chat's words, any other as it is (None when there is none)."""
    if not isinstance(usage, dict) or "input_tokens" not in usage:
        return usage or None  # type: ignore[return-value]
    prompt, completion = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": int(usage.get("total_tokens") or prompt + completion)}
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out  # type: ignore[return-value]


def finishes(chunk: ChatCompletionChunk | dict[str, Any]) -> bool:
    """Whether one of the chunk's choices says why it ended."""
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason"):
            return True
    return False
