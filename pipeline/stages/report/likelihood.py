"""The likelihood sections: NLL of the canonical solutions per model with paired tests (the run's
report), and the ablation's report (tools/ablation.py: arms at equal tokens, seeds, dose-response).

    python -c "import json; from pipeline.stages.report.likelihood import write_ablation_report; \
write_ablation_report(json.load(open('eval/ablation/metrics.json')), __import__('pathlib').Path('/tmp/abl'))"
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import HumanEvalMetrics, HumanEvalSimilarity, PerProblem
from pipeline.core.config import CORPUS_SOURCES
from pipeline.core.records import atomic_write_text
from pipeline.core.significance import paired_comparison
from pipeline.stages.report.blocks import Block, _plt, _png, bullets, heading, image, para, render, table

LABELS = {"base": "base", "pretrained": "after pretrain (phase 1)", "finetuned": "fine-tuned (last phase)"}


def _p(p: float | None) -> str:
    return "-" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def likelihood_section(he: HumanEvalMetrics | Mapping | None, per_problem: PerProblem | Mapping | None,
                       similarity: HumanEvalSimilarity | None) -> list[Block]:
    """The run's NLL figures: per model and item set, each phase against the one before, and the Table-3 split.
    `he` is HumanEval's section of the evaluate stage's metrics (a dict, as run_evaluate returns it, is parsed)."""
    if isinstance(he, Mapping):
        he = HumanEvalMetrics.model_validate(he)
    if isinstance(per_problem, Mapping):
        per_problem = PerProblem.parse(per_problem, "per_problem")
    lk = he.likelihood if he is not None else None
    blocks: list[Block] = [heading(2, "Likelihood of the canonical solutions (NLL)")]
    if not lk:
        return blocks + [para("Not measured in this run (`evaluate.likelihood: false`).")]
    blocks.append(para("Mean negative log-likelihood (nats/token; lower is better) of each problem's canonical "
                       "solution given exactly the prompt the evaluator sends, under each model: a continuous "
                       "endpoint that moves where greedy pass@1 cannot. Per model: the mean over problems with a "
                       "problem-level bootstrap 95% interval, and bits/byte over all solution bytes. Between models: "
                       "the mean per-problem difference, a sign-flip permutation test (primary) and Wilcoxon's."))
    rows, cmp_rows = [], []
    for set_name, entry in lk.items():
        label = "held-out curated exercises" if set_name == "heldout" else set_name
        summaries = entry.models()
        for model in LABELS:
            if model in summaries:
                s = summaries[model]
                rows.append([label, LABELS[model], s.items, f"{s.nll_per_token:.4f}",
                             f"[{s.ci95[0]:.4f}, {s.ci95[1]:.4f}]", f"{s.bits_per_byte:.4f}"])
        for name, c in entry.comparisons.items():
            b, a = name.split("_vs_")
            cmp_rows.append([label, f"{LABELS[b]} - {LABELS[a]}", c.n, f"{c.delta:+.4f}", _ci(c.ci95),
                             _p(c.p_value), _p(c.wilcoxon_p), f"{c.lower} / {c.higher}"])
    blocks.append(table(["items", "model", "n", "nats/token", "95% CI", "bits/byte"], rows))
    if cmp_rows:
        blocks.append(table(["items", "difference", "n", "mean delta", "95% CI", "p (sign-flip)", "p (Wilcoxon)",
                             "lower / higher"], cmp_rows))
    blocks += _split_rows(per_problem, similarity)
    return blocks


def _split_rows(per_problem: PerProblem | None, similarity: HumanEvalSimilarity | None) -> list[Block]:
    """fine-tuned - base on problems similar / non-similar to the kept training data (phi-1 Table 3 style)."""
    if per_problem is None or similarity is None:
        return []
    results = per_problem.by_task()
    values = {m: {t: score.likelihood.nll_per_token for t, r in results.items()
                  if (score := r.model(m)) is not None and score.likelihood is not None}
              for m in ("base", "finetuned")}
    if not values["base"] or not values["finetuned"]:
        return []
    rows = []
    for level, groups in sorted(similarity.tau_levels.items(), key=lambda kv: -float(kv[0])):
        row: list[Any] = [level]
        for ids in (groups.similar, groups.non_similar):
            ids = [t for t in ids if t in values["base"] and t in values["finetuned"]]
            if len(ids) < 3:
                row += [len(ids), "-", "-"]
                continue
            c = paired_comparison([values["base"][t] for t in ids], [values["finetuned"][t] for t in ids])
            row += [len(ids), f"{c['delta']:+.4f}", _p(c["p_value"])]
        rows.append(row)
    return [table(["tau", "similar (n)", "delta on similar", "p", "non-similar (n)", "delta on non-similar", "p"], rows),
            para("NLL of fine-tuned - base (nats/token) on the problems whose closest kept training record has an "
                 "AST match score at or above (similar) or below (non-similar) each tau: a gain on the non-similar "
                 "problems is not explained by near copies of the benchmark.")]


# ---------------------------------------------------------------------------------------
# The ablation's report
# ---------------------------------------------------------------------------------------


def plot_arms(arms: dict) -> bytes | None:
    plt = _plt()
    if plt is None:
        return None
    names = list(arms)
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.2))
    for y, name in enumerate(names[::-1]):
        a = arms[name]
        seeds = [s["humaneval_nll"] for s in (a.get("per_seed") or {}).values()] or [a["humaneval_nll"]]
        ax.scatter(seeds, [y] * len(seeds), color="#1f77b4", s=18)
        ax.plot([a["humaneval_nll"]] * 2, [y - 0.3, y + 0.3], color="#d62728")
    ax.set_yticks(range(len(names)), names[::-1])
    ax.set_xlabel("HumanEval canonical-solution NLL (nats/token); dots: seeds, bar: mean")
    return _png(fig)


def plot_dose(dose: dict) -> bytes | None:
    plt = _plt()
    if plt is None or not dose.get("points"):
        return None
    import math

    xs = [math.log1p(p["exercises"]) for p in dose["points"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [p["humaneval_nll"] for p in dose["points"]], marker="o")
    ax.set_xticks(xs, [str(p["exercises"]) for p in dose["points"]])
    ax.set_xlabel("curated exercises trained on (log(1 + n) axis)")
    ax.set_ylabel("NLL (nats/token)")
    return _png(fig)


def _comparison(name: str) -> str:
    """'curated_vs_corpus_filtered' -> 'curated vs corpus filtered'."""
    return " vs ".join(part.replace("_", " ") for part in name.split("_vs_"))


def ablation_blocks(m: dict) -> list[Block]:
    arms, comps = m["arms"], m["comparisons"]
    prim = m["primary"]
    blocks: list[Block] = [
        heading(2, "Endpoint and test, fixed before the numbers"),
        para(f"Primary: **{prim['comparison'].replace('_', ' ')}**, {m['endpoint']}; {prim['test']}, alpha "
             f"{prim['alpha']}. Every arm trains on as many target tokens as the curated set "
             f"({m['curated_exercises']} curated exercises trained on"
             + (f", of {m['curated_records']} records with the eval-loss split" if m.get("curated_records") else "")
             + f"), with the same steps, LoRA config and seeds ({', '.join(map(str, m['seeds']))})."),
        heading(2, "Arms")]
    rows = []
    for name, a in arms.items():
        seeds = a.get("per_seed") or {}
        p1 = a.get("pass_at_1")
        rows.append([name, f"{a['humaneval_nll']:.4f}", f"{a.get('humaneval_nll_sd_over_seeds', 0):.4f}" if seeds else "-",
                     f"{a['heldout_nll']:.4f}" if "heldout_nll" in a else "-",
                     ", ".join(str(s.get("records")) for s in seeds.values()) or "-",
                     ", ".join(str(s.get("target_tokens")) for s in seeds.values()) or "-",
                     f"{100 * p1['finetuned']:.1f}% ({p1['subset']})" if p1 else "-"])
    blocks.append(table(["arm", "HumanEval NLL (mean over seeds)", "sd over seeds", "held-out NLL", "records per seed",
                         "target tokens per seed", "greedy pass@1 (seed 0)"], rows))
    if any(a in arms for a in CORPUS_SOURCES):
        blocks.append(para("corpus: the corpus stage's natural code (documented functions as exercises), curated "
                           "but not filtered; corpus_filtered: the same, only the snippets its educational-value "
                           "classifier kept. corpus filtered vs corpus is the filter's own effect at equal target "
                           "tokens."))
    png = plot_arms(arms)
    if png:
        blocks.append(image("ablation_arms.png", "NLL per arm and seed", png))
    blocks.append(heading(2, "Paired comparisons (first - second)"))
    crows = []
    for name, c in comps.items():
        crows.append([_comparison(name), c["n"], f"{c['delta_nll']:+.4f}", _ci(c["ci95"]), _p(c["p_value"]),
                      _p(c["wilcoxon_p"]), f"{c['problems_lower']} / {c['problems_higher']}",
                      f"{c['heldout']['delta_nll']:+.4f} (p {_p(c['heldout']['p_value'])})" if "heldout" in c else "-"])
    blocks.append(table(["comparison", "problems", "delta NLL", "95% CI", "p (sign-flip)", "p (Wilcoxon)",
                         "first lower / higher", "held-out delta"], crows))
    split_rows = []
    for name, c in comps.items():
        for level, groups in sorted(c.get("table3", {}).items(), key=lambda kv: -float(kv[0])):
            for key, g in groups.items():
                split_rows.append([_comparison(name), level, key.replace("_", "-"), g["n"],
                                   f"{g['delta_nll']:+.4f}", _p(g["p_value"])])
    if split_rows:
        blocks += [para("The same comparisons on HumanEval problems similar / non-similar to the curated data "
                        "(AST match score tau of the closest kept record, phi-1 Table 3 style):"),
                   table(["comparison", "tau", "problems", "n", "delta NLL", "p (sign-flip)"], split_rows)]
    dose = m.get("dose_response") or {}
    if dose.get("points"):
        t = dose.get("trend_on_log1p_n") or {}
        blocks += [heading(2, "Dose-response"),
                   table(["curated exercises", "HumanEval NLL"], [[p["exercises"], f"{p['humaneval_nll']:.4f}"]
                                                                  for p in dose["points"]]),
                   para(f"Slope of NLL on log(1 + n): {t.get('slope', float('nan')):+.4f} per unit, "
                        f"permutation p = {_p(t.get('p_value'))} (seed {dose['seed']}, nested samples).")]
        png = plot_dose(dose)
        if png:
            blocks.append(image("ablation_dose.png", "NLL against curated exercises", png))
    if m.get("phase1"):
        p = m["phase1"]
        c = p["with_vs_without"]
        blocks += [heading(2, "Phase 1 (textbooks) on / off"),
                   bullets([f"with phase 1: {p['with_phase1_nll']:.4f}; without: {p['without_phase1_nll']:.4f} "
                            f"nats/token (seed {p['seed']})",
                            f"with - without: {c['delta_nll']:+.4f} {_ci(c['ci95'])}, p = {_p(c['p_value'])}"])]
    return blocks


def write_ablation_report(metrics: dict, out_dir: Path, extra: list[Block] = ()) -> None:
    """report.md, report.html and plots/ of an ablation's metrics.json; `extra` blocks go at the end (the corpus
    the corpus arms came from)."""
    blocks = ablation_blocks(metrics) + list(extra)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for b in blocks:
        if b["kind"] == "image":
            (plots / b["name"]).write_bytes(b["png"])
    context = {"title": "Ablation: does the curated data teach?", "blocks": blocks,
               "note": "Generated by tools/ablation.py from its metrics.json: do not edit by hand."}
    atomic_write_text(out_dir / "report.md", render("report.md.j2", context))
    atomic_write_text(out_dir / "report.html", render("report.html.j2", context))
