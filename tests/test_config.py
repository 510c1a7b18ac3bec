"""The config contract: validation names file, key path and reason; secrets are masked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, load_settings

GOOD = """
keys:
  - {key: "${AGENT_KEY}", agent: quality, rpm: 30}
admin_key: "${ADMIN_KEY:-admin-secret-123}"
providers:
  groq: {kind: openai, api_key: "${GROQ_KEY}"}
  demo: {kind: demo}
models:
  fast: [groq/llama-3.1-8b-instant, demo/echo]
routing: {default: fast, rules: [{if: {contains_any: [code]}, model: fast}]}
"""
ENV = {"AGENT_KEY": "sk-agent-key-123", "GROQ_KEY": "gsk-provider-secret-456"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_good_config_resolves_env_and_presets(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD), env=ENV)
    assert s.providers["groq"].base_url == "https://api.groq.com/openai/v1"
    assert s.keys[0].key.get_secret_value() == "sk-agent-key-123"
    assert s.models["fast"].deployments == ["groq/llama-3.1-8b-instant", "demo/echo"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("routing:", "routng:"), "routng: unknown key"),
        (GOOD.replace("agent: quality", "agnet: quality"), "keys[0].agnet: unknown key"),
        (GOOD.replace("groq/llama", "grok/llama"), "models.fast[0]: unknown provider 'grok'"),
        (GOOD.replace("default: fast", "default: slow"), "routing.default: unknown model 'slow'"),
        (GOOD.replace("kind: demo", "kind: dmeo"), "providers.demo.kind"),
        (GOOD.replace("${GROQ_KEY}", "${MISSING_VAR}"), "providers.groq.api_key: environment variable MISSING_VAR is not set"),
    ],
)
def test_mistakes_name_file_key_and_reason(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=ENV)
    assert f"{path}: " in str(info.value)
    assert expected in str(info.value)


def test_embedded_default_adds_cloud_providers_with_keys() -> None:
    s = load_settings(None, env={"GROQ_API_KEY": "gsk-x"})
    assert set(s.providers) == {"demo", "groq"}
    assert s.routing.default == "fast"
    assert load_settings(None, env={}).routing.default == "demo"


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(write(tmp_path, GOOD)), env=ENV)
    assert result.returncode == 0, result.stderr
    for secret in ("sk-agent-key-123", "gsk-provider-secret-456", "admin-secret-123"):
        assert secret not in result.stdout + result.stderr
    assert '"api_key": "***"' in result.stdout


def test_check_config_fails_on_misspelt_key_and_unknown_provider(tmp_path: Path) -> None:
    bad = GOOD.replace("routing:", "routng:").replace("groq/llama", "nope/llama")
    result = run_cli("check-config", "--config", str(write(tmp_path, bad)), env=ENV)
    assert result.returncode == 2
    assert "routng: unknown key" in result.stderr
    assert "models.fast[0]: unknown provider 'nope'" in result.stderr or "routng" in result.stderr


def test_serve_refuses_public_bind_without_keys(tmp_path: Path) -> None:
    result = run_cli("serve", "--host", "0.0.0.0", "--port", "18999", env={})
    assert result.returncode == 2
    assert "refusing to bind" in result.stderr
