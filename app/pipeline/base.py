"""What flows through the pipeline: the request, its context, and the handler shape (the answer is in :mod:`app.pipeline.answer`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.config import KeyConfig
from app.pipeline.answer import Answer


@dataclass(frozen=True, slots=True)
class Deployment:
    """One place a public model can be served: ``provider/model-id``."""

    provider: str
    model: str

    @classmethod
    def parse(cls, text: str) -> Deployment:
        provider, _, model = text.partition("/")
        return cls(provider, model)

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(slots=True)
class ChatRequest:
    """A validated chat completion request; ``body`` is the OpenAI JSON as the client sent it.

    ``raw`` is the body's bytes as they came (empty when the request was built otherwise): equal
    bytes mean an equal body, so work that depends only on the body can be remembered by them.
    """

    body: dict[str, Any]
    raw: bytes = b""

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return bool(self.stream and isinstance(opts, dict) and opts.get("include_usage"))

    def prompt_text(self) -> str:
        """The text of the user messages, for routing rules and token estimates."""
        parts: list[str] = []
        for msg in self.body["messages"]:
            if msg.get("role") != "user":
                continue
            content = msg.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)

    def estimated_tokens(self) -> int:
        """Prompt size (~4 characters a token) plus the most the answer may take."""
        chars = sum(len(str(m.get("content") or "")) for m in self.body["messages"])
        limit = self.body.get("max_completion_tokens") or self.body.get("max_tokens") or 256
        return chars // 4 + 1 + int(limit) * int(self.body.get("n") or 1)


@dataclass(slots=True)
class RequestContext:
    """Per-request state the layers fill in; read at the end for headers, metrics and the log."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    agent: str = "anonymous"
    key: KeyConfig | None = None
    cache_namespace: str = "default"
    cache_read: bool = True
    cache_write: bool = True
    #: SHA-256 of the fields that decide the answer; computed once, shared by cache and dedupe
    cache_key: str | None = None
    route: str = ""
    deployments: list[Deployment] = field(default_factory=list)
    strategy: str = "ordered"
    deployment: Deployment | None = None
    backend: str = ""
    cache_status: str = "bypass"
    dedupe_role: str | None = None
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    upstream_seconds: float = 0.0
    ttft_seconds: float | None = None
    error_type: str | None = None

    @property
    def paid_upstream(self) -> bool:
        """Whether this request's own upstream call produced its answer (not a cache hit, not a follower)."""
        return self.cache_status != "hit" and self.dedupe_role != "follower"

    def identify(self, key: KeyConfig | None) -> None:
        """The caller, from its gateway key (None: no keys are configured, the caller is anonymous)."""
        if key is not None:
            self.key = key
            self.agent = key.agent
            self.cache_namespace = key.cache_namespace


class Handler(Protocol):
    """A pipeline stage: takes the request and its context, returns the result or raises."""

    async def __call__(self, request: ChatRequest, ctx: RequestContext) -> Answer: ...
