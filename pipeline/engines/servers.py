"""Managed local LLM servers: started as subprocesses on 127.0.0.1, always stopped.

- llama.cpp (CPU, GGUF), one of two programs (`server.program`):
  - `llama-cpp-python` (`python -m llama_cpp.server`) decodes one request at a time behind a
    lock, so `server.n_parallel` starts that many server processes (replicas) that share the
    cores (`n_threads` split between them); the client spreads requests over them.
  - `llama-server`, llama.cpp's C++ server (built by `make install`), is one process with
    `n_parallel` slots decoded together in one batch (continuous batching): about 2x the
    tokens/s of the replicas on 2 cores (bench/generate_yield.py).
- vLLM (`vllm serve`, GPU, Hugging Face id), with LoRA options for serving adapters; started with this
  Python (`sys.executable -m vllm.entrypoints.cli.main serve`, the module behind the `vllm` script), so the
  vLLM of the running environment is used whether or not its bin/ is on PATH (`dvc exp run`). Before a start
  it must see a CUDA GPU as torch does (CUDA_VISIBLE_DEVICES honoured) and free GPU memory for its share.
- A `remote` preset needs no server: its base_url (or its several base_urls, replicas of one
  model that the client spreads requests over and fails over between) is used as is.

Each server listens on a free port, logs to a file, and is stopped on normal exit, on an
exception and on Ctrl-C/SIGTERM: its whole process group, waited for to the last process (vLLM's engine
processes hold the GPU memory and outlive its API server by seconds).

API keys: a managed server gets the key of its preset's `api_key_env`, explicitly, in the one variable its
program reads (vLLM: VLLM_API_KEY, llama-server: LLAMA_API_KEY, llama-cpp-python: API_KEY), never on its
command line (which is logged); without `api_key_env` those variables are removed from its environment, so a
key exported for something else is never inherited by accident (the server would answer 401 to everything).

    python -m pipeline.engines.servers smollm2-135m-instruct   # start, print the URL, wait for Ctrl-C
"""

from __future__ import annotations

import contextlib
import importlib.util
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

from pipeline.core.config import REPO_ROOT, ConfigError, ModelPreset, load_preset
from pipeline.engines.models import ensure_gguf
from pipeline.engines.versions import llama_server_path

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """A managed server did not come up; the message points at its log file."""


# vLLM's --max-lora-rank is an argparse choice among these (vllm/config/lora.py, MaxLoRARanks, the same in 0.30
# and 0.34); any other value stops the server at start-up with exit code 2.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The environment variables through which each server program takes an API key. llama-cpp-python's settings are
# pydantic-settings without a prefix, read case-insensitively: API_KEY (or api_key) protects it.
KEY_VARIABLES = {"vllm": "VLLM_API_KEY", "llama-server": "LLAMA_API_KEY", "llama-cpp-python": "API_KEY"}
_INHERITED_KEYS = {*KEY_VARIABLES.values(), "LLAMA_ARG_API_KEY_FILE"}
# How long a vLLM start waits for the GPU memory its share needs (a server stopped just before, or another
# process, may still hold it); then vLLM starts anyway and says what it found.
GPU_MEMORY_WAIT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llamacpp_command(preset: ModelPreset, port: int, threads: int, lora_path: str | None = None) -> list[str]:
    srv = preset.server
    if importlib.util.find_spec("llama_cpp") is None:  # the GPU install leaves it out (a C++ build from source)
        raise ConfigError(f"preset '{preset.name}': server.program is llama-cpp-python, which is not installed here "
                          "(the GPU install leaves it out): install it with `pip install -e .[llamacpp]`, or set "
                          "server.program: llama-server")
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


def vllm_lora_rank(rank: int) -> int:
    """The --max-lora-rank for adapters of rank `rank`: the smallest value vLLM accepts that holds it (an
    adapter of rank 12 is served with 16; vLLM pads it)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} (finetune.lora_r, or the adapter_config.json 'r' of the adapter being "
                      f"served) is above {VLLM_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts: "
                      f"train with finetune.lora_r <= {VLLM_LORA_RANKS[-1]}, or evaluate with evaluate.engine=transformers")


def vllm_command(preset: ModelPreset, port: int, lora_modules: dict[str, str] | None = None,
                 max_lora_rank: int | None = None) -> list[str]:
    srv = preset.server
    cmd = [
        # This Python's vLLM (the `vllm` script's own module): bin/ need not be on PATH.
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(preset.hf_id),
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
            cmd += ["--max-lora-rank", str(vllm_lora_rank(max_lora_rank))]
    return cmd + list(srv.extra_args)


def _cuda_device_count() -> int:
    """CUDA devices as torch (and so vLLM) sees them: CUDA_VISIBLE_DEVICES honoured, any /dev/nvidiaN."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def vllm_unavailable_reason(preset: ModelPreset | None = None) -> str | None:
    """Why a vLLM server cannot start here (None: it can): vLLM not installed in this Python, or fewer CUDA
    GPUs than the preset shards over (tensor_parallel_size x data_parallel_size)."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed in this Python ({sys.executable}); install the GPU extra: `make install-gpu`"
    needed = preset.server.tensor_parallel_size * preset.server.data_parallel_size if preset else 1
    found = _cuda_device_count()
    if found < needed:
        import torch

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"torch {torch.__version__} ({build}) sees {found} CUDA GPU(s), and vLLM needs {needed}"
                + ("" if torch.version.cuda else "; `make install-gpu` installs the CUDA torch"))
    return None


def _visible_nvml_indices(count: int) -> list[int | str]:
    """NVML handles (index or UUID) of the first `count` devices CUDA shows this process."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return list(range(count))
    return [int(v) if v.isdigit() else v for v in visible[:count]]


