"""Usage questions answered from the request log with SQL that runs on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.storage.models import RequestLog

T = RequestLog.__table__.c

HIT = T.cache == "hit"
SEMANTIC_HIT = T.cache == "semantic-hit"
MISS = T.cache == "miss"
FOLLOWER = T.dedupe == "follower"
#: answered by a call this request itself made upstream (not the cache, not a coalesced leader's)
UPSTREAM_CALL = and_(T.backend.is_not(None), not_(HIT), not_(SEMANTIC_HIT), or_(T.dedupe.is_(None), not_(FOLLOWER)))
OK = T.status < 400
#: answered without an upstream call of its own: the cache (exact or semantic) or a leader
AVOIDED = and_(OK, or_(HIT, SEMANTIC_HIT, FOLLOWER))
PAID = and_(OK, UPSTREAM_CALL)


def _count(cond: ColumnElement[bool]) -> Any:
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)


def _sum_if(cond: ColumnElement[bool], column: Any) -> Any:
    return func.coalesce(func.sum(case((cond, column), else_=0)), 0)


async def _median(conn: AsyncConnection, column: Any, where: ColumnElement[bool], count: int) -> float | None:
    """The median by LIMIT/OFFSET on the sorted column: portable, and the ts index bounds the scan."""
    if count == 0:
        return None
    offset = (count - 1) // 2
    rows = await conn.execute(select(column).where(where).order_by(column).limit(1 if count % 2 else 2).offset(offset))
    values = [float(v) for (v,) in rows]
    return sum(values) / len(values) if values else None


async def _latency(conn: AsyncConnection, where: ColumnElement[bool]) -> dict[str, float | None]:
    count, avg = (await conn.execute(select(func.count(), func.avg(T.latency_ms)).where(where))).one()
    p50 = await _median(conn, T.latency_ms, where, int(count))
    return {"p50": _ms(p50), "avg": _ms(avg), "count": int(count)}


def _ms(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


async def request_stats(engine: AsyncEngine, hours: int, now: datetime | None = None) -> dict[str, Any]:
    """The ``/admin/stats`` answer for the last ``hours``."""
    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    window = T.ts >= since
    async with engine.connect() as conn:
        total, hits, misses, followers = (
            await conn.execute(select(func.count(), _count(HIT), _count(MISS), _count(FOLLOWER)).where(window))
        ).one()
        backends = await conn.execute(select(T.backend, func.count()).where(window, UPSTREAM_CALL).group_by(T.backend).order_by(T.backend))
        agents = await conn.execute(
            select(
                T.agent,
                func.count(),
                _count(HIT),
                _count(FOLLOWER),
                _count(T.status >= 400),
                _sum_if(UPSTREAM_CALL, T.prompt_tokens),
                _sum_if(UPSTREAM_CALL, T.completion_tokens),
            )
            .where(window)
            .group_by(T.agent)
            .order_by(T.agent)
        )
        errors = await conn.execute(select(T.error_type, T.status, func.count()).where(window, T.status >= 400).group_by(T.error_type, T.status))
        endpoints = await conn.execute(
            select(T.endpoint, func.count(), _count(HIT), _count(FOLLOWER), _count(T.status >= 400), _sum_if(UPSTREAM_CALL, T.prompt_tokens), _sum_if(UPSTREAM_CALL, T.completion_tokens))
            .where(window)
            .group_by(T.endpoint)
            .order_by(T.endpoint)
        )
        savings = await conn.execute(
            select(
                T.agent,
                _count(and_(OK, HIT)),
                _count(and_(OK, SEMANTIC_HIT)),
                _count(and_(OK, FOLLOWER)),
                _sum_if(AVOIDED, T.prompt_tokens + T.completion_tokens),
                _sum_if(PAID, T.price_usd),
                _sum_if(AVOIDED, T.price_usd),
                _sum_if(OK, T.reference_usd),
            )
            .where(window)
            .group_by(T.agent)
            .order_by(T.agent)
        )
        cache_latency = await _latency(conn, and_(window, HIT, OK))
        upstream_latency = await _latency(conn, and_(window, UPSTREAM_CALL, OK))
        by_error: dict[str, int] = {}
        for error_type, status, count in errors:
            key = error_type or str(status)
            by_error[key] = by_error.get(key, 0) + int(count)
        lookups = int(hits) + int(misses)
        return {
            "hours": hours,
            "since": since.isoformat(),
            "total_requests": int(total),
            "cache_hits": int(hits),
            "cache_misses": int(misses),
            "cache_hit_rate": round(int(hits) / lookups, 4) if lookups else 0.0,
            "dedupe_savings": int(followers),
            "backend_distribution": {b: int(n) for b, n in backends},
            "latency_ms": {"cache": cache_latency, "upstream": upstream_latency},
            "by_agent": {
                agent: {
                    "requests": int(n),
                    "cache_hits": int(h),
                    "dedupe_savings": int(f),
                    "errors": int(e),
                    "prompt_tokens": int(pt),
                    "completion_tokens": int(ct),
                }
                for agent, n, h, f, e, pt, ct in agents
            },
            "by_endpoint": {
                name: {
                    "requests": int(n),
                    "cache_hits": int(h),
                    "dedupe_savings": int(f),
                    "errors": int(e),
                    "prompt_tokens": int(pt),
                    "completion_tokens": int(ct),
                }
                for name, n, h, f, e, pt, ct in endpoints
            },
            "errors": dict(sorted(by_error.items(), key=lambda kv: -kv[1])),
            "savings": _savings(list(savings)),
        }


def _savings(rows: list[Any]) -> dict[str, Any]:
    """Calls and tokens the cache and dedupe avoided, money spent, and money saved at the
    deployments' prices and against the reference price; in total and per agent."""

    def one(hits: Any, semantic: Any, followers: Any, tokens: Any, spent: Any, saved: Any, reference: Any) -> dict[str, Any]:
        return {
            "calls_avoided": {"cache": int(hits), "semantic": int(semantic), "dedupe": int(followers)},
            "tokens_avoided": int(tokens),
            "spent_usd": round(float(spent), 6),
            "saved_usd": round(float(saved), 6),
            "reference_usd": round(float(reference), 6),
            "saved_vs_reference_usd": round(float(reference) - float(spent), 6),
        }

    totals = [sum(float(row[i]) for row in rows) for i in range(1, 8)]
    return {"total": one(*totals), "by_agent": {row[0]: one(*row[1:]) for row in rows}}


