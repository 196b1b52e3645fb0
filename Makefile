# The venv lives in the repo; torch is pinned to the CPU wheel first so no CUDA build is pulled.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.setup-done

.PHONY: setup test lint test-slow demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,eval,data,analysis,lora,image,ray]' 'torch==2.13.0'
	touch $(STAMP)

# The house rules run first: ruff (lint + format, one line length) and mypy on the core.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(PY) -m pactmerge.demo

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache demo_out
