"""Admiral Optimizer overhead benchmark: ``python bench/run.py [--quick] [--duration S]``.

Starts nginx as a static upstream, then measures a FastAPI + aiohttp passthrough, a constant
FastAPI endpoint and the gateway against it with wrk (and, for streamed answers, with the stream
client of stream_load.py), prints every figure and the ratios against the targets of issue 8,
and writes them to ``bench/results/latest.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import tools

SCENARIOS = ("baselines", "gateway", "stream", "workers", "rss", "stalls")
#: run only when asked for (``--shared`` or ``--only shared``): it needs Redis and PostgreSQL
EXTRA_SCENARIOS = ("shared",)
#: share of CPU time busy with no benchmark running above which the figures are not trustworthy
BUSY = 0.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before each run (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections for throughput runs (default 50)")
    p.add_argument("--ttfb-requests", type=int, default=300, help="streamed requests per TTFB median, per round (default 300)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the baseline and gateway runs, figures are medians (default 5, --quick 3)")
    p.add_argument("--stall-duration", type=float, default=60.0, help="seconds of each run of the stalls scenario (default 60)")
    p.add_argument("--quick", action="store_true", help="3 rounds, and RSS marks at 2k/20k requests instead of 10k/100k")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCENARIOS + EXTRA_SCENARIOS)} (default: all but shared)")
    p.add_argument(
        "--shared",
        action="store_true",
        help="the gateway on Redis + PostgreSQL beside the embedded one (issue 21); alone, or with the scenarios --only names",
    )
    p.add_argument("--skip-gateway", action="store_true", help="baselines only (no admiral-optimizer needed)")
    p.add_argument("--gateway-tree", type=Path, default=None, help="run the gateway from this checkout (on PYTHONPATH) instead of the installed one")
    p.add_argument("--no-install", action="store_true", help="never apt-get or pip install anything")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "latest.json", help="results file")
    args = p.parse_args(argv)
    if args.only is None:
        args.only = "shared" if args.shared else ",".join(SCENARIOS)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.shared and "shared" not in args.only:
        args.only.append("shared")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    unknown = set(args.only) - set(SCENARIOS + EXTRA_SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.skip_gateway:
        args.only = [s for s in args.only if s == "baselines"]
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    needs_gateway = any(s != "baselines" for s in args.only)
    if not args.no_install:
        tools.ensure_system_tools()
        tools.ensure_python(install_gateway=needs_gateway)

    import report
    from procs import CpuPlan, busy_fraction, free_port
    from scenarios import Bench
    from upstream import nginx_server

    gateway_cmd = tools.gateway_command()
    if needs_gateway and gateway_cmd is None:
        sys.exit("bench: admiral-optimizer is not installed (pip install -e . or use --skip-gateway)")

    plan = CpuPlan.detect()
    if plan.load is not None:
        # this process runs the TTFB client: keep it on the load core with wrk and nginx
        os.sched_setaffinity(0, {int(c) for c in plan.load.split(",")})
    workdir = BENCH / "results" / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    if args.gateway_tree is not None:
        gateway_cmd = tools.tree_command(workdir, args.gateway_tree, "tree")
    rss_marks = (2_000, 20_000) if args.quick else (10_000, 100_000)
    print(f"bench: {plan.describe()}; {args.duration:g}s per run, c={args.connections}", flush=True)

    busy_before = busy_fraction()
    if busy_before > BUSY:
        print(f"bench: warning: the machine is already {busy_before:.0%} busy; figures will be low and noisy")
    upstream_port = free_port()
    bench = Bench(args.duration, args.warmup, args.connections, args.ttfb_requests, rss_marks, plan, workdir, upstream_port, gateway_cmd, args.rounds)
    with nginx_server(workdir / "nginx", upstream_port, plan.load):
        if {"baselines", "gateway", "stream"} & set(args.only):
            bench.compare(with_baselines="baselines" in args.only, with_gateway="gateway" in args.only, with_stream="stream" in args.only)
        for name in ("workers", "rss"):
            if name in args.only:
                getattr(bench, name)()
        if "stalls" in args.only:
            import stalls

            stalls.run(bench, args.stall_duration)
        if "shared" in args.only:
            import shared

            shared.run(bench)
    busy_after = busy_fraction()

    bench.ceiling_check()
    for when, busy in (("before", busy_before), ("right after", busy_after)):
        if busy > BUSY:
            bench.warnings.append(f"other work kept the machine {busy:.0%} busy {when} the run")
    rows = report.ratios(bench.figures, bench.rounds_seen)
    report.print_ratios(rows)
    for warning in bench.warnings:
        print(f"warning: {warning}")
    settings = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "ttfb_requests": args.ttfb_requests,
        "rss_marks": list(rss_marks),
        "stall_duration_s": args.stall_duration,
        "rounds": args.rounds,
        "scenarios": args.only,
    }
    report.write(args.out, settings, report.machine(plan.describe()), bench.figures, rows, bench.warnings, bench.rounds_seen)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')} in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
