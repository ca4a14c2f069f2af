"""Test artifacts built from the models in pipeline.core.artifacts: every key is one its producer writes (a
misspelled override fails here, as it would in a reader), with small defaults a test overrides.

    generate_stats(requested=28, kept={"exercise": 21, "textbook": 4})
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.core.artifacts import (
    DecontaminateStats,
    DedupeStats,
    EvalMetrics,
    FilterStats,
    FinetuneMetrics,
    GenerateStats,
    HumanEvalSimilarity,
    PerProblem,
)


def merged(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, section by section (a dict value replaces a dict only where `base` has none)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def generate_stats(**over: Any) -> GenerateStats:
    return GenerateStats.parse(merged({
        "teacher": "qwen", "requested": 10, "completed": 10, "not_attempted": 0, "stopped_by_budget": False,
        "lost": 0, "failed_requests": 0, "failed_by_error": {}, "kept": {"exercise": 8, "textbook": 1},
        "rejected": 1, "rejected_by_reason": {"parse:no_assert_tests": 1}, "salvaged_from_length": 0,
        "repair": {"rounds": 0, "requests": 0, "by_outcome": {}, "exercises_repaired": 0},
        "tokens": {"prompt": 1000, "completion": 2000}, "cost_usd": 0.0, "ledger_this_run": {},
        "coverage": {"prompts": 10, "duplicate_prompt_rate": 0.0, "distinct_topics": 5,
                     "distinct_topic_subtopic_pairs": 8, "topic_subtopic_pairs_available": 0, "distinct_topic_pairs": 4,
                     "distinct_audiences": 3, "distinct_function_names": 8, "function_name_duplicate_rate": 0.0},
        "timing": {"wall_s": 1.0, "server_start_s": 0.0}}, over), "generate_stats()")


def filter_kind(n_in: int, kept: int, reasons: dict[str, int] | None = None, **over: Any) -> dict:
    return {"in": n_in, "kept": kept, "dropped": n_in - kept, "dropped_by_reason": reasons or {}, **over}


def filter_stats(exercise: dict | None = None, textbook: dict | None = None, **over: Any) -> FilterStats:
    ex = exercise or filter_kind(8, 6, {"tests_failed:failed": 2})
    return FilterStats.parse(merged({
        "exercise": {"assert_policy": "all", "kept_with_dropped_asserts": 0, "asserts_dropped": 0,
                     "kept_with_rewritten_asserts": 0, "asserts_rewritten": 0, **ex},
        "textbook": textbook or filter_kind(1, 1), "isolation": "bwrap",
        "timing": {"wall_s": 1.0, "records_per_s": 10.0}}, over), "filter_stats()")


def dedupe_kind(n_in: int, kept: int, exact: int = 0, near: int = 0, **over: Any) -> dict:
    return {"in": n_in, "kept": kept, "removed_exact": exact, "removed_near": near, "clusters": exact + near,
            "largest_cluster": 2 if exact + near else 1, "ast_checked": 0, "unparsable_code": 0,
            "candidate_pairs": near, "confirmed_pairs": near, "crowded_rows": 0, "without_shingles": 0,
            "duplicate_rate_per_1000": [], **over}


def dedupe_stats(exercise: dict | None = None, textbook: dict | None = None, **over: Any) -> DedupeStats:
    ex, tb = exercise or dedupe_kind(6, 6), textbook or dedupe_kind(1, 1)
    resumed = {"blocks": 1, "blocks_reused": 0, "confirm_steps_reused": 0}
    return DedupeStats.parse(merged({
        "exercise": ex, "textbook": tb, "kept": {"exercise": ex["kept"], "textbook": tb["kept"]},
        "removed": {"exercise": ex["in"] - ex["kept"], "textbook": tb["in"] - tb["kept"]},
        "lsh": {"num_perm": 128, "permutations_used": 96, "bands": 16, "rows": 6, "threshold": 0.8,
                "candidate_recall": 0.99, "p_candidate_at_threshold": 0.9923, "shingle_size": 5, "exact": True,
                "near": True},
        "timing": {"wall_s": 0.1, "index_s": 0.05, "decide_s": 0.02, "write_s": 0.01, "docs_per_s": 100.0, "workers": 1,
                   "resumed": {"exercise": resumed, "textbook": resumed}}}, over), "dedupe_stats()")


def decontaminate_stats(n_in: dict, kept: dict, **over: Any) -> DecontaminateStats:
    return DecontaminateStats.parse(merged({
        "in": n_in, "kept": kept, "removed": {k: n_in[k] - kept[k] for k in n_in},
        "removed_by_signal": {"ngram": 0, "difflib": 0, "ast": 0}, "kept_by_behaviour": 0, "removed_task_ids": [],
        "signals": ["ngram", "difflib", "ast"],
        "thresholds": {"ngram_size": 13, "candidate_ngram_size": 10, "difflib": 0.5, "ast": 0.9},
        "humaneval": {"problems": 164, "max_ast_tau": 0.5, "similar_at_tau": {}},
        "tokens": {"completion_tokens": 0, "text_words": 0},
        "dataset": {"rows": sum(kept.values()), "columns": ["id", "kind", "text"], "jsonl": "train.jsonl",
                    "parquet": "data/train-00000-of-00001.parquet"},
        "timing": {"index_s": 0.1, "ngram_difflib_s": 0.1, "ast_s": 0.1, "dataset_s": 0.1, "wall_s": 0.5}},
        over), "decontaminate_stats()")


def finetune_metrics(train: int, eval: int, **over: Any) -> FinetuneMetrics:
    """A trained run's metrics: `train` examples trained on, `eval` held out for the eval loss."""
    records = train + eval
    return FinetuneMetrics.parse(merged({
        "student": "smollm2-135m-instruct", "enabled": True, "kinds": ["exercise"], "records_used": records,
        "heldout_records": 3, "training_seed": 1234, "source": "curated", "phase_one": None, "device": "cpu",
        "quantization": "none", "compute_dtype": "bfloat16", "init_adapter": None, "steps": 4, "epochs": 2.0,
        "resumed_from_step": None, "train_loss": 0.5, "train_loss_mean": 0.6, "eval_loss": 0.7, "train_tokens": 1000,
        "tokens_per_s": 50.0, "train_s": 20.0, "processes": 1, "global_batch": 4, "per_device_batch": 4,
        "grad_accum_per_process": 1, "trainable_params": 1000, "total_params": 100000,
        "examples": {"records": records, "exercises": records, "textbooks": 0, "truncated": 0, "split": 0,
                     "dropped_long": 0, "dropped_no_target": 0, "tokens": 500, "target_tokens": 300, "train": train,
                     "eval": eval, "train_sequences": train, "eval_sequences": eval, "sequence_fill": 0.5},
        "peak_memory_mb": 1000.0, "peak_memory_kind": "peak_rss", "wall_s": 30.0}, over), "finetune_metrics()")


