#!/usr/bin/env bash
# The load test in one command, all on 127.0.0.1: starts the fake upstream (200 ms per call) and
# the gateway (loadtest/gateway.yaml, a fresh database), waits for /health, runs the locust
# scenario headless, stops both and exits with locust's exit code.
#
#   loadtest/run.sh [more locust options, e.g. -u 20]
#
# Environment: PYTHON (default .venv/bin/python, else $VIRTUAL_ENV's, else python3; needs
# `pip install -e '.[loadtest]'`), ADMIRAL_LOADTEST_PORT (gateway, 8000), FAKE_UPSTREAM_PORT (8090),
# ADMIRAL_ADMIN_KEY (default: a random key for this run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  else PYTHON=python3
  fi
fi
if ! "$PYTHON" -c 'import app.cli, locust' 2>/dev/null; then
  echo "run.sh: $PYTHON cannot import the gateway and locust; install them with: pip install -e '.[loadtest]'" >&2
  exit 2
fi

export ADMIRAL_LOADTEST_PORT="${ADMIRAL_LOADTEST_PORT:-8000}"
export FAKE_UPSTREAM_PORT="${FAKE_UPSTREAM_PORT:-8090}"
export ADMIRAL_ADMIN_KEY="${ADMIRAL_ADMIN_KEY:-$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')}"
GATEWAY="http://127.0.0.1:$ADMIRAL_LOADTEST_PORT"
RESULTS=loadtest/results
WORK="$(mktemp -d "${TMPDIR:-/tmp}/admiral-loadtest.XXXXXX")"
export ADMIRAL_LOADTEST_DB="$WORK/admiral.db"  # fresh: /admin/stats then holds this run only
mkdir -p "$RESULTS"

listening() {  # port: is something accepting connections on it?
  "$PYTHON" -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)' "$1"
}
healthy() {
  "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$GATEWAY/health" 2>/dev/null
}
stop() {  # pid: SIGTERM, then SIGKILL after 10 s
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}
cleanup() {
  [[ -n "${GATEWAY_PID:-}" ]] && stop "$GATEWAY_PID"
  [[ -n "${FAKE_PID:-}" ]] && stop "$FAKE_PID"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# never measure whatever else happens to be listening there
for port in "$ADMIRAL_LOADTEST_PORT" "$FAKE_UPSTREAM_PORT"; do
  if listening "$port"; then
    echo "run.sh: 127.0.0.1:$port is already in use; set ADMIRAL_LOADTEST_PORT / FAKE_UPSTREAM_PORT" >&2
    exit 2
  fi
done

"$PYTHON" loadtest/fake_upstream_server.py --port "$FAKE_UPSTREAM_PORT" --latency 0.2 >"$WORK/fake-upstream.log" 2>&1 &
FAKE_PID=$!
"$PYTHON" -m app.cli serve --config loadtest/gateway.yaml --port "$ADMIRAL_LOADTEST_PORT" --log-level warning >"$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!

for _ in $(seq 150); do  # 30 s
  for pid in "$FAKE_PID" "$GATEWAY_PID"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run.sh: a server exited during start-up; logs:" >&2
      tail -n 20 "$WORK/fake-upstream.log" "$WORK/gateway.log" >&2
      exit 2
    fi
  done
  if listening "$FAKE_UPSTREAM_PORT" && healthy; then break; fi
  sleep 0.2
done
if ! healthy; then
  echo "run.sh: the gateway did not answer $GATEWAY/health within 30 s; its log:" >&2
  tail -n 20 "$WORK/gateway.log" >&2
  exit 2
fi
echo "run.sh: fake upstream on 127.0.0.1:$FAKE_UPSTREAM_PORT, gateway on $GATEWAY; logs in $WORK"

set +e
"$PYTHON" -m locust -f loadtest/locustfile.py --headless -u 100 -r 50 --host "$GATEWAY" \
  --run-time 3m --only-summary --csv "$RESULTS/run" "$@"
rc=$?
set -e

stop "$GATEWAY_PID"; GATEWAY_PID=
stop "$FAKE_PID"; FAKE_PID=
tail -n 1 "$WORK/fake-upstream.log"
echo "run.sh: locust exit code $rc; CSV in $RESULTS/run_*.csv; logs in $WORK"
exit "$rc"
