# Two commands a newcomer needs: `make run` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint clean

$(BIN)/gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## run: start the gateway on the embedded defaults (SQLite + embedded status under data/);
## pass options with ARGS, e.g. make run ARGS="--port 9000"
run: $(BIN)/gateway
	$(BIN)/gateway serve $(ARGS)

# The partners page test drives Debian's chromium (headless, through Playwright); installed
# here when missing (needs root, or sudo); never `playwright install`.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update
	$$([ "$$(id -u)" = 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y --no-install-recommends chromium

## test: lint, type-check and run the whole suite (needs Redis and PostgreSQL on localhost)
test: $(BIN)/gateway $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(BIN)/gateway
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
