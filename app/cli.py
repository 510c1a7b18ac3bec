"""``admiral-optimizer``: serve, migrate, check-config, tiny-model."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys

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
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.api.transport import CoalescingHttpToolsProtocol

    common = {
        "host": host,
        "port": port,
        "log_level": args.log_level,
        "access_log": False,
        "loop": "uvloop",
        "http": CoalescingHttpToolsProtocol,
        "timeout_graceful_shutdown": settings.server.shutdown_grace_s,
    }
    # uvicorn stops gracefully on SIGTERM, then raises it again for the handler it found: with the
    # default one a clean stop would end "killed by SIGTERM" (143) instead of exit status 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.workers > 1:
        # workers re-read the config through the environment
        if args.config:
            os.environ["ADMIRAL_CONFIG"] = os.path.abspath(args.config)
        from app.main import prepare_multiprocess

        prepare_multiprocess()
        uvicorn.run("app.main:app_from_env", factory=True, workers=args.workers, **common)
    else:
        from app.main import create_app

        uvicorn.run(create_app(settings), **common)
    return 0


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


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from app.tiny_model import build_tiny_model

    print(build_tiny_model(args.dir))
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
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate the config and print it with secrets masked")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check_config)
    migrate = sub.add_parser("migrate", help="upgrade the configured database to the latest schema")
    migrate.add_argument("--config")
    migrate.set_defaults(func=cmd_migrate)
    tiny = sub.add_parser("tiny-model", help="build a tiny random-weight model for tests and demos (needs the vllm extra)")
    tiny.add_argument("dir")
    tiny.set_defaults(func=cmd_tiny_model)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
