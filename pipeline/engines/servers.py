"""Managed local LLM servers: started as subprocesses on 127.0.0.1, always stopped.

- llama.cpp (CPU, GGUF), one of two programs (`server.program`):
  - `llama-cpp-python` (`python -m llama_cpp.server`) decodes one request at a time behind a
    lock, so `server.n_parallel` starts that many server processes (replicas) that share the
    cores (`n_threads` split between them); the client spreads requests over them.
  - `llama-server`, llama.cpp's C++ server (built by `make install`), is one process with
    `n_parallel` slots decoded together in one batch (continuous batching): about 2x the
    tokens/s of the replicas on 2 cores (bench/generate_yield.py).
- vLLM (`vllm serve`, GPU, Hugging Face id), with LoRA options for serving adapters.
- A `remote` preset needs no server: its base_url (or its several base_urls, replicas of one
  model that the client spreads requests over and fails over between) is used as is.

Each server listens on a free port, logs to a file, and is stopped on normal exit, on an
exception and on Ctrl-C/SIGTERM (its whole process group is killed).

    python -m pipeline.engines.servers smollm2-135m-instruct   # start, print the URL, wait for Ctrl-C
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from pipeline.core.config import REPO_ROOT, ConfigError, ModelPreset, llama_server_path, load_preset
from pipeline.engines.models import ensure_gguf

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """A managed server did not come up; the message points at its log file."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llamacpp_command(preset: ModelPreset, port: int, threads: int, lora_path: str | None = None) -> list[str]:
    srv = preset.server
    # The stock server, or the same server evaluating each request from an empty context.
    module = "llama_cpp.server" if srv.reuse_prompt_prefix else "pipeline.engines.llamacpp_server"
    cmd = [
        sys.executable, "-m", module,
        "--model", str(ensure_gguf(preset.gguf)),
        "--model_alias", preset.model,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(srv.n_ctx), "--n_batch", str(srv.n_batch),
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
        # Logits of every prompt token are never used here and slow prompt processing.
        "--logits_all", "False",
    ]
    if preset.chat_format:
        cmd += ["--chat_format", preset.chat_format]
    if lora_path:
        cmd += ["--lora_path", lora_path]
    return cmd + list(srv.extra_args)


def llama_server_command(preset: ModelPreset, port: int, threads: int, lora_path: str | None = None) -> list[str]:
    srv = preset.server
    binary = llama_server_path()
    if binary is None or not binary.is_file():
        raise ConfigError(f"preset '{preset.name}': server.program is llama-server, but no llama-server binary was "
                          f"found{f' at {binary}' if binary else ''} (run `make install`, or set LLAMA_SERVER to its path)")
    cmd = [
        str(binary), "--model", str(ensure_gguf(preset.gguf)), "--alias", preset.model,
        "--host", "127.0.0.1", "--port", str(port),
        # One KV buffer shared by the slots, each slot up to n_ctx tokens.
        "--ctx-size", str(srv.n_ctx * srv.n_parallel), "--parallel", str(srv.n_parallel), "--kv-unified",
        "--batch-size", str(srv.n_batch), "--threads", str(threads), "--threads-batch", str(threads),
        "--cont-batching", "--jinja", "--no-webui",
    ]
    if not srv.reuse_prompt_prefix:  # a slot's previous prompt is not reused (nor kept in a RAM cache)
        cmd += ["--no-cache-prompt", "--cache-ram", "0"]
    if preset.chat_format:
        cmd += ["--chat-template", preset.chat_format]
    if lora_path:
        cmd += ["--lora", lora_path]
    return cmd + list(srv.extra_args)


def vllm_command(preset: ModelPreset, port: int, lora_modules: dict[str, str] | None = None,
                 max_lora_rank: int | None = None) -> list[str]:
    srv = preset.server
    cmd = [
        "vllm", "serve", str(preset.hf_id),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", preset.model,
        "--max-model-len", str(srv.n_ctx),
        "--max-num-seqs", str(srv.n_parallel),
        "--gpu-memory-utilization", str(srv.gpu_memory_utilization),
    ]
    if srv.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(srv.tensor_parallel_size)]
    if srv.data_parallel_size > 1:  # one API server, several engine replicas behind it, balanced by vLLM
        cmd += ["--data-parallel-size", str(srv.data_parallel_size)]
    if lora_modules:
        cmd += ["--enable-lora", "--lora-modules", *[f"{k}={v}" for k, v in sorted(lora_modules.items())]]
        if max_lora_rank:
            cmd += ["--max-lora-rank", str(max_lora_rank)]
    return cmd + list(srv.extra_args)


class ManagedProcess:
    """One server subprocess in its own process group, with a health check and a log file."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, health_path: str, env: dict | None = None):
        self.cmd, self.port, self.log_path, self.health_path = cmd, port, log_path, health_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        logf.write(f"\n$ {' '.join(self.cmd)}\n".encode())
        logf.flush()
        # A new session: Ctrl-C in the terminal reaches us, and we stop the server ourselves.
        self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env)
        logf.close()

    def wait_healthy(self, timeout_s: float) -> None:
        url = f"http://127.0.0.1:{self.port}{self.health_path}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with code {self.proc.returncode} during start-up; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise ServerError(f"server not healthy after {timeout_s:.0f} s at {url}; see {self.log_path}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the servers (only in the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def serve(preset: ModelPreset, log_dir: str | Path, lora_path: str | None = None,
          lora_modules: dict[str, str] | None = None, max_lora_rank: int | None = None) -> Iterator[list[str]]:
    """Yield the base URLs to send requests to; start and always stop the servers they need."""
    if preset.engine == "remote":
        yield list(preset.base_urls) or [str(preset.base_url)]
        return
    log_dir = Path(log_dir)
    procs: list[ManagedProcess] = []
    cores = preset.server.n_threads or os.cpu_count() or 1
    if preset.engine == "llamacpp" and preset.server.program == "llama-server":
        port = free_port()
        procs.append(ManagedProcess(llama_server_command(preset, port, cores, lora_path), port,
                                    log_dir / f"llama-server-{preset.name}.log", "/health"))
    elif preset.engine == "llamacpp":
        replicas = preset.server.n_parallel
        threads = max(1, cores // replicas)
        for i in range(replicas):
            port = free_port()
            procs.append(ManagedProcess(llamacpp_command(preset, port, threads, lora_path), port,
                                        log_dir / f"llamacpp-{preset.name}-{i}.log", "/v1/models"))
    else:
        port = free_port()
        procs.append(ManagedProcess(vllm_command(preset, port, lora_modules, max_lora_rank), port,
                                    log_dir / f"vllm-{preset.name}.log", "/health"))
    with _sigterm_as_exit():
        try:
            t0 = time.monotonic()
            for p in procs:
                p.start()
            for p in procs:
                p.wait_healthy(preset.server.startup_timeout_s)
            log.info("%s: %d server(s) up in %.1f s", preset.name, len(procs), time.monotonic() - t0)
            yield [p.base_url for p in procs]
        finally:
            for p in procs:
                p.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO)
    preset = load_preset(argv[0], REPO_ROOT / "configs")
    with serve(preset, "logs") as urls:
        print(" ".join(urls), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
