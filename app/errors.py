"""The gateway's error tree; every error knows its HTTP status and OpenAI error type.

    GatewayError                      500 internal_error
    ├── BadRequestError               400 invalid_request_error
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDeniedError         403 permission_error
    ├── NotFoundError                 404 not_found_error
    ├── MethodNotAllowedError         405 invalid_request_error (+ Allow)
    ├── PayloadTooLargeError          413 invalid_request_error
    ├── RateLimitError                429 rate_limit_error (+ Retry-After)
    ├── ServiceUnavailableError       503 service_unavailable (+ Retry-After)
    └── UpstreamError                 502 upstream_error   (a provider failed)
        ├── UpstreamTimeoutError      504 timeout
        ├── UpstreamRateLimitError    429 from the provider (+ its Retry-After)
        ├── UpstreamAuthError         401/403 from the provider: our key is bad
        ├── UpstreamBadResponseError  the provider answered something that is not OpenAI
        ├── UpstreamClientError       the provider rejected the request itself (400/404/422)
        │   └── ContextLengthError    400: the prompt does not fit this deployment (failover moves on)
        └── BackendUnavailableError   503: skipped without a call (circuit open, queue full)
            └── BackendRateLimitedError  429: skipped (provider budget spent, cooling after a 429)

Vendor exceptions are translated at the provider boundary (``raise UpstreamError(...) from exc``).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

#: what the database raises when it is out of reach: answered 503, not 500
UNAVAILABLE = (OSError, OperationalError, InterfaceError, SQLAlchemyTimeoutError)


class GatewayError(Exception):
    """Base of every error the gateway answers with."""

    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        """The error in Anthropic's shape, for clients of ``/v1/messages``."""
        message = self.message
        # Anthropic's clients (Claude Code among them) recognise an overlong prompt by these words
        if self.code == "context_length_exceeded" and not message.lower().startswith("prompt is too long"):
            message = "prompt is too long: " + message
        return anthropic_error(self.status, message)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after + 0.999)))}


#: where clients speak Anthropic's Messages API: every error there is in Anthropic's shape
ANTHROPIC_PATH = "/v1/messages"

#: Anthropic's error type for each status the gateway answers with (others: by class of status)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def speaks_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class BadRequestError(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    error_type = "permission_error"


class NotFoundError(GatewayError):
    status = 404
    error_type = "not_found_error"


