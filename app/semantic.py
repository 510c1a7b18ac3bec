"""The semantic cache's parts: which requests may use it, what must agree besides meaning, and the index.

Cosine similarity alone cannot tell a paraphrase from a different question in the same words
("convert 5 miles" and "convert 8 miles" are 0.85 alike), so a candidate found by similarity must
also pass :func:`agree`: the two prompts' numbers, negations, quoted strings, named entities, dates
and programming languages must be the same. The index keeps, per *scope* (route, namespace and
every other part of the request but the last user message), each stored request's vector and
those features — never its text — and points at the exact cache's entry that holds the answer.
It is bounded, persisted in the ``semantic_entries`` table beside the exact cache, and shared by
replicas through that table: each replica reads the rows the others add.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.pipeline.base import CHAT, ModelRequest, RequestContext
from app.pipeline.cache_key import NEUTRAL_FIELDS
from app.storage.models import SemanticEntry
from app.storage.write_behind import WriteBehind

log = logging.getLogger("admiral.semantic")

_WORD = re.compile(r"[A-Za-z][A-Za-z'+#.-]*[A-Za-z+#]|[A-Za-z]")
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|(?<!\w)'([^']+)'(?!\w)|`([^`]+)`")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*)([A-Z][\w'-]*)")
#: capitalised but no name
_PRONOUNS = frozenset({"I", "I'm", "I've", "I'd", "I'll", "OK", "Ok"})
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen "
    "nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion trillion dozen half "
    "quarter twice thrice first second third fourth fifth sixth seventh eighth ninth tenth once double triple".split()
)
_NEGATIONS = frozenset(
    "not no never none nobody nothing nowhere neither nor without cannot except unless hardly barely "
    "can't don't doesn't didn't isn't aren't wasn't weren't won't wouldn't shouldn't couldn't mustn't hasn't haven't hadn't".split()
)
_DATES = frozenset(
    "january february march april may june july august september october november december jan feb mar apr jun jul aug sep "
    "sept oct nov dec monday tuesday wednesday thursday friday saturday sunday today tomorrow yesterday tonight weekend "
    "morning evening night noon midnight spring summer autumn fall winter".split()
)
_LANGUAGES = frozenset(
    "python java javascript typescript rust go golang c c++ c# cpp csharp ruby php kotlin swift scala haskell perl r sql "
    "bash shell zsh powershell lua dart elixir erlang clojure julia matlab fortran cobol html css ocaml f# fsharp groovy "
    "objective-c assembly wasm solidity zig nim crystal vb.net visual basic delphi pascal prolog lisp scheme racket "
    "react vue angular svelte django flask rails spring node.js nodejs deno pandas numpy".split()
)


@dataclass(frozen=True, slots=True)
class Features:
    """What must be equal in two prompts for one's answer to serve the other (``words``: every word, lower-cased)."""

    numbers: frozenset[str]
    negations: frozenset[str]
    quoted: frozenset[str]
    #: named entities in the order they first appear ("Fahrenheit to Celsius" is not "Celsius to Fahrenheit")
    entities: tuple[str, ...]
    dates: frozenset[str]
    languages: frozenset[str]
    words: frozenset[str]

    def encode(self) -> bytes:
        return orjson.dumps({f: list(v) if isinstance(v := getattr(self, f), tuple) else sorted(v) for f in self.__slots__})

    @classmethod
    def decode(cls, raw: bytes) -> Features:
        data = orjson.loads(raw)
        return cls(**{f: tuple(data.get(f, ())) if f == "entities" else frozenset(data.get(f, ())) for f in cls.__slots__})


def features(text: str) -> Features:
    words = [w.lower() for w in _WORD.findall(text)]
    starts = {m.group(1) for m in _SENTENCE_START.finditer(text)}
    entities = dict.fromkeys(w.lower() for w in _WORD.findall(text) if w[0].isupper() and w not in starts and w not in _PRONOUNS and w.lower() not in _DATES)
    negations = {w for w in words if w in _NEGATIONS or w.endswith("n't")}
    return Features(
        numbers=frozenset(_NUMBER.findall(text)) | frozenset(w for w in words if w in _NUMBER_WORDS),
        negations=frozenset(negations),
        quoted=frozenset(next(g for g in m.groups() if g is not None).strip().lower() for m in _QUOTED.finditer(text)),
        entities=tuple(entities),
        dates=frozenset(w for w in words if w in _DATES),
        languages=frozenset(w for w in words if w in _LANGUAGES),
        words=frozenset(words),
    )


def agree(a: Features, b: Features) -> bool:
    """Whether two prompts that mean nearly the same may share an answer.

    Numbers, negations, quoted strings, dates and programming languages must be the same sets;
    a named entity (a capitalised word inside a sentence) of either must be a word of the other,
    so "the Eiffel Tower" matches "the eiffel tower" but not "the Louvre".
    """
    if a.numbers != b.numbers or a.negations != b.negations or a.quoted != b.quoted or a.dates != b.dates or a.languages != b.languages:
        return False
    if not (set(a.entities) <= b.words and set(b.entities) <= a.words):
        return False
    shared = set(a.entities) & set(b.entities)
    return [e for e in a.entities if e in shared] == [e for e in b.entities if e in shared]


def eligible(request: ModelRequest, max_temperature: float) -> str | None:
    """The last user message's text when the semantic cache may answer this request, else None.

    Only chat requests ending in a user message with text, without tools or functions, one choice,
    and a temperature (1 when unset, OpenAI's default) no higher than ``max_temperature``.
    """
    body = request.body
    if request.endpoint != CHAT or body.get("tools") or body.get("functions") or (body.get("n") or 1) > 1:
        return None
    temperature = body.get("temperature")
    if (1.0 if temperature is None else float(temperature)) > max_temperature:
        return None
    messages = body["messages"]
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return None  # images, audio, files: their meaning is not in the text
        content = "\n".join(str(p.get("text") or "") for p in content)
    return content if isinstance(content, str) and content.strip() else None


