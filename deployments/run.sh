#!/usr/bin/env bash
# Start a deployment run and wait for it, at most BUILDKIT_PIPELINE_WATCH_TIMEOUT seconds (default 7800: the flow's
# 7200 s timeout and 10 minutes to be picked up) unless --watch-timeout is given.
#   deployments/run.sh on-demand --param ref=v1.4.0 --param 'components=["weather-mcp"]'
#   deployments/run.sh compare-builders/compare --param ref=v1.4.0
# Exit 0: the run Completed; 1: it ended in any other state (or the CLI failed); 3: the watch timed out and the
# run goes on (`prefect flow-run ls`, `prefect flow-run cancel <id>`).
set -uo pipefail
cd "$(dirname "$0")/.."
name="${1:-on-demand}"
shift || true
prefect=prefect
[ -x .venv/bin/prefect ] && prefect=.venv/bin/prefect
[[ "$name" == */* ]] || name="build-and-deploy/$name"
case " $* " in
  *" --watch-timeout "* | *" --watch-timeout="*) ;;
  *) set -- "$@" --watch-timeout "${BUILDKIT_PIPELINE_WATCH_TIMEOUT:-7800}" ;;
esac
output="$(mktemp)"
trap 'rm -f "$output"' EXIT
"$prefect" deployment run "$name" --watch "$@" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}
# prefect/cli/flow_runs_watching.py (3.9.1) raises FlowRunWaitTimeout: "... exceeded watch timeout of N seconds".
if [ "$status" -ne 0 ] && grep -q "exceeded watch timeout" "$output"; then
  echo "run.sh: stopped watching; the run is still going" >&2
  exit 3
fi
exit "$status"
