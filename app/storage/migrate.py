"""Alembic upgrade to head on a database URL (the CLI's ``migrate`` and the SQLite self-upgrade)."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("app.migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(url: str) -> None:
    """Blocking: call it from a thread when an event loop is running."""
    command.upgrade(alembic_config(url), "head")
