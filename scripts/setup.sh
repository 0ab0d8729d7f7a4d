#!/usr/bin/env bash
# Everything the project needs beyond Python, pip, npm and make: uv, the locked Python
# environment in .venv, and the helm and kubectl binaries in .tools/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1 && [ ! -x .tools/uv/bin/uv ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target .tools/uv uv
fi
UV=$(command -v uv || echo .tools/uv/bin/uv)
PYTHONPATH=.tools/uv "$UV" sync --frozen --quiet
bash scripts/install-tools.sh >/dev/null
