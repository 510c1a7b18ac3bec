"""The three Python servers the benchmark compares: passthrough (plain and streamed), constant endpoint, gateway."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from procs import HOST, Server, free_port, pinned
from upstream import JSON_PATH, STREAM_PATH

BENCH = Path(__file__).resolve().parent
GATEWAY_KEY = "bench-gateway-key-0123456789"


def uvicorn_app(name: str, module: str, workdir: Path, cpus: str | None, env: dict[str, str] | None = None) -> Server:
    """``module:app`` under uvicorn with uvloop and httptools, one worker, access log off."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        f"{module}:app",
        "--app-dir",
        str(BENCH),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return Server(name, pinned(cmd, cpus), port, env=env or {}, log=workdir / f"{name}.log")


def passthrough(workdir: Path, upstream_port: int, cpus: str | None) -> Server:
    env = {"BENCH_UPSTREAM_URL": f"http://{HOST}:{upstream_port}{JSON_PATH}", "BENCH_UPSTREAM_STREAM_URL": f"http://{HOST}:{upstream_port}{STREAM_PATH}"}
    return uvicorn_app("passthrough", "passthrough", workdir, cpus, env)


def constant(workdir: Path, cpus: str | None) -> Server:
    return uvicorn_app("constant", "constant", workdir, cpus)


def gateway(
    command: str,
    workdir: Path,
    upstream_port: int,
    cpus: str | None,
    workers: int = 1,
    name: str = "gateway",
    database_url: str | None = None,
    state_url: str = "memory://",
) -> Server:
    """``admiral-optimizer serve --config bench/gateway.yaml`` on a fresh SQLite file in ``workdir``, or on ``database_url``.

    ``database_url`` and ``state_url`` (a Redis for the shared mode) are emptied by the caller.
    """
    port = free_port()
    db_dir = workdir / name
    db_dir.mkdir(parents=True, exist_ok=True)
    for old in db_dir.glob("admiral.db*"):
        old.unlink()
    env = {
        "BENCH_GATEWAY_PORT": str(port),
        "BENCH_UPSTREAM_PORT": str(upstream_port),
        "BENCH_GATEWAY_KEY": GATEWAY_KEY,
        "BENCH_ADMIN_KEY": "bench-admin-key-0123456789",
        "BENCH_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{db_dir}/admiral.db",
        "BENCH_STATE_URL": state_url,
    }
    config = str(BENCH / "gateway.yaml")
    log = workdir / f"{name}.log"
    migrate = subprocess.run([command, "migrate", "--config", config], env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if migrate.returncode != 0:
        log.write_text(migrate.stdout + migrate.stderr)
        raise RuntimeError(f"admiral-optimizer migrate failed; see {log}")
    cmd = [command, "serve", "--config", config, "--host", HOST, "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    return Server(name, pinned(cmd, cpus), port, env=env, log=log)
