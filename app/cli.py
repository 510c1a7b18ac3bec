"""``admiral-optimizer``: serve, reload, migrate, check-config, providers, tiny-model."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.config import ConfigError, Settings, load_settings, masked


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


#: the log level, for worker processes that set up JSON logging themselves
LOG_LEVEL_ENV = "ADMIRAL_LOG_LEVEL"


def _load(path: str | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _load(args.config)
    host = args.host or settings.server.host
    port = args.port or settings.server.port
    if not settings.keys and not is_loopback(host):
        print(f"refusing to bind {host}: no gateway keys are configured, so anyone could call it. Add 'keys' to the config or bind 127.0.0.1.", file=sys.stderr)
        return 2
    engines = [name for name, provider in settings.providers.items() if provider.kind == "vllm"]
    if args.workers > 1 and engines:
        names = ", ".join(repr(name) for name in engines)
        print(
            f"refusing --workers {args.workers}: provider {names} (kind: vllm) runs its engine inside the gateway process, so every worker "
            "would load its own copy of the model and its KV cache. Run one worker (the engine batches concurrent requests itself), "
            "or serve the model with `vllm serve` and reach it through a provider of kind 'openai'.",
            file=sys.stderr,
        )
        return 2
    from app.json_logs import LOG_FORMAT_ENV, log_format, use_json_logs
    from app.telemetry import export_settings

    try:
        export_settings(settings.telemetry, os.environ)  # a bad OTEL_* value stops here, not in the first request
    except ConfigError as exc:
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    if args.log_format:
        os.environ[LOG_FORMAT_ENV] = args.log_format  # workers and Services read it from there
    json_logs = log_format(settings) == "json"
    if json_logs:
        os.environ[LOG_FORMAT_ENV] = "json"
        os.environ[LOG_LEVEL_ENV] = args.log_level
        use_json_logs(args.log_level)
    else:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app import edge

    common = {
        "host": host,
        "port": port,
        "log_level": args.log_level,
        "access_log": False,
        "loop": "uvloop",
        "timeout_graceful_shutdown": settings.server.shutdown_grace_s,
        **({"log_config": None} if json_logs else {}),  # uvicorn's records go through the JSON handler too
        **edge.prepare(settings.server),  # the HTTP edge's limits, the open-file limit raised
    }
    # uvicorn stops gracefully on SIGTERM, then raises it again for the handler it found: with the
    # default one a clean stop would end "killed by SIGTERM" (143) instead of exit status 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # SIGHUP reloads the config (app/reload.py); until the app takes it, it must not end the process
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pid_path = write_pid_file(args.pid_file, port)
    try:
        if args.workers > 1:
            # workers re-read the config through the environment
            if args.config:
                os.environ["ADMIRAL_CONFIG"] = os.path.abspath(args.config)
            from uvicorn.supervisors.multiprocess import Multiprocess

            from app.main import prepare_multiprocess
            from app.reload import forward_hup

            prepare_multiprocess()
            # uvicorn's parent restarts every worker on SIGHUP (streams in flight cut): each reloads in place instead
            Multiprocess.handle_hup = forward_hup(lambda supervisor: [p.pid for p in supervisor.processes if p.pid is not None])  # type: ignore[method-assign,assignment]
            uvicorn.run("app.main:app_from_env", factory=True, workers=args.workers, **common)
        else:
            from app.main import create_app

            uvicorn.run(create_app(settings), **common)
    finally:
        with contextlib.suppress(OSError):
            if pid_path.read_text().strip() == str(os.getpid()):
                pid_path.unlink()
    return 0


def pid_file_path(explicit: str | None, port: int) -> Path:
    """Where ``serve`` on ``port`` keeps its process id (for ``reload``): ``--pid-file``, else the runtime directory."""
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"admiral-optimizer-{port}.pid"


def write_pid_file(explicit: str | None, port: int) -> Path:
    path = pid_file_path(explicit, port)
    try:
        path.write_text(f"{os.getpid()}\n")
    except OSError as exc:
        logging.getLogger("admiral").warning("cannot write the pid file %s (admiral-optimizer reload needs it, or --pid): %s", path, exc)
    return path


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the config, signal the running ``serve`` (SIGHUP), and report what it loaded."""
    settings = _load(args.config)  # a config that does not validate is refused here: the running one stays
    port = args.port or settings.server.port
    if args.pid:
        pid = args.pid
    else:
        path = pid_file_path(args.pid_file, port)
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            print(f"no running gateway found: cannot read {path} (start it with `serve`, or give --pid / --pid-file)", file=sys.stderr)
            return 1
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    before = _config_status(settings.server.host, port, admin_key)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no process {pid} (a stale pid file?)", file=sys.stderr)
        return 1
    if admin_key is None or before is None:
        print(f"sent SIGHUP to {pid}; see its log for the outcome (GET /admin/config shows the loaded version)")
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _config_status(settings.server.host, port, admin_key)
        last = (now or {}).get("last_reload")
        if now is not None and last and last != before.get("last_reload"):
            if last["ok"]:
                print(f"reloaded: version {now['version']} ({now['digest']}) at {now['loaded_at']}" + (f"; takes a restart: {', '.join(now['pending_restart'])}" if now["pending_restart"] else ""))
                return 0
            print(f"reload refused, still running version {now['version']}: {last['error']}", file=sys.stderr)
            return 1
    print(f"sent SIGHUP to {pid}, but no reload showed in /admin/config within {args.wait:g}s; see its log", file=sys.stderr)
    return 1


