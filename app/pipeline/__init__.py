"""The request pipeline: layers nested in one visible place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.pipeline.auth import AuthLayer
from app.pipeline.base import Handler
from app.pipeline.dispatch import Dispatcher
from app.pipeline.failover import FailoverLayer
from app.pipeline.router import RouterLayer

if TYPE_CHECKING:
    from app.services import Services


def build_pipeline(services: Services) -> Handler:
    """Outermost first: auth → routing → failover → dispatch."""
    handler: Handler = Dispatcher(services.providers)
    handler = FailoverLayer(handler)
    handler = RouterLayer(handler, services.router)
    return AuthLayer(handler, services.authenticator)
