"""The embeddings cache as a pipeline layer: one entry per input item, not per batch.

A batch of 100 inputs of which 97 were embedded before asks the provider for the 3 others only
(one sub-request, which passes dedupe, failover, breakers, budgets and backpressure like any
request) and answers all 100 in their order. ``x-admiral-cache`` says ``hit`` (every item was
cached), ``miss`` (none was) or ``partial``. An item's key is the route, the namespace, every
answer-deciding field of the body (``dimensions`` and provider extras; not ``encoding_format``,
``user``) and the item itself, a string or a token id array.

One answer never mixes vectors of two deployments (two models' vectors do not compare, and may
not even be of one length). Each item's entry remembers the deployment that embedded it; the hits
used are those of one deployment (the one holding most of them), so a batch of 100 with 3 new
items still asks for those 3. When failover has the missing items answered by another deployment
than the one the hits came from, the hits are asked of that deployment too, in a second call given
only it; the answer is then a ``miss``, and the entries now hold that deployment's vectors.

Vectors are asked of the provider as base64 (float32) and kept so; the edge writes them in the
encoding each client asks for (:mod:`app.api.embeddings`). Other endpoints pass to the exact
response cache unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from typing import Any, NamedTuple, cast

import orjson

from app.errors import UpstreamBadResponseError
from app.metrics import Metrics
from app.pipeline.answer import Answer
from app.pipeline.base import EMBEDDINGS, Deployment, Handler, ModelRequest, RequestContext
from app.pipeline.cache_key import KEY_VERSION, NEUTRAL_FIELDS, _normal, compute_cache_key
from app.pipeline.params import add_usage
from app.shapes import ChatCompletion
from app.storage.response_cache import CachedAnswer, ResponseCache
from app.vectors import BASE64, as_base64

#: fields that change no item's vector: the inputs are keyed one by one, the encoding is the edge's
_ITEM_NEUTRAL = NEUTRAL_FIELDS | {"input", "encoding_format"}
#: cache reads in flight at once for the items of one request (the persistent tier is a database)
_READS_AT_ONCE = 64

Item = str | list[int]


def items_of(value: Any) -> list[Item]:
    """The inputs of a validated ``input``: a string, strings, one token array or token arrays."""
    if isinstance(value, str):
        return [value]
    if value and type(value[0]) is int:
        return [value]
    return list(value)


def item_keys(request: ModelRequest, ctx: RequestContext, items: list[Item]) -> list[str]:
    """Each item's cache key: SHA-256 over what decides its vector."""
    fields = {k: v for k, v in request.body.items() if v is not None and k not in _ITEM_NEUTRAL}
    material = {"v": KEY_VERSION, "endpoint": "embeddings-item", "route": ctx.route, "namespace": ctx.cache_namespace, "request": _normal(fields)}
    prefix = orjson.dumps(material, option=orjson.OPT_SORT_KEYS) + b"\n"
    return [hashlib.sha256(prefix + orjson.dumps(item)).hexdigest() for item in items]


