"""Load generation with wrk: throughput and latency of plain (non-streamed) answers. Streams: stream_load.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fixtures import PROMPT_PAD, request_body
from procs import HOST, pinned
from upstream import JSON_PATH

LUA = Path(__file__).with_name("load.lua")


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured; latencies in milliseconds."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    p999_ms: float = 0.0
    max_ms: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Workload:
    """The requests one run sends: wrk's, or the stream client's (``stream``, see stream_load.py)."""

    model: str
    unique: bool
    auth: str | None = None
    cache_control: str | None = None
    stream: bool = False
    path: str = JSON_PATH

    def env(self) -> dict[str, str]:
        # the body is HEAD .. TAIL; a unique prompt puts a per-run nonce and a counter between them
        marker = "@@"
        nonce = uuid.uuid4().hex[:12] if self.unique else "fixed"
        body = request_body(self.model, f"[{nonce}-{marker}] {PROMPT_PAD}", stream=self.stream).decode()
        head, tail = body.split(marker)
        env = {"WRK_HEAD": head, "WRK_TAIL": tail, "WRK_UNIQUE": "1" if self.unique else "0"}
        if not self.unique:
            env["WRK_HEAD"] = head + "0"
        if self.auth:
            env["WRK_AUTH"] = self.auth
        if self.cache_control:
            env["WRK_CACHE_CONTROL"] = self.cache_control
        return env

    def bodies(self) -> Callable[[int], bytes]:
        """Request ``i``'s body, as load.lua builds it: unique per ``i`` (and per call) or one fixed body."""
        env = self.env()
        head, tail = env["WRK_HEAD"].encode(), env["WRK_TAIL"].encode()
        if not self.unique:
            return lambda i: head + tail
        return lambda i: head + str(i).encode() + tail

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.stream:
            headers["Accept"] = "text/event-stream"
        if self.auth:
            headers["Authorization"] = f"Bearer {self.auth}"
        if self.cache_control:
            headers["Cache-Control"] = self.cache_control
        return headers


def wrk(port: int, work: Workload, *, connections: int, duration: float, cpus: str | None, stop_after: int | None = None) -> WrkResult:
    """Run wrk (one thread) against ``POST {work.path}`` on ``port``.

    With ``stop_after`` the run ends after that many responses (``duration`` is then only a bound)
    and reports no latencies.
    """
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA),
        f"http://{HOST}:{port}{work.path}",
    ]
    env = {**os.environ, **work.env()}
    if stop_after:
        env["WRK_STOP_AFTER"] = str(stop_after)
    start = time.perf_counter()
    out = subprocess.run(pinned(cmd, cpus), env=env, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    elapsed = time.perf_counter() - start
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    errors = sum(data.get(k, 0) for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    seconds = data["duration_us"] / 1e6 if "duration_us" in data else elapsed
    ms = {name: data.get(f"{name}_us", 0) / 1000 for name in ("p50", "p90", "p99", "p999", "max")}
    return WrkResult(data["requests"], seconds, ms["p50"], ms["p90"], ms["p99"], errors, ms["p999"], ms["max"])
