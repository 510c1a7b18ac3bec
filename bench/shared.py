"""The shared mode (``run.py --shared``, issue 21): the gateway on Redis + PostgreSQL beside the embedded one.

Both gateways run the same ``gateway.yaml`` (1 worker, pinned to the server core): the embedded one
on a fresh SQLite file and in-process state, the shared one on Redis database ``REDIS_DB`` (flushed
first) and a fresh PostgreSQL database ``PG_DATABASE`` (dropped, created and migrated). Their runs
are interleaved in rounds: misses, then hits, at c=``--connections``.

Before them, a third gateway on the same Redis and PostgreSQL, reaching Redis through
``redis_trips.TripCounter`` (a counting proxy, kept off the measured runs), gets ``COUNTED``
misses one at a time and as many hits: Redis round trips and commands per request from
``redis_trips.measure``, then PostgreSQL transactions per request from ``pg_stat_database``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis_trips
import servers
import stalls
from load import Workload
from procs import HOST, Server, http_call

if TYPE_CHECKING:
    from scenarios import Bench

#: a Redis database number nothing else on the machine uses (flushed at each run)
REDIS_URL = f"redis://{HOST}:6379/11"
PG_DATABASE = "admiral_bench_shared"
PG_URL = f"postgresql+asyncpg://postgres@{HOST}:5432/{PG_DATABASE}"
#: misses (and as many hits) sent one at a time behind the per-request counts
COUNTED = 200
#: PostgreSQL 15 sends an idle backend's statistics within 10 s: wait that long before reading them
PG_STATS_DELAY_S = 11.0


def fresh_backends() -> None:
    """Empty the Redis database of ``REDIS_URL`` and make PostgreSQL database ``PG_DATABASE`` anew (the gateway migrates it)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    finally:
        client.close()
    stalls._psql("postgres", f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
    stalls._psql("postgres", f"CREATE DATABASE {PG_DATABASE}")


def gateway(command: str, workdir: Path, upstream_port: int, cpus: str | None, name: str = "gateway-shared") -> Server:
    """The bench's gateway on ``REDIS_URL`` and ``PG_URL``, both emptied first (also the profilers' ``--shared``)."""
    fresh_backends()
    return servers.gateway(command, workdir, upstream_port, cpus, name=name, database_url=PG_URL, state_url=REDIS_URL)


def run(bench: Bench) -> None:
    """Misses and hits, embedded against shared, in interleaved rounds; Redis and PostgreSQL work per request."""
    print(f"shared mode: the gateway on Redis + PostgreSQL beside the embedded one, 1 worker each, {bench.rounds} interleaved rounds", flush=True)
    c = bench.connections
    misses = Workload("bench", unique=True, auth=servers.GATEWAY_KEY)
    hits = Workload("bench", unique=False, auth=servers.GATEWAY_KEY)
    assert bench.gateway_cmd is not None
    try:
        shared = gateway(bench.gateway_cmd, bench.workdir, bench.upstream_port, bench.plan.server)
    except (OSError, RuntimeError, subprocess.SubprocessError, ImportError) as exc:
        bench.warnings.append(f"shared: Redis at {REDIS_URL} or PostgreSQL at {HOST}:5432 not usable ({exc}); skipped")
        return
    count(bench, misses, hits)
    with contextlib.ExitStack() as stack:
        up = {"embedded": stack.enter_context(bench._gateway(bench.plan.server, name="gateway-embedded")), "shared": stack.enter_context(shared)}
        for name, gw in up.items():
            bench.check(gw, hits)
            cache = bench.check(gw, hits).get("x-admiral-cache", "<no header>")
            if cache != "hit":
                bench.warnings.append(f"shared: the {name} gateway answered a repeated request with x-admiral-cache: {cache}")
        runs = (
            ("shared_embedded_rps", f"embedded gateway, cache misses, c={c}", "embedded", misses, c),
            ("shared_rps", f"shared gateway (Redis + PostgreSQL), cache misses, c={c}", "shared", misses, c),
            ("shared_embedded_hits_rps", f"embedded gateway, cache hits, c={c}", "embedded", hits, c),
            ("shared_hits_rps", f"shared gateway (Redis + PostgreSQL), cache hits, c={c}", "shared", hits, c),
        )
        bench.interleave(runs, up)


def count(bench: Bench, misses: Workload, hits: Workload) -> None:
    """Redis round trips and commands, PostgreSQL transactions, per miss and per hit (requests one at a time).

    ``pg_stat_database`` is this database's alone: its commits and rollbacks are the gateway's
    transactions (a read is a rolled-back one). Redis's command counts are the whole server's (see
    redis_trips.py): other clients of this Redis add to them.
    """
    assert bench.gateway_cmd is not None
    counter = redis_trips.TripCounter(REDIS_URL)
    try:
        gw = servers.gateway(
            bench.gateway_cmd, bench.workdir, bench.upstream_port, bench.plan.server, name="gateway-counted", database_url=PG_URL, state_url=counter.url
        )
        with gw:
            counts = redis_trips.measure(f"http://{HOST}:{gw.port}", servers.GATEWAY_KEY, counter, REDIS_URL, COUNTED)
            for kind, phase in counts.items():
                top = ", ".join(f"{name} {calls / phase.requests:.2f}" for name, calls in phase.commands.most_common(6))
                bench.record(f"shared_redis_trips_per_{kind}", phase.trips_per_request, "trips", f"shared gateway, Redis round trips per {kind}")
                bench.record(f"shared_redis_commands_per_{kind}", phase.commands_per_request, "cmd", f"shared gateway, Redis commands per {kind}", top)
            for kind, work in (("miss", misses), ("hit", hits)):
                bodies = work.bodies()
                _ask(gw, work, bodies(-1))  # not counted: for hits, the miss that stores the answer
                time.sleep(PG_STATS_DELAY_S)  # what came before is in pg_stat_database
                before = pg_transactions()
                for i in range(COUNTED):
                    _ask(gw, work, bodies(i))
                time.sleep(PG_STATS_DELAY_S)  # the writes behind the requests land, and their statistics arrive
                commits, rollbacks, inserted = (after - b for b, after in zip(before, pg_transactions(), strict=True))
                note = f"commits {commits / COUNTED:.3f}, rollbacks {rollbacks / COUNTED:.3f}, rows inserted {inserted / COUNTED:.2f}"
                bench.record(
                    f"shared_pg_transactions_per_{kind}", (commits + rollbacks) / COUNTED, "xact", f"shared gateway, PostgreSQL transactions per {kind}", note
                )
    finally:
        counter.close()


def _ask(gw: Server, work: Workload, body: bytes) -> None:
    status, _, data = http_call(gw.port, "POST", work.path, body, work.headers())
    if status != 200:
        raise RuntimeError(f"{gw.name} answered {status} while counting: {data[:300]!r}")


def pg_transactions() -> tuple[int, int, int]:
    """Commits, rollbacks and rows inserted in ``PG_DATABASE`` so far."""
    out = stalls._psql("postgres", f"SELECT xact_commit, xact_rollback, tup_inserted FROM pg_stat_database WHERE datname = '{PG_DATABASE}'")
    commits, rollbacks, inserted = (int(x) for x in out.split("|"))
    return commits, rollbacks, inserted