class EmbeddingCacheLayer:
    """Answers embeddings item by item from the cache, asking the provider only for the items it lacks.

    Placed where the exact cache is: ``exact`` is that cache (every other endpoint goes there),
    ``upstream`` what follows it (dedupe, then failover). ``Cache-Control: no-cache`` skips the
    reads (``bypass``), ``no-store`` the writes; inputs repeated within a batch are asked for once.
    """

    def __init__(self, exact: Handler, upstream: Handler, cache: ResponseCache, metrics: Metrics) -> None:
        self._exact = exact
        self._upstream = upstream
        self._cache = cache
        self._hits = metrics.cache_hits
        self._misses = metrics.cache_misses
        self._item_hits = metrics.embedding_cache_items.labels("hit")
        self._item_misses = metrics.embedding_cache_items.labels("miss")

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer:
        if request.endpoint != EMBEDDINGS:
            return await self._exact(request, ctx)
        items = items_of(request.body["input"])
        keys = item_keys(request, ctx, items)
        found = _one_deployment(await self._lookup(keys)) if ctx.cache_read else {}
        # the items to ask for, each once, in their first order
        missing = {key: item for key, item in zip(keys, items, strict=True) if key not in found}
        if ctx.cache_read:
            hit = sum(key in found for key in keys)
            self._item_hits.inc(hit)
            self._item_misses.inc(len(keys) - hit)
        if not missing:
            self._hits.inc()
            ctx.cache_status = "hit"
            first = found[keys[0]].stored
            ctx.backend = first.backend
            if first.deployment:
                ctx.deployment = Deployment.parse(first.deployment)
            entries = {key: hit.entry for key, hit in found.items()}
            return _answer(_assembled(keys, entries, {"object": "list", "model": entries[keys[0]]["model"], "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
        if ctx.cache_read:
            self._misses.inc()
            ctx.cache_status = "partial" if found else "miss"
        else:
            ctx.cache_status = "bypass"
        made, entries = await self._ask(request, ctx, missing)
        answering = ctx.deployment
        if found and answering is not None and next(iter(found.values())).stored.deployment != str(answering):
            # failover had another deployment answer than the one the hits came from
            wanted = dict(zip(keys, items, strict=True))
            again, more = await self._ask(request, ctx, {key: wanted[key] for key in found}, pinned=answering)
            usage = add_usage([made.get("usage"), again.get("usage")])
            if usage is None:  # one call told none: a sum would undercount, the gateway estimates instead
                made.pop("usage", None)
            else:
                made["usage"] = usage
            entries |= more
            ctx.cache_status = "miss"
        else:
            entries |= {key: hit.entry for key, hit in found.items()}
        return _answer(_assembled(keys, entries, made))

    async def _ask(
        self, request: ModelRequest, ctx: RequestContext, wanted: dict[str, Item], pinned: Deployment | None = None
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The provider's answer for ``wanted`` (key -> item), and each item's entry, stored unless ``no-store``.

        ``pinned``: the one deployment that may answer (failover is given it alone)."""
        ask = ModelRequest({**request.body, "input": list(wanted.values()), "encoding_format": BASE64}, b"", EMBEDDINGS)
        # dedupe keys the call it joins by what is asked (the missing items), not by the whole batch;
        # a pinned call joins only calls pinned to the same deployment
        ctx.cache_key = None if pinned is None else hashlib.sha256(f"{compute_cache_key(ask, ctx)} {pinned}".encode()).hexdigest()
        route = ctx.deployments
        if pinned is not None:
            ctx.deployments = [pinned]
        try:
            answer = await self._upstream(ask, ctx)
        finally:
            ctx.deployments = route
        made: dict[str, Any] = dict(answer.body)
        model = made.get("model")
        entries: dict[str, dict[str, Any]] = {}
        for key, item in zip(wanted, _vectors(made, len(wanted), ctx.backend), strict=True):
            entries[key] = entry = {"item": item, "model": model}
            if ctx.cache_write:
                self._cache.put(key, ctx.cache_namespace, entry, ctx.backend, str(ctx.deployment) if ctx.deployment else None)
        return made, entries

    async def _lookup(self, keys: list[str]) -> dict[str, _Hit]:
        cache = self._cache
        now = cache.clock.now()
        stored: dict[str, CachedAnswer | None] = {}
        rest: list[str] = []
        for key in dict.fromkeys(keys):
            # most hits are in memory: no task per item for them
            stored[key] = cache.memory.get(key, now)
            if stored[key] is None:
                rest.append(key)
        for start in range(0, len(rest), _READS_AT_ONCE):
            part = rest[start : start + _READS_AT_ONCE]
            stored.update(zip(part, await asyncio.gather(*(cache.get(k) for k in part)), strict=True))
        found: dict[str, _Hit] = {}
        for key, answer in stored.items():
            if answer is None:
                continue
            entry = answer.body
            if isinstance(entry.get("item"), dict) and isinstance(entry["item"].get("embedding"), str):
                found[key] = _Hit(answer, entry)
        return found


class _Hit(NamedTuple):
    """A cached item: the stored answer (its backend) and its entry, decoded once."""

    stored: CachedAnswer
    entry: dict[str, Any]


def _one_deployment(found: dict[str, _Hit]) -> dict[str, _Hit]:
    """The hits of the deployment that embedded most of them (on a tie, the one of the earliest item)."""
    counts = Counter(hit.stored.deployment for hit in found.values())
    if len(counts) <= 1:
        return found
    chosen = counts.most_common(1)[0][0]
    return {key: hit for key, hit in found.items() if hit.stored.deployment == chosen}


def _vectors(made: dict[str, Any], count: int, backend: str) -> list[dict[str, Any]]:
    """The provider's items in input order, each vector as base64, index dropped; a 502 when they do not add up."""
    data = made.get("data")
    by_index: dict[int, dict[str, Any]] = {}
    if isinstance(data, list):
        for position, item in enumerate(data):
            if not isinstance(item, dict):
                continue
            index = item.get("index", position)
            vector = as_base64(item.get("embedding"))
            if type(index) is int and vector is not None:
                by_index[index] = {k: v for k, v in item.items() if k != "index"} | {"embedding": vector}
    if sorted(by_index) != list(range(count)):
        raise UpstreamBadResponseError(f"{backend or 'the backend'} answered {len(by_index)} usable embeddings for {count} inputs", backend=backend)
    return [by_index[i] for i in range(count)]


def _assembled(keys: list[str], entries: dict[str, dict[str, Any]], top: dict[str, Any]) -> dict[str, Any]:
    """The embeddings list for the request's items in their order, around the answer's other fields."""
    data = [{"object": "embedding", "index": i, **entries[key]["item"]} | {"index": i} for i, key in enumerate(keys)]
    return {**top, "object": top.get("object") or "list", "data": data}


def _answer(body: dict[str, Any]) -> Answer:
    # an embeddings list, not a chat completion: the answer carries it as it carries any complete body
    return Answer(body=cast(ChatCompletion, body))
