"""JSON log lines for log shippers: every record one JSON object on stderr, plus one line per request.

``telemetry.log_format: json`` (or ``serve --log-format json``) turns it on. Records are handed
to a thread through a queue, so a slow stderr (a full pipe to a shipper) never blocks the event
loop. Each line carries the trace id of the span it was logged in, when tracing is on.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry import trace

from app.config import Settings

if TYPE_CHECKING:
    from app.pipeline.base import ModelRequest, RequestContext
    from app.shapes import Usage

#: ``serve --log-format`` passes its choice to worker processes through this variable
LOG_FORMAT_ENV = "ADMIRAL_LOG_FORMAT"

request_log = logging.getLogger("admiral.request")


def log_format(settings: Settings) -> str:
    """``text`` or ``json``: the command line's choice, else the config's."""
    chosen = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    return chosen if chosen in ("text", "json") else settings.telemetry.log_format


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time (UTC, ISO 8601), level, logger, message, trace ids, the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            out["trace_id"] = trace_id
            out["span_id"] = getattr(record, "span_id", None)
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


class _TraceIds(logging.Filter):
    """Stamps the current span's ids on a record, in the thread that logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = f"{context.trace_id:032x}"
            record.span_id = f"{context.span_id:016x}"
        return True


class _QueueHandler(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # keep the record whole (args merged, exception kept as text): the listener's formatter makes the JSON
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def use_json_logs(level: str | int) -> logging.handlers.QueueListener:
    """Route every log record (uvicorn's too) through a queue to a thread writing JSON lines to stderr."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _QueueHandler(records)
    handler.addFilter(_TraceIds())
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(JsonFormatter())
    listener = logging.handlers.QueueListener(records, out, respect_handler_level=False)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    listener.start()
    atexit.register(listener.stop)
    return listener


def request_line(request: ModelRequest | None, ctx: RequestContext, status: int, content: str | None, usage: Usage | None) -> None:
    """The request's one JSON line (a RequestRecorder observer): who, what, where it went, how it ended."""
    elapsed_ms = (time.perf_counter() - ctx.started) * 1000.0
    fields: dict[str, Any] = {
        "request_id": ctx.request_id,
        "trace_id": ctx.trace_id,
        "agent": ctx.agent,
        "endpoint": ctx.endpoint,
        "model": request.body.get("model") if request is not None else None,
        "route": ctx.route or None,
        "backend": ctx.backend or None,
        "deployment": str(ctx.deployment) if ctx.deployment else None,
        "cache": ctx.cache_status,
        "dedupe": ctx.dedupe_role,
        "stream": bool(request and request.stream),
        "status": status,
        "latency_ms": round(elapsed_ms, 3),
        "upstream_ms": round(ctx.upstream_seconds * 1000.0, 3) if ctx.upstream_seconds else None,
        "ttft_ms": round(ctx.ttft_seconds * 1000.0, 3) if ctx.ttft_seconds is not None else None,
        "attempts": ctx.attempts,
        "error_type": ctx.error_type,
    }
    if usage:
        fields["prompt_tokens"] = usage.get("prompt_tokens")
        fields["completion_tokens"] = usage.get("completion_tokens")
        if usage.get("estimated"):
            fields["usage_estimated"] = True  # the provider sent none: counted by the gateway (app/pipeline/params.py)
    request_log.info("request", extra={"fields": fields})
