"""The report's sections on the evaluation: the run in one paragraph, pass@k with the deltas and their tests,
the other benchmarks, the phi-1 Table 3 style split into problems similar / non-similar to the training data,
and the evaluation run with its sanity checks. Each reads the evaluate stage's artifacts through their models.

    python -c "from pipeline.core.artifacts import EvalMetrics; from pipeline.stages.report.evaluation import *; \
print(EvalMetrics.read('eval/metrics.json').humaneval.ks())"
"""

from __future__ import annotations

from typing import Any

from pipeline.core.artifacts import BenchmarkMetrics, Delta
from pipeline.core.config import RunConfig
from pipeline.core.humaneval import BENCHMARK_LABELS
from pipeline.stages.report.blocks import Block, bullets, heading, para, table
from pipeline.stages.report.common import MODEL_LABELS, MODELS, NA, PHASE_LABELS, humaneval, na, pct
from pipeline.stages.report.inputs import Inputs

OTHER_BENCHMARKS = tuple(b for b in BENCHMARK_LABELS if b != "humaneval")


def summary_section(cfg: RunConfig, inputs: Inputs) -> list[Block]:
    """The run in one paragraph, under the title and the generated note that the templates write."""
    he = humaneval(inputs.metrics)
    ev = cfg.evaluate
    if he is None:
        return [na("HumanEval metrics (run `textbook evaluate`)")]
    models = inputs.per_problem.models if inputs.per_problem else {}
    student = models.get("base") or models.get("finetuned")
    evaluated = ", ".join(MODEL_LABELS[m] for m in he.scores())
    return [para(
        f"Student `{cfg.finetune.student}` ({student.engine if student else NA}), teacher `{cfg.generate.teacher}`; "
        f"evaluated: {evaluated}. HumanEval **{he.subset}** problems, {he.samples_per_problem} "
        f"sample(s) per problem at temperature {he.temperature} (0 = greedy), top_p {he.top_p}, "
        f"max_tokens {he.max_tokens}, harness **{he.harness}** (its prompts, stop "
        f"sequences{', sanitizer' if he.harness == 'evalplus' else ''} and time limits)"
        f"{', extra stop sequences ' + ', '.join(f'`{s!r}`' for s in ev.stop) if ev.stop else ''}; "
        f"run profile `{cfg.profile}`, seed {cfg.seed}.")]


def _interval(lo: float | None, hi: float | None, signed: bool = False) -> str:
    return f"{pct(lo, signed)} - {pct(hi, signed)}"


def passk_section(inputs: Inputs) -> list[Block]:
    blocks: list[Block] = [heading(2, "pass@k: base, each phase, fine-tuned")]
    he = humaneval(inputs.metrics)
    if he is None:
        return blocks + [na("metrics.json")]
    ks = [k for k in he.ks() if k != "pass@1"]
    header = ["model", "pass@1 (%)", "95% interval", *[f"{k} (%)" for k in ks], "problems solved"]
    rows = []
    for m, r in he.scores().items():
        values = r.pass_at_k()
        rows.append([MODEL_LABELS[m], pct(r.pass_at_1), _interval(r.pass_at_1_ci95_low, r.pass_at_1_ci95_high),
                     *[pct(values.get(k)) for k in ks], f"{r.problems_solved} of {he.problems}"])
    d = he.delta
    deltas: list[tuple[str, Delta]] = ([("**delta (fine-tuned - base)**", d)] if d is not None else []) + [
        (PHASE_LABELS[step], v) for step, v in (he.phases or {}).items() if step in PHASE_LABELS]
    for label, v in deltas:
        values = v.pass_at_k()
        rows.append([label, pct(v.pass_at_1, signed=True), _interval(v.pass_at_1_ci95_low, v.pass_at_1_ci95_high, True),
                     *[pct(values.get(k), signed=True) for k in ks],
                     f"+{v.improved_problems} / -{v.regressed_problems}"])
    blocks.append(table(header, rows))
    for label, v in deltas:
        verdict = "within noise" if v.within_noise else "outside noise at the 5% level"
        test = "McNemar's exact test" if v.test == "mcnemar_exact" else "a paired z-test"
        name = "The delta" if v is d else f"The {label.split(' (')[0]}"
        blocks.append(para(f"{name} of {pct(v.pass_at_1, True)} points of pass@1 is **{verdict}** ({test} on "
                           f"the same {he.problems} problems, p = {v.p_value:.3g}; "
                           f"{v.improved_problems} problem(s) improved, {v.regressed_problems} "
                           "regressed)."))
    if deltas:
        blocks.append(para("Intervals are 95%: " + ("a bootstrap over problems" if he.samples_per_problem > 1
                                                     else "Wilson") + " for each pass@1, normal approximation on "
                           "per-problem differences for each delta."))
    blocks += other_benchmarks_section(inputs)
    return blocks


