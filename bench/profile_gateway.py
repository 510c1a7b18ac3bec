"""Profile the gateway with py-spy under the cache-miss (or cache-hit) load of the benchmark.

``python bench/profile_gateway.py [--duration 20] [--hits] [--stream] [--shared]`` writes ``bench/results/profile.svg`` (a flame
graph) and ``profile.txt`` (collapsed stacks), and prints the functions with the most samples,
by own time and by time including callees, counting only the thread that holds the GIL (the
work that limits a one-process asyncio server). Needs ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import servers
import shared
import tools
from load import Workload, wrk
from procs import CpuPlan, free_port
from stream_load import stream_load
from upstream import nginx_server


def top(collapsed: Path, n: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """Own-time and inclusive-time sample counts per frame from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return own.most_common(n), inclusive.most_common(n), total


#: where a sample's CPU goes: the innermost frame of one of these libraries (asyncio's own frames
#: count for the library that called them), else our code, else the event loop itself
LIBRARIES = ("redis", "asyncpg", "sqlalchemy", "aiohttp", "uvicorn", "starlette", "pydantic", "prometheus_client", "orjson")


def by_library(collapsed: Path) -> list[tuple[str, int]]:
    """Samples per library, each sample given to the innermost frame of a library in ``LIBRARIES`` or of ``app``."""
    counts: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # what the event loop runs: the frames under its run() (above it is the process's start; a
        # greenlet's stack, SQLAlchemy's way to run async drivers, has no such frame)
        loop = next((i for i, frame in enumerate(frames) if "(asyncio/runners.py:" in frame), -1)
        owner = "event loop, other"
        for frame in reversed(frames[loop + 1 :]):
            where = frame.rpartition("(")[2]
            package = where.split("/", 1)[0] if "/" in where else ""
            if package in LIBRARIES or package == "app":
                owner = "our code (app/)" if package == "app" else package
                break
        counts[owner] += int(count)
    return counts.most_common()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--hits", action="store_true", help="profile cache hits instead of misses")
    p.add_argument("--stream", action="store_true", help="profile the streamed workload (40-chunk SSE answers)")
    p.add_argument("--shared", action="store_true", help="the gateway on Redis + PostgreSQL (as run.py --shared starts it)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    tools.ensure_system_tools()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = tools.gateway_command()
    if command is None or not Path(spy).exists():
        sys.exit("profile: needs admiral-optimizer and py-spy installed in this environment")
    plan = CpuPlan.detect()
    out = BENCH / "results"
    workdir = out / "work-profile"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    upstream_port = free_port()
    work = Workload("bench", unique=not args.hits, auth=servers.GATEWAY_KEY)
    if args.stream:
        work = Workload("bench-stream", unique=not args.hits, auth=servers.GATEWAY_KEY, stream=True)
    start = shared.gateway if args.shared else servers.gateway
    with nginx_server(workdir / "nginx", upstream_port, plan.load), start(command, workdir, upstream_port, plan.server) as gw:
        assert gw.proc is not None
        if args.stream:
            load = threading.Thread(target=stream_load, args=(gw.port, work), kwargs={"connections": 50, "duration": args.duration + 4})
        else:
            load = threading.Thread(target=wrk, args=(gw.port, work), kwargs={"connections": 50, "duration": args.duration + 4, "cpus": plan.load})
        load.start()
        base = [spy, "record", "-p", str(gw.proc.pid), "-d", str(args.duration), "-r", "250", "--gil"]
        subprocess.run([*base, "-o", str(out / "profile.txt"), "-f", "raw"], check=True, capture_output=True)
        load.join()
    own, inclusive, total = top(out / "profile.txt", args.top)
    where = ", Redis + PostgreSQL" if args.shared else ""
    print(f"{total} samples; {'streamed ' if args.stream else ''}{'cache hits' if args.hits else 'cache misses'}, c=50{where}")
    for title, rows in (
        ("own time", own),
        ("including callees", inclusive),
        ("library (the innermost library frame of a sample)", by_library(out / "profile.txt")),
    ):
        print(f"\ntop by {title}")
        for frame, count in rows:
            print(f"  {100 * count / total:5.1f}%  {frame}")
    print(f"\ncollapsed stacks: {out / 'profile.txt'} (flamegraph.pl or speedscope can draw them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
