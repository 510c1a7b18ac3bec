"""What leaves for a provider: its parameter profile, calls split by ``max_n``, usage it did not say.

A profile (``providers.<name>.drop_params``, ``rename_params``, ``max_n``; a preset's quirks by
default) turns the client's body into the one this provider takes. It is applied at dispatch, so
the cache key and dedupe see the client's request as sent. A request for more choices than the
provider gives in one call is split into several calls whose choices are numbered on, and whose
usage adds up. A provider that sends no usage (it refuses ``stream_options``, or just says
nothing) gets it counted: the prompt estimated from its text, the answer from the text it sent,
marked ``"estimated": true`` inside ``usage``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from app.config import ProviderConfig
from app.pipeline.base import EMBEDDINGS, ModelRequest

_MESSAGES = "messages[]."
#: about this many characters a token: the estimate the limits use too
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class ParamProfile:
    """One provider's parameter quirks: fields dropped (top level and in each message), renamed,
    and the most choices (``n``) one call may ask for."""

    drop: tuple[str, ...] = ()
    drop_in_messages: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    max_n: int | None = None

    @classmethod
    def of(cls, config: ProviderConfig) -> ParamProfile | None:
        """The provider's profile; None when it has nothing to change (most providers, no work per call)."""
        drop = tuple(n for n in config.drop_params if not n.startswith(_MESSAGES))
        in_messages = tuple(n.removeprefix(_MESSAGES) for n in config.drop_params if n.startswith(_MESSAGES))
        rename = tuple(config.rename_params.items())
        if not (drop or in_messages or rename or config.max_n):
            return None
        return cls(drop, in_messages, rename, config.max_n)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` as this provider takes it (a copy when anything changes; the client's stays as sent)."""
        out = body
        for name in self.drop:
            if name in out:
                if out is body:
                    out = dict(body)
                del out[name]
        for old, new in self.rename:
            if old in out:
                if out is body:
                    out = dict(body)
                out[new] = out.pop(old)
        messages = out.get("messages")
        if (
            self.drop_in_messages
            and isinstance(messages, list)
            and any(isinstance(m, dict) and not m.keys().isdisjoint(self.drop_in_messages) for m in messages)
        ):
            if out is body:
                out = dict(body)
            out["messages"] = [{k: v for k, v in m.items() if k not in self.drop_in_messages} if isinstance(m, dict) else m for m in messages]
        return out

    def splits(self, body: dict[str, Any]) -> list[int] | None:
        """How many choices each call asks for when ``n`` is more than one call may take; else None."""
        n = body.get("n")
        if self.max_n is None or not isinstance(n, int) or isinstance(n, bool) or n <= self.max_n:
            return None
        full, rest = divmod(n, self.max_n)
        return [self.max_n] * full + ([rest] if rest else [])


def with_n(body: dict[str, Any], n: int) -> dict[str, Any]:
    """``body`` asking for ``n`` choices (``n`` left out for one: some providers take no ``n`` at all)."""
    out = {k: v for k, v in body.items() if k != "n"}
    if n != 1:
        out["n"] = n
    return out


# -- estimated usage ---------------------------------------------------------------------------


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        # content parts ({"type": "text", "text": ...}), tool calls ({"function": {"arguments": ...}})
        return sum(_chars(value[k]) for k in ("text", "content", "tool_calls", "function", "arguments") if k in value)
    return 0


def _tokens(chars: int) -> int:
    return (chars + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def prompt_tokens(request: ModelRequest) -> int:
    """About how many tokens the request's prompt holds (messages with their tool calls, a prompt, inputs)."""
    body = request.body
    if request.endpoint == EMBEDDINGS:
        source = body.get("input")
    else:
        source = body.get("messages") if "messages" in body else body.get("prompt")
    if isinstance(source, list) and source and all(isinstance(v, int) for v in source):
        return len(source)  # token ids
    return _tokens(_chars(source)) + 1


def context_needed(request: ModelRequest) -> int:
    """What the request needs of a context window: its prompt and the answer it allows (``max_tokens``)."""
    body = request.body
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return prompt_tokens(request) + (limit if isinstance(limit, int) and not isinstance(limit, bool) else 0)


def _answer_chars(choices: Iterable[Any], key: str) -> int:
    """Characters of answer text in ``choices`` (``key``: ``delta`` in chunks, ``message`` in a body)."""
    total = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")  # completions
        if isinstance(text, str):
            total += len(text)
        part = choice.get(key)
        if isinstance(part, dict):
            for field in ("content", "reasoning_content", "reasoning", "refusal", "tool_calls"):
                value = part.get(field)
                if value:
                    total += _chars(value)
    return total


def _delta_chars(chunk: dict[str, Any]) -> int:
    choices = chunk.get("choices")
    if not choices:
        return 0
    if len(choices) == 1:
        # the common chunk: one choice, a piece of content, nothing else to count
        delta = choices[0].get("delta")
        if delta is not None and len(delta) == 1:
            content = delta.get("content")
            if isinstance(content, str):
                return len(content)
    return _answer_chars(choices, "delta")


def estimated_usage(prompt: int, completion_chars: int) -> dict[str, Any]:
    completion = _tokens(completion_chars)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "estimated": True}


def with_usage(body: dict[str, Any], request: ModelRequest) -> dict[str, Any]:
    """A complete answer with usage: the provider's, else estimated (from ``x_groq.usage`` when there)."""
    if body.get("usage"):
        return body
    if request.endpoint == EMBEDDINGS:
        prompt = prompt_tokens(request)
        return {**body, "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "estimated": True}}
    vendor = body.get("x_groq")
    if isinstance(vendor, dict) and isinstance(vendor.get("usage"), dict):
        return {**body, "usage": vendor["usage"]}
    return {**body, "usage": estimated_usage(prompt_tokens(request), _answer_chars(body.get("choices") or (), "message"))}


def missing_usage(chunks: list[dict[str, Any]], request: ModelRequest) -> dict[str, Any] | None:
    """The usage chunk to end a whole stream's ``chunks`` with when the provider sent none (its
    ``x_groq.usage`` when there, else estimated); None when one of them carries usage.

    Looked at once, when the stream is over: the chunks pass on untouched meanwhile."""
    if not chunks or any(chunk.get("usage") for chunk in reversed(chunks)):
        return None
    last = chunks[-1]
    vendor = last.get("x_groq")
    if isinstance(vendor, dict) and isinstance(vendor.get("usage"), dict):
        usage = vendor["usage"]
    else:
        usage = estimated_usage(prompt_tokens(request), sum(map(_delta_chars, chunks)))
    head = {k: v for k, v in last.items() if k in ("id", "object", "created", "model", "system_fingerprint")}
    return {**head, "choices": [], "usage": usage}


async def metered(chunks: AsyncIterator[dict[str, Any]], request: ModelRequest) -> AsyncIterator[dict[str, Any]]:
    """A stream that ends with a usage chunk when the provider sent none (see :func:`missing_usage`)."""
    seen: list[dict[str, Any]] = []
    try:
        async for chunk in chunks:
            seen.append(chunk)
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    tail = missing_usage(seen, request)
    if tail is not None:
        yield tail


# -- one request as several calls (n above max_n) ----------------------------------------------


def add_usage(usages: list[Any]) -> dict[str, Any] | None:
    """The usage of several calls together (numbers added, details too); None if one said none."""
    if not usages or not all(isinstance(u, dict) and u for u in usages):
        return None
    total: dict[str, Any] = {}
    for usage in usages:
        _add_into(total, usage)
    return total


def _add_into(into: dict[str, Any], usage: dict[str, Any]) -> None:
    for key, value in usage.items():
        if isinstance(value, bool):
            into[key] = into.get(key, False) or value  # "estimated" when any part was
        elif isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            _add_into(into.setdefault(key, {}), value)
        elif key not in into:
            into[key] = value


def _renumbered(choices: list[Any], offset: int) -> list[Any]:
    return [{**c, "index": offset + int(c.get("index") or 0)} if isinstance(c, dict) else c for c in choices]


def joined(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Complete answers of split calls as one: the first one's head, every choice numbered on, usage added."""
    out = dict(bodies[0])
    choices: list[Any] = []
    offset = 0
    for body in bodies:
        # numbered by what each call answered: a provider that gave fewer leaves no gap
        part = body.get("choices") or []
        choices += _renumbered(part, offset)
        offset += len(part)
    out["choices"] = choices
    usage = add_usage([b.get("usage") for b in bodies])
    if usage is not None:
        out["usage"] = usage
    else:
        out.pop("usage", None)
    return out


async def gathered(calls: list[Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every call's answer; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def interleaved(streams: list[AsyncIterator[dict[str, Any]]], sizes: list[int]) -> AsyncIterator[dict[str, Any]]:
    """Split calls' streams as one, chunks as they come with their choices numbered on; one usage
    chunk at the end adding up theirs. Nothing is given before every call has sent its first chunk,
    so a call failing at the start fails the whole before the client has anything (failover can
    still move on); a failure of one ends all (the others are cancelled)."""
    queue: asyncio.Queue[tuple[int, dict[str, Any] | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
            await queue.put((i, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who raises it
            await queue.put((i, exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    usages: list[Any] = [None] * len(streams)
    head: dict[str, Any] = {}
    held: list[dict[str, Any]] | None = []
    begun: set[int] = set()
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            begun.add(i)
            if item is None:
                running -= 1
            else:
                if item.get("usage"):
                    usages[i] = item["usage"]
                choices = item.get("choices")
                if choices:
                    if not head:
                        head = {k: v for k, v in item.items() if k in ("id", "object", "created", "model", "system_fingerprint")}
                    out = {**item, "choices": _renumbered(choices, offsets[i])}
                    if out.get("usage"):
                        out["usage"] = None  # it goes out added up, at the end
                    if held is None:
                        yield out
                    else:
                        held.append(out)
            if held is not None and len(begun) == len(tasks):
                for out in held:
                    yield out
                held = None
        usage = add_usage(usages)
        if usage is not None:
            yield {**head, "choices": [], "usage": usage}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
