"""``admiral-optimizer providers``: the check a user runs after adding a provider key.

For each configured provider: whether its key works, the model ids it offers (its ``/models``),
which of the model ids the config routes to it it lacks, and the limits its headers announce
(from ``/models``, or from a one-token chat completion with ``--probe``, the default).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from app.config import ProviderConfig, Settings
from app.providers.announced import Announced, announced_limits


@dataclass
class ProviderReport:
    name: str
    kind: str
    #: ok, key refused, unreachable, error, or local (demo and vLLM need no key)
    key: str
    detail: str = ""
    offered: list[str] | None = None
    configured: list[str] = field(default_factory=list)
    announced: list[Announced] = field(default_factory=list)

    @property
    def lacking(self) -> list[str]:
        if self.offered is None:
            return []
        return [m for m in self.configured if m not in self.offered]

    @property
    def ok(self) -> bool:
        return self.key in ("ok", "local") and not self.lacking

    def as_dict(self) -> dict[str, Any]:
        now = time.time()
        return {
            "provider": self.name,
            "kind": self.kind,
            "key": self.key,
            "detail": self.detail or None,
            "offered": self.offered,
            "configured": self.configured,
            "lacking": self.lacking,
            "announced": [
                {"unit": a.unit, "window": a.window or None, "limit": a.limit, "remaining": a.remaining, "resets_in_s": round(a.resets_at - now, 1) if a.resets_at else None}
                for a in self.announced
            ],
        }


def configured_models(settings: Settings, provider: str) -> list[str]:
    """The model ids the config routes to ``provider``, in config order."""
    ids: dict[str, None] = {}
    for model in settings.models.values():
        for deployment in model.deployments:
            name, _, model_id = deployment.partition("/")
            if name == provider:
                ids[model_id] = None
    return list(ids)


async def _check_http(name: str, config: ProviderConfig, configured: list[str], probe: bool, session: aiohttp.ClientSession) -> ProviderReport:
    report = ProviderReport(name, config.kind, key="ok", configured=configured)
    base = (config.base_url or "").rstrip("/")
    headers = {**config.headers}
    if config.api_key is not None:
        headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
    try:
        async with session.get(base + "/models", headers=headers) as resp:
            raw = await resp.read()
            if resp.status in (401, 403):
                report.key, report.detail = "key refused", f"GET /models answered {resp.status}"
                return report
            if resp.status >= 400:
                report.key, report.detail = "error", f"GET /models answered {resp.status}"
            else:
                data = orjson.loads(raw).get("data")
                report.offered = [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else None
            report.announced = announced_limits(resp.headers, time.time())
        if probe and not report.announced and configured:
            body = {"model": configured[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            async with session.post(base + "/chat/completions", headers=headers, data=orjson.dumps(body)) as resp:
                await resp.read()
                if resp.status in (401, 403):
                    report.key, report.detail = "key refused", f"a one-token chat completion answered {resp.status}"
                elif resp.status >= 400 and resp.status != 429:
                    report.detail = f"a one-token chat completion to {configured[0]} answered {resp.status}"
                report.announced = announced_limits(resp.headers, time.time())
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError) as exc:
        report.key, report.detail = "unreachable", f"{type(exc).__name__}: {exc}"[:200]
    for secret in (config.api_key.get_secret_value() if config.api_key else "", *config.headers.values()):
        if len(secret) >= 8:
            report.detail = report.detail.replace(secret, "***")
    return report


async def check_providers(settings: Settings, *, probe: bool = True, timeout_s: float = 15.0) -> list[ProviderReport]:
    reports: list[ProviderReport] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        checks = []
        for name, config in settings.providers.items():
            configured = configured_models(settings, name)
            if config.kind == "openai":
                checks.append(_check_http(name, config, configured, probe, session))
            else:
                reports.append(ProviderReport(name, config.kind, key="local", detail="runs in the gateway: no key", configured=configured))
        reports.extend(await asyncio.gather(*checks))
    order = list(settings.providers)
    return sorted(reports, key=lambda r: order.index(r.name))


def render(reports: list[ProviderReport]) -> str:
    lines = []
    for r in reports:
        status = "OK  " if r.ok else "FAIL"
        lines.append(f"{status} {r.name} ({r.kind}): key {r.key}" + (f" — {r.detail}" if r.detail else ""))
        if r.offered is not None:
            lines.append(f"     offers {len(r.offered)} model(s)" + (f": {', '.join(r.offered[:12])}{' ...' if len(r.offered) > 12 else ''}" if r.offered else ""))
        if r.configured:
            lines.append(f"     configured: {', '.join(r.configured)}")
        if r.lacking:
            lines.append(f"     LACKS: {', '.join(r.lacking)} (routed here by the config, not offered by the provider)")
        for a in r.announced:
            window = f" per {a.window}" if a.window else ""
            parts = [f"limit {a.limit}" if a.limit is not None else "", f"remaining {a.remaining}" if a.remaining is not None else ""]
            reset = f", resets in {max(0.0, a.resets_at - time.time()):.0f} s" if a.resets_at else ""
            lines.append(f"     announces {a.unit}{window}: {', '.join(p for p in parts if p)}{reset}")
    return "\n".join(lines)
