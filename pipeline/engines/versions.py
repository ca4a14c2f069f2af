"""The installed version of each engine, part of every request-cache key.

A model's outputs depend on the code that serves it, so ``ModelPreset.identity()`` (in core)
names the engine's version: the Python distributions for llama-cpp-python, vLLM and
transformers, and ``llama-server --version`` for llama.cpp's C++ server. Finding them is the
engines layer's business (it runs the server binary), so this module registers
:func:`engine_version` with the core config when imported; the stages and the LLM client
import it.

    engine_version("llamacpp")      # 'llama-cpp-python==<its installed version>'
    engine_version("llama-server")  # 'llama-server==<the build line of `llama-server --version`>'
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.core.config import register_engine_versions

_DISTRIBUTIONS = {"llamacpp": ("llama-cpp-python",), "vllm": ("vllm",), "transformers": ("transformers", "torch")}


@functools.cache  # looked up per request by the cache; a package does not change under a running process
def engine_version(engine: str) -> str:
    """The installed version of what serves ``engine`` (part of every cache key); 'remote' for endpoints."""
    if engine == "llama-server":
        return f"llama-server=={llama_server_version()}"
    if engine not in _DISTRIBUTIONS:
        return engine

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not-installed"

    return ",".join(f"{d}=={version(d)}" for d in _DISTRIBUTIONS[engine])


def llama_server_path() -> Path | None:
    """llama.cpp's C++ server: $LLAMA_SERVER, else the one `make install` puts beside this Python, else PATH."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file():
        return beside
    found = shutil.which("llama-server")
    return Path(found) if found else None


@functools.cache
def llama_server_version() -> str:
    """`llama-server --version`'s build line, e.g. "1 (0c1e570)"; "not-installed" if there is none."""
    path = llama_server_path()
    if path is None:
        return "not-installed"
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return "not-installed"
    line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version:")), "")
    return line.removeprefix("version:").strip() or "unknown"


register_engine_versions(engine_version)
