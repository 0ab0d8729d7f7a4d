#!/usr/bin/env bash
# Everything the project needs beyond Python, pip, npm and make: uv, the locked Python
# environment in .venv, and the helm and kubectl binaries in .tools/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1 && [ ! -x .tools/uv/bin/uv ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target .tools/uv uv
fi
UV=$(command -v uv || echo .tools/uv/bin/uv)
# --compile-bytecode: uv otherwise leaves compiling to the first import (uv docs, `--compile-bytecode`), and with
# PYTHONDONTWRITEBYTECODE set no .pyc is ever written: every prefect CLI call, worker, server and flow process of
# the tests then compiles Prefect and the flows' imports again (about 2.5 times the start-up CPU). A later sync
# only checks the .pyc files (about 1 s).
PYTHONPATH=.tools/uv "$UV" sync --frozen --quiet --compile-bytecode
bash scripts/install-tools.sh >/dev/null