async def backend_recent(engine: AsyncEngine, minutes: int = 15, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Per backend over the last ``minutes``: calls, failures, upstream latency and the last failure."""
    since = (now or datetime.now(UTC)) - timedelta(minutes=minutes)
    where = and_(T.ts >= since, UPSTREAM_CALL)
    failed = T.status >= 500
    out: dict[str, dict[str, Any]] = {}
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(T.backend, func.count(), _count(failed), func.avg(T.upstream_ms), func.max(T.ts)).where(where).group_by(T.backend)
        )
        for backend, count, failures, upstream_ms, last_seen in rows:
            out[backend] = {
                "requests": int(count),
                "errors": int(failures),
                "upstream_ms_avg": _ms(upstream_ms),
                "last_seen": _iso(last_seen),
                "last_error": None,
            }
        last = (
            select(T.backend, func.max(T.id).label("id")).where(T.ts >= since, T.backend.is_not(None), failed).group_by(T.backend).subquery()
        )
        errors = await conn.execute(select(T.backend, T.ts, T.status, T.error_type).join(last, T.id == last.c.id))
        for backend, ts, status, error_type in errors:
            entry = out.setdefault(backend, {"requests": 0, "errors": 0, "upstream_ms_avg": None, "last_seen": None, "last_error": None})
            entry["last_error"] = {"at": _iso(ts), "status": int(status), "error_type": error_type}
    return out


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # SQLite gives back the naive UTC it was given
    return value.isoformat()
