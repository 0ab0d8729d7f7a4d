#!/usr/bin/env bash
# Start a deployment run and wait for it; the exit code is 0 only when the run Completed.
#   deployments/run.sh on-demand --param ref=v1.4.0 --param 'components=["weather-mcp"]'
#   deployments/run.sh compare-builders/compare --param ref=v1.4.0
set -uo pipefail
cd "$(dirname "$0")/.."
name="${1:-on-demand}"
shift || true
prefect=prefect
[ -x .venv/bin/prefect ] && prefect=.venv/bin/prefect
[[ "$name" == */* ]] || name="build-and-deploy/$name"
exec "$prefect" deployment run "$name" --watch "$@"
