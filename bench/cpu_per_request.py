"""CPU time, system calls and context switches per request, kernel included, from ``perf stat``.

``python bench/cpu_per_request.py [--hits] [--connections 50] [--rounds 2] [--passthrough] [--shared] [--tree PATH ...]``

Throughput on this VM drifts by ±20 %; the CPU a server spends per request (all its threads,
user and kernel time) drifts far less, and unlike callgrind's instruction counts
(``instructions.py``) it includes the kernel: socket writes that wake the client, ``getpid``
behind every ``asyncio.get_running_loop()`` on CPython 3.11, SQLite's ``pwrite``/``pread``, futex
hand-offs between threads. Each server runs under the benchmark's load (nginx upstream, wrk,
the CPU plan of ``run.py``); after a warm-up, ``perf stat -p`` counts for 5 s while the gateway's
own ``admiral_requests_total`` says how many requests that was (for the passthrough, wrk's rate
times the window). Needs ``perf`` (``apt-get install linux-perf``) and permission to use it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import servers
import shared
import tools
from load import Workload, WrkResult, wrk
from procs import Server, free_port
from upstream import nginx_server

WINDOW_S = 5
EVENTS = "task-clock,raw_syscalls:sys_enter,context-switches"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", action="store_true", help="one fixed prompt (cache hits) instead of unique ones")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per server, interleaved (default 2)")
    parser.add_argument("--passthrough", action="store_true", help="also measure the FastAPI + aiohttp passthrough")
    parser.add_argument("--shared", action="store_true", help="the gateway on Redis + PostgreSQL (as run.py --shared starts it)")
    parser.add_argument("--tree", action="append", default=[], type=Path, help="a checkout of this repository to measure (repeatable)")
    return parser.parse_args(argv)


def requests_served(port: int) -> float:
    """The gateway's ``admiral_requests_total``, summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(r"^admiral_requests_total\{[^}]*\} (\S+)$", text, re.M))


def measure(server: Server, work: Workload, connections: int, cpus: str | None, gateway: bool) -> str:
    """One line: µs of CPU, system calls and context switches per request, and wrk's rate."""
    assert server.proc is not None
    wrk(server.port, work, connections=connections, duration=3, cpus=cpus)  # warm-up
    done: list[WrkResult] = []
    load = threading.Thread(target=lambda: done.append(wrk(server.port, work, connections=connections, duration=WINDOW_S + 4, cpus=cpus)))
    load.start()
    time.sleep(1.5)
    before = requests_served(server.port) if gateway else 0.0
    stat = subprocess.run(
        ["perf", "stat", "-x", ",", "-e", EVENTS, "-p", str(server.proc.pid), "--", "sleep", str(WINDOW_S)], capture_output=True, text=True, check=True
    )
    after = requests_served(server.port) if gateway else 0.0
    load.join()
    rate = done[0].requests / done[0].seconds
    served = after - before if gateway else rate * WINDOW_S
    counts = {
        line.split(",")[2]: float(line.split(",")[0])
        for line in stat.stderr.splitlines()
        if line.count(",") >= 2 and line.split(",")[0].replace(".", "").isdigit()
    }
    cpu_us = counts["task-clock"] * 1000 / served  # task-clock is in ms
    return f"{cpu_us:7.1f} µs CPU, {counts['raw_syscalls:sys_enter'] / served:5.2f} syscalls, {counts['context-switches'] / served:5.2f} switches per request; wrk {rate:,.0f} req/s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan, workdir = tools.measuring_setup("perf", "linux-perf", "admiral-cpu-")
    kind = "cache hits" if args.hits else "cache misses"
    print(f"bench: CPU per request, {kind}, c={args.connections}, {WINDOW_S} s counted per round, {args.rounds} rounds", flush=True)
    labels = ["passthrough"] if args.passthrough else []
    labels += [str(tree) for tree in args.tree] or ["gateway (installed)"]
    with nginx_server(workdir, free_port(), plan.load) as upstream:
        for rnd in range(args.rounds):
            for i, label in enumerate(labels):
                if label == "passthrough":
                    server, work = servers.passthrough(workdir, upstream.port, plan.server), Workload("bench", not args.hits)
                else:
                    command = tools.tree_command(workdir, Path(label), f"tree-{i}") if args.tree else tools.gateway_command()
                    if command is None:
                        sys.exit("bench: admiral-optimizer is not installed (pip install -e .) and no --tree was given")
                    start = shared.gateway if args.shared else servers.gateway
                    server = start(command, workdir, upstream.port, plan.server, name=f"gateway-{i}")
                    work = Workload("bench", not args.hits, servers.GATEWAY_KEY)
                with server:
                    line = measure(server, work, args.connections, plan.load, gateway=label != "passthrough")
                print(f"  round {rnd + 1}  {label:<40} {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