def scope_of(request: ModelRequest, ctx: RequestContext) -> str:
    """SHA-256 of everything that must be equal for a semantic match: route, namespace, every
    answer-deciding field, and every message before the last."""
    body = {k: v for k, v in request.body.items() if v is not None and k not in NEUTRAL_FIELDS}
    body["messages"] = request.body["messages"][:-1]
    material = {"route": ctx.route, "namespace": ctx.cache_namespace, "request": body}
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(slots=True)
class Entry:
    cache_key: str
    vector: Any  # a unit float32 torch vector
    features: Features
    expires_at: float


@dataclass(frozen=True, slots=True)
class Match:
    cache_key: str
    similarity: float


class SemanticIndex:
    """Vectors of stored requests per scope, bounded, persisted and shared through the database."""

    def __init__(self, db: AsyncEngine, *, max_entries: int, ttl_s: float, sync_interval_s: float = 2.0) -> None:
        self._db = db
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        #: scope -> cache key -> entry (insertion order: the oldest first)
        self._scopes: dict[str, OrderedDict[str, Entry]] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._pending: list[dict[str, Any]] = []
        self._last_id = 0
        # a failed round is tried again after one sync interval
        self._writer = WriteBehind(
            self._sync, name="admiral-semantic-index", interval_s=sync_interval_s, backoff_s=sync_interval_s, max_backoff_s=sync_interval_s
        )
        self._swept = 0.0

    def __len__(self) -> int:
        return len(self._order)

    async def start(self) -> None:
        await self._read_new(initial=True)
        self._swept = time.monotonic()
        self._writer.start()

    async def aclose(self) -> None:
        await self._writer.stop()
        await self._flush()

    def nearest(self, scope: str, vector: Any, threshold: float, wanted: Features) -> Match | None:
        """The most similar live entry of ``scope`` at or above ``threshold`` whose features agree."""
        entries = self._scopes.get(scope)
        if not entries:
            return None
        import torch

        now = time.time()
        live = [e for e in entries.values() if e.expires_at > now]
        if not live:
            return None
        similarity = torch.stack([e.vector for e in live]) @ vector
        order = torch.argsort(similarity, descending=True).tolist()
        for index in order:
            score = float(similarity[index])
            if score < threshold:
                return None
            if agree(wanted, live[index].features):
                return Match(live[index].cache_key, score)
        return None

    def add(self, scope: str, cache_key: str, vector: Any, wanted: Features) -> None:
        """Index a stored request (this replica at once, the others through the table)."""
        expires_at = time.time() + self._ttl_s
        self._keep(scope, Entry(cache_key, vector, wanted, expires_at))
        self._pending.append(
            {"scope": scope, "cache_key": cache_key, "vector": vector.numpy().tobytes(), "features": wanted.encode(), "created_at": time.time(), "expires_at": expires_at}
        )
        self._writer.wake()

    def forget(self, scope: str, cache_key: str) -> None:
        """Drop an entry whose answer left the exact cache."""
        entries = self._scopes.get(scope)
        if entries is not None and entries.pop(cache_key, None) is not None:
            self._order.pop((scope, cache_key), None)

    def _keep(self, scope: str, entry: Entry) -> None:
        entries = self._scopes.setdefault(scope, OrderedDict())
        entries[entry.cache_key] = entry
        self._order[(scope, entry.cache_key)] = None
        self._order.move_to_end((scope, entry.cache_key))
        while len(self._order) > self._max_entries:
            (old_scope, old_key), _ = self._order.popitem(last=False)
            bucket = self._scopes.get(old_scope)
            if bucket is not None:
                bucket.pop(old_key, None)
                if not bucket:
                    del self._scopes[old_scope]

    async def _sync(self) -> bool:
        """Write what was added here, read what the other replicas added, sweep once a minute."""
        try:
            await self._flush()
            await self._read_new()
            if time.monotonic() - self._swept > 60:
                self._swept = time.monotonic()
                async with self._db.begin() as conn:
                    await conn.execute(delete(SemanticEntry).where(SemanticEntry.expires_at <= time.time()))
        except Exception as exc:  # the database may come back; the in-process index goes on
            log.warning("semantic index: database work failed, will retry: %s: %s", type(exc).__name__, str(exc)[:200])
            return False
        return True

    async def _flush(self) -> None:
        rows, self._pending = self._pending, []
        if rows:
            async with self._db.begin() as conn:
                await conn.execute(insert(SemanticEntry), rows)

    async def _read_new(self, initial: bool = False) -> None:
        import numpy
        import torch

        query = select(SemanticEntry.id, SemanticEntry.scope, SemanticEntry.cache_key, SemanticEntry.vector, SemanticEntry.features, SemanticEntry.expires_at).where(
            SemanticEntry.id > self._last_id, SemanticEntry.expires_at > time.time()
        )
        if initial:
            query = query.order_by(SemanticEntry.id.desc()).limit(self._max_entries)
        else:
            query = query.order_by(SemanticEntry.id)
        async with self._db.connect() as conn:
            rows = (await conn.execute(query)).all()
        for row in sorted(rows, key=lambda r: r.id):
            self._last_id = max(self._last_id, row.id)
            entries = self._scopes.get(row.scope)
            if entries is not None and row.cache_key in entries:
                continue  # this replica's own, indexed when it was added
            vector = torch.from_numpy(numpy.frombuffer(row.vector, dtype=numpy.float32).copy())
            self._keep(row.scope, Entry(row.cache_key, vector, Features.decode(row.features), row.expires_at))
