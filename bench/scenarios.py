"""The scenarios: each starts what it needs, measures, records figures and stops what it started."""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servers
from load import Workload, WrkResult, wrk
from procs import CpuPlan, Server, http_call
from stream_load import StreamResult, percentile, stream_load
from upstream import STREAM_PATH

#: the ceiling each kind of throughput figure is compared with: what its load generator sends straight to nginx
CEILINGS = {"_rps": "wrk_ceiling_rps", "_chunks_per_s": "stream_ceiling_chunks_per_s"}
#: unmeasured streams before a TTFB median (first round only)
TTFB_WARMUP = 20
#: one measured run: (figure, label, server name, workload, connections)
Run = tuple[str, str, str, Workload, int]


@dataclass
class Bench:
    """Shared settings of one run and the figures measured so far."""

    duration: float
    warmup: float
    connections: int
    ttfb_requests: int
    rss_marks: tuple[int, int]
    plan: CpuPlan
    workdir: Path
    upstream_port: int
    gateway_cmd: str | None
    rounds: int = 1
    figures: dict[str, Any] = field(default_factory=dict)
    #: every round's value of the figures measured in rounds
    rounds_seen: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: (p99, p99.9, max) in ms of every run of a figure, round by round
    tails: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------------------------------

    def record(self, key: str, value: float, unit: str, label: str, note: str = "") -> None:
        self.figures[key] = round(value, 3)
        print(f"  {label:<52} {value:>10.2f} {unit:<7} {note}".rstrip(), flush=True)

    def check(self, server: Server, work: Workload) -> dict[str, str]:
        """One request of the workload must come back 200 with a chat completion (or a whole stream)."""
        if work.stream:
            result = stream_load(server.port, work, connections=1, requests=1)
            if result.errors:
                raise RuntimeError(f"{server.name} streamed a bad answer: {result.first_error}")
            return {}
        status, resp_headers, data = http_call(server.port, "POST", work.path, work.bodies()(0), work.headers())
        if status != 200 or "choices" not in json.loads(data):
            raise RuntimeError(f"{server.name} answered {status}: {data[:300]!r}")
        return resp_headers

    def load(self, server: Server, work: Workload, connections: int, *, warm: bool = True) -> WrkResult:
        self.check(server, work)
        if warm and self.warmup > 0:
            wrk(server.port, work, connections=connections, duration=self.warmup, cpus=self.plan.load)
        result = wrk(server.port, work, connections=connections, duration=self.duration, cpus=self.plan.load)
        if result.errors:
            self.warnings.append(f"{server.name}: {result.errors} errors of {result.requests} requests")
        return result

    def stream(self, server: Server, work: Workload, connections: int, *, warm: bool = True, ttfb: bool = False) -> StreamResult:
        """Streams of ``work``: ``--ttfb-requests`` of them for a TTFB median, else ``--duration`` seconds."""
        self.check(server, work)
        if ttfb:
            result = stream_load(server.port, work, connections=connections, requests=self.ttfb_requests, warmup=TTFB_WARMUP if warm else 0)
        else:
            if warm and self.warmup > 0:
                stream_load(server.port, work, connections=connections, duration=self.warmup)
            result = stream_load(server.port, work, connections=connections, duration=self.duration)
        if result.errors:
            self.warnings.append(f"{server.name}: {result.errors} bad streams of {result.errors + result.streams}, the first: {result.first_error}")
        return result

    def measure(self, key: str, server: Server, work: Workload, connections: int, warm: bool) -> float:
        """One run for figure ``key``: its throughput, or its median latency (``_ms``); its tail goes to ``tails``."""
        if work.stream:
            streamed = self.stream(server, work, connections, warm=warm, ttfb=key.endswith("_ms"))
            # a throughput run's tail is whole streams (request to last byte), a TTFB run's is the first byte
            times = streamed.ttfb_ms if key.endswith("_ms") else streamed.total_ms
            self.tails.setdefault(key, []).append(tuple(percentile(times, q) for q in (99.0, 99.9, 100.0)))  # type: ignore[arg-type]
            return streamed.ttfb_p50_ms if key.endswith("_ms") else streamed.chunks_per_s
        result = self.load(server, work, connections, warm=warm)
        self.tails.setdefault(key, []).append((result.p99_ms, result.p999_ms, result.max_ms))
        return result.p50_ms if key.endswith("_ms") else result.rps

    def record_tail(self, key: str, label: str) -> None:
        """p99 and p99.9 (medians over the rounds) and max (over all of them) of figure ``key``'s runs."""
        runs = self.tails.get(key)
        if not runs:
            return
        p99 = statistics.median(r[0] for r in runs)
        p999 = statistics.median(r[1] for r in runs)
        top = max(r[2] for r in runs)
        self.figures.update({f"{key}_p99_ms": round(p99, 3), f"{key}_p999_ms": round(p999, 3), f"{key}_max_ms": round(top, 3)})
        print(f"  {'':<4}{label[:44]:<48} tail: p99 {p99:.2f} ms, p99.9 {p999:.2f} ms, max {top:.2f} ms", flush=True)

    def ceiling_check(self) -> None:
        """Warn when a server got near what the load generator alone can send."""
        for suffix, ceiling_key in CEILINGS.items():
            ceiling = self.figures.get(ceiling_key)
            for key, value in self.figures.items():
                if ceiling and key.endswith(suffix) and key != ceiling_key and value > 0.5 * ceiling:
                    self.warnings.append(f"{key} is over half the load generator ceiling ({ceiling_key}); the load generator may be the limit")

    def interleave(self, runs: Sequence[Run], up: dict[str, Server]) -> None:
        """Each run once a round, ``--rounds`` rounds; a figure is the median of its rounds, its tail beside it."""
        samples: dict[str, list[float]] = {}
        for round_number in range(self.rounds):
            for key, _, name, work, connections in runs:
                samples.setdefault(key, []).append(self.measure(key, up[name], work, connections, warm=round_number == 0))
        self.rounds_seen.update({key: [round(v, 3) for v in values] for key, values in samples.items()})
        for key, label, *_ in runs:
            values = samples[key]
            note = f"median of {len(values)}, {min(values):.2f} to {max(values):.2f}"
            self.record(key, statistics.median(values), _unit(key), label, note)
            self.record_tail(key, label)

    def _gateway(self, cpus: str | None, workers: int = 1, name: str = "gateway") -> Server:
        assert self.gateway_cmd is not None
        return servers.gateway(self.gateway_cmd, self.workdir, self.upstream_port, cpus, workers, name)

    # -- scenarios -------------------------------------------------------------------------------

    def compare(self, with_baselines: bool, with_gateway: bool, with_stream: bool = False) -> None:
        """Passthrough, constant endpoint and gateway side by side, their runs interleaved in rounds.

        All servers run at once on the server core (only the one under load does any work), and
        each round measures every figure once, so a slow minute of the machine lands on all of
        them alike; every figure is the median of its rounds. ``with_stream`` adds the streamed
        workload: the passthrough's and the gateway's stream runs, both always.
        """
        which = ", ".join(name for name, on in (("baselines", with_baselines), ("gateway", with_gateway), ("streams", with_stream)) if on)
        print(f"{which}, 1 worker, {self.rounds} interleaved rounds", flush=True)
        c = self.connections
        misses = Workload("bench", unique=True)
        gw_misses = Workload("bench", unique=True, auth=servers.GATEWAY_KEY)
        gw_hits = Workload("bench", unique=False, auth=servers.GATEWAY_KEY)
        # streams: unique prompts (cache misses through the gateway's whole streaming path)
        streams = Workload("bench-stream", unique=True, stream=True, path=STREAM_PATH)
        gw_streams = Workload("bench-stream", unique=True, auth=servers.GATEWAY_KEY, stream=True)
        # nginx shares the load core with the load generator here, so these bound what it can send at all
        if with_baselines:
            ceiling = wrk(self.upstream_port, misses, connections=c, duration=min(self.duration, 5), cpus=self.plan.load)
            self.record("wrk_ceiling_rps", ceiling.rps, "req/s", "wrk straight to nginx (load generator ceiling)")
        if with_stream:
            client_ceiling = stream_load(self.upstream_port, streams, connections=c, duration=min(self.duration, 5))
            self.record("stream_ceiling_chunks_per_s", client_ceiling.chunks_per_s, "chunk/s", "stream client straight to nginx (its ceiling)")
        with contextlib.ExitStack() as started:
            up: dict[str, Server] = {}
            if with_baselines or with_stream:
                up["passthrough"] = started.enter_context(servers.passthrough(self.workdir, self.upstream_port, self.plan.server))
            if with_baselines:
                up["constant"] = started.enter_context(servers.constant(self.workdir, self.plan.server))
            if with_gateway or with_stream:
                up["gateway"] = started.enter_context(self._gateway(self.plan.server))
            if with_gateway:
                self.check(up["gateway"], gw_hits)
                cache = self.check(up["gateway"], gw_hits).get("x-admiral-cache", "<no header>")
                if cache != "hit":
                    self.warnings.append(f"gateway: a repeated request answered x-admiral-cache: {cache}")
            # (figure, label, server, workload, connections): each baseline run next to its gateway run
            plain = (
                (
                    ("passthrough_rps", f"passthrough, unique prompts, c={c}", "passthrough", misses, c),
                    ("gateway_rps", f"gateway, unique prompts (cache misses), c={c}", "gateway", gw_misses, c),
                ),
                (
                    ("constant_rps", f"constant endpoint, c={c}", "constant", Workload("bench", unique=False), c),
                    ("gateway_hits_rps", f"gateway, one fixed prompt (cache hits), c={c}", "gateway", gw_hits, c),
                ),
                (
                    ("passthrough_c1_p50_ms", "passthrough, c=1 p50", "passthrough", misses, 1),
                    ("gateway_c1_p50_ms", "gateway, c=1 p50 (misses)", "gateway", gw_misses, 1),
                ),
            )
            streamed = (
                (
                    ("stream_passthrough_chunks_per_s", f"passthrough, streams relayed, c={c}", "passthrough", streams, c),
                    ("stream_gateway_chunks_per_s", f"gateway, streams relayed (cache misses), c={c}", "gateway", gw_streams, c),
                ),
                (
                    ("ttfb_passthrough_ms", "passthrough, stream TTFB c=1 (median)", "passthrough", streams, 1),
                    ("ttfb_gateway_ms", "gateway, stream TTFB c=1 (median, misses)", "gateway", gw_streams, 1),
                ),
            )
            sides = [(plain, with_baselines, with_gateway), (streamed, with_stream, with_stream)]
            runs = [run for pairs, base_on, gw_on in sides for base, gw in pairs for run, on in ((base, base_on), (gw, gw_on)) if on]
            self.interleave(runs, up)
        if with_stream:
            direct = stream_load(self.upstream_port, streams, connections=1, requests=self.ttfb_requests, warmup=TTFB_WARMUP)
            self.record("ttfb_direct_ms", direct.ttfb_p50_ms, "ms", f"stream TTFB direct to nginx (median of {direct.streams})")

    def workers(self) -> None:
        """Misses throughput with 1 worker and with 2, each free to use every core."""
        print("gateway, 1 vs 2 workers (servers unpinned)", flush=True)
        misses = Workload("bench", unique=True, auth=servers.GATEWAY_KEY)
        for n in (1, 2):
            with self._gateway(self.plan.every, workers=n, name=f"gateway-{n}w") as gw:
                key = f"gateway_{n}w_rps"
                result = self.load(gw, misses, self.connections)
                self.tails[key] = [(result.p99_ms, result.p999_ms, result.max_ms)]
                self.record(key, result.rps, "req/s", f"gateway --workers {n}, unique prompts, c={self.connections}")
                self.record_tail(key, f"gateway --workers {n}")

    def rss(self) -> None:
        """RSS of a fresh gateway after the first and the last mark of unique, no-store requests."""
        first, last = self.rss_marks
        print(f"gateway RSS after {first} and {last} requests", flush=True)
        # no-store: the response cache is bounded by design; what must not grow is everything else
        work = Workload("bench", unique=True, auth=servers.GATEWAY_KEY, cache_control="no-store")
        with self._gateway(self.plan.server, name="gateway-rss") as gw:
            self.check(gw, work)
            self.record("rss_start_mb", gw.rss_mb(), "MiB", "gateway RSS at start")
            done = 1
            for key, mark in (("rss_first_mb", first), ("rss_last_mb", last)):
                while done < mark:
                    step = wrk(gw.port, work, connections=self.connections, duration=600, cpus=self.plan.load, stop_after=mark - done)
                    if step.errors:
                        self.warnings.append(f"gateway-rss: {step.errors} errors of {step.requests} requests")
                    done += max(step.requests, 1)
                self.figures[f"{key.removesuffix('_mb')}_requests"] = done
                self.record(key, gw.rss_mb(), "MiB", f"gateway RSS after {done} requests")


def _unit(key: str) -> str:
    if key.endswith("_ms"):
        return "ms"
    return "chunk/s" if key.endswith("_chunks_per_s") else "req/s"
