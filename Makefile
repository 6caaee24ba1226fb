# Everything a new machine needs, from nothing but Python 3.11+.
PYTHON ?= python3
PYTEST_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test lint format bench clean requirements

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(RUNTIME_STAMP) $@

# Clears what a killed previous run left, migrates, finds the broker (starts Redis when none is
# configured or reachable), then web + worker + beat in the foreground.
run: $(RUNTIME_STAMP)
	$(BIN)/python manage.py run --with-parent

test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(DEV_STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/system.py
	$(BIN)/python bench/system.py --corpus mixed --rounds 2
	$(BIN)/python bench/system.py --corpus mixed --rounds 2 --no-libvips
	$(BIN)/python bench/system.py --corpus mixed --rounds 2 --no-watch-events

# Pins every dependency of requirements.in (and -dev.in) into the .txt files that are installed.
requirements: $(DEV_STAMP)
	CUSTOM_COMPILE_COMMAND="make requirements" $(BIN)/pip-compile --quiet --no-emit-index-url \
		--no-emit-find-links --no-strip-extras --annotation-style=line -o requirements.txt requirements.in
	CUSTOM_COMPILE_COMMAND="make requirements" $(BIN)/pip-compile --quiet --no-emit-index-url \
		--no-emit-find-links --no-strip-extras --annotation-style=line -o requirements-dev.txt requirements-dev.in

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
