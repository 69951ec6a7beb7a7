# Site Kit. `make up` runs the whole stack; `make test` runs every test. Both install what they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
WIDGET := widget/dist/widget.js

.PHONY: up test lint bench load system-deps widget clean

# A venv made while python3.11-venv was missing has a python but no pip: it is made again.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	@echo "Installing Python dependencies into $(VENV) (first run: a few minutes) ..." >&2
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV) >&2
	@$(PY) -m pip install -q --disable-pip-version-check -U pip >&2
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' >&2
	@rm -f $(VENV)/.installed-* && touch $@

# Debian packages: redis-server for the stack, node and npm to build the widget, chromium for
# the widget's browser tests, and python3.11-venv while there is no usable $(VENV): Debian's
# python3.11 ships ensurepip in that package, and `-m venv` fails without it.
system-deps:
	@missing=""; \
	$(PY) -m pip --version >/dev/null 2>&1 || ! command -v $(PYTHON) >/dev/null \
	  || $(PYTHON) -c 'import ensurepip' 2>/dev/null \
	  || missing="$$missing $$(basename $(PYTHON))-venv"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	[ -z "$$missing" ] || { \
	  echo "Installing$$missing (Debian packages) ..." >&2; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; }

widget/node_modules/.package-lock.json: widget/package-lock.json
	@echo "Installing the widget's build tools (npm ci) ..." >&2
	@cd widget && npm ci --no-audit --no-fund --loglevel=error >&2

# The build prints the bundle's size and fails over 12 KB gzipped.
$(WIDGET): widget/node_modules/.package-lock.json widget/build.mjs $(wildcard widget/src/*.js)
	@cd widget && node build.mjs >&2

widget: $(WIDGET)

up: system-deps $(STAMP) $(WIDGET)
	@$(PY) -m devstack up

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: system-deps $(STAMP) $(WIDGET) lint
	$(PY) -m pytest

bench: system-deps $(STAMP)
	@$(PY) -m loadtest.bench

load: system-deps $(STAMP)
	@$(PY) -m loadtest.load

clean:
	rm -rf .stack .pytest_cache .mypy_cache .ruff_cache widget/dist
