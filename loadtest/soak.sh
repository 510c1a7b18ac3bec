#!/usr/bin/env bash
# The soak run in one command: mixed traffic against a SQLite gateway and a PostgreSQL + Redis one,
# sampled every minute; see loadtest/soak.py for what it does and how it judges.
#
#   loadtest/soak.sh [--duration 30m] [--sample-every 60] [--clients 6] [--only sqlite,pg]
#
# Needs PostgreSQL (psql as postgres@127.0.0.1, trust) and Redis (127.0.0.1:6379) for the pg gateway.
# Environment: PYTHON (default .venv/bin/python, else $VIRTUAL_ENV's, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  else PYTHON=python3
  fi
fi
exec "$PYTHON" loadtest/soak.py "$@"
