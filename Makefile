VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint fmt openapi bench mutate clean constraints readme-tour demo

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# No flags: VKMMU_HOST / VKMMU_PORT apply (default 127.0.0.1:8000).
run: install
	$(VENV)/bin/vkmmu serve

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/ruff format --check app tests bench
	$(VENV)/bin/mypy app
	$(VENV)/bin/mypy --strict app/engine

fmt: install
	$(VENV)/bin/ruff format app tests bench
	$(VENV)/bin/ruff check --fix app tests bench

openapi: install
	$(PY) -m app.openapi_dump openapi/openapi.json

bench: install
	$(PY) bench/run.py

# Mutation testing of app/engine with mutmut, bounded in time (bench/mutation.py; work dir
# build/mutation). Writes bench/mutation.json and bench/mutation.md; not a CI gate.
# E.g. make mutate MUTATE_ARGS="--modules all --budget 14400", or --only with mutant globs.
mutate: install
	$(PY) bench/mutation.py $(MUTATE_ARGS)

# deploy/constraints.txt (the image's pinned dependencies) from this venv.
constraints: install
	$(PY) deploy/constraints.py

# Run docs/tour.sh against a fresh server and rewrite the README's tour block.
readme-tour: install
	$(PY) docs/tour.py --write

# The tour against an in-process app, as tables.
demo: install
	$(VENV)/bin/vkmmu demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
