.PHONY: setup test demo serve bench clean

export PREFECT_HOME ?= $(CURDIR)/.prefect
# every process of the tests and benchmarks would otherwise compile the whole of Prefect again at start-up
unexport PYTHONDONTWRITEBYTECODE
# the first start of the local Prefect server migrates its SQLite database, which takes longer than the default 20 s
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# the local servers of the demo, the tests and the benchmarks send no telemetry (nothing leaves 127.0.0.1)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
PYTHON := .venv/bin/python

setup:
	@bash scripts/setup.sh

# three sessions side by side, each with its own Prefect server and sandbox (on 2 cores: much of a session's time
# is spent waiting on flow runs, workers and helm); a file's tests stay together in one (pytest-dev/pytest-xdist
# docs/distribution.rst, `--dist loadfile`), as its module fixtures need
test: setup
	$(PYTHON) -m pytest -q -n 3 --dist loadfile

demo: setup
	$(PYTHON) -m sandbox.demo

serve: setup
	@mkdir -p $(PREFECT_HOME)
	@bash scripts/serve-sandbox.sh

bench: setup
	@bash scripts/install-postgres.sh
	$(PYTHON) -m bench

clean:
	rm -rf .venv .tools .prefect .pytest_cache
