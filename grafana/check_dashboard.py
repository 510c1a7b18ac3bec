"""Run every query of the Grafana dashboard against a live Prometheus and report broken panels.

Usage: python grafana/check_dashboard.py http://localhost:9090 [--dashboard PATH] [--allow-empty TITLE]

Dashboard variables are substituted with fixed values ($agent/$backend -> ".*",
$__rate_interval -> 1m, $__interval -> 15s, $__range -> 1h) and each target's expr is sent to
/api/v1/query. A panel fails when a query errors or returns no series; exit status 1 if any panel
fails, 2 if Prometheus cannot be reached. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "admiral-optimizer.json"

SUBSTITUTIONS = {
    "agent": ".*",
    "backend": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}
# $name, ${name} and ${name:format}; \w+ is greedy, so $__range never matches inside $__rate_interval.
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
METRIC_NAME = re.compile(r"\badmiral_[a-zA-Z0-9_]+")


class PrometheusUnreachableError(Exception):
    """Prometheus did not answer at all (as opposed to rejecting a query)."""


def substitute(expr: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return SUBSTITUTIONS.get(name, match.group(0))

    return VARIABLE.sub(replace, expr)


def iter_panels(panels: list[dict[str, Any]], row: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (row title, panel) for every panel, including those inside collapsed rows."""
    for panel in panels:
        if panel.get("type") == "row":
            row = panel.get("title", "")
            yield from iter_panels(panel.get("panels", []), row)
        else:
            yield row, panel


class Prometheus:
    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.base_url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                body: dict[str, Any] = json.load(response)
                return body
        except urllib.error.HTTPError as exc:
            # Prometheus answers bad queries with 400/422 and a JSON error body.
            try:
                body = json.load(exc)
            except ValueError:
                raise PrometheusUnreachableError(f"{url}: HTTP {exc.code}") from exc
            return body
        except (urllib.error.URLError, TimeoutError, ValueError) as exc:
            raise PrometheusUnreachableError(f"{url}: {exc}") from exc

    def query(self, expr: str, time: str | None) -> tuple[list[Any] | None, str]:
        """Return (result, "") on success or (None, error message)."""
        params = {"query": expr}
        if time:
            params["time"] = time
        body = self._get("/api/v1/query", params)
        if body.get("status") != "success":
            return None, f"{body.get('errorType', 'error')}: {body.get('error', 'unknown error')}"
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [data["result"]], ""  # a single [time, value] pair, always "data"
        return data["result"], ""

    def metric_names(self) -> set[str]:
        body = self._get("/api/v1/label/__name__/values", {})
        return set(body.get("data") or [])


def check(prometheus: Prometheus, dashboard: dict[str, Any], allow_empty: set[str], time: str | None) -> int:
    known_metrics = prometheus.metric_names()
    failures = 0
    for row, panel in iter_panels(dashboard.get("panels", [])):
        title = f"{row} / {panel.get('title', '?')}" if row else panel.get("title", "?")
        problems: list[str] = []
        for target in panel.get("targets", []):
            if target.get("hide") or not target.get("expr"):
                continue
            expr = substitute(target["expr"])
            result, error = prometheus.query(expr, time)
            ref = target.get("refId", "?")
            if result is None:
                problems.append(f"[{ref}] query error: {error}\n      {expr}")
            elif not result:
                missing = sorted(set(METRIC_NAME.findall(expr)) - known_metrics)
                why = f"not in Prometheus at all: {', '.join(missing)}" if missing else "no matching series"
                problems.append(f"[{ref}] no data ({why})\n      {expr}")
        if not problems:
            print(f"OK    {title}")
        elif panel.get("title") in allow_empty and all("] no data" in p for p in problems):
            print(f"EMPTY {title} (allowed)")
        else:
            failures += 1
            print(f"FAIL  {title}")
            for problem in problems:
                print(f"      {problem}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the Admiral Optimizer dashboard's queries.")
    parser.add_argument("prometheus_url", help="Prometheus base URL, e.g. http://localhost:9090")
    parser.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="dashboard JSON file")
    parser.add_argument(
        "--allow-empty",
        action="append",
        default=[],
        metavar="TITLE",
        help="panel title allowed to return no data (repeatable), e.g. 'Retries and failovers'",
    )
    parser.add_argument("--time", help="evaluation time (RFC 3339 or unix seconds); default now")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    args = parser.parse_args(argv)

    dashboard = json.loads(args.dashboard.read_text())
    prometheus = Prometheus(args.prometheus_url, args.timeout)
    try:
        failures = check(prometheus, dashboard, set(args.allow_empty), args.time)
    except PrometheusUnreachableError as exc:
        print(f"cannot reach Prometheus: {exc}", file=sys.stderr)
        return 2
    if failures:
        print(f"\n{failures} panel(s) failed", file=sys.stderr)
        return 1
    print("\nall panels returned data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
