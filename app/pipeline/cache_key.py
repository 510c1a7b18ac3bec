"""The exact-match key shared by the cache and dedupe layers."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from app.memo import BODY_MAX_BYTES, Recent
from app.pipeline.base import CHAT, ModelRequest, RequestContext

#: fields that never change the answer; every other field of the body is part of the key
NEUTRAL_FIELDS = frozenset({"model", "stream", "stream_options", "user", "metadata", "store", "request_id"})
#: bump when the key's encoding changes, so old entries stop matching instead of answering wrongly
KEY_VERSION = 1
#: keys by (raw body, route, namespace): a repeated request costs a dict lookup
_recent: Recent[tuple[bytes, str, str, str], str] = Recent()


def _normal(value: Any) -> Any:
    """Numbers that are equal compare equal: ``1`` and ``1.0`` encode the same way."""
    if isinstance(value, float):
        # past 2**63 an int no longer encodes (orjson), so a huge 1e30 stays a float
        return int(value) if value.is_integer() and abs(value) < 2**63 else value
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def compute_cache_key(request: ModelRequest, ctx: RequestContext) -> str:
    """SHA-256 over the route, the namespace and every answer-deciding field, in canonical JSON.

    The route is the public model name the router resolved (for ``auto``, the model it chose), so
    ``auto`` and the name it picks share entries. Absent and ``null`` fields are the same.
    """
    remember = 0 < len(request.raw) <= BODY_MAX_BYTES
    if remember:
        known = _recent.get((request.raw, request.endpoint, ctx.route, ctx.cache_namespace))
        if known is not None:
            return known
    fields = {k: v for k, v in request.body.items() if v is not None and k not in NEUTRAL_FIELDS}
    material = {"v": KEY_VERSION, "route": ctx.route, "namespace": ctx.cache_namespace, "request": _normal(fields)}
    if request.endpoint != CHAT:
        # the same fields can mean another operation (a completions prompt is no chat)
        material["endpoint"] = request.endpoint
    key = hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()
    if remember:
        _recent.put((request.raw, request.endpoint, ctx.route, ctx.cache_namespace), key)
    return key


def ensure_cache_key(request: ModelRequest, ctx: RequestContext) -> str:
    """The request's key, computed on first use and kept on the context."""
    if ctx.cache_key is None:
        ctx.cache_key = compute_cache_key(request, ctx)
    return ctx.cache_key