def _config_status(host: str, port: int, admin_key: str | None) -> dict[str, Any] | None:
    if admin_key is None:
        return None
    import urllib.error
    import urllib.request

    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    request = urllib.request.Request(f"http://{target}:{port}/admin/config", headers={"Authorization": f"Bearer {admin_key}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except (OSError, ValueError, urllib.error.URLError):
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    print(json.dumps(masked(settings), indent=2))
    print(f"config OK: {settings.source}", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.storage.migrate import upgrade_to_head

    settings = _load(args.config)
    upgrade_to_head(settings.database.url)
    print("database at head", file=sys.stderr)
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    import asyncio

    from app.provider_check import check_providers, render

    settings = _load(args.config)
    reports = asyncio.run(check_providers(settings, probe=not args.no_probe))
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        print(render(reports))
    return 0 if all(r.ok for r in reports) else 1


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from app.tiny_model import build_tiny_embedding_model, build_tiny_model

    print((build_tiny_embedding_model if args.embedding else build_tiny_model)(args.dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="admiral-optimizer", description="OpenAI-compatible LLM gateway for agent fleets.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="config file (default: $ADMIRAL_CONFIG, else the embedded default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--log-format", choices=["text", "json"], help="json: one JSON object a line, plus one line per request (default: telemetry.log_format)")
    serve.add_argument("--pid-file", help="where to keep the process id for `reload` (default: $XDG_RUNTIME_DIR or the temp dir, admiral-optimizer-PORT.pid)")
    serve.set_defaults(func=cmd_serve)
    reload = sub.add_parser("reload", help="re-read the config in the running gateway (as SIGHUP); a bad config is refused")
    reload.add_argument("--config", help="the config the gateway runs with (for its port and admin key; it re-reads its own)")
    reload.add_argument("--port", type=int, help="the gateway's port (default: server.port of the config)")
    reload.add_argument("--pid", type=int, help="the serve process id (default: from its pid file)")
    reload.add_argument("--pid-file", help="the pid file serve wrote (default: as serve's)")
    reload.add_argument("--wait", type=float, default=10.0, help="seconds to wait for /admin/config to show the outcome (default 10)")
    reload.set_defaults(func=cmd_reload)
    check = sub.add_parser("check-config", help="validate the config and print it with secrets masked")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check_config)
    migrate = sub.add_parser("migrate", help="upgrade the configured database to the latest schema")
    migrate.add_argument("--config")
    migrate.set_defaults(func=cmd_migrate)
    providers = sub.add_parser("providers", help="check each provider: key, offered models, missing models, announced limits")
    providers.add_argument("--config")
    providers.add_argument("--json", action="store_true", help="one JSON object per provider")
    providers.add_argument("--no-probe", action="store_true", help="read announced limits from GET /models only (no one-token chat completion)")
    providers.set_defaults(func=cmd_providers)
    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight model for tests and demos (needs the vllm extra)")
    tiny.add_argument("dir")
    tiny.add_argument("--embedding", action="store_true", help="a BERT embedding model instead (serve it with engine.runner: pooling)")
    tiny.set_defaults(func=cmd_tiny_model)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
