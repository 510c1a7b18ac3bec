"""Tables: the request log, the persistent tier of the response cache, the semantic cache's index,
stored Responses API responses."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Float, Index, Integer, LargeBinary, MetaData, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {"ix": "ix_%(table_name)s_%(column_0_N_name)s", "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class RequestLog(Base):
    """One row per answered model request (any endpoint); no prompt text unless log_content is on."""

    __tablename__ = "request_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    request_id: Mapped[str] = mapped_column(String(128), nullable=False)
    agent: Mapped[str] = mapped_column(String(128), nullable=False)
    requested_model: Mapped[str] = mapped_column(String(200), nullable=False)
    route: Mapped[str] = mapped_column(String(200), nullable=False)
    backend: Mapped[str | None] = mapped_column(String(128))
    deployment_model: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int] = mapped_column(Integer, nullable=False)
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)
    cache: Mapped[str] = mapped_column(String(16), nullable=False)
    dedupe: Mapped[str | None] = mapped_column(String(16))
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    upstream_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error_type: Mapped[str | None] = mapped_column(String(64))
    prompt: Mapped[str | None] = mapped_column(Text)
    completion: Mapped[str | None] = mapped_column(Text)
    #: the client protocol's operation: chat, completions, embeddings, responses, messages
    endpoint: Mapped[str] = mapped_column(String(32), nullable=False, default="chat", server_default="chat")
    #: the W3C trace id (32 hex digits) of the request's server span, when tracing is on
    trace_id: Mapped[str | None] = mapped_column(String(32))
    #: how an ``auto`` request's route was chosen (classifier, rule, default) and the classifier's confidence
    route_by: Mapped[str | None] = mapped_column(String(16))
    route_score: Mapped[float | None] = mapped_column(Float)
    #: the answer's tokens at the deployment's price, and at the reference price (US dollars);
    #: paid when the request called upstream, saved when the cache or a leader answered it
    price_usd: Mapped[float] = mapped_column(Float, nullable=False, default=0.0, server_default="0")
    #: the token counts are the gateway's estimate (the provider sent no usage)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    reference_usd: Mapped[float] = mapped_column(Float, nullable=False, default=0.0, server_default="0")

    __table_args__ = (Index(None, "ts"), Index(None, "agent", "ts"))


class CacheEntry(Base):
    """A cached complete response, keyed by the SHA-256 of the request's deciding fields."""

    __tablename__ = "cache_entries"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(128), nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)

    __table_args__ = (Index(None, "expires_at"),)


class StoredResponse(Base):
    """A Responses API response kept for ``GET /v1/responses/{id}`` and ``previous_response_id``.

    ``conversation`` holds (as JSON ``{"messages", "input"}``) the chat messages that led to it, its
    own answer included, so that a continuation sends them without walking the chain, and the
    request's input as Responses items (for ``input_items``); ``response`` is the response object
    as the client got it. Each belongs to the agent that made it; retention follows the request log's.
    """

    __tablename__ = "stored_responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    conversation: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    response: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)

    __table_args__ = (Index(None, "created_at"),)


class SemanticEntry(Base):
    """A stored request in the semantic cache's index: its vector and the features a match must
    share (never its text), pointing at the exact cache's entry that holds the answer."""

    __tablename__ = "semantic_entries"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    #: SHA-256 of what must be equal besides the last user message (route, namespace, parameters, earlier turns)
    scope: Mapped[str] = mapped_column(String(64), nullable=False)
    cache_key: Mapped[str] = mapped_column(String(64), nullable=False)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    features: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)

    __table_args__ = (Index(None, "expires_at"),)
