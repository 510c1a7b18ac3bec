"""Model resolution and task-aware routing: public name, ``auto`` or ``provider/model-id``, within the models the caller's key may use."""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.classifier import Decision, RouteClassifier
from app.config import KeyConfig, RoutingRule, Settings
from app.errors import NotFoundError, PermissionDeniedError
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
    """Turns the requested model into a route name and its ordered deployments, within what the caller's key may use.

    A key with ``models`` may use those public names, and a ``provider/model-id`` only when that
    deployment serves one of them. ``auto`` routes among them: a classifier choice or a rule whose
    model the key may not use is passed over as if it had not matched; then ``routing.default``
    if the key may use it, else the first model of the key's list.
    """

    def __init__(self, settings: Settings) -> None:
        self._models = {name: ([Deployment.parse(d) for d in m.deployments], m.strategy) for name, m in settings.models.items()}
        self._providers = set(settings.providers)
        self._rules = [CompiledRule.build(r) for r in settings.routing.rules]
        self._default = settings.routing.default
        #: deployment -> the public names it serves (a provider/model-id is allowed through them)
        self._serving: dict[str, list[str]] = {}
        for name, model in settings.models.items():
            for deployment in model.deployments:
                self._serving.setdefault(deployment, []).append(name)

    def public_models(self, key: KeyConfig | None = None) -> list[str]:
        """The public model names, in config order; with a key, those it may use."""
        if key is None or key.models is None:
            return list(self._models)
        return [name for name in self._models if name in key.models]

    def choose_auto(self, request: ModelRequest, agent: str, key: KeyConfig | None = None, decision: Decision | None = None) -> tuple[str | None, str]:
        """The route for ``auto`` and what chose it: the classifier (when confident), a keyword
        rule, else the default — each only among the models the key may use."""
        # a key's list is short: looking through it costs less than building a set
        allowed = key.models if key is not None else None
        if decision is not None and decision.confident and (allowed is None or decision.route in allowed):
            return decision.route, "classifier"
        if self._rules:
            text = request.prompt_text()
            has_tools = bool(request.body.get("tools") or request.body.get("functions"))
            for rule in self._rules:
                if (allowed is None or rule.model in allowed) and rule.matches(text, has_tools, agent):
                    return rule.model, "rule"
        if allowed is None or self._default in allowed:
            return self._default, "default"
        assert key is not None and key.models
        return key.models[0], "default"

    def resolve(self, request: ModelRequest, agent: str, key: KeyConfig | None = None, decision: Decision | None = None) -> tuple[str, list[Deployment], str]:
        """(route, deployments, strategy) for the request; 404 for a model that does not exist (or
        that the key cannot see), 403 ``model_not_allowed`` for one outside the key's list."""
        allowed = key.models if key is not None else None
        name = request.model
        if name == "auto":
            route, deployments, strategy, _ = self.resolve_auto(request, agent, key, decision)
            return route, deployments, strategy
        found = self._models.get(name)
        if found is not None:
            if allowed is not None and name not in allowed:
                raise self._not_allowed(name, key)
            return name, found[0], found[1]
        deployment = Deployment.parse(name)
        if deployment.model and deployment.provider in self._providers:
            if allowed is not None and not any(public in allowed for public in self._serving.get(name, ())):
                raise self._not_allowed(name, key)
            return name, [deployment], "ordered"
        known = self.public_models(key)
        raise NotFoundError(f"The model '{_shown(name)}' does not exist. Known models: {', '.join(known) or 'none'}.", param="model", code="model_not_found")

    def resolve_auto(self, request: ModelRequest, agent: str, key: KeyConfig | None, decision: Decision | None) -> tuple[str, list[Deployment], str, str]:
        """``resolve`` for ``auto``, with what chose the route (classifier, rule, default)."""
        chosen, by = self.choose_auto(request, agent, key, decision)
        if chosen is None:
            raise NotFoundError("The model 'auto' needs routing rules or routing.default in the gateway config.", param="model", code="model_not_found")
        deployments, strategy = self._models[chosen]
        return chosen, deployments, strategy, by

    def _not_allowed(self, name: str, key: KeyConfig | None) -> PermissionDeniedError:
        assert key is not None
        return PermissionDeniedError(
            f"The gateway key of agent '{key.agent}' may not use the model '{_shown(name)}'. Its models: {', '.join(self.public_models(key))}.",
            param="model",
            code="model_not_allowed",
        )


def _shown(name: str) -> str:
    return name if len(name) <= 100 else name[:100] + "..."


class RouterLayer:
    """Sets the route and the deployments to try; the header ``x-admiral-route`` comes from here."""

    def __init__(self, next_handler: Handler, router: ModelRouter, classifier: RouteClassifier | None = None) -> None:
        self._next = next_handler
        self._router = router
        self._classifier = classifier

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        if request.model != "auto":
            ctx.route, ctx.deployments, ctx.strategy = self._router.resolve(request, ctx.agent, ctx.key)
            return await self._next(request, ctx)
        decision = None
        if self._classifier is not None:
            decision = await self._classifier.classify(request.prompt_text())
            ctx.route_score = round(decision.confidence, 4) if decision is not None else None
        ctx.route, ctx.deployments, ctx.strategy, ctx.route_by = self._router.resolve_auto(request, ctx.agent, ctx.key, decision)
        return await self._next(request, ctx)
