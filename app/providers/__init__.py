"""Backends: build one provider object per configured provider."""

from __future__ import annotations

from app.config import ConfigError, Settings
from app.providers.base import Provider, UpstreamRequest
from app.providers.demo import DemoProvider
from app.providers.openai_compat import OpenAICompatibleProvider
from app.providers.openai_responses import OpenAIResponsesProvider

__all__ = ["Provider", "UpstreamRequest", "build_providers"]


def build_providers(settings: Settings) -> dict[str, Provider]:
    """One provider per config entry; a vLLM provider needs the optional vllm extra."""
    providers: dict[str, Provider] = {}
    for name, config in settings.providers.items():
        if config.kind == "openai" and config.responses == "native":
            providers[name] = OpenAIResponsesProvider(name, config)
        elif config.kind == "openai":
            providers[name] = OpenAICompatibleProvider(name, config)
        elif config.kind == "demo":
            providers[name] = DemoProvider(name, config)
        else:
            from app.providers.vllm_engine import VLLMEngineProvider, validate_engine_args

            try:
                validate_engine_args(config.engine)
            except (ValueError, ImportError) as exc:
                raise ConfigError(f"{settings.source}: providers.{name}.engine: {exc}") from None
            providers[name] = VLLMEngineProvider(name, config.model or "", dict(config.engine))
    return providers
