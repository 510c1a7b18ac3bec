"""The real command line: ``admiral-optimizer serve`` as a child process, and fresh PostgreSQL databases."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import free_port

PG_ADMIN_DSN = os.environ.get("ADMIRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("admiral-optimizer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


class ServeProcess:
    """``admiral-optimizer serve`` on a free loopback port; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, config: Path, *, workers: int = 1, env: dict[str, str] | None = None, cwd: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()  # a given port: the same gateway started again where clients know it
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.with_suffix(f".{self.port}.log")
        args = [*cli_command(), "serve", "--config", str(config), "--port", str(self.port), "--workers", str(workers), "--log-level", "info"]
        child_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env={**child_env, **(env or {})}, cwd=cwd or config.parent)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"serve did not answer /health in {timeout} s:\n{self.output()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve(config: Path, **kwargs: object) -> Iterator[ServeProcess]:
    process = ServeProcess(config, **kwargs)  # type: ignore[arg-type]
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


async def _pg_execute(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg(sql: str) -> None:
    # a thread of its own: callers may be sync tests or coroutines on a running loop
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _pg_execute(sql)).result()


def pg_available() -> str | None:
    """None when the PostgreSQL server answers, else why not."""
    try:
        _pg("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_ADMIN_DSN} unreachable: {type(exc).__name__}: {exc}"
    return None


class PgDatabases:
    """Creates throwaway databases with random names; ``drop_all`` removes every one of them."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        name = f"admiral_test_{int(time.time())}_{secrets.token_hex(4)}"
        _pg(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        return f"{base}/{name}"

    @staticmethod
    def drop_stale(max_age_s: float = 6 * 3600) -> None:
        """Drop databases left by sessions that were killed before their teardown (by the time in their name)."""

        async def stale() -> list[str]:
            import asyncpg

            conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
            try:
                rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'admiral_test_%'")
            finally:
                await conn.close()
            old = []
            for row in rows:
                stamp = row["datname"].split("_")[2]
                if stamp.isdigit() and time.time() - int(stamp) > max_age_s:
                    old.append(row["datname"])
            return old

        with ThreadPoolExecutor(1) as pool:
            names = pool.submit(asyncio.run, stale()).result()
        for name in names:
            _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop_all(self) -> None:
        for name in self.names:
            _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.clear()


NewDatabase = Callable[[], str]
