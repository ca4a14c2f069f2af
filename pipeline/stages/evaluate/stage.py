"""The evaluate stage's core (`run_evaluate`) and its CLI: self-check, generation, execution,
scoring, the likelihood endpoint, and the outputs. The protocol is in the package docstring.

    textbook evaluate --set evaluate.problems=20
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import EvalMetrics, PerProblem
from pipeline.core.config import RunConfig, configs_dir, load_preset
from pipeline.core.records import write_jsonl
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.llm import LLMError, RequestCache
from pipeline.sandbox import Sandbox
from pipeline.stages.evaluate.benchmarks import HELDOUT, INFO, heldout_problems
from pipeline.stages.evaluate.generation import client_config, generate_all
from pipeline.stages.evaluate.harness import Convention
from pipeline.stages.evaluate.scoring import bench_metrics, completions_for, execute, self_check
from pipeline.stages.evaluate.targets import (
    Bench,
    EvaluationError,
    Target,
    build_requests,
    load_benches,
    resolve_targets,
    unique_requests,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _timer(into: dict, key: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        into[key] = round(time.monotonic() - t0, 3)


def run_evaluate(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns the metrics (also written to metrics.json). Raises EvaluationError."""
    ev = cfg.evaluate
    t_start = time.monotonic()
    root = configs_dir(config_path)
    benches = load_benches(ev)
    held = heldout_problems(cfg.finetune.heldout_path)
    if held:  # the exercises finetune held out: pass@1 (and NLL) in the training distribution
        benches.append(Bench(HELDOUT, held, len(held), Convention(ev.harness, INFO[HELDOUT].family),
                             every_problem=held))
    targets = resolve_targets(cfg, root)
    out_dir = Path(ev.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, root, "evaluate", out_dir)
    timing: dict[str, float] = {}

    # A harness that cannot pass the reference solutions would score every model 0: stop before generating.
    with Sandbox(ev.sandbox) as sandbox, _timer(timing, "self_check_s"):
        checks = {b.name: self_check(b.problems, sandbox, b.conv) for b in benches}
        isolation = sandbox.isolation
    for b in benches:
        rate, failing, b.reference_s = checks[b.name]
        if failing and b.name == HELDOUT:  # the dataset's own exercise, not the harness: left out, named
            log.warning("held-out exercises whose solution fails its tests here, left out: %s", ", ".join(failing))
            bad = {f.split(" ")[0] for f in failing}
            b.problems = [p for p in b.problems if p["task_id"] not in bad]
            b.every_problem, b.total = b.problems, len(b.problems)
            continue
        if failing:
            raise EvaluationError(f"self-check: {len(failing)} of {len(b.problems)} canonical solutions of "
                                  f"{INFO[b.name].label} did not pass through the execution path: "
                                  f"{', '.join(failing[:10])}; the harness is broken")

    per_bench = {(t.name, b.name): build_requests(t, b, ev, cfg.seed) for t in targets for b in benches}
    requests = {t.name: [r for b in benches for r in per_bench[t.name, b.name]] for t in targets}
    unique = {t.name: unique_requests(requests[t.name]) for t in targets}
    cache = RequestCache(cfg.evaluate.cache_path)
    try:
        with _timer(timing, "generation_s"):
            sent, gen_stats = generate_all(targets, {n: u[0] for n, u in unique.items()}, client_config(cfg), cache,
                                           progress)
    finally:
        cache.close()
    failed = [(t.name, r.id, r.error) for t in targets for r in sent[t.name].values() if not r.ok]
    if failed:
        raise EvaluationError(f"{len(failed)} request(s) failed after all retries (e.g. {failed[:3]}); a failed "
                              "request is not a wrong answer: fix the server and re-run (finished ones are cached)")
    results = {t.name: {rid: sent[t.name][rep] for rid, rep in unique[t.name][1].items()} for t in targets}

    metrics: dict[str, Any] = {}
    flags: list[str] = []
    all_samples: dict[str, list[dict]] = {t.name: [] for t in targets}
    per_problem_files: dict[str, dict] = {}
    with Sandbox(ev.sandbox) as sandbox, _timer(timing, "execution_s"):
        for b in benches:
            samples = {t.name: completions_for(t, b, per_bench[t.name, b.name], results[t.name], ev) for t in targets}
            exec_s = execute(b, targets, samples, ev, sandbox, progress)
            metrics[b.name], per_problem, bench_flags = bench_metrics(b, targets, samples, ev, gen_stats, exec_s)
            flags += bench_flags
            for t in targets:
                all_samples[t.name] += samples[t.name]
            per_problem_files[b.name] = {
                "benchmark": INFO[b.name].label, "subset": b.subset, "problems": len(b.problems),
                "results": [{"task_id": p["task_id"], **{m: per_problem[m][p["task_id"]] for m in per_problem}}
                            for p in b.problems]}
    if ev.likelihood:  # after generation: every server is stopped, the scorer has the memory to itself
        with _timer(timing, "likelihood_s"):
            nll = _likelihood(cfg, root, targets, benches, progress)
        for b in benches:
            for row in per_problem_files[b.name]["results"]:
                for name, sets in nll["scores"].items():
                    if row["task_id"] in sets.get(b.name, {}) and name in row:
                        row[name]["likelihood"] = sets[b.name][row["task_id"]]
    he = metrics["humaneval"]
    he["presets"] = {"student": cfg.finetune.student, "teacher": cfg.generate.teacher}
    he["benchmarks"] = list(ev.benchmarks)
    if ev.likelihood:  # by item set (each benchmark, heldout): per target, and each phase against the one before
        he["likelihood"] = nll["metrics"]
    for t in targets:
        write_jsonl(out_dir / f"samples_{t.name}.jsonl", all_samples[t.name], sort_key=None)
    for name in ("pretrained",):  # a declared DVC output, empty when the phase is off
        if name not in all_samples:
            write_jsonl(out_dir / f"samples_{name}.jsonl", [], sort_key=None)
    errors = sum(r["status"] == "error" for rows in all_samples.values() for r in rows)
    he["sanity"] = {"canonical_pass_rate": min(checks[b.name][0] for b in benches), "failed_requests": 0,
                    "harness_errors": errors, "isolation": isolation, "flags": flags}
    he["timing"] = {**timing, "wall_s": round(time.monotonic() - t_start, 3)}
    first = per_problem_files.pop("humaneval")
    # Written through their typed models: a key the report would not read fails here, not there.
    PerProblem.parse({
        **first, "samples_per_problem": ev.n_samples, "models": {t.name: t.describe() for t in targets},
        **({"benchmarks": per_problem_files} if per_problem_files else {}),
        **({"likelihood": nll["per_item"]} if ev.likelihood else {})}, out_dir / "per_problem.json",
    ).write(out_dir / "per_problem.json")
    EvalMetrics.parse(metrics, out_dir / "metrics.json").write(out_dir / "metrics.json")
    for flag in flags:
        log.warning("SANITY FLAG: %s", flag)
    log.info("evaluate: %s", {b.name: {t.name: metrics[b.name][t.name]["pass@1"] for t in targets} for b in benches})
    return metrics


