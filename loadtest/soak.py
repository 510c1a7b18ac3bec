"""The soak run: hours of mixed traffic against two gateways, sampled every minute (loadtest/soak.sh).

    python loadtest/soak.py [--duration 30m] [--sample-every 60] [--clients 6] [--only sqlite,pg]

Starts the fake upstream (loadtest/fake_upstream_server.py, 20 ms a call; two models that always
fail: one answers 500, one cuts its stream) and two gateways on it: ``sqlite`` (the embedded
default's storage: SQLite file, in-process state) and ``pg`` (PostgreSQL + Redis). Each gets
``--clients`` concurrent clients sending a mix: plain and streamed requests, cache misses (unique
prompts) and hits (a small set of prompts), clients that leave a stream after its first chunk,
and requests to the failing models. Halfway through, each gateway's config gains a key and is
reloaded with SIGHUP; the new key must work at once.

Every ``--sample-every`` seconds, per gateway: resident memory and open descriptors of the server
process, asyncio tasks (``/admin/runtime``), database and WAL size, requests answered, failures
the faults caused and failures they did not, and latency of the minute's plain requests. Samples
go to ``samples.jsonl``, the verdict to ``summary.md`` (and stdout): after the warm-up each
figure must stay within 5 % (the database grows by design, one request-log row per request: it
is judged by its bytes per request instead; PostgreSQL's WAL directory, the server's own, against
its ``max_wal_size``; descriptors are judged without the TCP connections of
the pools and of the clients' keep-alive, whose number follows the last minute's concurrency: those
must stay within their pools' bounds), and no request may fail that the faults did not cause.
Exit status 0 when all hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.config import ProviderConfig
from app.storage.db import POOL_OVERFLOW, POOL_SIZE

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ADMIN = "soak-admin-" + uuid.uuid4().hex[:12]
KEY = "soak-agent-" + uuid.uuid4().hex[:12]
RELOAD_KEY = "soak-reloaded-" + uuid.uuid4().hex[:12]
PG_DB = "admiral_soak"
#: spread allowed after the warm-up, for every flat figure
FLAT = 0.05
#: the failing models: what the fake upstream does for them, and what a client then sees
FAULTS = {"broken": "500", "torn": "cut"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")


def duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"a duration like 90, 90s, 30m or 2h, not {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- the processes -----------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    config: Path
    port: int
    database_url: str
    state_url: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    version: int = 1

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def write_config(self, upstream_port: int, keys: list[str]) -> None:
        key_lines = "\n".join(f"  - {{key: {k}, agent: soak-{i}, rpm: 10000000, tpm: 10000000000}}" for i, k in enumerate(keys))
        fault_models = "".join(f"\n  {public}: [up/{public}]" for public in FAULTS)
        self.config.write_text(
            f"""# soak run: {self.name}
server: {{host: {HOST}, port: {self.port}, shutdown_grace_s: 5}}
keys:
{key_lines}
admin_key: {ADMIN}
providers:
  up: {{kind: openai, base_url: "http://{HOST}:{upstream_port}/v1", api_key: soak-upstream, timeout_s: 10}}
models:
  fast: [up/fake-model]{fault_models}