def _bench_rows(name: str, bench: BenchmarkMetrics, models: list[str]) -> list[list[Any]]:
    rows = []
    scores = bench.scores()
    for model in models:
        r = scores.get(model)
        rows.append([BENCHMARK_LABELS[name], MODEL_LABELS[model], pct(r.pass_at_1 if r else None),
                     _interval(r.pass_at_1_ci95_low if r else None, r.pass_at_1_ci95_high if r else None),
                     f"{r.problems_solved if r else None} of {bench.problems}", bench.subset])
    d = bench.delta
    if d is not None:
        rows.append([BENCHMARK_LABELS[name], "**delta (fine-tuned - base)**", pct(d.pass_at_1, signed=True),
                     f"p = {d.p_value:.3g}", f"+{d.improved_problems} / -{d.regressed_problems}", bench.subset])
    return rows


def other_benchmarks_section(inputs: Inputs) -> list[Block]:
    """HumanEval+, MBPP, MBPP+ where the run covered them; the ones it did not, named."""
    metrics = inputs.metrics
    he = humaneval(metrics)
    run = {b: bench for b in OTHER_BENCHMARKS if metrics and (bench := metrics.benchmark(b)) is not None}
    missing = [BENCHMARK_LABELS[b] for b in OTHER_BENCHMARKS if b not in run]
    blocks: list[Block] = []
    if run:
        models = list(he.scores()) if he else []
        rows = [row for b, bench in run.items() for row in _bench_rows(b, bench, models)]
        blocks += [heading(3, "Other benchmarks"),
                   table(["benchmark", "model", "pass@1 (%)", "95% interval", "problems solved", "subset"], rows)]
    if missing:
        blocks.append(para(f"Not run here: {', '.join(missing)} (`evaluate.benchmarks`; EvalPlus's data files, "
                           "README \"Benchmarks\")."))
    return blocks


def similarity_section(inputs: Inputs) -> list[Block]:
    blocks: list[Block] = [heading(2, "Problems similar / non-similar to the training data (phi-1 Table 3 style)")]
    sim, pp = inputs.similarity, inputs.per_problem
    if sim is None or pp is None:
        return blocks + [na("humaneval_similarity.json and per_problem.json are both needed; the split")]
    results = pp.by_task()
    models = [m for m in MODELS if m in pp.models]
    levels = sim.tau_levels
    header = ["tau", "similar (n)", *[f"{MODEL_LABELS[m]} on similar" for m in models], "non-similar (n)",
              *[f"{MODEL_LABELS[m]} on non-similar" for m in models]]
    rows = []
    for level in sorted(levels, key=float, reverse=True):
        groups = [[t for t in ids if t in results] for ids in (levels[level].similar, levels[level].non_similar)]
        row: list[Any] = [level]
        for ids in groups:
            row.append(len(ids))
            for m in models:
                vals = [score.pass_at_1 for t in ids if (score := results[t].model(m)) is not None]
                row.append(pct(sum(vals) / len(vals)) if vals else "-")
        rows.append(row)
    blocks.append(table(header, rows))
    blocks.append(para(f"pass@1 (%) on the evaluated problems ({pp.subset}) whose closest kept training record "
                       "has an AST match score tau at or above (similar) or below (non-similar) each level. "
                       f"Highest tau of any problem: {max((p.ast_tau for p in sim.problems), default=NA)}."
                       " A gain that holds on the non-similar problems is not explained by near copies of the benchmark."))
    return blocks


def run_section(inputs: Inputs) -> list[Block]:
    blocks: list[Block] = [heading(2, "Evaluation run and sanity checks")]
    he = humaneval(inputs.metrics)
    if he is None:
        return blocks + [na("metrics.json")]
    models = inputs.per_problem.models if inputs.per_problem else {}
    rows = []
    for m, r in he.scores().items():
        d = models.get(m)
        sha = d.adapter_sha256 if d else None
        rows.append([MODEL_LABELS[m], d.engine if d else NA, f"`{d.model if d else NA}`",
                     f"`{sha[:12]}`" if sha else "-", r.requests_sent, r.cache_hits,
                     r.tokens_per_s, r.problems_per_min, r.generation_s, r.execution_s,
                     r.empty_completions, r.cut_at_max_tokens])
    blocks.append(table(["model", "engine", "requested as", "adapter sha256", "requests sent", "cache hits",
                         "tokens/s", "problems/min", "generation s", "execution s", "empty completions",
                         "cut at max_tokens"], rows))
    s = he.sanity
    blocks.append(para(f"Self-check: the canonical solutions of the evaluated problems pass the same execution path "
                       f"at {pct(s.canonical_pass_rate)}% (sandbox isolation `{s.isolation}`); "
                       f"failed requests: {s.failed_requests}; harness errors: "
                       f"{s.harness_errors}. Sanity flags: {len(s.flags) if s.flags else 'none'}."))
    if s.flags:
        blocks.append(bullets([f"**flag**: {f}" for f in s.flags]))
    return blocks