def _likelihood(cfg: RunConfig, root: Path, targets: list[Target], benches: list[Bench], progress: bool) -> dict:
    """NLL of the canonical solutions (and held-out exercises) under every student target: the metrics,
    per-item scores by target and set, and the held-out per-item table."""
    from pipeline.stages.evaluate.likelihood import benchmark_items, likelihood_metrics, score_targets

    sets = {b.name: benchmark_items(b, cfg.evaluate.likelihood_problems if b.name != HELDOUT else 0)
            for b in benches}
    scores = score_targets(cfg, targets, load_preset(cfg.finetune.student, root), sets, progress)
    by_id = {name: {s: {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in rows} for s, rows in per.items()}
             for name, per in scores.items()}
    # Every scored item of every set, by model: the subsets pass@k evaluates are in the results rows too.
    per_item = {name: {"items": len(items), "results": [{"id": i.id, **{n: by_id[n][name][i.id] for n in by_id
                                                                       if i.id in by_id[n].get(name, {})}}
                                                        for i in items]}
                for name, items in sets.items() if items}
    return {"metrics": likelihood_metrics(scores, cfg.evaluate.seed), "scores": by_id, "per_item": per_item}


def main(args) -> int:
    def summary(metrics: dict) -> dict:
        he = metrics["humaneval"]
        return {"subset": he["subset"], **{m: he[m]["pass@1"] for m in ("base", "pretrained", "finetuned", "teacher")
                                          if m in he},
                "delta": he.get("delta", {}).get("pass@1"), "flags": len(he["sanity"]["flags"])}

    return stage_cli(run_evaluate, args, summary, {EvaluationError: ("evaluate failed", 1), LLMError: ("evaluate failed", 1)})