routing: {{default: fast}}
retry: {{attempts: 2, backoff_s: 0.05, max_backoff_s: 0.1}}
circuit_breaker: {{failure_threshold: 1000000, window_s: 60, cooldown_s: 1}}
# a memory tier that fills within the warm-up: what must stay flat after it is everything else
cache: {{enabled: true, ttl_s: 3600, memory_max_bytes: 8388608}}
dedupe: {{enabled: true}}
database: {{url: "{self.database_url}"}}
state: {{url: "{self.state_url}", key_prefix: "soak-{uuid.uuid4().hex[:8]}:"}}
"""
        )

    def start(self, python: str) -> None:
        cli = [python, "-m", "app.cli"]
        subprocess.run([*cli, "migrate", "--config", str(self.config)], check=True, cwd=REPO, capture_output=True)
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*cli, "serve", "--config", str(self.config), "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} gateway exited at start; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} gateway not ready in 60 s; see {self.log}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)


def _proc_status(pid: int) -> tuple[int, int]:
    """VmRSS (bytes) and open descriptors of ``pid``."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _connections(pid: int, own_port: int, upstream_port: int) -> dict[str, int]:
    """The TCP connections ``pid`` holds open, by peer: the pools' (to the upstream, PostgreSQL,
    Redis) and the clients' keep-alive connections to the gateway.

    Their number at a quiet moment is set by how many were in use at once in the last keep-alive
    period, not by anything the gateway keeps: descriptors are judged without them, and they are
    judged against their pools' bounds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    peers = {upstream_port: "upstream", 5432: "postgresql", 6379: "redis"}
    counts = dict.fromkeys(("clients", *peers.values()), 0)
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if inode not in inodes or state == "0A":  # not this process's, or a listening socket
                    continue
                if int(local.rsplit(":", 1)[1], 16) == own_port:
                    counts["clients"] += 1
                elif (peer := peers.get(int(remote.rsplit(":", 1)[1], 16))) is not None:
                    counts[peer] += 1
    return counts


def _psql(database: str, sql: str) -> str:
    cmd = ["psql", "-h", HOST, "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-qtAc", sql]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


# -- the traffic -------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one gateway's clients saw; reset of the per-minute latencies at each sample."""

    ok: int = 0
    left: int = 0  # streams the client abandoned on purpose
    fault_failures: int = 0  # failures of requests to the failing models (expected)
    unexpected: int = 0
    first_unexpected: list[str] = field(default_factory=list)
    plain_ms: list[float] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.unexpected += 1
        if len(self.first_unexpected) < 10:
            self.first_unexpected.append(f"{time.strftime('%H:%M:%S')} {what}")


HIT_PROMPTS = [f"soak question {i}: what is {i} times {i}?" for i in range(40)]


