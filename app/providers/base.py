"""The one protocol every backend speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One call to one deployment: the OpenAI body of ``endpoint`` (chat, completions, embeddings)
    with ``model`` set to the provider's id."""

    model: str
    payload: dict[str, Any]
    request_id: str
    endpoint: str = "chat"


class Provider(Protocol):
    """A backend: OpenAI-compatible HTTP API, in-process engine or the demo responder.

    ``complete`` returns the endpoint's OpenAI answer (a ``chat.completion``, a
    ``text_completion``, an embeddings ``list``). ``stream`` yields its chunks
    (``chat.completion.chunk`` or ``text_completion`` dicts, never the ``[DONE]`` marker); when the payload asks for
    ``stream_options.include_usage`` the last chunk carries ``usage`` and empty ``choices``.
    Failures are raised as :mod:`app.errors` types (``UpstreamError`` and subclasses).
    Cancelling the awaiting task must abort the backend's work.
    """

    name: str

    async def start(self) -> None: ...

    def ready(self) -> bool: ...

    async def complete(self, request: UpstreamRequest) -> dict[str, Any]: ...

    def stream(self, request: UpstreamRequest) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...
