"""Writing a streamed answer as server-sent events, ending with ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.disconnect import DisconnectWatcher
from app.errors import GatewayError
from app.pipeline.answer import Answer, Batch
from app.shapes import ChatCompletionChunk, Events

log = logging.getLogger("admiral.api")

#: nginx and other proxies must not buffer the event stream
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"


def sse_event(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class StreamWriter(Protocol):
    """How one client protocol writes a streamed answer: each chunk, the end, a failure mid-stream."""

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        """The bytes for one upstream chunk (empty: nothing to send for it)."""
        ...

    def chunks(self, batch: Batch) -> bytes:
        """The bytes for a batch of them (what one read brought), sent as one message: each
        chunk's, unless a writer knows a shorter way (a writer that subclasses this gets this)."""
        return b"".join(map(self.chunk, batch))

    def end(self) -> bytes: ...

    def failed(self, exc: GatewayError) -> bytes: ...


class OpenAIEvents:
    """OpenAI's event stream: each chunk as it came, then ``data: [DONE]``.

    Usage travels as OpenAI sends it: only to a client that asked (``stream_options.include_usage``).
    A failure after the first chunk goes out as one error event, then ``[DONE]``.
    """

    __slots__ = ("_include_usage",)

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        if self._include_usage or "usage" not in chunk:
            return sse_event(chunk)
        if not chunk.get("choices"):
            return b""
        return sse_event({k: v for k, v in chunk.items() if k != "usage"})

    def chunks(self, batch: Batch) -> bytes:
        if type(batch) is not Events:
            return b"".join(map(self.chunk, batch))
        # a provider's events go out in its bytes, unparsed: all of them at once, or event by event
        # when some chunks lose their usage (no event says "usage" otherwise)
        if self._include_usage or b'"usage"' not in batch.raw:
            return batch.raw
        return b"".join(self.chunk(c) if "usage" in c else b"data: " + data + b"\n\n" for c, data in zip(batch, batch.datas, strict=True))

    def end(self) -> bytes:
        return _DONE

    def failed(self, exc: GatewayError) -> bytes:
        return sse_event(exc.body()) + _DONE


class SSEResponse(Response):
    """Relays chunks as they arrive, written by the client protocol's ``writer``; a client that
    leaves cancels the upstream side at once."""

    def __init__(self, first: Batch, rest: Answer, writer: StreamWriter, headers: list[tuple[bytes, bytes]], task: asyncio.Task[Any]) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.raw_headers = [*(h for h in self.raw_headers if h[0] != b"content-length"), *_SSE_HEADERS, *headers]
        self._first = first
        self._rest = rest
        self._writer = writer
        #: the request's task, which also sends the response (a client leaving cancels it)
        self._task = task

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self._task
        writer = self._writer
        watcher = DisconnectWatcher(receive, task)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            chunks = self._first
            while chunks:
                data = writer.chunks(chunks)
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                chunks = await self._rest.batch()
            await send({"type": "http.response.body", "body": writer.end(), "more_body": False})
        except GatewayError as exc:
            # the client already has a 200: the failure travels in the stream
            log.warning("stream failed after the first chunk: %s", exc.message)
            await send({"type": "http.response.body", "body": writer.failed(exc), "more_body": False})
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            task.uncancel()
        except OSError:
            pass  # the client is gone: the answer's end records it
        finally:
            watcher.stop()
            await self._rest.aclose()
