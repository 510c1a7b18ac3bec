"""Model resolution and task-aware routing: public name, ``auto`` or ``provider/model-id``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.config import RoutingRule, Settings
from app.errors import NotFoundError
from app.pipeline.answer import Answer
from app.pipeline.base import Deployment, Handler, ModelRequest, RequestContext


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A routing rule with its regex compiled and its words lower-cased, once at start."""

    model: str
    words: tuple[str, ...] | None
    regex: re.Pattern[str] | None
    min_chars: int | None
    max_chars: int | None
    has_tools: bool | None
    agents: frozenset[str] | None

    @classmethod
    def build(cls, rule: RoutingRule) -> CompiledRule:
        c = rule.when
        return cls(
            model=rule.model,
            words=tuple(w.lower() for w in c.contains_any) if c.contains_any is not None else None,
            regex=re.compile(c.regex) if c.regex is not None else None,
            min_chars=c.min_chars,
            max_chars=c.max_chars,
            has_tools=c.has_tools,
            agents=frozenset(c.agents) if c.agents is not None else None,
        )

    def matches(self, text: str, has_tools: bool, agent: str) -> bool:
        if self.agents is not None and agent not in self.agents:
            return False
        if self.has_tools is not None and has_tools != self.has_tools:
            return False
        if self.min_chars is not None and len(text) < self.min_chars:
            return False
        if self.max_chars is not None and len(text) > self.max_chars:
            return False
        if self.words is not None:
            lowered = text.lower()
            if not any(w in lowered for w in self.words):
                return False
        return self.regex is None or self.regex.search(text) is not None


class ModelRouter:
    """Turns the requested model into a route name and its ordered deployments."""

    def __init__(self, settings: Settings) -> None:
        self._models = {name: ([Deployment.parse(d) for d in m.deployments], m.strategy) for name, m in settings.models.items()}
        self._providers = set(settings.providers)
        self._rules = [CompiledRule.build(r) for r in settings.routing.rules]
        self._default = settings.routing.default

    def public_models(self) -> list[str]:
        return list(self._models)

    def choose_auto(self, request: ModelRequest, agent: str) -> str | None:
        if self._rules:
            text = request.prompt_text()
            has_tools = bool(request.body.get("tools") or request.body.get("functions"))
            for rule in self._rules:
                if rule.matches(text, has_tools, agent):
                    return rule.model
        return self._default

    def resolve(self, request: ModelRequest, agent: str) -> tuple[str, list[Deployment], str]:
        name = request.model
        if name == "auto":
            chosen = self.choose_auto(request, agent)
            if chosen is None:
                raise NotFoundError("The model 'auto' needs routing rules or routing.default in the gateway config.", param="model", code="model_not_found")
            name = chosen
        found = self._models.get(name)
        if found is not None:
            return name, found[0], found[1]
        deployment = Deployment.parse(name)
        if deployment.model and deployment.provider in self._providers:
            return name, [deployment], "ordered"
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise NotFoundError(f"The model '{shown}' does not exist. Known models: {', '.join(self._models) or 'none'}.", param="model", code="model_not_found")


class RouterLayer:
    """Sets the route and the deployments to try; the header ``x-admiral-route`` comes from here."""

    def __init__(self, next_handler: Handler, router: ModelRouter) -> None:
        self._next = next_handler
        self._router = router

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        ctx.route, ctx.deployments, ctx.strategy = self._router.resolve(request, ctx.agent)
        return await self._next(request, ctx)
