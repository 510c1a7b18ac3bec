"""The limits a provider announces in its answers' headers (``x-ratelimit-*``).

OpenAI, Groq, Together and most OpenAI-compatible providers send
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; Cerebras and some others add the
window (``-minute``, ``-hour``, ``-day``) to the name. Resets come as durations (``1s``,
``6m0s``, ``2m59.56s``, ``20ms``), as plain seconds, or as a unix time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^x-ratelimit-(limit|remaining|reset)-(requests|tokens|req)(?:-(minute|hour|day))?$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: a reset above this is a unix time, not a duration
_EPOCH = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Announced:
    """One window a provider announced: its limit, what remains, and when it resets (unix time)."""

    unit: str  # requests or tokens
    window: str  # minute, hour, day, or "" when the provider did not say
    limit: int | None
    remaining: int | None
    resets_at: float | None


def parse_reset(value: str, now: float) -> float | None:
    """The unix time a reset header names, or None if it cannot be read."""
    text = value.strip().lower()
    try:
        number = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        return now + sum(float(n) * _UNIT_S[u] for n, u in parts)
    return number if number > _EPOCH else now + max(0.0, number)


def _number(value: str) -> int | None:
    try:
        return int(float(value))
    except ValueError:
        return None


def announced_limits(headers: Mapping[str, str], now: float) -> list[Announced]:
    """Every window the headers announce (empty when they announce none)."""
    fields: dict[tuple[str, str], dict[str, str]] = {}
    for name, value in headers.items():
        if name[:1] not in ("x", "X"):
            continue  # every answer passes here: most of its headers are not even looked at
        match = _NAME.match(name.lower())
        if match is not None:
            kind, unit, window = match.groups()
            unit = "requests" if unit == "req" else unit
            fields.setdefault((unit, window or ""), {})[kind] = value
    found = []
    for (unit, window), values in fields.items():
        reset = values.get("reset")
        found.append(
            Announced(
                unit=unit,
                window=window,
                limit=_number(values["limit"]) if "limit" in values else None,
                remaining=_number(values["remaining"]) if "remaining" in values else None,
                resets_at=parse_reset(reset, now) if reset is not None else None,
            )
        )
    return found
