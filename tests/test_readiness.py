"""``/health/ready``: 200 while requests can be served (degraded or not), 503 only when they cannot."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app.api.health import ready

OK = {"ok": True}
REDIS_DOWN = {"ok": False, "degraded": True}


def answer(checks: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async def readiness() -> dict[str, Any]:
        return checks

    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(services=SimpleNamespace(readiness=readiness))))
    response = asyncio.run(ready(request))  # type: ignore[arg-type]
    return response.status_code, orjson.loads(response.body)


@pytest.mark.parametrize(
    ("checks", "status", "said"),
    [
        ({"database": OK, "state": OK, "backends": {"ok": True, "ready": ["demo"]}}, 200, "ready"),
        # Redis down: served from this replica's memory, so it stays in rotation
        ({"database": OK, "state": REDIS_DOWN, "backends": {"ok": True, "ready": ["demo"]}}, 200, "degraded"),
        # ... but not when nothing could serve anyway
        ({"database": OK, "state": REDIS_DOWN, "backends": {"ok": False, "ready": []}}, 503, "not_ready"),
        ({"database": {"ok": False, "message": "unreachable: OSError"}, "state": OK, "backends": {"ok": True, "ready": ["demo"]}}, 503, "not_ready"),
        ({"database": OK, "state": {"ok": False}, "backends": {"ok": True, "ready": ["demo"]}}, 503, "not_ready"),
    ],
    ids=["all-ok", "redis-degraded", "degraded-and-no-backend", "database-down", "state-down-without-fallback"],
)
def test_readiness_is_503_only_when_requests_cannot_be_served(checks: dict[str, Any], status: int, said: str) -> None:
    code, body = answer(checks)
    assert (code, body["status"]) == (status, said)
    assert body["checks"] == checks
