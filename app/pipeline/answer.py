"""What the pipeline answers: one shape for a complete answer (``chat.completion``, ``text_completion``,
embeddings ``list``, a forwarded request's Responses ``response``) and for a stream of chunks (or
of a forwarded request's Responses events).

A layer that must act when the answer is over (release a slot, settle a budget, store it, record
the request) registers a hook with :meth:`Answer.when_done` instead of wrapping the stream; a
layer that must see each chunk registers a tap with :meth:`Answer.on_chunk`. The stream is read
once, by whoever delivers it, and the hooks run exactly once, in the order they were registered
(the layer nearest the provider first), however the stream ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, Protocol

import orjson

from app.pipeline.streaming import ChunkAssembler
from app.shapes import ChatCompletion, ChatCompletionChunk, Events, Usage, chat_usage, last_usage

log = logging.getLogger("admiral.pipeline")

#: called once with None (complete, or the stream ran to its end), the exception the stream
#: failed with, or GeneratorExit (the reader let go of it)
EndHook = Callable[[BaseException | None], Awaitable[None]]
ChunkTap = Callable[[ChatCompletionChunk], None]
#: the chunks one read brought: a list, or a provider's events as they came
Batch = list[ChatCompletionChunk] | Events


class Batches(Protocol):
    """A stream read a batch at a time: ``batch`` gives the chunks there are (at least one,
    waiting for them if need be), [] at the end; ``aclose`` lets go of it."""

    async def batch(self) -> Batch: ...

    async def aclose(self) -> None: ...


class Answer:
    """A complete answer (a dict or its encoded JSON, each made from the other when asked) or a stream."""

    __slots__ = ("_after", "_at", "_batch", "_body", "_encoded", "_ends", "_fold", "_held", "_kept", "_over", "_source", "_taps", "from_cache", "usage")

    def __init__(self, *, body: ChatCompletion | None = None, encoded: bytes | None = None, chunks: AsyncIterator[ChatCompletionChunk] | Batches | None = None) -> None:
        assert (chunks is None) != (body is None and encoded is None), "an answer is complete or a stream"
        self._body = body
        self._encoded = encoded
        self._source = chunks
        #: the source's next batch of chunks, when it reads them a batch at a time (a failed getattr
        #: on a complete answer's None would cost an exception on every plain request)
        self._batch: Callable[[], Awaitable[Batch]] | None = getattr(chunks, "batch", None) if chunks is not None else None
        #: a batch read for ``__anext__``, and how much of it was handed over
        self._held: Batch = []
        self._at = 0
        # most answers get no tap and no hook: the lists are made for the first one
        self._taps: list[ChunkTap] | tuple[()] = ()
        self._ends: list[EndHook] | tuple[()] = ()
        self._over = False
        self._fold: ChunkAssembler | None = None
        self._kept: list[Batch] | None = None
        #: a complete answer's bookkeeping, run by :meth:`sent` as it goes out
        self._after: Callable[[], None] | None = None
        #: the usage the answer reports (a stream's once its usage chunk has passed), in chat's words
        usage = body.get("usage") if body is not None else None
        if usage is not None and "input_tokens" in usage:
            usage = chat_usage(usage)  # a forwarded request's response object
        self.usage: Usage | None = usage
        #: read from the cache (exact, semantic, or the shared tier a finished flight left): not stored again
        self.from_cache = False

    @classmethod
    def stored(cls, encoded: bytes, usage: Usage | None) -> Answer:
        """An answer from the cache: a complete one kept as JSON, decoded only if someone reads it,
        or a stream kept as the provider's events (``data: ...``), read as they are."""
        answer = cls(chunks=_Replay(Events.of_raw(encoded, "the cache"))) if encoded.startswith(b"data: ") else cls(encoded=encoded)
        answer.usage = chat_usage(usage) if usage is not None and "input_tokens" in usage else usage
        answer.from_cache = True
        return answer

    @property
    def is_stream(self) -> bool:
        return self._source is not None

    @property
    def body(self) -> ChatCompletion:
        if self._body is None:
            assert self._encoded is not None, "a stream has no body"
            self._body = orjson.loads(self._encoded)
        return self._body

    @property
    def encoded(self) -> bytes:
        if self._encoded is None:
            self._encoded = orjson.dumps(self.body)
        return self._encoded

    @encoded.setter
    def encoded(self, payload: bytes) -> None:
        """The body's JSON made elsewhere (for the cache): the client gets the same bytes."""
        self._encoded = payload

    def after_sent(self, bookkeeping: Callable[[], None]) -> None:
        """Run ``bookkeeping`` when a complete answer goes out (:meth:`sent`)."""
        assert self._source is None, "a stream's bookkeeping is an end hook"
        self._after = bookkeeping

    def sent(self) -> None:
        """The answer went out (or could not): run its bookkeeping, once."""
        bookkeeping, self._after = self._after, None
        if bookkeeping is not None:
            try:
                bookkeeping()
            except Exception:
                # the client has its answer: bookkeeping must not turn it into an error
                log.exception("answer bookkeeping failed")

    def on_chunk(self, tap: ChunkTap) -> None:
        """Call ``tap`` with each chunk as it is read (never for a complete answer)."""
        if self._taps:
            self._taps.append(tap)  # type: ignore[union-attr]
        else:
            self._taps = [tap]

    def fold(self) -> ChunkAssembler:
        """The stream folded as it is read into the ``chat.completion`` (or ``text_completion``) it amounts to: one fold
        per stream, however many want it (the cache stores it, a plain request is answered with it).
        Ask before the stream is read: it sees the chunks read after."""
        if self._fold is None:
            # fed before the taps, a batch at a time (Answer._seen)
            self._fold = ChunkAssembler()
        return self._fold

    def kept(self) -> list[Batch]:
        """The stream's batches as they are read, kept whole (a provider's
        :class:`~app.shapes.Events` unparsed): one list per stream, however many want it. Ask
        before the stream is read."""
        if self._kept is None:
            self._kept = []
        return self._kept

    async def when_done(self, hook: EndHook) -> None:
        """Run ``hook`` when the answer is over: now for a complete answer, at the stream's end otherwise."""
        if self._source is None:
            await hook(None)
            return
        assert not self._over, "an end hook must come before its stream ends"
        if self._ends:
            self._ends.append(hook)  # type: ignore[union-attr]
        else:
            self._ends = [hook]

    def __aiter__(self) -> Answer:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        assert self._source is not None, "a complete answer is not a stream"
        if self._batch is not None:
            while self._at >= len(self._held):
                self._held = await self.batch()
                self._at = 0
                if not self._held:
                    raise StopAsyncIteration
            chunk = self._held[self._at]
            self._at += 1
            return chunk
        try:
            chunk = await anext(self._source)  # type: ignore[arg-type]
        except StopAsyncIteration:
            await self._end(None)
            raise
        except BaseException as exc:
            await self._end(exc)
            raise
        self._seen([chunk])
        return chunk

    async def batch(self) -> Batch:
        """The next chunks: all that the source has read by now (at least one), without waiting for
        more; [] at the end. A writer sends a batch as one ASGI message: a burst from the provider
        then costs one send, not one per chunk, and a batch as the provider sent it
        (:class:`~app.shapes.Events`) goes out in the provider's bytes."""
        if self._at < len(self._held):
            # the rest of a batch that ``__anext__`` began
            held, self._held = self._held, []
            return held[self._at :]
        if self._batch is None:
            chunk = await anext(self, None)
            return [] if chunk is None else [chunk]
        try:
            chunks = await self._batch()
            if chunks:
                self._seen(chunks)
        except BaseException as exc:
            await self._end(exc)
            raise
        if not chunks:
            await self._end(None)
        return chunks

    def _seen(self, chunks: Batch) -> None:
        if self._kept is not None:
            self._kept.append(chunks)
        if self._fold is not None:
            self._fold.add_all(chunks)
        for tap in self._taps:
            for chunk in chunks:
                tap(chunk)
        usage = last_usage(chunks)
        if usage:
            self.usage = usage

    async def aclose(self) -> None:
        """Let go of the stream (ending it if still open) and run the end hooks."""
        if self._source is not None:
            await self._end(GeneratorExit())

    async def _end(self, outcome: BaseException | None) -> None:
        if self._over:
            return
        self._over = True
        # the hooks and taps close over this answer: dropped once run, a finished stream's objects
        # are freed by their reference counts, not left in a cycle for the collector (whose
        # collections of that garbage stopped every stream in flight for 300 ms at c=50)
        ends, self._ends = self._ends, ()
        self._taps = ()
        try:
            close = getattr(self._source, "aclose", None)
            if close is not None:
                await close()
        finally:
            for hook in ends:
                try:
                    await hook(outcome)
                except Exception:
                    # bookkeeping must never break the client's answer
                    log.exception("answer end hook failed")


