.PHONY: setup test demo bench clean

export PREFECT_HOME ?= $(CURDIR)/.prefect
PYTHON := .venv/bin/python

setup:
	@bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(PYTHON) -m sandbox.demo

clean:
	rm -rf .venv .tools .prefect .pytest_cache
