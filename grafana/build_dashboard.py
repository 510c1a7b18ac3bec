"""Generate grafana/dashboards/admiral-optimizer.json.

Run `python grafana/build_dashboard.py` after editing the panels below; `--check` exits non-zero
when the committed JSON is out of date. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "admiral-optimizer.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Selectors reused by the panels; only metrics that carry the label get the filter.
AGENT_BACKEND = 'agent=~"$agent",backend=~"$backend"'
AGENT = 'agent=~"$agent"'
BASIS_REFERENCE = ',basis="reference"'
BACKEND = 'backend=~"$backend"'
RATE = "[$__rate_interval]"

Panel = dict[str, Any]
Size = tuple[int, int]  # (width, height) in grid units; the grid is 24 wide
Threshold = tuple[float | None, str]  # (lower bound, color); None is the base step
State = tuple[int, str, str]  # (gauge value, text, color)


def target(expr: str, legend: str = "__auto", *, instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "editorMode": "code",
    }


def series(metric: str, selector: str = "") -> str:
    return f"{metric}{{{selector}}}" if selector else metric


def sum_rate(metric: str, selector: str = "", by: str = "") -> str:
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({series(metric, selector)}{RATE}))"


def quantiles(metric: str, qs: tuple[float, ...], *, by: str = "", selector: str = "") -> list[dict[str, Any]]:
    """One histogram_quantile target per quantile, optionally split by a label."""
    group = f"le, {by}" if by else "le"
    legend_suffix = f" {{{{{by}}}}}" if by else ""
    buckets = series(f"{metric}_bucket", selector)
    return [target(f"histogram_quantile({q}, sum by ({group}) (rate({buckets}{RATE})))", f"p{round(q * 100)}{legend_suffix}") for q in qs]


def panel(kind: str, title: str, targets: list[dict[str, Any]], size: Size, description: str) -> Panel:
    width, height = size
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width},
        "targets": targets,
    }


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    *,
    size: Size,
    unit: str = "short",
    stack: bool = False,
    no_value: str | None = None,
    description: str = "",
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 30 if stack else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if no_value is not None:
        defaults["noValue"] = no_value
    return panel("timeseries", title, targets, size, description) | {
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, expr: str, *, size: Size, unit: str, steps: list[Threshold], description: str = "") -> Panel:
    return panel("stat", title, [target(expr, title)], size, description) | {
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "decimals": 2,
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "graphMode": "area",
            "colorMode": "value",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
        },
    }


def state_timeline(title: str, expr: str, *, size: Size, states: list[State], description: str = "") -> Panel:
    mapping = {str(value): {"text": text, "color": color, "index": i} for i, (value, text, color) in enumerate(states)}
    return panel("state-timeline", title, [target(expr, "{{backend}}")], size, description) | {
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [{"value": None, "color": "text"}]},
                "mappings": [{"type": "value", "options": mapping}],
                "custom": {"fillOpacity": 80, "lineWidth": 0},
            },
            "overrides": [],
        },
        "options": {
            "showValue": "auto",
            "mergeValues": True,
            "rowHeight": 0.9,
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
            "tooltip": {"mode": "single", "sort": "none"},
        },
    }


def piechart(title: str, expr: str, legend: str, *, size: Size, description: str = "") -> Panel:
    return panel("piechart", title, [target(expr, legend, instant=True)], size, description) | {
        "fieldConfig": {"defaults": {"unit": "short", "color": {"mode": "palette-classic"}}, "overrides": []},
        "options": {
            "pieType": "donut",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "showLegend": True,
                "values": ["value", "percent"],
            },
            "tooltip": {"mode": "single", "sort": "none"},
        },
    }


def sections() -> dict[str, list[Panel]]:
    """Rows and their panels in display order."""
    hits = sum_rate("admiral_cache_hits_total")
    misses = sum_rate("admiral_cache_misses_total")
    requests = sum_rate("admiral_requests_total", AGENT_BACKEND)
    errors_5xx = sum_rate("admiral_requests_total", f'status=~"5..",{AGENT_BACKEND}')
    return {
        "Overview": [
            stat(
                "Request rate",
                requests,
                size=(6, 5),
                unit="reqps",
                steps=[(None, "blue")],
                description="Model requests per second (every endpoint), all outcomes.",
            ),
            stat(
                "Cache hit ratio",
                f"{hits} / ({hits} + {misses})",
                size=(6, 5),
                unit="percentunit",
                steps=[(None, "red"), (0.2, "yellow"), (0.5, "green")],
                description="Cache hits / (hits + misses). AdmiralCacheDegraded fires below 20% over 15m.",
            ),
            stat(
                "Dedupe savings",
                sum_rate("admiral_dedupe_coalesced_total"),
                size=(6, 5),
                unit="reqps",
                steps=[(None, "purple")],
                description="Requests per second answered by joining an identical in-flight request.",
            ),
            stat(
                "Error rate (5xx)",
                f"({errors_5xx} or vector(0)) / {requests}",
                size=(6, 5),
                unit="percentunit",
                steps=[(None, "green"), (0.01, "yellow"), (0.05, "red")],
                description="Share of requests answered with a 5xx status. AdmiralHighErrorRate fires above 5%.",
            ),
            stat(
                "Calls avoided",
                f"sum(increase({series('admiral_calls_avoided_total', AGENT)}[$__range])) or vector(0)",
                size=(6, 5),
                unit="short",
                steps=[(None, "green")],
                description="Upstream calls the cache (exact and semantic) and dedupe saved in the selected time range.",
            ),
            stat(
                "Tokens avoided",
                f"sum(increase({series('admiral_tokens_avoided_total', AGENT)}[$__range])) or vector(0)",
                size=(6, 5),
                unit="short",
                steps=[(None, "green")],
                description="Tokens not spent upstream because the cache or a leader answered, in the selected time range.",
            ),
            stat(
                "Spent",
                f"sum(increase({series('admiral_spend_usd_total', AGENT)}[$__range])) or vector(0)",
                size=(6, 5),
                unit="currencyUSD",
                steps=[(None, "blue")],
                description="Money spent upstream at the deployments' prices (models.*.price; free tiers cost 0).",
            ),
            stat(
                "Saved vs reference",
                f"sum(increase({series('admiral_saved_usd_total', AGENT + BASIS_REFERENCE)}[$__range])) or vector(0)",
                size=(6, 5),
                unit="currencyUSD",
                steps=[(None, "green")],
                description="What the same answers would have cost at the reference price (models.*.reference_price), minus what was spent.",
            ),
            timeseries(
                "Tokens rate by direction",
                [target(sum_rate("admiral_tokens_total", AGENT_BACKEND, "direction"), "{{direction}}")],
                size=(24, 8),
                stack=True,
                description="Tokens per second, prompt vs completion.",
            ),
        ],
        "By agent": [
            timeseries(
                "Request rate by agent",
                [target(sum_rate("admiral_requests_total", AGENT_BACKEND, "agent"), "{{agent}}")],
                size=(12, 8),
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Tokens by agent",
                [target(sum_rate("admiral_tokens_total", AGENT_BACKEND, "agent, direction"), "{{agent}} {{direction}}")],
                size=(12, 8),
                description="Tokens per second by agent and direction.",
            ),
        ],
        "By backend": [
            piechart(
                "Requests by backend",
                f"sum by (backend) (increase({series('admiral_requests_total', AGENT_BACKEND)}[$__range]))",
                "{{backend}}",
                size=(8, 9),
                description="Distribution of requests over backends in the selected time range.",
            ),
            timeseries(
                "Upstream latency by backend",
                quantiles("admiral_upstream_duration_seconds", (0.5, 0.95), by="backend", selector=BACKEND),
                size=(16, 9),
                unit="s",
            ),
            state_timeline(
                "Circuit state",
                f"max by (backend) (admiral_circuit_state{{{BACKEND}}})",
                size=(12, 7),
                states=[(0, "closed", "green"), (1, "half-open", "yellow"), (2, "open", "red")],
                description="Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
            ),
            state_timeline(
                "Backend up",
                f"min by (backend) (admiral_backend_up{{{BACKEND}}})",
                size=(12, 7),
                states=[(0, "down", "red"), (1, "up", "green")],
            ),
        ],
        "Timeline": [
            timeseries(
                "Requests by status",
                [target(sum_rate("admiral_requests_total", AGENT_BACKEND, "status"), "{{status}}")],
                size=(12, 8),
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Cache hits vs misses",
                [target(hits, "hits"), target(misses, "misses")],
                size=(12, 8),
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Requests by endpoint",
                [target(sum_rate("admiral_requests_total", AGENT_BACKEND, "endpoint"), "{{endpoint}}")],
                size=(12, 8),
                unit="reqps",
                stack=True,
                description="Requests per second by the endpoint called: chat, completions, embeddings, responses, messages.",
            ),
            timeseries(
                "Time to first token",
                quantiles("admiral_time_to_first_token_seconds", (0.5, 0.95), selector=BACKEND),
                size=(12, 8),
                unit="s",
                description="Streaming requests only.",
            ),
        ],
        "Health": [
            timeseries(
                "Rate-limit rejections by scope",
                [target(sum_rate("admiral_ratelimit_rejections_total", by="scope"), "{{scope}}")],
                size=(8, 8),
                unit="reqps",
                no_value="0",
                description="429s per second: agent = gateway key limits, provider = upstream budget.",
            ),
            timeseries(
                "Retries and failovers",
                [
                    target(sum_rate("admiral_retries_total", BACKEND, "backend"), "retry {{backend}}"),
                    target(
                        sum_rate("admiral_failovers_total", 'from_backend=~"$backend"', "from_backend"),
                        "failover from {{from_backend}}",
                    ),
                ],
                size=(8, 8),
                unit="ops",
                no_value="0",
            ),
            timeseries("In-flight requests", [target("sum(admiral_inflight_requests)", "in flight")], size=(8, 8)),
            timeseries(
                "Gateway overhead",
                quantiles("admiral_overhead_seconds", (0.5, 0.95)),
                size=(12, 8),
                unit="s",
                description="Time spent in the gateway excluding the upstream call.",
            ),
            timeseries(
                "Request duration",
                # exemplars: each dot is one traced request; click it for its trace in Jaeger
                [{**t, "exemplar": True} for t in quantiles("admiral_request_duration_seconds", (0.5, 0.95, 0.99))],
                size=(12, 8),
                unit="s",
            ),
        ],
    }


def query_variable(name: str, label: str) -> dict[str, Any]:
    query = f"label_values(admiral_requests_total, {name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


def layout() -> list[Panel]:
    """Give rows and panels ids and grid positions: left to right, wrapping at 24 columns."""
    panels: list[Panel] = []
    y = 0
    for row_title, row_panels in sections().items():
        grid = {"h": 1, "w": 24, "x": 0, "y": y}
        panels.append({"type": "row", "title": row_title, "collapsed": False, "panels": [], "gridPos": grid})
        y += 1
        x = line_height = 0
        for p in row_panels:
            grid = p["gridPos"]
            if x + grid["w"] > 24:
                x, y, line_height = 0, y + line_height, 0
            grid |= {"x": x, "y": y}
            for i, t in enumerate(p["targets"]):
                t["refId"] = chr(ord("A") + i)
            panels.append(p)
            x += grid["w"]
            line_height = max(line_height, grid["h"])
        y += line_height
    for panel_id, p in enumerate(panels, start=1):
        p["id"] = panel_id
    return panels


def dashboard() -> dict[str, Any]:
    return {
        "uid": "admiral-optimizer",
        "title": "Admiral Optimizer",
        "description": "LLM gateway traffic, cache and dedupe savings, backends and health.",
        "tags": ["admiral", "llm-gateway"],
        "schemaVersion": 39,
        "version": 1,
        "id": None,
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                {
                    "datasource": DATASOURCE,
                    "enable": True,
                    "expr": 'ALERTS{alertname=~"Admiral.*", alertstate="firing"}',
                    "iconColor": "red",
                    "name": "Admiral alerts",
                    "step": "60s",
                    "titleFormat": "{{alertname}}",
                    "tagKeys": "severity,backend,scope",
                    "useValueForTime": False,
                },
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                    "hide": 0,
                },
                query_variable("agent", "Agent"),
                query_variable("backend", "Backend"),
            ]
        },
        "panels": layout(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is out of date")
    args = parser.parse_args()
    text = json.dumps(dashboard(), indent=2) + "\n"
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
