"""Load generation: wrk for throughput and latency, a small blocking client for streaming TTFB."""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fixtures import PROMPT_PAD, request_body
from procs import HOST, pinned

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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Workload:
    """The requests one wrk run sends."""

    model: str
    unique: bool
    auth: str | None = None
    cache_control: str | None = None

    def env(self) -> dict[str, str]:
        # the body is HEAD .. TAIL; a unique prompt puts a per-run nonce and a counter between them
        marker = "@@"
        nonce = uuid.uuid4().hex[:12] if self.unique else "fixed"
        body = request_body(self.model, f"[{nonce}-{marker}] {PROMPT_PAD}").decode()
        head, tail = body.split(marker)
        env = {"WRK_HEAD": head, "WRK_TAIL": tail, "WRK_UNIQUE": "1" if self.unique else "0"}
        if not self.unique:
            env["WRK_HEAD"] = head + "0"
        if self.auth:
            env["WRK_AUTH"] = self.auth
        if self.cache_control:
            env["WRK_CACHE_CONTROL"] = self.cache_control
        return env


def wrk(port: int, work: Workload, *, connections: int, duration: float, cpus: str | None, stop_after: int | None = None) -> WrkResult:
    """Run wrk (one thread) against ``POST /v1/chat/completions`` on ``port``.

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
        f"http://{HOST}:{port}/v1/chat/completions",
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
    return WrkResult(data["requests"], seconds, data.get("p50_us", 0) / 1000, data.get("p90_us", 0) / 1000, data.get("p99_us", 0) / 1000, errors)


@dataclass(frozen=True)
class TtfbResult:
    """Time from sending a streamed request to the first body byte, in milliseconds."""

    median_ms: float
    p90_ms: float
    samples: int
    errors: int


def ttfb(port: int, path: str, body_for: Callable[[int], bytes], headers: dict[str, str], requests: int, warmup: int = 20) -> TtfbResult:
    """Send ``requests`` streamed requests one after another on one keep-alive connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **headers}
    samples: list[float] = []
    errors = 0
    try:
        for i in range(warmup + requests):
            body = body_for(i)
            start = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            first = resp.read1(65536)
            elapsed = time.perf_counter() - start
            rest = first + resp.read()
            if resp.status != 200 or b"data: [DONE]" not in rest:
                errors += 1
            elif i >= warmup:
                samples.append(elapsed * 1000)
    finally:
        conn.close()
    if not samples:
        raise RuntimeError(f"no successful streamed request on port {port}{path}")
    samples.sort()
    return TtfbResult(statistics.median(samples), samples[int(len(samples) * 0.9) - 1], len(samples), errors)
