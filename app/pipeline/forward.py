"""Requests a provider with the client's own API takes as they came: the Responses API forwarded.

A Responses request arrives translated to chat (:class:`Forwardable`), with the Responses request
it was beside it. When its route has deployments whose provider speaks the Responses API natively
(``responses: native``), :class:`ForwardLayer` sends the original on instead (:class:`NativeCall`,
endpoint ``responses``): the cache and single-flight key on it, a native deployment is given it
as it is, and a translated deployment — failover may move on to one — is given the chat request,
when chat can say what it asks. A request chat cannot say (a built-in tool, an item reference,
``background``) goes only to native deployments, and where the route has none it is the 400 its
translation raised, naming the feature.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.pipeline.answer import Answer
from app.pipeline.base import RESPONSES, Deployment, Forwardable, Handler, ModelRequest, RequestContext

__all__ = ["RESPONSES", "ForwardLayer", "Forwardable", "NativeCall"]


@dataclass(slots=True)
class NativeCall(ModelRequest):
    """A :class:`Forwardable` on its way to a route with native deployments: ``body`` is the
    forwarded request (endpoint ``responses``), what every layer keys and counts on."""

    #: the chat request it was translated to (it estimates, and is what a translated deployment takes)
    translated: Forwardable | None = None
    #: the providers of the route that take it as it is
    natives: frozenset[str] = frozenset()

    def at(self, deployment: Deployment) -> ModelRequest:
        """What ``deployment`` is given: this request, or (for a translated one) the chat request."""
        if deployment.provider in self.natives or self.translated is None or self.translated.refusal is not None:
            return self
        return self.translated

    def measured(self) -> ModelRequest:
        """What its size is read from (prompt, answer limit): the chat request it was translated to."""
        return self.translated if self.translated is not None else self

    def prompt_text(self) -> str:
        return self.translated.prompt_text() if self.translated is not None else ""

    def estimated_tokens(self) -> int:
        return self.translated.estimated_tokens() if self.translated is not None else 1


class ForwardLayer:
    """After routing: a :class:`Forwardable` whose route has a native deployment goes on as the
    request it came as; one whose route has none goes on translated, or is refused when chat
    cannot say it. Any other request passes untouched."""

    def __init__(self, next_handler: Handler, natives: frozenset[str]) -> None:
        self._next = next_handler
        self._natives = natives

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        if not isinstance(request, Forwardable):
            return await self._next(request, ctx)
        natives = frozenset(d.provider for d in ctx.deployments if d.provider in self._natives)
        if not natives:
            if request.refusal is not None:
                raise request.refusal
            return await self._next(request, ctx)
        if request.refusal is not None:
            # only a provider with the Responses API can say it
            ctx.deployments = [d for d in ctx.deployments if d.provider in natives]
        native = NativeCall(request.forward, b"", RESPONSES, translated=request, natives=natives)
        return await self._next(native, ctx)