class _Replay:
    """A stream kept as its events, given again in one batch."""

    __slots__ = ("_events",)

    def __init__(self, events: Events) -> None:
        self._events: Events | None = events

    async def batch(self) -> Batch:
        events, self._events = self._events, None
        return events if events is not None else []

    async def aclose(self) -> None:
        self._events = None


def first_content(answer: Answer) -> Callable[[], str | None]:
    """What the first choice says, for the request log: read from the body, or gathered from the stream."""
    if not answer.is_stream:
        def of_body() -> str | None:
            choices = answer.body.get("choices") or ()
            if not choices:
                return _output_text(answer.body)
            first = choices[0]
            return (first.get("message") or {}).get("content") if "message" in first else first.get("text")  # type: ignore[return-value]

        return of_body
    parts: list[str] = []

    def tap(chunk: ChatCompletionChunk) -> None:
        choices = chunk.get("choices")
        if choices is None:
            # a forwarded request's Responses events: their text comes in its own deltas
            if chunk.get("type") == "response.output_text.delta":  # type: ignore[comparison-overlap]
                parts.append(chunk.get("delta") or "")  # type: ignore[misc]
            return
        for choice in choices:
            delta = choice.get("delta")
            # a text completion's events carry text instead of a delta
            content = delta.get("content") if isinstance(delta, dict) else choice.get("text") if delta is None else None
            if content and choice.get("index", 0) == 0:
                parts.append(content)

    answer.on_chunk(tap)
    return lambda: "".join(parts)


def _output_text(body: Any) -> str | None:
    """A Responses ``response``'s text (its messages' ``output_text`` parts), or None for anything else."""
    output = body.get("output")
    if not isinstance(output, list):
        return None
    return "".join(
        part.get("text") or ""
        for item in output
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict) and part.get("type") == "output_text"
    )


class Tokens(NamedTuple):
    prompt: int
    completion: int
    total: int


#: what an answer the request did not call upstream for cost (made once: a NamedTuple is slow to build)
_NOTHING = Tokens(0, 0, 0)


def reported_tokens(usage: Usage | dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens as a usage reports them; zeros for what it does not say."""
    if not usage:
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def spent_tokens(paid: bool, usage: Usage | dict[str, Any] | None) -> Tokens | None:
    """The tokens a request paid upstream; None when the provider did not say.

    ``paid`` is False for answers the request did not call upstream for (a cache hit, a dedupe
    follower): they cost nothing, whatever the usage they carry.
    """
    if not paid:
        return _NOTHING
    if not usage:
        return None
    prompt, completion = reported_tokens(usage)
    total = int(usage.get("total_tokens") or 0) or prompt + completion
    return Tokens(prompt, completion, total) if total else None
