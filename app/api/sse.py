"""Writing a streamed answer as server-sent events, ending with ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.disconnect import DisconnectWatcher
from app.errors import GatewayError
from app.pipeline.answer import Answer
from app.shapes import ChatCompletionChunk

log = logging.getLogger("admiral.api")

#: nginx and other proxies must not buffer the event stream
_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_DONE = b"data: [DONE]\n\n"


def sse_event(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class SSEResponse(Response):
    """Relays chunks as they arrive; a client that leaves cancels the upstream side at once.

    Usage travels as OpenAI sends it: only to a client that asked (``stream_options.include_usage``).
    A failure after the first chunk goes out as one error event, then ``[DONE]``.
    """

    def __init__(self, first: list[ChatCompletionChunk], rest: Answer, include_usage: bool, headers: list[tuple[bytes, bytes]], task: asyncio.Task[Any]) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.raw_headers = [*(h for h in self.raw_headers if h[0] != b"content-length"), *_SSE_HEADERS, *headers]
        self._first = first
        self._rest = rest
        self._include_usage = include_usage
        #: the request's task, which also sends the response (a client leaving cancels it)
        self._task = task

    def _encode(self, chunk: ChatCompletionChunk) -> bytes | None:
        if self._include_usage or "usage" not in chunk:
            return sse_event(chunk)
        if not chunk.get("choices"):
            return None
        return sse_event({k: v for k, v in chunk.items() if k != "usage"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self._task
        watcher = DisconnectWatcher(receive, task)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            chunks = self._first
            while chunks:
                data = b"".join([event for event in map(self._encode, chunks) if event is not None])
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                chunks = await self._rest.batch()
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        except GatewayError as exc:
            # the client already has a 200: the failure travels as one error event, then [DONE]
            log.warning("stream failed after the first chunk: %s", exc.message)
            await send({"type": "http.response.body", "body": sse_event(exc.body()) + _DONE, "more_body": False})
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            task.uncancel()
        except OSError:
            pass  # the client is gone: the answer's end records it
        finally:
            watcher.stop()
            await self._rest.aclose()