class MethodNotAllowedError(GatewayError):
    status = 405
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class PayloadTooLargeError(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(GatewayError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailableError(GatewayError):
    status = 503
    error_type = "service_unavailable"


class UpstreamError(GatewayError):
    """A provider call failed; ``retryable`` tells failover whether another try may help."""

    status = 502
    error_type = "upstream_error"
    retryable = True
    #: counts against the deployment's circuit breaker
    breaker_failure = True

    def __init__(self, message: str, *, backend: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.backend = backend


class UpstreamTimeoutError(UpstreamError):
    status = 504
    error_type = "timeout"
    code = "upstream_timeout"


class UpstreamRateLimitError(UpstreamError):
    status = 429
    error_type = "rate_limit_error"
    code = "upstream_rate_limited"
    breaker_failure = False


class UpstreamAuthError(UpstreamError):
    code = "upstream_auth_failed"


class UpstreamBadResponseError(UpstreamError):
    code = "upstream_bad_response"


class UpstreamClientError(UpstreamError):
    """The provider refused the request itself: the caller's mistake, not the backend's.

    The client gets the provider's own ``type``, ``code`` and ``param`` (``context_length_exceeded``
    on ``messages`` must stay tellable from any other 400).
    """

    retryable = False
    breaker_failure = False

    def __init__(self, message: str, *, status: int, error_type: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status if status in (400, 404, 413, 422) else 400
        self.error_type = error_type or ("not_found_error" if self.status == 404 else "invalid_request_error")


class ContextLengthError(UpstreamClientError):
    """The prompt (with ``max_tokens``) does not fit this deployment's context window: another
    deployment of the model may take it, so failover moves on; no breaker failure."""

    retryable = True
    code = "context_length_exceeded"
    #: no call was made: the model's ``context_window`` for the deployment ruled it out
    skipped = False

    def __init__(self, message: str, *, status: int = 400, endpoint: str = "chat", **kwargs: Any) -> None:
        if kwargs.get("param") is None:
            kwargs["param"] = prompt_param(endpoint)
        if kwargs.get("code") is None:
            kwargs.pop("code", None)
        super().__init__(message, status=status, **kwargs)


#: the request field that holds the prompt, per endpoint: what a too-long prompt's 400 names when
#: the provider names none (the Messages API's is ``messages``, as chat's)
_PROMPT_PARAMS = {"completions": "prompt", "embeddings": "input"}


def prompt_param(endpoint: str) -> str:
    """The field holding the prompt of a request to ``endpoint`` (chat, completions, embeddings, ...)."""
    return _PROMPT_PARAMS.get(endpoint, "messages")


#: how providers say a prompt is too long for the model (their code, or these words in the message):
#: OpenAI, vLLM, DeepSeek, OpenRouter "maximum context length"; vLLM's engine "longer than the
#: maximum model length"; Groq, Cerebras "reduce the length of the messages"; Mistral "too large
#: for model with N maximum context length"; Anthropic "prompt is too long"; Gemini "input token
#: count (N) exceeds the maximum number of tokens"; xAI "maximum prompt length is N but the request
#: contains"; Together "the input (N tokens) is longer than the model's context length"; TGI
#: "`inputs` tokens + `max_new_tokens` must be <="; llama.cpp "exceeds the available context size";
#: Ollama "prompt too long; exceeded max context length"
_CONTEXT_CODES = frozenset({"context_length_exceeded", "context_window_exceeded", "model_context_window_exceeded"})
_CONTEXT_WORDS = re.compile(
    r"maximum context length|max context length|context length exceeded|context_length_exceeded"
    r"|exceeds? (?:the )?(?:model'?s? )?context (?:window|length)|longer than the (?:model'?s? )?(?:context length|maximum model length)"
    r"|context window (?:exceeded|is exceeded|too small)|reduce the length of the (?:messages|prompt|input)|too large for model with"
    r"|prompt is too long|input is too long for|input token count.{0,40}exceeds the maximum|maximum prompt length is \d+"
    r"|tokens \+ `?max_new_tokens`? must be|exceeds the available context size",
    re.IGNORECASE,
)


def says_too_long(message: str) -> bool:
    """Whether a provider's (or vLLM's) error message says the prompt does not fit the model's context."""
    return _CONTEXT_WORDS.search(message) is not None


class ProviderErrorFields(NamedTuple):
    """What a provider's error body says, whichever shape it came in."""

    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None


def provider_error_fields(body: Any) -> ProviderErrorFields:
    """The message, type, code and param of a provider's decoded error body.

    OpenAI's shape nests them (``{"error": {"message": ..., "code": ...}}``; some put a bare string
    under ``error``); Mistral's puts them at the top (``{"object": "error", "message": ...,
    "code": "3051"}``). A code that comes as a number is given as text; a field that is not a
    scalar is absent. A body in neither shape gives an empty message.
    """
    if not isinstance(body, dict):
        return ProviderErrorFields("")
    nested = body.get("error")
    if isinstance(nested, str):
        return ProviderErrorFields(nested)
    fields = nested if isinstance(nested, dict) else body
    message = fields.get("message")
    return ProviderErrorFields(
        message if isinstance(message, str) else "",
        type=_scalar(fields.get("type")),
        code=_scalar(fields.get("code")),
        param=_scalar(fields.get("param")),
    )


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    return str(value) or None


def as_context_length(exc: GatewayError, endpoint: str = "chat") -> ContextLengthError | None:
    """``exc`` as a :class:`ContextLengthError` when it is a provider's 400/413/422 saying the prompt
    is too long for the model (or the in-process engine's 400 coded so); None for any other error.

    A provider that names no field gets the one holding the prompt on ``endpoint``."""
    if isinstance(exc, ContextLengthError):
        return exc
    if type(exc) is BadRequestError:
        if exc.code not in _CONTEXT_CODES:
            return None
        return ContextLengthError(exc.message, code=exc.code, param=exc.param, endpoint=endpoint)
    if not isinstance(exc, UpstreamClientError) or exc.status not in (400, 413, 422):
        return None
    if exc.code not in _CONTEXT_CODES and not says_too_long(exc.message):
        return None
    return ContextLengthError(exc.message, status=400, backend=exc.backend, error_type=exc.error_type, code=exc.code, param=exc.param, endpoint=endpoint)


class BackendUnavailableError(UpstreamError):
    """A deployment skipped without calling it: its circuit is open or its queue is full."""

    status = 503
    error_type = "service_unavailable"
    code = "backend_unavailable"
    breaker_failure = False


class BackendRateLimitedError(BackendUnavailableError):
    """A deployment skipped because its provider budget is spent or it asked us to wait."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


def database_unavailable() -> ServiceUnavailableError:
    # the database went away under the request: the caller may well succeed a little later
    return ServiceUnavailableError("The gateway's database is unavailable; try again shortly.", code="database_unavailable", retry_after=5)
