"""The config file: YAML with ``${ENV}`` interpolation, validated by pydantic (unknown keys fail)."""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A config mistake, said as ``file: key.path: reason``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    shutdown_grace_s: float = Field(30.0, ge=0)
    # the HTTP edge (app/edge.py); each limit is answered the way nginx answers it
    #: a request head not complete this long after its first byte (or after the connection opened): closed
    header_timeout_s: float = Field(10.0, gt=0)
    #: a request head (request line and headers) larger than this: 431
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)
    #: a body still incomplete gets judged every body_timeout_s: less than body_min_bytes_per_s over it: 408
    body_timeout_s: float = Field(10.0, gt=0)
    body_min_bytes_per_s: int = Field(1024, ge=0)
    #: a keep-alive connection with no request for this long: closed
    idle_timeout_s: float = Field(75.0, gt=0)
    #: open connections per process; beyond it, the oldest one waiting for a request is closed, else the new one gets 503
    max_connections: int = Field(4096, ge=8)


class KeyConfig(_Strict):
    key: SecretStr
    agent: str = Field(min_length=1)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    #: requests and tokens per day (the day of ``limits.day_timezone``)
    rpd: int | None = Field(None, ge=1)
    tpd: int | None = Field(None, ge=1)
    cache_namespace: str = "default"
    #: the public model names this key may use (absent: all)
    models: list[str] | None = None
    #: the semantic cache for this key's requests (absent: as ``cache.semantic.enabled`` and the model say)
    semantic_cache: bool | None = None

    @field_validator("models")
    @classmethod
    def _some_models(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty list would allow no model at all; leave 'models' out to allow every model")
        return v

    @field_validator("key")
    @classmethod
    def _not_empty(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 8:
            raise ValueError("a gateway key needs at least 8 characters")
        return v


class Preset(_Strict):
    base_url: str
    key_env: str | None
    default_model: str
    #: the provider's parameter profile (see ProviderConfig): what it refuses, what it names otherwise
    drop_params: tuple[str, ...] = ()
    rename_params: dict[str, str] = {}
    max_n: int | None = None


#: A preset is a default base_url, the environment variable holding its key, and the quirks the
#: provider documents (parameters it answers 400/422 to): README "Providers" cites each one.
PRESETS: dict[str, Preset] = {
    "cerebras": Preset(
        base_url="https://api.cerebras.ai/v1",
        key_env="CEREBRAS_API_KEY",
        default_model="llama3.1-8b",
        drop_params=("frequency_penalty", "presence_penalty", "logit_bias", "parallel_tool_calls", "service_tier"),
    ),
    "groq": Preset(
        base_url="https://api.groq.com/openai/v1",
        key_env="GROQ_API_KEY",
        default_model="llama-3.1-8b-instant",
        drop_params=("logprobs", "top_logprobs", "logit_bias", "messages[].name"),
        max_n=1,
    ),
    "together": Preset(base_url="https://api.together.xyz/v1", key_env="TOGETHER_API_KEY", default_model="meta-llama/Llama-3.2-3B-Instruct-Turbo"),
    "mistral": Preset(
        base_url="https://api.mistral.ai/v1",
        key_env="MISTRAL_API_KEY",
        default_model="mistral-small-latest",
        drop_params=("stream_options", "messages[].name"),
        rename_params={"seed": "random_seed", "max_completion_tokens": "max_tokens"},
    ),
    "deepseek": Preset(base_url="https://api.deepseek.com/v1", key_env="DEEPSEEK_API_KEY", default_model="deepseek-chat"),
    "xai": Preset(base_url="https://api.x.ai/v1", key_env="XAI_API_KEY", default_model="grok-3-mini"),
    "openrouter": Preset(base_url="https://openrouter.ai/api/v1", key_env="OPENROUTER_API_KEY", default_model="meta-llama/llama-3.1-8b-instruct"),
    "gemini": Preset(
        base_url="https://generativelanguage.googleapis.com/v1beta/openai",
        key_env="GEMINI_API_KEY",
        default_model="gemini-2.0-flash",
        drop_params=("frequency_penalty", "presence_penalty", "prompt_cache_key", "web_search_options"),
    ),
    # Ollama ignores fields it does not take: without the split, n > 1 would quietly answer one choice
    "ollama": Preset(base_url="http://127.0.0.1:11434/v1", key_env=None, default_model="llama3.2", max_n=1),
    "vllm-server": Preset(base_url="http://127.0.0.1:8001/v1", key_env="VLLM_SERVER_API_KEY", default_model="default"),
}


#: body fields without which no call makes sense: never dropped or renamed by a profile
_ESSENTIAL_PARAMS = frozenset({"model", "messages", "prompt", "input", "stream", "role", "content"})


class ProviderConfig(_Strict):
    kind: Literal["openai", "vllm", "demo"]
    preset: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    headers: dict[str, str] = {}
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    rpd: int | None = Field(None, ge=1)
    tpd: int | None = Field(None, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    first_byte_timeout_s: float | None = Field(None, gt=0)
    max_concurrency: int = Field(256, ge=1)
    queue_timeout_s: float = Field(5.0, ge=0)
    # parameter profile (a preset's quirks are the default): body fields removed before sending
    # (``messages[].NAME`` removes a key from each message), fields sent under another name, and the
    # most choices one call may ask for (a request for more is split into several calls)
    drop_params: list[str] = []
    rename_params: dict[str, str] = {}
    max_n: int | None = Field(None, ge=1)
    # kind: openai: ``native`` forwards Responses requests to its Responses API (/responses) as they
    # came, and sends its chat requests there re-encoded, for models served only there
    responses: Literal["translated", "native"] = "translated"
    # kind: vllm
    model: str | None = None
    engine: dict[str, Any] = {}
    # kind: demo
    latency_s: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _kind_fields(self) -> ProviderConfig:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")
        if self.kind == "vllm" and not self.model:
            raise ValueError("a provider of kind 'vllm' needs 'model' (a local model directory)")
        if self.kind != "vllm" and (self.model or self.engine):
            raise ValueError("'model' and 'engine' apply to kind 'vllm' only")
        if self.responses == "native" and self.kind != "openai":
            raise ValueError("'responses: native' applies to kind 'openai' only")
        for name in [*self.drop_params, *self.rename_params, *self.rename_params.values()]:
            field = name.removeprefix("messages[].")
            if not field or field in _ESSENTIAL_PARAMS:
                raise ValueError(f"parameter profile: {name!r} cannot be dropped or renamed")
        both = set(self.drop_params) & set(self.rename_params)
        if both:
            raise ValueError(f"parameter profile: {sorted(both)} both dropped and renamed")
        if any(name.startswith("messages[].") for name in self.rename_params):
            raise ValueError("rename_params: only top-level body fields can be renamed")
        return self


class Price(_Strict):
    """US dollars per million tokens (0: the free tiers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)


class ModelConfig(_Strict):
    deployments: list[str] = Field(min_length=1)
    strategy: Literal["ordered", "latency"] = "ordered"
    #: the semantic cache for requests routed here (absent: as ``cache.semantic.enabled`` says)
    semantic_cache: bool | None = None
    #: tokens (prompt + max_tokens) each deployment takes; a deployment entry may say its own
    #: (``{deployment: p/m, context_window: N}``), this is the default for the others
    context_window: int | None = Field(None, ge=1)
    #: deployment -> its context window, gathered from the entries that say one
    context_windows: dict[str, int] = {}
    #: what its deployments' tokens cost, and what they would cost on a paid reference model
    #: (a deployment entry may say its own ``price`` / ``reference_price``): the savings report
    price: Price | None = None
    reference_price: Price | None = None
    #: deployment -> its own price / reference price, gathered from the entries that say one
    prices: dict[str, Price] = {}
    reference_prices: dict[str, Price] = {}

    @model_validator(mode="before")
    @classmethod
    def _deployment_entries(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not isinstance(data.get("deployments"), list):
            return data
        names: list[Any] = []
        windows = dict(data.get("context_windows") or {})
        prices = {"price": dict(data.get("prices") or {}), "reference_price": dict(data.get("reference_prices") or {})}
        for i, entry in enumerate(data["deployments"]):
            if not isinstance(entry, Mapping):
                names.append(entry)
                continue
            unknown = set(entry) - {"deployment", "context_window", *prices}
            if unknown or not isinstance(entry.get("deployment"), str):
                shape = "{deployment: provider/model-id, context_window: tokens, price: {...}, reference_price: {...}}"
                raise ValueError(f"deployments[{i}]: an entry is 'provider/model-id' or {shape}" + (f" (unknown key {min(unknown)!r})" if unknown else ""))
            window = entry.get("context_window")
            if window is not None:
                if not isinstance(window, int) or isinstance(window, bool) or window < 1:
                    raise ValueError(f"deployments[{i}].context_window: a positive number of tokens")
                windows[entry["deployment"]] = window
            for field_name, found in prices.items():
                if entry.get(field_name) is not None:
                    found[entry["deployment"]] = entry[field_name]
            names.append(entry["deployment"])
        return {**data, "deployments": names, "context_windows": windows, "prices": prices["price"], "reference_prices": prices["reference_price"]}

    def window_of(self, deployment: str) -> int | None:
        """The context window configured for ``deployment`` (its own, else the model's), None when unsaid."""
        return self.context_windows.get(deployment, self.context_window)


class RuleCondition(_Strict):
    contains_any: list[str] | None = None
    regex: str | None = None
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    has_tools: bool | None = None
    agents: list[str] | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from None
        return v


class LimitsConfig(_Strict):
    """How the daily budgets (``rpd``/``tpd`` of keys and providers) count."""

    #: the time zone whose midnight starts a new day (an IANA name)
    day_timezone: str = "UTC"
    #: ``optimizer.budget_low`` fires once a day when a provider has used this share of a daily budget
    budget_low_share: float = Field(0.8, gt=0, le=1)

    @field_validator("day_timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as 'UTC' or 'Europe/Berlin')") from None
        return v


class RoutingRule(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    when: RuleCondition = Field(alias="if")
    model: str


class ClassifierConfig(_Strict):
    """The learned task router (``routing.classifier``): see :mod:`app.classifier`."""

    #: a packaged model's name or a local model directory
    model: str = "all-MiniLM-L6-v2"
    #: below this confidence (0..1) the keyword rules, then ``routing.default``, decide
    min_confidence: float = Field(0.35, ge=0, le=1)
    #: public model name -> example prompts of the tasks it should get
    routes: dict[str, list[str]] = {}
    #: built-in example category (code, reasoning, long, general) -> public model name, or null to leave it out
    categories: dict[str, str | None] = {}
    built_in_examples: bool = True


class RoutingConfig(_Strict):
    default: str | None = None
    classifier: ClassifierConfig | None = None
    rules: list[RoutingRule] = []


class SemanticCacheConfig(_Strict):
    """``cache.semantic``: answer a request from a stored one that means the same (see :mod:`app.semantic`)."""

    enabled: bool = False
    #: the least cosine similarity of the last user messages (chosen from measurements: README)
    threshold: float = Field(0.88, gt=0, le=1)
    #: a packaged model's name or a local model directory (the learned router's, when both are on, is shared)
    model: str = "all-MiniLM-L6-v2"
    #: requests asking a higher temperature (unset counts as 1) never use it
    max_temperature: float = Field(1.0, ge=0)
    #: stored requests indexed at most (the oldest leave first)
    max_entries: int = Field(100_000, ge=1)


class CacheConfig(_Strict):
    enabled: bool = True
    ttl_s: float = Field(3600.0, gt=0)
    memory_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    max_entry_bytes: int = Field(1024 * 1024, ge=1)
    max_total_bytes: int = Field(1024 * 1024 * 1024, ge=1)
    sweep_interval_s: float = Field(60.0, gt=0)
    semantic: SemanticCacheConfig = SemanticCacheConfig()


class DedupeConfig(_Strict):
    enabled: bool = True


class CircuitBreakerConfig(_Strict):
    failure_threshold: int = Field(5, ge=1)
    window_s: float = Field(60.0, gt=0)
    cooldown_s: float = Field(300.0, gt=0)
    rate_limit_cooldown_s: float = Field(5.0, ge=0)  # pause after a provider 429 without Retry-After


class RetryConfig(_Strict):
    attempts: int = Field(3, ge=1)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(8.0, ge=0)
    deadline_s: float = Field(120.0, gt=0)


class DatabaseConfig(_Strict):
    url: str = "sqlite+aiosqlite:///./admiral.db"
    log_content: bool = False
    retention_days: int = Field(30, ge=1)
    queue_size: int = Field(10000, ge=1)
    batch_size: int = Field(500, ge=1)


class StateConfig(_Strict):
    url: str = "memory://"
    key_prefix: str = "admiral:"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("memory://", "redis://", "rediss://")):
            raise ValueError("state.url must be memory:// or redis://host:port/db")
        return v


class AmqpConfig(_Strict):
    """``events.amqp``: every event published to a durable topic exchange on RabbitMQ."""

    url: SecretStr
    exchange: str = Field("admiral", min_length=1)
    routing_key_prefix: str = ""
    queue_size: int = Field(10000, ge=1)
    confirm_timeout_s: float = Field(10.0, gt=0)
    max_backoff_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith(("amqp://", "amqps://")):
            raise ValueError("events.amqp.url must be amqp://user:password@host:5672/vhost (or amqps://)")
        return v


class EventsConfig(_Strict):
    webhooks: list[str] = []
    amqp: AmqpConfig | None = None
    timeout_s: float = Field(5.0, gt=0)
    queue_size: int = Field(1000, ge=1)
    degraded_hit_rate: float = Field(0.2, ge=0, le=1)
    degraded_window_s: float = Field(300.0, gt=0)
    degraded_min_requests: int = Field(50, ge=1)


class TelemetryConfig(_Strict):
    """``telemetry``: OpenTelemetry traces over OTLP and the log format. ``OTEL_*`` variables fill what is unset here."""

    #: None: on when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set
    enabled: bool | None = None
    #: the collector's OTLP base URL (http://collector:4318; grpc: http://collector:4317)
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] | None = None
    headers: dict[str, SecretStr] = {}
    sample_ratio: float | None = Field(None, ge=0, le=1)
    service_name: str | None = None
    #: prompts and answers on spans (gen_ai.input.messages, gen_ai.output.messages)
    capture_content: bool = False
    queue_size: int = Field(2048, ge=1)
    batch_size: int = Field(512, ge=1)
    export_interval_s: float = Field(1.0, gt=0)
    export_timeout_s: float = Field(10.0, gt=0)
    #: text, or json: one JSON object a line, and one line per request (for log shippers)
    log_format: Literal["text", "json"] = "text"

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("telemetry.endpoint must be an http:// or https:// URL")
        return v


class Settings(_Strict):
    """The whole resolved configuration."""

    server: ServerConfig = ServerConfig()
    keys: list[KeyConfig] = []
    admin_key: SecretStr | None = None
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, ModelConfig] = {}
    routing: RoutingConfig = RoutingConfig()
    limits: LimitsConfig = LimitsConfig()
    cache: CacheConfig = CacheConfig()
    dedupe: DedupeConfig = DedupeConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    retry: RetryConfig = RetryConfig()
    database: DatabaseConfig = DatabaseConfig()
    state: StateConfig = StateConfig()
    events: EventsConfig = EventsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    source: str = Field("<embedded default>", exclude=True)

    @field_validator("models", mode="before")
    @classmethod
    def _list_form(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: {"deployments": d} if isinstance(d, list) else d for k, d in v.items()}
        return v

    def native_responses(self) -> frozenset[str]:
        """The providers that speak the Responses API natively (``responses: native``)."""
        return frozenset(name for name, config in self.providers.items() if config.kind == "openai" and config.responses == "native")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if default is not None:
                # as in the shell: ${X:-d} also takes d when X is set but empty (compose passes unset vars as "")
                return env.get(name) or default
            if name in env:
                return env[name]
            raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set")

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    return node


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "deployments" or not out.startswith("models."):
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _expand_provider_defaults(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, prov in (data.get("providers") or {}).items():
        if not isinstance(prov, dict) or prov.get("kind") != "openai":
            continue
        preset = PRESETS.get(prov.get("preset") or name)
        if preset is None:
            continue
        prov.setdefault("base_url", preset.base_url)
        prov.setdefault("drop_params", list(preset.drop_params))
        prov.setdefault("rename_params", dict(preset.rename_params))
        prov.setdefault("max_n", preset.max_n)
        if "api_key" not in prov and preset.key_env and env.get(preset.key_env):
            prov["api_key"] = env[preset.key_env]


def _classifier_problems(s: Settings) -> list[str]:
    c = s.routing.classifier
    if c is None:
        return []
    from app.embedding_models import model_directory
    from app.route_examples import BUILT_IN

    problems = [f"routing.classifier.routes.{route}: unknown model {route!r}" for route in c.routes if route not in s.models]
    try:
        model_directory(c.model)
    except ValueError as exc:
        problems.append(f"routing.classifier.model: {exc}")
    for category, route in c.categories.items():
        if category not in BUILT_IN:
            problems.append(f"routing.classifier.categories.{category}: no such category (known: {', '.join(BUILT_IN)})")
        elif route is not None and route not in s.models:
            problems.append(f"routing.classifier.categories.{category}: unknown model {route!r}")
    return problems


def _check_references(s: Settings) -> list[str]:
    problems: list[str] = []
    for name, prov in s.providers.items():
        if prov.kind == "openai" and not prov.base_url:
            problems.append(f"providers.{name}.base_url: required for kind 'openai' (no preset named {name!r})")
    for public, model in s.models.items():
        if public == "auto":
            problems.append("models.auto: 'auto' is reserved for task-aware routing")
        for i, dep in enumerate(model.deployments):
            provider, _, model_id = dep.partition("/")
            if not model_id:
                problems.append(f"models.{public}[{i}]: {dep!r} is not 'provider/model-id'")
            elif provider not in s.providers:
                problems.append(f"models.{public}[{i}]: unknown provider {provider!r}")
        for dep in model.context_windows:
            if dep not in model.deployments:
                problems.append(f"models.{public}.context_windows: {dep!r} is not one of its deployments")
    if s.routing.default is not None and s.routing.default not in s.models:
        problems.append(f"routing.default: unknown model {s.routing.default!r}")
    for i, rule in enumerate(s.routing.rules):
        if rule.model not in s.models:
            problems.append(f"routing.rules[{i}].model: unknown model {rule.model!r}")
    problems.extend(_classifier_problems(s))
    for i, k in enumerate(s.keys):
        for j, name in enumerate(k.models or ()):
            if name not in s.models:
                problems.append(f"keys[{i}].models[{j}]: unknown model {name!r} (known: {', '.join(s.models) or 'none'})")
    agents = [k.agent for k in s.keys]
    for i, k in enumerate(s.keys):
        if agents.count(k.agent) > 1 and agents.index(k.agent) != i:
            problems.append(f"keys[{i}].agent: duplicate agent name {k.agent!r}")
    secrets = [k.key.get_secret_value() for k in s.keys]
    if len(set(secrets)) != len(secrets):
        problems.append("keys: two entries share the same key")
    return problems


def build_settings(data: dict[str, Any], source: str, env: Mapping[str, str] | None = None) -> Settings:
    """Validate a raw mapping into :class:`Settings`; raise :class:`ConfigError` naming the key."""
    env = os.environ if env is None else env
    try:
        data = _interpolate(data, "", env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _expand_provider_defaults(data, env)
    try:
        settings = Settings.model_validate({**data, "source": source})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}: {_loc(err['loc'])}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    problems = _check_references(settings)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return settings


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the config file at ``path`` (or ``$ADMIRAL_CONFIG``), or build the embedded default."""
    env = os.environ if env is None else env
    path = path or env.get("ADMIRAL_CONFIG") or None
    if path is None:
        return build_settings(default_config(env), "<embedded default>", env)
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: <root>: expected a mapping of sections")
    return build_settings(data, str(file), env)


def default_config(env: Mapping[str, str]) -> dict[str, Any]:
    """The embedded default: demo provider plus every cloud preset whose key is in the environment."""
    providers: dict[str, Any] = {"demo": {"kind": "demo"}}
    models: dict[str, Any] = {"demo": ["demo/echo"]}
    cloud: list[str] = []
    for name, preset in PRESETS.items():
        if preset.key_env and env.get(preset.key_env):
            providers[name] = {"kind": "openai"}
            deployment = f"{name}/{preset.default_model}"
            models[name] = [deployment]
            cloud.append(deployment)
    if cloud:
        models["fast"] = cloud
    return {
        "providers": providers,
        "models": models,
        "routing": {"default": "fast" if cloud else "demo"},
        "admin_key": env.get("ADMIRAL_ADMIN_KEY") or None,
    }


def masked(settings: Settings) -> dict[str, Any]:
    """The resolved config as plain data, secrets replaced by ``***``."""
    data = settings.model_dump(mode="json", by_alias=True)
    for key in data["keys"]:
        key["key"] = "***"
    if data["admin_key"]:
        data["admin_key"] = "***"
    for prov in data["providers"].values():
        if prov.get("api_key"):
            prov["api_key"] = "***"
        prov["headers"] = {k: "***" for k in prov.get("headers", {})}
    data["database"]["url"] = re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", data["database"]["url"])
    data["state"]["url"] = re.sub(r"//([^:/@]*):([^@]+)@", r"//\1:***@", data["state"]["url"])
    if data["events"].get("amqp"):
        data["events"]["amqp"]["url"] = re.sub(r"//([^:/@]*):([^@]+)@", r"//\1:***@", settings.events.amqp.url.get_secret_value())  # type: ignore[union-attr]
    data["telemetry"]["headers"] = {k: "***" for k in data["telemetry"]["headers"]}
    return data
