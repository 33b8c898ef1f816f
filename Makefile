# vmsilo — the two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all venv deps test lint typecheck unit demo bench config-doc clean install uninstall

all: test

deps:
	./scripts/install-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: deps $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy src

test: venv lint typecheck
	$(BIN)/pytest -q

demo: venv
	$(BIN)/python -m vmsilo.demo examples/demo.toml

config-doc: $(STAMP)
	$(BIN)/python -m vmsilo.config.reference -o docs/CONFIG.md

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# The production install (root): a venv under /opt/vmsilo built with Debian's python3, the
# commands linked into /usr/local/bin. PREFIX, BINDIR and DESTDIR may be overridden.
install: deps
	./scripts/install-system install

uninstall:
	./scripts/install-system uninstall

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
