"""The compose stack's files: config.example.yaml validates as compose passes it, the compose file validates."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
#: what docker-compose.yml hands the gateway when .env sets nothing: every variable present but empty
COMPOSE_ENV = {name: "" for name in ("ADMIRAL_AGENT_KEY", "ADMIRAL_ADMIN_KEY", "ADMIRAL_DATABASE_URL", "ADMIRAL_STATE_URL", "GROQ_API_KEY")}


def test_example_config_as_compose_passes_it() -> None:
    settings = load_settings(ROOT / "config.example.yaml", env=COMPOSE_ENV)
    assert settings.database.url == "sqlite+aiosqlite:////data/admiral.db"
    assert settings.state.url == "memory://"
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == ""
    assert "demo" in settings.providers and settings.providers["groq"].base_url == "https://api.groq.com/openai/v1"
    assert settings.keys and settings.server.host == "0.0.0.0"


def test_example_config_takes_the_environment() -> None:
    env = COMPOSE_ENV | {
        "ADMIRAL_AGENT_KEY": "sk-from-dotenv-123",
        "ADMIRAL_ADMIN_KEY": "admin-from-dotenv",
        "ADMIRAL_DATABASE_URL": "postgresql+asyncpg://admiral:pw@postgres:5432/admiral",
        "ADMIRAL_STATE_URL": "redis://redis:6379/0",
        "GROQ_API_KEY": "gsk-test",
    }
    settings = load_settings(ROOT / "config.example.yaml", env=env)
    assert settings.keys[0].key.get_secret_value() == "sk-from-dotenv-123"
    assert settings.database.url.startswith("postgresql+asyncpg://") and settings.state.url == "redis://redis:6379/0"
    assert settings.providers["groq"].api_key is not None


def test_check_config_cli_on_the_example() -> None:
    from tests.serve import cli_command

    r = subprocess.run([*cli_command(), "check-config", "--config", str(ROOT / "config.example.yaml")], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **COMPOSE_ENV}, timeout=60)
    assert r.returncode == 0, r.stderr


def test_compose_mounts_files_that_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"


def test_grafana_admin_password_comes_from_the_environment() -> None:
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]["environment"]
    # ${VAR:?message}: compose refuses to start without it, so there is no admin/admin to forget
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_compose_file_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GRAFANA_ADMIN_PASSWORD": "not-admin"}
    for args in ([], ["--profile", "scaleout"]):
        r = subprocess.run([binary, *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env, check=False)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([binary, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": env["PATH"]}, check=False)
    assert r.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in r.stderr
