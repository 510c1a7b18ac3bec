"""Tracing on against tracing off: throughput of cache misses and c=1 latency, same code, interleaved rounds.

``python bench/tracing.py [--rounds 3] [--seconds 10] [--sample-ratio R] [--tree PATH]``

Two gateways from one tree (the installed one, or ``--tree``) run side by side on the benchmark's
nginx upstream and CPU plan: one with tracing off, one exporting every span over OTLP/HTTP to a
sink on the load generator's core (it reads each export and answers it, as a collector would);
``--sample-ratio`` samples that share of the requests (``parentbased_traceidratio``), else all.
Each round measures both, one after the other: cache misses at c=50 (req/s) and at c=1 (p50).
Prints each figure's median and the on/off ratio with its per-round range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import servers
import tools
from load import Workload, wrk
from procs import Server, free_port, pinned
from upstream import nginx_server

#: a minimal OTLP/HTTP collector: reads each export, counts its bytes, answers an empty ExportTraceServiceResponse
SINK = """
import sys
from aiohttp import web
async def traces(request):
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")
async def health(request):
    return web.Response(text="ok")
app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/v1/traces", traces)
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--sample-ratio", type=float, help="trace this share of the requests (default: every one)")
    parser.add_argument("--tree", type=Path, help="a checkout of this repository to measure (default: the installed gateway)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan, workdir = tools.measuring_setup("wrk", "wrk", "admiral-tracing-")
    command = tools.tree_command(workdir, args.tree, "tree") if args.tree else tools.gateway_command()
    if command is None:
        sys.exit("bench: admiral-optimizer is not installed (pip install -e .) and no --tree was given")
    print(f"bench: tracing off vs on, {args.rounds} rounds of {args.seconds:g} s; {plan.describe()}", flush=True)
    sink_port = free_port()
    sink = Server("otlp-sink", pinned([sys.executable, "-c", SINK, str(sink_port)], plan.load), sink_port, log=workdir / "sink.log")
    figures: dict[str, dict[str, list[float]]] = {"off": {"rps": [], "p50": []}, "on": {"rps": [], "p50": []}}
    work = Workload("bench", True, servers.GATEWAY_KEY)
    with nginx_server(workdir, free_port(), plan.load) as upstream, sink:
        off = servers.gateway(command, workdir, upstream.port, plan.server, name="tracing-off")
        on = servers.gateway(command, workdir, upstream.port, plan.server, name="tracing-on")
        off.env["OTEL_SDK_DISABLED"] = "true"
        on.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
        on.env["OTEL_SERVICE_NAME"] = "admiral-bench"
        if args.sample_ratio is not None:
            on.env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            on.env["OTEL_TRACES_SAMPLER_ARG"] = str(args.sample_ratio)
        with off, on:
            for server in (off, on):  # warm-up
                wrk(server.port, work, connections=50, duration=3, cpus=plan.load)
            for round_ in range(args.rounds):
                for label, server in (("off", off), ("on", on)):
                    many = wrk(server.port, work, connections=50, duration=args.seconds, cpus=plan.load)
                    one = wrk(server.port, work, connections=1, duration=args.seconds / 2, cpus=plan.load)
                    figures[label]["rps"].append(many.rps)
                    figures[label]["p50"].append(one.p50_ms)
                    print(f"  round {round_ + 1} tracing {label:<3}  misses c=50 {many.rps:8.0f} req/s   c=1 p50 {one.p50_ms:.3f} ms", flush=True)
    rps_ratios = [a / b for a, b in zip(figures["on"]["rps"], figures["off"]["rps"], strict=True)]
    p50_ratios = [a / b for a, b in zip(figures["on"]["p50"], figures["off"]["p50"], strict=True)]
    print(
        f"misses c=50: off {statistics.median(figures['off']['rps']):.0f} req/s, on {statistics.median(figures['on']['rps']):.0f} req/s: "
        f"{statistics.median(rps_ratios):.2f}x ({min(rps_ratios):.2f}-{max(rps_ratios):.2f})"
    )
    print(
        f"c=1 p50: off {statistics.median(figures['off']['p50']):.3f} ms, on {statistics.median(figures['on']['p50']):.3f} ms: "
        f"{statistics.median(p50_ratios):.2f}x ({min(p50_ratios):.2f}-{max(p50_ratios):.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
