"""What tokens cost: each deployment's price, and a reference price to say what the free tiers saved.

Prices are US dollars per million tokens, input (prompt) and output (completion), set per model
(``models.<name>.price`` / ``reference_price``, for all its deployments) or per deployment entry
(``{deployment: p/m, price: {...}, reference_price: {...}}``); the default is 0, the free tiers.
Every answered request is priced at its deployment's price and at the reference price, whether it
called upstream (money spent) or was answered by the cache or a leader (money saved).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Price, Settings
from app.pipeline.base import Deployment

_FREE = Price()


@dataclass(frozen=True, slots=True)
class Priced:
    """One deployment's price and reference price."""

    price: Price
    reference: Price

    def of(self, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
        """(at price, at reference price) in US dollars."""
        return _cost(self.price, prompt_tokens, completion_tokens), _cost(self.reference, prompt_tokens, completion_tokens)


def _cost(price: Price, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1_000_000


class Prices:
    """Deployment (``provider/model-id``) -> its prices; a route's first deployment stands in when
    the one that answered is not known."""

    def __init__(self, settings: Settings) -> None:
        self._by_deployment: dict[str, Priced] = {}
        self._by_route: dict[str, Priced] = {}
        for name, model in settings.models.items():
            for deployment in model.deployments:
                priced = Priced(model.prices.get(deployment, model.price or _FREE), model.reference_prices.get(deployment, model.reference_price or _FREE))
                self._by_deployment.setdefault(deployment, priced)
                self._by_route.setdefault(name, priced)
        #: whether any price is set (else every figure is 0 and nothing needs computing)
        self.any = any(p.price != _FREE or p.reference != _FREE for p in self._by_deployment.values())

    def cost(self, deployment: Deployment | None, route: str, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
        priced = self._by_deployment.get(str(deployment)) if deployment is not None else None
        if priced is None:
            priced = self._by_route.get(route)
        return priced.of(prompt_tokens, completion_tokens) if priced is not None else (0.0, 0.0)
