"""The evaluate stage's section: HumanEval (and EvalPlus's benchmarks) pass@k of each target."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from pipeline.core.config.shared import ClientConfig, SandboxConfig
from pipeline.core.config.validation import require, section


@section("evaluate")
class EvaluateConfig:
    output_dir: StrictStr = Field("eval", description="metrics.json and per-problem results.")
    cache_path: StrictStr = Field(
        "data/eval_cache/requests.sqlite", description="Request cache for completions (kept across runs).")
    problems: StrictInt = Field(
        0, ge=0, description="Evaluate the first N HumanEval problems; 0 = all 164 (a subset is named in "
        "every output).")
    models: list[StrictStr] = Field(
        default_factory=lambda: ["base", "pretrained", "finetuned"], description="Which to evaluate: base, "
        "pretrained (after phase 1; skipped when pretrain is off), finetuned (after the last phase), "
        "teacher.")
    n_samples: StrictInt = Field(
        1, ge=1, description="Samples per problem (1 with temperature 0 = greedy pass@1).")
    temperature: StrictFloat = Field(0.0, ge=0, le=2, description="0 = greedy.")
    top_p: StrictFloat = Field(0.95, description="Nucleus mass when sampling.")
    ks: list[StrictInt] = Field(
        default_factory=lambda: [1], description="k values for pass@k (each <= n_samples).")
    max_tokens: StrictInt = Field(384, description="Completion token cap.")
    harness: Literal["evalplus", "bigcode"] = Field(
        "evalplus", description="Evaluation convention, named in every report: evalplus (EvalPlus's prompts, "
        "stop strings, sanitizer and time limits) or bigcode (bigcode-evaluation-harness's stop strings, "
        "prompt + completion run as is); pipeline/stages/evaluate/harness.py.")
    stop: list[StrictStr] = Field(
        default_factory=list, description="Stop sequences added to the harness's own (base models).")
    chat_prefill: StrictBool = Field(
        False, description="evalplus, chat models: EvalPlus's convention for locally served instruct models "
        "(its vLLM and HF providers, behind published open-model scores) instead of its API one: the answer "
        "is begun for the model (EvalPlus's response prefix and an open ```python block, an assistant "
        "prefill that llama-server and vLLM continue) and stops at the block's end. Chat students are "
        "fine-tuned in the API convention: for scoring instruct models (tools/validate.py), not the "
        "students.")
    benchmarks: list[StrictStr] = Field(
        default_factory=lambda: ["humaneval"], description="Benchmarks to run: humaneval (always; the "
        "headline), humaneval+, mbpp, mbpp+ (EvalPlus's data sets, read from the paths below).")
    humaneval_plus_path: StrictStr = Field(
        "", description="EvalPlus's HumanEvalPlus-v0.1.10.jsonl.gz for humaneval+; empty = the file the "
        "evalplus package downloads (network).")
    mbpp_plus_path: StrictStr = Field(
        "", description="EvalPlus's MbppPlus-v0.2.0.jsonl.gz for mbpp and mbpp+; empty = the file the "
        "evalplus package downloads (network).")
    engine: Literal["auto", "llamacpp", "vllm", "transformers"] = Field(
        "auto", description="auto: the student preset's engine (llama.cpp for GGUF, vLLM for HF ids; a vLLM "
        "student where vLLM cannot start is an error); transformers: in process (bf16, batched on a GPU; "
        "the CPU fallback, when asked).")
    client: ClientConfig = Field(
        default_factory=lambda: ClientConfig(length_retries=0), description="The evaluator's own client: "
        "requests in flight, retries, timeouts, rate limits (a cut completion is never asked again and "
        "there is no budget cap).")
    seed: StrictInt = Field(0, description="Sampling seed offset (added to the run seed).")
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Execution limits and isolation.")
    likelihood: StrictBool = Field(
        False, description="Also score the NLL of each problem's canonical solution (and of the held-out "
        "exercises) under every student target, given the prompt the evaluator sends: a continuous endpoint "
        "with paired sign-flip tests, where greedy pass@1 cannot see a small effect. In process with "
        "transformers on the weights llama.cpp serves.")
    likelihood_batch: StrictInt = Field(
        8, ge=1, description="Texts per forward pass of the likelihood scorer.")
    likelihood_problems: StrictInt = Field(
        0, ge=-1, description="Problems the likelihood endpoint scores: the first N of each benchmark, 0 = "
        "all of them (cheap beside generation: all 164 HumanEval problems in about 2 minutes for a 270M "
        "student on 2 cores), -1 = the problems pass@k evaluates.")

    @model_validator(mode="after")
    def _cross_checks(self) -> EvaluateConfig:
        from pipeline.core.humaneval import BENCHMARK_LABELS

        require(all(1 <= k <= self.n_samples for k in self.ks), "ks",
                f"each k must be in [1, n_samples={self.n_samples}]")
        known = tuple(BENCHMARK_LABELS)
        require("humaneval" in self.benchmarks and set(self.benchmarks) <= set(known)
                and len(set(self.benchmarks)) == len(self.benchmarks), "benchmarks",
                f"must list humaneval and any of {', '.join(known[1:])}, each once; got {self.benchmarks}")
        allowed = {"base", "pretrained", "finetuned", "teacher"}
        require(bool(self.models) and set(self.models) <= allowed, "models",
                f"must be a non-empty subset of {sorted(allowed)}")
        require(self.n_samples == 1 or self.temperature > 0, "temperature",
                "n_samples > 1 needs temperature > 0")
        require(not self.chat_prefill or self.harness == "evalplus", "chat_prefill",
                "is EvalPlus's convention: it needs evaluate.harness evalplus")
        return self