def model_score(pass1: float, solved: int, **over: Any) -> dict:
    return {"pass@1": pass1, "pass@1_ci95_low": 0.057, "pass@1_ci95_high": 0.51, "passed_samples": solved,
            "problems_solved": solved, "empty_completions": 1, "cut_at_max_tokens": 2, "generation_s": 30.0,
            "server_start_s": 2.0, "requests_sent": 10, "cache_hits": 0, "completion_tokens": 900,
            "tokens_per_s": 25.0, "problems_per_min": 20.0, "execution_s": 0.5, **over}


def delta(pass1: float, **over: Any) -> dict:
    return {"pass@1": pass1, "pass@1_ci95_low": -0.2, "pass@1_ci95_high": 0.4, "p_value": 1.0,
            "test": "mcnemar_exact", "within_noise": True, "improved_problems": 2, "regressed_problems": 1, **over}


def eval_metrics(problems: int, models: dict[str, dict], **over: Any) -> EvalMetrics:
    """HumanEval on the first `problems` problems; `models`: name -> model_score(...)."""
    he = {"benchmark": "HumanEval", "harness": "bigcode", "problems": problems, "problems_total": 164,
          "subset": f"first {problems} of 164", "samples_per_problem": 1, "temperature": 0.0, "top_p": 0.95,
          "max_tokens": 384, **models, "presets": {"student": "smollm2-135m-instruct", "teacher": "qwen"},
          "benchmarks": ["humaneval"],
          "sanity": {"canonical_pass_rate": 1.0, "failed_requests": 0, "harness_errors": 0, "isolation": "bwrap",
                     "flags": []},
          "timing": {"self_check_s": 1.0, "generation_s": 60.0, "execution_s": 1.0, "wall_s": 62.0}}
    return EvalMetrics.parse(merged({"humaneval": he}, over), "eval_metrics()")


def describe(model: str, adapter_sha256: str | None = None) -> dict:
    return {"preset": "smollm2-135m-instruct", "engine": "llamacpp", "model": model, "api": "completion",
            "identity": f"llamacpp:{model}", "adapter": "data/finetune/adapter.gguf" if adapter_sha256 else None,
            "adapter_sha256": adapter_sha256}


def per_problem(tasks: list[str], passed: dict[str, dict[int, int]], models: dict[str, dict]) -> PerProblem:
    """`passed`: model -> {index of a task in `tasks`: samples passed of 1}."""
    return PerProblem.parse({
        "benchmark": "HumanEval", "subset": f"first {len(tasks)} of 164", "problems": len(tasks),
        "samples_per_problem": 1, "models": models,
        "results": [{"task_id": t, **{m: {"n": 1, "c": p.get(i, 0), "pass@1": float(p.get(i, 0))}
                                      for m, p in passed.items()}} for i, t in enumerate(tasks)]}, "per_problem()")


def similarity(task_ids: list[str], similar: dict[str, list[str]], taus: dict[str, float]) -> HumanEvalSimilarity:
    """`similar`: tau level -> the similar problems; `taus`: a problem's AST tau (0.5 when not given)."""
    return HumanEvalSimilarity.parse({
        "kept_records": 6, "ngram_size": 13, "candidate_ngram_size": 10, "metric": "ast_tau",
        "problems": [{"task_id": t, "ast_tokens": 40, "ast_tau": taus.get(t, 0.5), "ast_tau_record": "ex-1",
                      "ngram_shared": 0, "ngram_shared_record": None, "candidate_ngram_shared": 0,
                      "candidate_ngram_shared_record": None, "kept_by_behaviour": []} for t in task_ids],
        "tau_levels": {lvl: {"similar": s, "non_similar": [t for t in task_ids if t not in s], "n_similar": len(s),
                             "n_non_similar": len(task_ids) - len(s)} for lvl, s in similar.items()}},
        "similarity()")
