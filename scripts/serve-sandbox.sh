#!/usr/bin/env bash
# `make serve`: a local Prefect server on SQLite (127.0.0.1:4200) and the deployments served against the sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:4200/api"
.venv/bin/prefect server start --host 127.0.0.1 --port 4200 >"$PREFECT_HOME/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
.venv/bin/python - <<'PY'
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:4200/api/health", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit("the Prefect server did not start; see .prefect/server.log")
PY
.venv/bin/prefect block register -m blocks >/dev/null
.venv/bin/python -m sandbox.serve
