# Two commands matter: `make demo` and `make test`. Both build .venv from nothing with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test install install-dev protos clean

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 2; }
	$(PYTHON) -m venv $(VENV)

# The stamp is keyed on pyproject.toml, so changing dependencies reinstalls.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[serve]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/lmforge demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -p no:cacheprovider

# Regenerate serve/api/_gen from protos/ after editing a .proto (the generated code is committed).
protos: $(VENV)/.installed-dev
	$(PY) -m serve.api.protogen

clean:
	rm -rf $(VENV) build *.egg-info
