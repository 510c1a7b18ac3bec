"""Alembic migrations on SQLite and PostgreSQL: the CLI, models in step with them, and the readiness gate."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from app.storage.db import create_engine
from app.storage.migrate import alembic_config, known_revisions
from app.storage.models import Base
from tests.serve import NewDatabase, cli_command
from tests.support import gateway

AGENT_KEY = "sk-agent-migrate-0001"
TABLES = {"alembic_version", "cache_entries", "request_log", "stored_responses", "semantic_entries"}


def migrate_cli(url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "migrate.yaml"
    config.write_text(f"database: {{url: '{url}'}}\n")
    return subprocess.run([*cli_command(), "migrate", "--config", str(config)], capture_output=True, text=True, timeout=120)


def inspect_db(url: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        engine = create_engine(url)

        def look(conn: Connection) -> dict[str, Any]:
            return {
                "tables": set(inspect(conn).get_table_names()),
                "revision": MigrationContext.configure(conn).get_current_revision(),
                "diff": compare_metadata(MigrationContext.configure(conn), Base.metadata),
            }

        try:
            async with engine.connect() as conn:
                return await conn.run_sync(look)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def check_migrate_roundtrip(url: str, tmp_path: Path) -> None:
    head, _ = known_revisions(url)
    assert inspect_db(url)["tables"] == set()
    r = migrate_cli(url, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "database at head" in r.stderr
    found = inspect_db(url)
    assert TABLES <= found["tables"] and found["revision"] == head
    assert found["diff"] == []  # the models and the migrations describe the same schema
    assert migrate_cli(url, tmp_path).returncode == 0  # a second run is a no-op
    command.downgrade(alembic_config(url), "base")
    assert inspect_db(url)["tables"] <= {"alembic_version"}
    command.upgrade(alembic_config(url), "head")
    assert inspect_db(url)["revision"] == head


def test_migrate_sqlite(tmp_path: Path) -> None:
    check_migrate_roundtrip(f"sqlite+aiosqlite:///{tmp_path}/m.db", tmp_path)


@pytest.mark.postgres
def test_migrate_postgres(new_pg_database: NewDatabase, tmp_path: Path) -> None:
    check_migrate_roundtrip(new_pg_database(), tmp_path)


def test_embedded_sqlite_upgrades_itself_at_start(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/auto.db"
    with gateway({"providers": {"demo": {"kind": "demo"}}, "models": {"demo": ["demo/echo"]}, "database": {"url": url}}) as gw:
        assert httpx.get(f"{gw.url}/health/ready").status_code == 200
    assert TABLES <= inspect_db(url)["tables"]


def test_workers_upgrading_one_sqlite_file_at_once_all_start(tmp_path: Path) -> None:
    # `serve --workers N` starts N self-upgrading workers together; unserialised, two found the
    # tables missing and one failed to create them (9 races in 12), which ended the whole server
    upgrade = "import sys; from app.storage.migrate import upgrade_to_head; upgrade_to_head(sys.argv[1])"
    for round_ in range(4):
        url = f"sqlite+aiosqlite:///{tmp_path}/race{round_}.db"
        racers = [subprocess.Popen([sys.executable, "-c", upgrade, url], stderr=subprocess.PIPE, text=True) for _ in range(3)]
        for racer in racers:
            _, err = racer.communicate(timeout=120)
            assert racer.returncode == 0, err[-2000:]
        assert inspect_db(url)["revision"] == known_revisions(url)[0]


@pytest.mark.postgres
def test_postgres_behind_is_not_ready_until_migrated(new_pg_database: NewDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = new_pg_database()
    config = f"""
keys: [{{key: {AGENT_KEY}, agent: a}}]
admin_key: admin-key-for-tests-0001
providers: {{demo: {{kind: demo}}}}
models: {{demo: [demo/echo]}}
database: {{url: '{url}'}}
"""
    with caplog.at_level(logging.ERROR, logger="admiral"), gateway(config) as gw:
        assert any("run admiral-optimizer migrate" in r.getMessage() for r in caplog.records)
        assert inspect_db(url)["tables"] == set()  # several replicas may start: none of them upgrades
        ready = httpx.get(f"{gw.url}/health/ready")
        assert ready.status_code == 503
        database = ready.json()["checks"]["database"]
        assert database["ok"] is False and "run admiral-optimizer migrate" in database["message"]
        # requests are still answered; their log rows wait in the queue
        r = httpx.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {AGENT_KEY}"}, json={"model": "demo", "messages": [{"role": "user", "content": "early"}]})
        assert r.status_code == 200
        assert migrate_cli(url, tmp_path).returncode == 0
        assert httpx.get(f"{gw.url}/health/ready").status_code == 200  # no restart needed
        deadline = time.monotonic() + 30
        while True:
            stats = httpx.get(f"{gw.url}/admin/stats", headers={"Authorization": "Bearer admin-key-for-tests-0001"}).json()
            if stats["total_requests"] == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stats["total_requests"] == 1  # the row written before the migration was kept and retried


@pytest.mark.postgres
def test_postgres_at_head_is_ready(new_pg_database: NewDatabase, tmp_path: Path) -> None:
    url = new_pg_database()
    assert migrate_cli(url, tmp_path).returncode == 0
    with gateway({"providers": {"demo": {"kind": "demo"}}, "models": {"demo": ["demo/echo"]}, "database": {"url": url}}) as gw:
        ready = httpx.get(f"{gw.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == {"ok": True}
