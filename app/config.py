"""The config file: YAML with ``${ENV}`` interpolation, validated by pydantic (unknown keys fail)."""

from __future__ import annotations

import os
import re
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


class KeyConfig(_Strict):
    key: SecretStr
    agent: str = Field(min_length=1)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    cache_namespace: str = "default"

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


#: A preset is a default base_url and the environment variable holding its key.
PRESETS: dict[str, Preset] = {
    "cerebras": Preset(base_url="https://api.cerebras.ai/v1", key_env="CEREBRAS_API_KEY", default_model="llama3.1-8b"),
    "groq": Preset(base_url="https://api.groq.com/openai/v1", key_env="GROQ_API_KEY", default_model="llama-3.1-8b-instant"),
    "together": Preset(base_url="https://api.together.xyz/v1", key_env="TOGETHER_API_KEY", default_model="meta-llama/Llama-3.2-3B-Instruct-Turbo"),
    "mistral": Preset(base_url="https://api.mistral.ai/v1", key_env="MISTRAL_API_KEY", default_model="mistral-small-latest"),
    "deepseek": Preset(base_url="https://api.deepseek.com/v1", key_env="DEEPSEEK_API_KEY", default_model="deepseek-chat"),
    "xai": Preset(base_url="https://api.x.ai/v1", key_env="XAI_API_KEY", default_model="grok-3-mini"),
    "openrouter": Preset(base_url="https://openrouter.ai/api/v1", key_env="OPENROUTER_API_KEY", default_model="meta-llama/llama-3.1-8b-instruct"),
    "gemini": Preset(base_url="https://generativelanguage.googleapis.com/v1beta/openai", key_env="GEMINI_API_KEY", default_model="gemini-2.0-flash"),
    "ollama": Preset(base_url="http://127.0.0.1:11434/v1", key_env=None, default_model="llama3.2"),
    "vllm-server": Preset(base_url="http://127.0.0.1:8001/v1", key_env="VLLM_SERVER_API_KEY", default_model="default"),
}


class ProviderConfig(_Strict):
    kind: Literal["openai", "vllm", "demo"]
    preset: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    headers: dict[str, str] = {}
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    first_byte_timeout_s: float | None = Field(None, gt=0)
    max_concurrency: int = Field(256, ge=1)
    queue_timeout_s: float = Field(5.0, ge=0)
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
        return self


class ModelConfig(_Strict):
    deployments: list[str] = Field(min_length=1)
    strategy: Literal["ordered", "latency"] = "ordered"


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


class RoutingRule(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    when: RuleCondition = Field(alias="if")
    model: str


class RoutingConfig(_Strict):
    default: str | None = None
    rules: list[RoutingRule] = []


class CacheConfig(_Strict):
    enabled: bool = True
    ttl_s: float = Field(3600.0, gt=0)
    memory_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    max_entry_bytes: int = Field(1024 * 1024, ge=1)
    max_total_bytes: int = Field(1024 * 1024 * 1024, ge=1)
    sweep_interval_s: float = Field(60.0, gt=0)


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


class EventsConfig(_Strict):
    webhooks: list[str] = []
    timeout_s: float = Field(5.0, gt=0)
    queue_size: int = Field(1000, ge=1)
    degraded_hit_rate: float = Field(0.2, ge=0, le=1)
    degraded_window_s: float = Field(300.0, gt=0)
    degraded_min_requests: int = Field(50, ge=1)


class Settings(_Strict):
    """The whole resolved configuration."""

    server: ServerConfig = ServerConfig()
    keys: list[KeyConfig] = []
    admin_key: SecretStr | None = None
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, ModelConfig] = {}
    routing: RoutingConfig = RoutingConfig()
    cache: CacheConfig = CacheConfig()
    dedupe: DedupeConfig = DedupeConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    retry: RetryConfig = RetryConfig()
    database: DatabaseConfig = DatabaseConfig()
    state: StateConfig = StateConfig()
    events: EventsConfig = EventsConfig()
    source: str = Field("<embedded default>", exclude=True)

    @field_validator("models", mode="before")
    @classmethod
    def _list_form(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: {"deployments": d} if isinstance(d, list) else d for k, d in v.items()}
        return v


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
        if "api_key" not in prov and preset.key_env and env.get(preset.key_env):
            prov["api_key"] = env[preset.key_env]


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
    if s.routing.default is not None and s.routing.default not in s.models:
        problems.append(f"routing.default: unknown model {s.routing.default!r}")
    for i, rule in enumerate(s.routing.rules):
        if rule.model not in s.models:
            problems.append(f"routing.rules[{i}].model: unknown model {rule.model!r}")
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
    return data