def gpu_memory_free_fractions(count: int) -> list[float] | None:
    """Free memory / total of the first `count` visible GPUs, read through NVML (vLLM's own dependency) so
    this process creates no CUDA context of its own (one would hold memory for the rest of the run); None
    where NVML cannot be read."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: nothing to wait for
        return None
    try:
        out = []
        for ref in _visible_nvml_indices(count):
            handle = (pynvml.nvmlDeviceGetHandleByIndex(ref) if isinstance(ref, int)
                      else pynvml.nvmlDeviceGetHandleByUUID(ref))
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(info.free / info.total)
        return out
    except Exception as exc:  # an odd CUDA_VISIBLE_DEVICES (MIG ids): vLLM checks for itself
        log.debug("NVML memory query failed: %s", exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def wait_for_gpu_memory(preset: ModelPreset, timeout_s: float = GPU_MEMORY_WAIT_S) -> None:
    """Wait until each GPU the preset uses has its `server.gpu_memory_utilization` share free: vLLM refuses
    to start below it, and a server stopped a moment ago can still be releasing its memory."""
    srv = preset.server
    count = srv.tensor_parallel_size * srv.data_parallel_size
    deadline = time.monotonic() + timeout_s
    while True:
        free = gpu_memory_free_fractions(count)
        if free is None or min(free) >= srv.gpu_memory_utilization:
            return
        if time.monotonic() >= deadline:
            log.warning("%s: GPU memory free %s after %.0f s, below server.gpu_memory_utilization=%.2f; starting "
                        "vLLM anyway", preset.name, [round(f, 3) for f in free], timeout_s, srv.gpu_memory_utilization)
            return
        time.sleep(1.0)


def server_env(preset: ModelPreset, program: str) -> dict[str, str]:
    """The environment of a managed server: this one without any API key variable, plus the preset's own key
    (`api_key_env`) in the variable `program` reads. The key goes in the environment, not on the command line,
    which is written to the log."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in _INHERITED_KEYS}
    if preset.api_key_env:
        from pipeline.engines.llm import resolve_api_key

        env[KEY_VARIABLES[program]] = resolve_api_key(preset)
    return env


class ManagedProcess:
    """One server subprocess in its own process group, with a health check and a log file."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, health_path: str, env: dict | None = None,
                 api_key: str | None = None, timeout_hint: str = ""):
        self.cmd, self.port, self.log_path, self.health_path = cmd, port, log_path, health_path
        self.env = env
        self.api_key = api_key  # sent with the health check: llama-cpp-python guards /v1/models too
        self.timeout_hint = timeout_hint
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
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with code {self.proc.returncode} during start-up; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0, headers=headers).status_code == 200:
                    return
            time.sleep(0.2)
        raise ServerError(f"server not healthy after {timeout_s:.0f} s at {url}{self.timeout_hint}; see {self.log_path}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL to what is left after `grace_s`; returns once no
        process of the group is left (vLLM's engine processes, which hold the GPU memory, outlive its API
        server), so the next server finds the memory free."""
        if self.proc is None:
            return
        group = self.proc.pid  # start_new_session: the server leads its own process group
        if self.proc.poll() is not None and not group_members(group):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        if not _wait_for_group(self.proc, group, grace_s):
            log.warning("server %s: still running %.0f s after SIGTERM; killing its process group", group, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            if not _wait_for_group(self.proc, group, 30.0):
                log.warning("server %s: processes %s outlived SIGKILL", group, sorted(group_members(group)))


def group_members(group: int) -> set[int]:
    """Live processes (not zombies) of a process group, from /proc (Linux). A zombie holds no memory, and
    where PID 1 does not reap orphans it would stay in the group forever."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            members.add(int(entry.name))
    return members


def _wait_for_group(proc: subprocess.Popen, group: int, timeout_s: float) -> bool:
    """Reap the leader and wait for the rest of its group to go; whether all went within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reaps the leader once it exits
        if proc.returncode is not None and not group_members(group):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


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
    program = "vllm" if preset.engine == "vllm" else preset.server.program
    env = server_env(preset, program)
    key = env.get(KEY_VARIABLES[program])
    hint = f" (preset '{preset.name}' server.startup_timeout_s={preset.server.startup_timeout_s:.0f})"
    if preset.engine == "llamacpp" and preset.server.program == "llama-server":
        port = free_port()
        procs.append(ManagedProcess(llama_server_command(preset, port, cores, lora_path), port,
                                    log_dir / f"llama-server-{preset.name}.log", "/health", env, key, hint))
    elif preset.engine == "llamacpp":
        replicas = preset.server.n_parallel
        threads = max(1, cores // replicas)
        for i in range(replicas):
            port = free_port()
            procs.append(ManagedProcess(llamacpp_command(preset, port, threads, lora_path), port,
                                        log_dir / f"llamacpp-{preset.name}-{i}.log", "/v1/models", env, key, hint))
    else:
        reason = vllm_unavailable_reason(preset)
        if reason:
            raise ServerError(f"preset '{preset.name}' is served by vLLM, which cannot start here: {reason}")
        port = free_port()
        hint += (": the first start downloads the weights inside this timeout; download them first "
                 f"(`hf download {preset.hf_id}`) or raise it")
        procs.append(ManagedProcess(vllm_command(preset, port, lora_modules, max_lora_rank), port,
                                    log_dir / f"vllm-{preset.name}.log", "/health", env, key, hint))
        wait_for_gpu_memory(preset)
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
