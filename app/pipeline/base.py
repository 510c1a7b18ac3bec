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


#: the OpenAI operations a request can be (``ModelRequest.endpoint``)
CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
#: a Responses API request forwarded as the client sent it (see :mod:`app.pipeline.forward`)
RESPONSES = "responses"


def _text_of(value: Any) -> list[str]:
    """The strings in a prompt or an embedding input: a string, a list of strings (token arrays have none)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _tokens_in(value: Any) -> int:
    """About how many tokens a prompt or an embedding input holds (~4 characters a token; token arrays counted)."""
    if isinstance(value, str):
        return len(value) // 4 + 1
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_tokens_in(v) for v in value)
    return 1


@dataclass(slots=True)
class ModelRequest:
    """A validated request to one of the OpenAI model endpoints; ``body`` is the OpenAI JSON of
    that endpoint (``endpoint``: chat, completions or embeddings) as the gateway will send it.

    Requests in other protocols (Responses, Anthropic Messages) arrive here translated to chat.
    ``raw`` is the body's bytes as they came (empty when the request was built otherwise): equal
    bytes mean an equal body, so work that depends only on the body can be remembered by them.
    """

    body: dict[str, Any]
    raw: bytes = b""
    endpoint: str = CHAT

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
        """The text the caller wrote (user messages, the prompt, the inputs), for routing rules and the log."""
        if self.endpoint == COMPLETIONS:
            return "\n".join(_text_of(self.body.get("prompt")))
        if self.endpoint == EMBEDDINGS:
            return "\n".join(_text_of(self.body.get("input")))
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
        if self.endpoint == EMBEDDINGS:
            return _tokens_in(self.body.get("input"))
        if self.endpoint == COMPLETIONS:
            prompt = _tokens_in(self.body.get("prompt"))
            limit = self.body.get("max_tokens") or 16
        else:
            chars = 0
            for m in self.body["messages"]:  # a loop, not sum() over a generator: this runs on every request
                chars += len(str(m.get("content") or ""))
            prompt = chars // 4 + 1
            limit = self.body.get("max_completion_tokens") or self.body.get("max_tokens") or 256
        return prompt + int(limit) * int(self.body.get("n") or 1)


@dataclass(slots=True)
class Forwardable(ModelRequest):
    """A request translated to chat (``body``) that a provider speaking the client's own API may
    take as it came (``forward``, its ``model`` still the client's; see :mod:`app.pipeline.forward`).
    ``refusal`` is why chat cannot say it, None when it can (``body`` is then only an estimate, for
    the limits and the log)."""

    forward: dict[str, Any] = field(default_factory=dict)
    refusal: Exception | None = None


@dataclass(slots=True)
class RequestContext:
    """Per-request state the layers fill in; read at the end for headers, metrics and the log."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    #: the operation the client asked for, in its protocol's words (chat, completions, embeddings, responses, messages)
    endpoint: str = CHAT
    #: the W3C trace id of the request's server span, when tracing is on
    trace_id: str | None = None
    agent: str = "anonymous"
    key: KeyConfig | None = None
    cache_namespace: str = "default"
    cache_read: bool = True
    cache_write: bool = True
    #: SHA-256 of the fields that decide the answer; computed once, shared by cache and dedupe
    cache_key: str | None = None
    route: str = ""
    #: how an ``auto`` request's route was chosen (classifier, rule, default) and the classifier's confidence
    route_by: str | None = None
    route_score: float | None = None
    deployments: list[Deployment] = field(default_factory=list)
    strategy: str = "ordered"
    deployment: Deployment | None = None
    backend: str = ""
    cache_status: str = "bypass"
    #: the similarity of the stored request that answered a semantic hit
    cache_similarity: float | None = None
    dedupe_role: str | None = None
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    upstream_seconds: float = 0.0
    ttft_seconds: float | None = None
    error_type: str | None = None

    @property
    def paid_upstream(self) -> bool:
        """Whether this request's own upstream call produced its answer (not a cache hit, not a follower)."""
        return self.cache_status not in ("hit", "semantic-hit") and self.dedupe_role != "follower"

    def identify(self, key: KeyConfig | None) -> None:
        """The caller, from its gateway key (None: no keys are configured, the caller is anonymous)."""
        if key is not None:
            self.key = key
            self.agent = key.agent
            self.cache_namespace = key.cache_namespace


class Handler(Protocol):
    """A pipeline stage: takes the request and its context, returns the result or raises."""

    async def __call__(self, request: ModelRequest, ctx: RequestContext) -> Answer: ...