@dataclass
class Traffic:
    """Starts and pauses the clients: samples are taken with no request in flight, so what they
    count (tasks, descriptors, memory) is what the gateway keeps, not what it is doing."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    running: asyncio.Event = field(default_factory=asyncio.Event)
    busy: int = 0

    async def quiet(self, settle_s: float = 1.0) -> None:
        self.running.clear()
        while self.busy:
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle_s)  # requests the clients left mid-stream finish in the gateway

    def resume(self) -> None:
        self.running.set()


async def client(gw: Gateway, tally: Tally, traffic: Traffic, key: list[str], seed: int) -> None:
    rng = random.Random(seed)
    counter = itertools.count()
    limits = httpx.Limits(max_connections=CLIENT_CONNECTIONS, max_keepalive_connections=CLIENT_CONNECTIONS)
    async with httpx.AsyncClient(base_url=f"{gw.url}/v1", timeout=30, limits=limits) as http:
        while not traffic.stop.is_set():
            await traffic.running.wait()
            traffic.busy += 1
            try:
                await one_request(http, rng, counter, tally, key, seed)
            finally:
                traffic.busy -= 1


async def one_request(http: httpx.AsyncClient, rng: random.Random, counter: itertools.count[int], tally: Tally, key: list[str], seed: int) -> None:
    r = rng.random()
    if r < 0.30:
        kind, model, prompt = "plain", "fast", f"soak {seed}-{next(counter)} {uuid.uuid4().hex}"
    elif r < 0.50:
        kind, model, prompt = "plain", "fast", rng.choice(HIT_PROMPTS)
    elif r < 0.68:
        kind, model, prompt = "stream", "fast", f"soak stream {seed}-{next(counter)} {uuid.uuid4().hex}"
    elif r < 0.80:
        kind, model, prompt = "stream", "fast", rng.choice(HIT_PROMPTS)
    elif r < 0.90:
        kind, model, prompt = "leave", "fast", f"soak leave {seed}-{next(counter)} {uuid.uuid4().hex}"
    elif r < 0.95:
        kind, model, prompt = "plain", "broken", f"soak broken {uuid.uuid4().hex}"
    else:
        kind, model, prompt = "stream", "torn", f"soak torn {uuid.uuid4().hex}"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    headers = {"Authorization": f"Bearer {key[0]}"}
    fault = model in FAULTS
    try:
        if kind == "plain":
            started = time.perf_counter()
            response = await http.post("/chat/completions", json=body, headers=headers)
            if response.status_code == 200 and response.json()["choices"][0]["message"]["content"]:
                tally.ok += 1
                tally.plain_ms.append((time.perf_counter() - started) * 1000)
            elif fault and response.status_code >= 500:
                tally.fault_failures += 1
            else:
                tally.fail(f"plain {model}: {response.status_code} {response.text[:200]}")
        else:
            async with http.stream("POST", "/chat/completions", json={**body, "stream": True}, headers=headers) as response:
                if response.status_code != 200:
                    if fault and response.status_code >= 500:
                        tally.fault_failures += 1
                    else:
                        tally.fail(f"{kind} {model}: {response.status_code}")
                    return
                lines: list[str] = []
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        if kind == "leave":
                            break
            if kind == "leave":
                tally.left += 1
            elif lines and lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines):
                tally.ok += 1
            elif fault:
                tally.fault_failures += 1
            else:
                tally.fail(f"stream {model}: ended with {lines[-1][:120] if lines else 'nothing'}")
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        if fault and isinstance(exc, httpx.HTTPError):
            tally.fault_failures += 1  # a torn stream may end the connection
        else:
            tally.fail(f"{kind} {model}: {type(exc).__name__}: {exc}")


# -- sampling ----------------------------------------------------------------------------------


async def sample(gw: Gateway, tally: Tally, started: float, log_lines: int, upstream_port: int) -> dict[str, Any]:
    assert gw.proc is not None
    rss, fds = await asyncio.to_thread(_proc_status, gw.proc.pid)
    connections = await asyncio.to_thread(_connections, gw.proc.pid, gw.port, upstream_port)
    async with httpx.AsyncClient(timeout=10) as http:
        runtime = (await http.get(f"{gw.url}/admin/runtime", headers={"Authorization": f"Bearer {ADMIN}"})).json()
    wal_bound = None
    if gw.database_url.startswith("sqlite"):
        path = Path(gw.database_url.split("///", 1)[1])
        db = path.stat().st_size
        wal_path = path.with_name(path.name + "-wal")
        wal = wal_path.stat().st_size if wal_path.exists() else 0
    else:
        db = int(await asyncio.to_thread(_psql, PG_DB, f"SELECT pg_database_size('{PG_DB}')"))
        wal = int(await asyncio.to_thread(_psql, PG_DB, "SELECT coalesce(sum(size), 0) FROM pg_ls_waldir()"))
        # the server's WAL directory (all databases): segments are recycled at checkpoints, and the
        # directory may grow to max_wal_size between them, whoever writes
        wal_bound = int(await asyncio.to_thread(_psql, PG_DB, "SELECT pg_size_bytes(current_setting('max_wal_size'))"))
    text = gw.log.read_text(errors="replace")
    lat = sorted(tally.plain_ms)
    tally.plain_ms.clear()
    return {
        "gateway": gw.name,
        "minute": round((time.monotonic() - started) / 60, 2),
        "rss_mb": round(rss / 2**20, 1),
        "open_fds": fds,
        # what the process holds besides pooled and keep-alive connections: files, listeners, pipes
        "held_fds": fds - sum(connections.values()),
        "connections": connections,
        "asyncio_tasks": runtime["asyncio_tasks"],
        "threads": runtime["threads"],
        "db_mb": round(db / 2**20, 2),
        "wal_mb": round(wal / 2**20, 2),
        "wal_bound_mb": None if wal_bound is None else round(wal_bound / 2**20),
        "answered": tally.ok + tally.left + tally.fault_failures + tally.unexpected,
        "ok": tally.ok,
        "left_mid_stream": tally.left,
        "fault_failures": tally.fault_failures,
        "unexpected_failures": tally.unexpected,
        "log_errors": sum(1 for line in text.splitlines()[log_lines:] if " ERROR " in line),
        "plain_p50_ms": round(statistics.median(lat), 1) if lat else None,
        "plain_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
        "config_version": gw.version,
    }


async def reload_with_new_key(gw: Gateway, upstream_port: int, key: list[str]) -> None:
    """Add a key to the config, SIGHUP, and switch this gateway's clients to the new key once it works."""
    assert gw.proc is not None
    gw.write_config(upstream_port, [KEY, RELOAD_KEY])
    os.kill(gw.proc.pid, signal.SIGHUP)
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(200):
            status = (await http.get(f"{gw.url}/admin/config", headers={"Authorization": f"Bearer {ADMIN}"})).json()
            if status["version"] == gw.version + 1:
                gw.version += 1
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"{gw.name}: the reload did not show in /admin/config")
        answer = await http.post(
            f"{gw.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {RELOAD_KEY}"},
            json={"model": "fast", "messages": [{"role": "user", "content": "after reload"}]},
        )
        if answer.status_code != 200:
            raise RuntimeError(f"{gw.name}: the key added by the reload answered {answer.status_code}")
    key[0] = RELOAD_KEY
    print(f"soak: {gw.name}: config reloaded (version {gw.version}); clients now use the new key", flush=True)


