#!/usr/bin/env bash
# PostgreSQL for the benchmarks' production-like Prefect server (bench/servers.py); Debian's package, if missing.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql
