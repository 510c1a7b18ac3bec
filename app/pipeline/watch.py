"""Run a layer's bookkeeping when a relayed stream ends, however it ends."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger("admiral.pipeline")

#: called once with None (finished), the exception it failed with, or GeneratorExit (abandoned)
StreamEnd = Callable[[BaseException | None], Awaitable[None]]


async def watch_stream(chunks: AsyncIterator[dict[str, Any]], on_end: StreamEnd) -> AsyncIterator[dict[str, Any]]:
    """Relay ``chunks`` unchanged and call ``on_end`` exactly once when the stream is over."""
    outcome: BaseException | None = None
    try:
        async for chunk in chunks:
            yield chunk
    except BaseException as exc:  # GeneratorExit and CancelledError included: the slot must be freed
        outcome = exc
        raise
    finally:
        try:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            try:
                await on_end(outcome)
            except Exception:
                # bookkeeping must never break the client's stream
                log.exception("stream end hook failed")
