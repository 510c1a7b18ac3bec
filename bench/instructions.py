"""Instructions per request under callgrind: a repeatable figure for A/B changes on a noisy machine.

``python bench/instructions.py [--requests 1000] [--hits] [--stream] [--shared] [--tree PATH ...] [--passthrough] [--constant]``

Wall-clock figures on a shared VM drift by ±20 % from one minute to the next; valgrind's
callgrind counts the instructions a process runs instead, within about 1 % for the same code and
load (1.349 and 1.365 M per cache miss in two runs). It starts nginx and each server
under ``valgrind --tool=callgrind`` with counting off, warms it up with 300 requests, counts
``--requests`` requests of the cache-miss (or ``--hits``) workload from wrk with 10 connections,
and prints instructions per request. Each ``--tree`` is a checkout of this repository (run with
``PYTHONPATH=tree``), so two versions can be compared in one go; without one, the installed
gateway. What it cannot see: time in the kernel (system calls, page faults, context switches)
and waiting, so a change that saves those shows in ``run.py``, not here. ``--shared`` runs each
gateway on Redis + PostgreSQL as ``run.py --shared`` does (both emptied before each), and counts
the gateway's instructions only, not Redis's or PostgreSQL's. Needs valgrind
(``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import servers
import shared
import tools
from load import Workload, wrk
from procs import Server, free_port
from upstream import STREAM_PATH, nginx_server

WARMUP_REQUESTS = 300
CONNECTIONS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per server (default 1000)")
    parser.add_argument("--hits", action="store_true", help="one fixed prompt (cache hits) instead of unique ones")
    parser.add_argument("--tree", action="append", default=[], type=Path, help="a checkout of this repository to measure (repeatable)")
    parser.add_argument("--passthrough", action="store_true", help="also measure the FastAPI + aiohttp passthrough")
    parser.add_argument("--constant", action="store_true", help="also measure the FastAPI endpoint returning a constant (the cache hits' baseline)")
    parser.add_argument("--stream", action="store_true", help="streamed requests (the stream workload's 40 chunks) instead of plain ones")
    parser.add_argument("--shared", action="store_true", help="the gateways on Redis + PostgreSQL (as run.py --shared starts them)")
    return parser.parse_args(argv)


def under_callgrind(server: Server, out: Path) -> Server:
    """``server`` with its interpreter run by callgrind, counting nothing until told to."""
    # children traced: the gateway's command may be a script that execs the interpreter
    # a vgdb prefix of its own: callgrind_control reaches this valgrind only, not another run's
    tool = ["valgrind", f"--vgdb-prefix={out.parent / 'vgdb'}", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes", f"--callgrind-out-file={out}"]
    at = 3 if server.cmd[0] == "taskset" else 0  # after "taskset -c CPUS"
    server.cmd = [*server.cmd[:at], *tool, *server.cmd[at:]]
    return server


def per_request(server: Server, out: Path, work: Workload, requests: int, cpus: str | None) -> float:
    """Instructions the server ran per request for ``requests`` requests, counted after a warm-up."""
    server.start(timeout=300)
    try:
        wrk(server.port, work, connections=CONNECTIONS, duration=120, cpus=cpus, stop_after=WARMUP_REQUESTS)
        # addressed by prefix and process id: another callgrind on the machine is left alone
        control = ["callgrind_control", f"--vgdb-prefix={out.parent / 'vgdb'}"]
        assert server.proc is not None
        pid = str(server.proc.pid)
        subprocess.run([*control, "--instr=on", pid], check=True, capture_output=True)
        done = wrk(server.port, work, connections=CONNECTIONS, duration=600, cpus=cpus, stop_after=requests)
        subprocess.run([*control, "--dump", pid], check=True, capture_output=True)
    finally:
        server.stop()
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:]))
    total = int(re.search(r"^summary: (\d+)$", dumps[0].read_text(), re.MULTILINE).group(1))  # type: ignore[union-attr]
    return total / max(done.requests, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan, workdir = tools.measuring_setup("valgrind", "valgrind", "admiral-instructions-")
    kind = ("streamed " if args.stream else "") + ("cache hits" if args.hits else "cache misses") + (", shared mode" if args.shared else "")
    print(f"bench: instructions per request, {kind}, {args.requests} requests at c={CONNECTIONS} after {WARMUP_REQUESTS} unmeasured", flush=True)
    with nginx_server(workdir, free_port(), plan.load) as upstream:
        # servers made just before each runs: a shared gateway empties Redis and PostgreSQL, which
        # the previous one must not have filled for it (its hits would come from another tier)
        runs: list[tuple[str, Callable[[], Server], Workload]] = []
        if args.passthrough:
            work = Workload("bench-stream", not args.hits, stream=True, path=STREAM_PATH) if args.stream else Workload("bench", not args.hits)
            runs.append(("passthrough", lambda: servers.passthrough(workdir, upstream.port, plan.server), work))
        if args.constant:
            runs.append(("constant endpoint", lambda: servers.constant(workdir, plan.server), Workload("bench", unique=False)))
        trees = args.tree or [None]
        start = shared.gateway if args.shared else servers.gateway
        for i, tree in enumerate(trees):
            command = tools.tree_command(workdir, tree, f"tree-{i}") if tree is not None else tools.gateway_command()
            if command is None:
                sys.exit("bench: admiral-optimizer is not installed (pip install -e .) and no --tree was given")
            work = Workload("bench-stream" if args.stream else "bench", not args.hits, servers.GATEWAY_KEY, stream=args.stream)
            runs.append((str(tree or "gateway (installed)"), functools.partial(start, command, workdir, upstream.port, plan.server, name=f"gateway-{i}"), work))
        for i, (label, make, work) in enumerate(runs):
            out = workdir / f"callgrind-{i}.out"
            count = per_request(under_callgrind(make(), out), out, work, args.requests, plan.load)
            print(f"  {label:<60} {count / 1e6:8.3f} M instructions per request", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
