# Site Kit. `make up` runs the whole stack; `make test` runs every test. Both install what they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: up test lint bench load system-deps clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	@echo "Installing Python dependencies into $(VENV) (first run: a few minutes) ..." >&2
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -U pip >&2
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' >&2
	@rm -f $(VENV)/.installed-* && touch $@

system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "Installing redis-server (Debian package) ..." >&2; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

up: system-deps $(STAMP)
	@$(PY) -m devstack up

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: system-deps $(STAMP) lint
	$(PY) -m pytest

bench: system-deps $(STAMP)
	@$(PY) -m loadtest.bench

load: system-deps $(STAMP)
	@$(PY) -m loadtest.load

clean:
	rm -rf .stack .pytest_cache .mypy_cache .ruff_cache
