"""The static upstream: nginx on loopback answering chat completions from its config, no disk I/O.

``/v1/chat/completions`` returns the fixed JSON completion; ``/stream/v1/chat/completions`` returns
a streamed answer as an SSE body of ``STREAM_CHUNKS`` events (see fixtures.py). The gateway always POSTs to ``{base_url}/chat/completions``, so a
second provider whose base_url ends in ``/stream/v1`` is how it reaches the streaming body.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fixtures import completion, sse_stream
from procs import HOST, Server, pinned

JSON_PATH = "/v1/chat/completions"
STREAM_PATH = "/stream/v1/chat/completions"
#: characters of a body per nginx string (before escaping), well under its 4 KiB token buffer
_PIECE = 2048


def _nginx_string(text: str) -> str:
    # nginx reads \n, \t, \\ and \' inside a quoted string as escapes
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _nginx_return(text: str, name: str) -> str:
    """Directives that answer 200 with ``text``: one ``return``, or, for a body longer than nginx
    reads as one config token (4 KiB), ``set`` directives holding pieces of it and a ``return``
    joining them (evaluated per request: a copy of a few KiB)."""
    pieces = [text[i : i + _PIECE] for i in range(0, len(text), _PIECE)]
    if len(pieces) == 1:
        return f"return 200 {_nginx_string(text)};"
    sets = "".join(f"set ${name}_{i} {_nginx_string(piece)};\n            " for i, piece in enumerate(pieces))
    return sets + 'return 200 "' + "".join(f"${name}_{i}" for i in range(len(pieces))) + '";'


def nginx_conf(workdir: Path, port: int) -> str:
    temp = workdir / "tmp"
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen {HOST}:{port};
        location = {JSON_PATH} {{
            default_type application/json;
            {_nginx_return(completion(), "completion")}
        }}
        location = {STREAM_PATH} {{
            default_type text/event-stream;
            {_nginx_return(sse_stream(), "stream")}
        }}
        location = /health {{ return 200 'ok'; }}
        location / {{ return 404; }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise RuntimeError("nginx is not installed")
    return found


def nginx_server(workdir: Path, port: int, cpus: str | None) -> Server:
    """An nginx (master + 1 worker) serving the fixtures on ``port``, pinned to ``cpus``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, port))
    cmd = [nginx_binary(), "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
    return Server("nginx", pinned(cmd, cpus), port, log=workdir / "nginx.out")
