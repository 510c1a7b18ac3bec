"""The serving step between the HTTP edge and the pipeline: one request in, one answer out, recorded once.

The edge (``app/api``) knows HTTP; the pipeline knows nothing of it. Here a request is read (by
a coroutine the edge hands over, so that a refused key or a bad body is recorded like any other
end), run through the pipeline, and recorded exactly once however it ends: answered, failed
with a gateway error, failed mid-stream, or left by its client. A complete answer is recorded
as it goes out (:meth:`~app.pipeline.answer.Answer.sent`, which the edge runs just before writing it): whoever has an answer finds it recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from starlette.requests import ClientDisconnect

from app.errors import UNAVAILABLE, GatewayError, UpstreamError, database_unavailable
from app.pipeline.answer import Answer, first_content
from app.pipeline.base import Handler, ModelRequest, RequestContext
from app.pipeline.streaming import replay
from app.recorder import RequestRecorder
from app.shapes import ChatCompletionChunk

log = logging.getLogger("admiral.serving")

#: the status recorded for a request whose client went away (nginx's convention)
CLIENT_CLOSED = 499


class Serving:
    """Runs requests through the pipeline; records each once, at its end."""

    def __init__(self, pipeline: Handler, recorder: RequestRecorder) -> None:
        self._pipeline = pipeline
        self._recorder = recorder

    async def __call__(self, ctx: RequestContext, read: Callable[[], Awaitable[ModelRequest]]) -> Answer:
        """The answer to the request ``read`` returns; raises a :class:`GatewayError` to answer
        with, or the client's going away. A streamed answer is recorded when the stream is over."""
        recorder = self._recorder
        recorder.start()
        request: ModelRequest | None = None
        try:
            request = await read()
            answer = await self._pipeline(request, ctx)
            if answer.is_stream != request.stream:
                answer = await as_asked(answer, request.stream)
        except GatewayError as exc:
            self._failed(request, ctx, exc)
            raise
        except UNAVAILABLE as exc:
            log.warning("request %s: the database is unavailable: %s: %s", ctx.request_id, type(exc).__name__, str(exc)[:200])
            error = database_unavailable()
            self._failed(request, ctx, error)
            raise error from None
        except (asyncio.CancelledError, ClientDisconnect):
            recorder.finish(request, ctx, CLIENT_CLOSED)
            raise
        except BaseException:
            recorder.finish(request, ctx, 500)
            raise
        content = first_content(answer) if recorder.log_content else None
        if not answer.is_stream:
            plain = request
            # recorded as the answer goes out (the edge calls ``answer.sent``)
            answer.after_sent(lambda: recorder.finish(plain, ctx, 200, content() if content else None, answer.usage))
            return answer
        done = request

        async def record(outcome: BaseException | None) -> None:
            if outcome is None:
                status = 200
            elif isinstance(outcome, GatewayError):
                status = outcome.status
                ctx.error_type = outcome.error_type
            else:
                status = CLIENT_CLOSED
            recorder.finish(done, ctx, status, content() if content else None, answer.usage)

        await answer.when_done(record)
        return answer

    def _failed(self, request: ModelRequest | None, ctx: RequestContext, exc: GatewayError) -> None:
        ctx.error_type = exc.error_type
        if isinstance(exc, UpstreamError) or exc.status >= 500:
            log.warning("request %s answered %d: %s", ctx.request_id, exc.status, exc.message)
        self._recorder.finish(request, ctx, exc.status)


async def as_asked(answer: Answer, stream: bool) -> Answer:
    """The answer in the form the request asked for: a stream folded into a complete answer, or
    a complete one (a cache hit, a plain leader's) replayed as a stream; every field kept."""
    if stream == answer.is_stream:
        return answer
    if stream:
        return Answer(chunks=_chunks(replay(answer.body)))
    folded = answer.fold()
    try:
        async for _ in answer:
            pass
    finally:
        await answer.aclose()
    return Answer(body=folded.result())


async def _chunks(chunks: Iterable[ChatCompletionChunk]) -> AsyncIterator[ChatCompletionChunk]:
    for chunk in chunks:
        yield chunk