async def run(args: argparse.Namespace, gateways: list[Gateway], upstream_port: int, out: Path) -> list[dict[str, Any]]:
    traffic = Traffic()
    traffic.resume()
    tallies = {gw.name: Tally() for gw in gateways}
    keys = {gw.name: [KEY] for gw in gateways}
    tasks = [
        asyncio.create_task(client(gw, tallies[gw.name], traffic, keys[gw.name], seed=i * 1000 + j))
        for i, gw in enumerate(gateways)
        for j in range(args.clients)
    ]
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    log_lines = {gw.name: 0 for gw in gateways}
    reloaded = False
    with (out / "samples.jsonl").open("w") as sink:
        while (elapsed := time.monotonic() - started) < args.duration:
            await asyncio.sleep(min(args.sample_every, args.duration - elapsed))
            if not reloaded and time.monotonic() - started >= args.duration / 2:
                for gw in gateways:
                    await reload_with_new_key(gw, upstream_port, keys[gw.name])
                reloaded = True
            await traffic.quiet()
            for gw in gateways:
                if gw.proc is None or gw.proc.poll() is not None:
                    raise RuntimeError(f"{gw.name} gateway died; see {gw.log}")
                row = await sample(gw, tallies[gw.name], started, log_lines[gw.name], upstream_port)
                samples.append(row)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print("soak: " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            traffic.resume()
    traffic.stop.set()
    traffic.resume()
    await asyncio.gather(*tasks, return_exceptions=True)
    for name, tally in tallies.items():
        for line in tally.first_unexpected:
            print(f"soak: {name}: unexpected failure: {line}", flush=True)
    return samples


# -- the verdict -------------------------------------------------------------------------------

FLAT_FIGURES = ("rss_mb", "held_fds", "asyncio_tasks")
#: how many connections each pool may hold at most (the provider's max_concurrency, the server
#: database's pool and overflow); the clients' keep-alive connections are bounded by the run's clients
POOL_BOUNDS = {"upstream": ProviderConfig.model_fields["max_concurrency"].default, "postgresql": POOL_SIZE + POOL_OVERFLOW}
CLIENT_CONNECTIONS = 4  # httpx's max_connections per client below


def _range(samples: list[dict[str, Any]], figure: str) -> tuple[float, float]:
    values = [float(s[figure]) for s in samples]
    return min(values), max(values)


def summarize(samples: list[dict[str, Any]], warmup_min: float, duration_s: float, clients: int) -> tuple[str, bool]:
    lines = [f"# Soak run: {duration_s / 60:.0f} min, samples every minute, warm-up {warmup_min:g} min", ""]
    ok = True
    for name in dict.fromkeys(s["gateway"] for s in samples):
        rows = [s for s in samples if s["gateway"] == name]
        after = [s for s in rows if s["minute"] > warmup_min] or rows[-1:]
        lines += [
            f"## {name}",
            "",
            "| minute | RSS MB | fds | held fds | connections (clients/upstream/pg/redis) | tasks | threads | DB MB | WAL MB | answered | fault failures | unexpected | log ERRORs | plain p50 ms | p99 ms |",
            "|" + " --- |" * 15,
        ]
        for s in rows:
            lines.append(
                f"| {s['minute']:.0f} | {s['rss_mb']} | {s['open_fds']} | {s['held_fds']} | {'/'.join(str(n) for n in s['connections'].values())} | {s['asyncio_tasks']} | {s['threads']} | {s['db_mb']} | {s['wal_mb']} | {s['answered']} | "
                f"{s['fault_failures']} | {s['unexpected_failures']} | {s['log_errors']} | {s['plain_p50_ms']} | {s['plain_p99_ms']} |"
            )
        lines.append("")
        wal_bound = after[-1].get("wal_bound_mb")
        # SQLite's WAL is the gateway's and must stay flat; PostgreSQL's is the server's, bounded by max_wal_size
        for figure in FLAT_FIGURES if wal_bound is not None else (*FLAT_FIGURES, "wal_mb"):
            low, high = _range(after, figure)
            # a figure near zero (the WAL after a checkpoint) is judged on an absolute floor of 1 unit
            spread = (high - low) / max(low, 1.0)
            verdict = "flat" if spread <= FLAT else "NOT FLAT"
            ok &= spread <= FLAT
            lines.append(f"- {figure}: {low:g} to {high:g} after the warm-up ({spread:.1%}): {verdict}")
        if wal_bound is not None:
            low, high = _range(after, "wal_mb")
            ok &= high <= wal_bound
            lines.append(f"- wal_mb: {low:g} to {high:g} after the warm-up, the server's WAL against its max_wal_size ({wal_bound} MB): {'within' if high <= wal_bound else 'OVER'}")
        bounds = {"clients": clients * CLIENT_CONNECTIONS, **POOL_BOUNDS}
        for peer in after[0]["connections"]:
            counts = [s["connections"][peer] for s in after]
            bound = bounds.get(peer)
            within = bound is None or max(counts) <= bound
            ok &= within
            verdict = "" if bound is None else f" (bound {bound}): {'within' if within else 'OVER'}"
            lines.append(f"- connections, {peer}: {min(counts)} to {max(counts)} after the warm-up{verdict}")
        grow = [(b["db_mb"] - a["db_mb"]) * 2**20 / max(1, b["answered"] - a["answered"]) for a, b in itertools.pairwise(after)]
        if grow:
            lines.append(
                f"- database growth: {min(grow):.0f} to {max(grow):.0f} bytes per request a minute (the request log keeps a row per request; retention prunes after 30 days)"
            )
        unexpected = rows[-1]["unexpected_failures"]
        ok &= unexpected == 0
        lines.append(
            f"- requests: {rows[-1]['answered']} answered, {rows[-1]['fault_failures']} failed by the injected faults, {unexpected} failed otherwise: {'ok' if unexpected == 0 else 'FAILED'}"
        )
        lines.append("")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=duration, default=duration("30m"), help="how long (90s, 30m, 2h; default 30m)")
    p.add_argument("--sample-every", type=duration, default=60.0, help="seconds between samples (default 60)")
    p.add_argument("--warmup", type=duration, default=None, help="samples before this are not judged (default: a sixth of the run, at least 2 min)")
    p.add_argument("--clients", type=int, default=6, help="concurrent clients per gateway (default 6)")
    p.add_argument("--only", default="sqlite,pg", help="gateways: sqlite, pg (PostgreSQL + Redis), or both (default)")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the pg gateway")
    p.add_argument("--out", type=Path, default=None, help="results directory (default loadtest/results/soak-<time>)")
    args = p.parse_args(argv)
    warmup_s = args.warmup if args.warmup is not None else max(120.0, args.duration / 6)
    out = args.out or REPO / "loadtest" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    upstream_port = free_port()
    fake_args = [python, str(REPO / "loadtest" / "fake_upstream_server.py"), "--port", str(upstream_port), "--latency", "0.02"]
    fake_args += [arg for model, behaviour in FAULTS.items() for arg in ("--by-model", f"{model}={behaviour}")]
    fake_log = (out / "fake-upstream.log").open("wb")
    fake = subprocess.Popen(fake_args, stdout=fake_log, stderr=subprocess.STDOUT, start_new_session=True)
    gateways: list[Gateway] = []
    wanted = {s.strip() for s in args.only.split(",")}
    if "sqlite" in wanted:
        gateways.append(Gateway("sqlite", out / "sqlite.yaml", free_port(), f"sqlite+aiosqlite:///{out}/sqlite/admiral.db", "memory://", out / "sqlite.log"))
        (out / "sqlite").mkdir(exist_ok=True)
    if "pg" in wanted:
        _psql("postgres", f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        _psql("postgres", f"CREATE DATABASE {PG_DB}")
        gateways.append(Gateway("pg", out / "pg.yaml", free_port(), f"postgresql+asyncpg://postgres@{HOST}:5432/{PG_DB}", args.redis, out / "pg.log"))
    try:
        for gw in gateways:
            gw.write_config(upstream_port, [KEY])
            gw.start(python)
        print(f"soak: {args.duration / 60:g} min against {', '.join(g.name for g in gateways)}; results in {out}", flush=True)
        samples = asyncio.run(run(args, gateways, upstream_port, out))
    finally:
        for gw in gateways:
            code = gw.stop()
            print(f"soak: {gw.name} gateway stopped ({code})", flush=True)
        fake.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            fake.wait(10)
        fake_log.close()
    report, ok = summarize(samples, warmup_s / 60, args.duration, args.clients)
    (out / "summary.md").write_text(report + "\n")
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
