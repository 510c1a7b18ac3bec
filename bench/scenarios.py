"""The scenarios: each starts what it needs, measures, records figures and stops what it started."""

from __future__ import annotations

import contextlib
import json
import statistics
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servers
from fixtures import PROMPT_PAD, request_body
from load import Workload, WrkResult, ttfb, wrk
from procs import CpuPlan, Server, http_call
from upstream import JSON_PATH, STREAM_PATH

GATEWAY_AUTH = {"Authorization": f"Bearer {servers.GATEWAY_KEY}"}


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

    # -- helpers ---------------------------------------------------------------------------------

    def record(self, key: str, value: float, unit: str, label: str, note: str = "") -> None:
        self.figures[key] = round(value, 3)
        print(f"  {label:<52} {value:>10.2f} {unit:<5} {note}".rstrip(), flush=True)

    def check(self, server: Server, work: Workload) -> dict[str, str]:
        """One request of the workload must come back 200 with a chat completion."""
        headers = {"Content-Type": "application/json"}
        if work.auth:
            headers["Authorization"] = f"Bearer {work.auth}"
        if work.cache_control:
            headers["Cache-Control"] = work.cache_control
        prompt = f"[check-{uuid.uuid4().hex[:8]}] {PROMPT_PAD}" if work.unique else None
        body = request_body(work.model, prompt) if prompt else _fixed_body(work)
        status, resp_headers, data = http_call(server.port, "POST", JSON_PATH, body, headers)
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

    def ceiling_check(self) -> None:
        """Warn when a server got near what the load generator alone can send."""
        ceiling = self.figures.get("wrk_ceiling_rps")
        for key, value in self.figures.items():
            if ceiling and key.endswith("_rps") and key != "wrk_ceiling_rps" and value > 0.5 * ceiling:
                self.warnings.append(f"{key} is over half the load generator ceiling; wrk may be the limit")

    def _gateway(self, cpus: str | None, workers: int = 1, name: str = "gateway") -> Server:
        assert self.gateway_cmd is not None
        return servers.gateway(self.gateway_cmd, self.workdir, self.upstream_port, cpus, workers, name)

    # -- scenarios -------------------------------------------------------------------------------

    def compare(self, with_baselines: bool, with_gateway: bool) -> None:
        """Passthrough, constant endpoint and gateway side by side, their runs interleaved in rounds.

        All servers run at once on the server core (only the one under load does any work), and
        each round measures every figure once, so a slow minute of the machine lands on all of
        them alike; every figure is the median of its rounds.
        """
        which = " and ".join(name for name, on in (("baselines", with_baselines), ("gateway", with_gateway)) if on)
        print(f"{which}, 1 worker, {self.rounds} interleaved rounds", flush=True)
        misses = Workload("bench", unique=True)
        gw_misses = Workload("bench", unique=True, auth=servers.GATEWAY_KEY)
        gw_hits = Workload("bench", unique=False, auth=servers.GATEWAY_KEY)
        if with_baselines:
            # nginx shares the load core with wrk here, so this bounds what wrk can send at all
            ceiling = wrk(self.upstream_port, misses, connections=self.connections, duration=min(self.duration, 5), cpus=self.plan.load)
            self.record("wrk_ceiling_rps", ceiling.rps, "req/s", "wrk straight to nginx (load generator ceiling)")
        with contextlib.ExitStack() as started:
            # (figure, label, server, workload, connections), each baseline run next to its gateway run
            runs: list[tuple[str, str, Server, Workload, int]] = []
            if with_baselines:
                passthrough = started.enter_context(servers.passthrough(self.workdir, self.upstream_port, self.plan.server))
                constant = started.enter_context(servers.constant(self.workdir, self.plan.server))
            if with_gateway:
                gw = started.enter_context(self._gateway(self.plan.server))
                self.check(gw, gw_hits)
                cache = self.check(gw, gw_hits).get("x-admiral-cache", "<no header>")
                if cache != "hit":
                    self.warnings.append(f"gateway: a repeated request answered x-admiral-cache: {cache}")
            for pair in (
                (("passthrough_rps", f"passthrough, unique prompts, c={self.connections}", misses, self.connections),
                 ("gateway_rps", f"gateway, unique prompts (cache misses), c={self.connections}", gw_misses, self.connections)),
                (("constant_rps", f"constant endpoint, c={self.connections}", Workload("bench", unique=False), self.connections),
                 ("gateway_hits_rps", f"gateway, one fixed prompt (cache hits), c={self.connections}", gw_hits, self.connections)),
                (("passthrough_c1_p50_ms", "passthrough, c=1 p50", misses, 1), ("gateway_c1_p50_ms", "gateway, c=1 p50 (misses)", gw_misses, 1)),
            ):
                (base_key, base_label, base_work, base_c), (gw_key, gw_label, gw_work, gw_c) = pair
                if with_baselines:
                    runs.append((base_key, base_label, constant if base_key == "constant_rps" else passthrough, base_work, base_c))
                if with_gateway:
                    runs.append((gw_key, gw_label, gw, gw_work, gw_c))
            samples: dict[str, list[float]] = {}
            for round_number in range(self.rounds):
                for key, _, server, work, connections in runs:
                    result = self.load(server, work, connections, warm=round_number == 0)
                    samples.setdefault(key, []).append(result.p50_ms if key.endswith("_ms") else result.rps)
            self.rounds_seen.update({key: [round(v, 3) for v in values] for key, values in samples.items()})
            for key, label, *_ in runs:
                values = samples[key]
                note = f"median of {len(values)}, {min(values):.2f} to {max(values):.2f}"
                self.record(key, statistics.median(values), "ms" if key.endswith("_ms") else "req/s", label, note)
            if with_gateway:
                streamed = ttfb(gw.port, JSON_PATH, _stream_body, GATEWAY_AUTH, self.ttfb_requests)
                if streamed.errors:
                    self.warnings.append(f"gateway: {streamed.errors} streamed requests failed")
                self.record("ttfb_gateway_ms", streamed.median_ms, "ms", f"stream TTFB through the gateway (median of {streamed.samples})")
        if with_baselines:
            direct = ttfb(self.upstream_port, STREAM_PATH, _stream_body, {}, self.ttfb_requests)
            self.record("ttfb_direct_ms", direct.median_ms, "ms", f"stream TTFB direct to nginx (median of {direct.samples})")

    def workers(self) -> None:
        """Misses throughput with 1 worker and with 2, each free to use every core."""
        print("gateway, 1 vs 2 workers (servers unpinned)", flush=True)
        misses = Workload("bench", unique=True, auth=servers.GATEWAY_KEY)
        for n in (1, 2):
            with self._gateway(self.plan.every, workers=n, name=f"gateway-{n}w") as gw:
                self.record(
                    f"gateway_{n}w_rps", self.load(gw, misses, self.connections).rps, "req/s", f"gateway --workers {n}, unique prompts, c={self.connections}"
                )

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


def _stream_body(i: int) -> bytes:
    return request_body("bench-stream", f"[stream-{uuid.uuid4().hex[:8]}-{i}] {PROMPT_PAD}", stream=True)


def _fixed_body(work: Workload) -> bytes:
    env = work.env()
    return (env["WRK_HEAD"] + env["WRK_TAIL"]).encode()
