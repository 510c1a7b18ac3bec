"""Several gateway replicas in one test: the same config, one Redis prefix, one PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import yaml

from app.clock import Clock
from app.storage.migrate import upgrade_to_head
from tests.conftest import REDIS_URL
from tests.support import GatewayServer, make_settings


def replica_config(config: dict[str, Any] | str, *, prefix: str, database_url: str, redis_url: str = REDIS_URL) -> dict[str, Any]:
    """``config`` with the shared state and database every replica uses."""
    data = yaml.safe_load(config) if isinstance(config, str) else dict(config)
    data["state"] = {**data.get("state", {}), "url": redis_url, "key_prefix": prefix}
    data["database"] = {**data.get("database", {}), "url": database_url}
    return data


@contextmanager
def replicas(config: dict[str, Any] | str, *, prefix: str, database_url: str, count: int = 2, redis_url: str = REDIS_URL, clock: Clock | None = None) -> Iterator[list[GatewayServer]]:
    """``count`` gateways on their own loopback ports, as a deployment runs them.

    The schema is upgraded once first, as ``admiral-optimizer migrate`` does before a rollout.
    """
    data = replica_config(config, prefix=prefix, database_url=database_url, redis_url=redis_url)
    upgrade_to_head(database_url)
    with ExitStack() as stack:
        yield [stack.enter_context(GatewayServer(make_settings(data), clock=clock)) for _ in range(count)]
