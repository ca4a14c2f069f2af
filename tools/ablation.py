"""The ablation: does the curated data teach, against controls at equal training tokens?

Arms (`finetune.source`): curated, rejected (the filter's rejects, same prompts and teacher),
natural (documented stdlib functions), and with `--arms ... corpus corpus_filtered` the corpus
stage's natural code, unfiltered and as its educational-value classifier kept it (both need the
corpus built under `--data`: `{data}/corpus/unfiltered/`, `{data}/corpus/select/kept.jsonl`); each
sampled to the curated set's target tokens, each trained with the same steps, LoRA config and
`--seeds`; plus the untrained base, a dose-response of curated exercises (`--dose`: seeded nested
samples), and phase 1 (textbooks) on / off.

Primary endpoint, fixed before the numbers: curated vs rejected, mean per-problem NLL (nats/token)
of HumanEval's 164 canonical solutions given the evaluator's prompt, per-problem values averaged
over seeds, sign-flip permutation test (two-sided, alpha 0.05). Secondary: curated vs base,
curated vs natural, curated vs corpus and vs corpus_filtered, corpus_filtered vs corpus (filtered
against unfiltered natural code at equal tokens), the held-out curated exercises, the dose-response
trend on log(1 + n), greedy pass@1 of one seed per arm (descriptive).

Every step resumes: training from its checkpoints (the finetune stage), NLL from the score cache
(one file per weights, adapter and item set), pass@1 from the evaluate request cache. Outputs:
`{--out}/metrics.json`, `report.md`, `plots/`.

    .venv/bin/python tools/ablation.py --seeds 0 1 2 --dose 12 24            # the default run's data
    .venv/bin/python tools/ablation.py --set profile=cpu-showcase --data data/showcase --out eval/showcase/ablation
    .venv/bin/python tools/ablation.py --arms curated rejected natural corpus corpus_filtered   # corpus built
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.artifacts import (  # noqa: E402
    AblationMetrics,
    AblationPerProblem,
    EvalMetrics,
    FinetuneMetrics,
)
from pipeline.core.config import (  # noqa: E402
    CORPUS_SOURCES,
    FINETUNE_SOURCES,
    configs_dir,
    load_config,
    load_preset,
)
from pipeline.core.significance import paired_comparison, trend_test  # noqa: E402

PRIMARY = "curated_vs_rejected"
ARMS = FINETUNE_SOURCES
# (first, second) of every paired comparison, first - second: curated against each other arm, and the corpus
# filter's own question, filtered against unfiltered natural code at equal tokens.
COMPARISONS = (*[("curated", other) for other in ("base", *ARMS[1:])], ("corpus_filtered", "corpus"))
TEXTBOOK = str(REPO / ".venv" / "bin" / "textbook")


def log(msg: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args: list[str]) -> None:
    log(" ".join(args[1:4]) + " ...")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([TEXTBOOK, *args[1:]], check=True, cwd=REPO, env=env)


class Ablation:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.sets = list(opts.set)
        data = opts.data
        self.base_sets = [f"finetune.dataset_dir={data}/dataset", f"controls.output_dir={data}/controls",
                          f"finetune.rejected_dir={data}/controls/rejected/dataset",
                          f"finetune.heldout_fraction={opts.heldout_fraction}", "evaluate.likelihood=true",
                          *self.sets]
        self.work = Path(opts.work)
        self.out = Path(opts.out)

    def cfg(self, extra: list[str]):
        return load_config(REPO / "params.yaml", self.base_sets + extra)

    def arm_sets(self, arm: str, seed: int) -> list[str]:
        """The overrides that make a run of `arm`: its source and seed, and for the corpus arms where the corpus
        is (only theirs, so the other arms' finished runs keep their keys)."""
        corpus = [f"finetune.corpus_dir={self.opts.data}/corpus/unfiltered",
                  f"finetune.corpus_kept={self.opts.data}/corpus/select/kept.jsonl"] if arm in CORPUS_SOURCES else []
        return [f"finetune.source={arm}", f"finetune.seed={seed}", *corpus]

    def finetune(self, name: str, extra: list[str], gguf: bool) -> tuple[list[str], FinetuneMetrics]:
        """Train one run (resumes; a finished run only reloads), returning its overrides and metrics."""
        sets = [f"finetune.output_dir={self.work / name}", f"finetune.export_gguf={str(gguf).lower()}", *extra]
        metrics_path = self.work / name / "metrics.json"
        done = self.work / name / ".ablation-done"
        key = json.dumps(self.base_sets + sets)
        if not (done.is_file() and done.read_text() == key and metrics_path.is_file()):
            run(["textbook", "finetune", "-q", *[a for s in self.base_sets + sets for a in ("--set", s)]])
            done.write_text(key)
        return sets, FinetuneMetrics.read(metrics_path)

    def nll(self, name: str, target: str, sets: list[str]) -> dict[str, dict[str, float]]:
        """{set: {item id: nats/token}} of a run's model (target base or finetuned)."""
        from pipeline.core.humaneval import load_problems
        from pipeline.engines.likelihood import Item
        from pipeline.stages.evaluate.harness import Convention
        from pipeline.stages.evaluate.likelihood import heldout_items, score_one, scored_target

        cfg = self.cfg(sets)
        student = load_preset(cfg.finetune.student, configs_dir(REPO / "params.yaml"))
        conv = Convention(cfg.evaluate.harness, "humaneval")
        items = {"humaneval": [Item(p["task_id"], conv.base_prompt(p["prompt"]), p["canonical_solution"])
                               for p in load_problems()],
                 "heldout": heldout_items(cfg)}
        st = scored_target(cfg, SimpleNamespace(name=target, preset=student), student)
        log(f"nll {name} ({target})")
        rows = score_one(cfg, st, items, progress=not self.opts.quiet)
        return {s: {r["id"]: r["nll_per_token"] for r in rs} for s, rs in rows.items()}

    def pass_at_1(self, name: str, sets: list[str]) -> dict:
        out = self.out / "runs" / name
        run(["textbook", "evaluate", "-q", *[a for s in self.base_sets + sets + [
            f"evaluate.output_dir={out}", "evaluate.likelihood=false", "evaluate.models=[base,finetuned]",
            f"evaluate.problems={self.opts.pass_problems}"] for a in ("--set", s)]])
        metrics = EvalMetrics.read(out / "metrics.json")
        he, held = metrics.humaneval, metrics.heldout
        return {"base": he.base.pass_at_1, "finetuned": he.finetuned.pass_at_1, "subset": he.subset,
                "delta": he.delta.model_dump(mode="json", by_alias=True, exclude_unset=True) if he.delta else {},
                **({"heldout": {"problems": held.problems, "base": held.base.pass_at_1,
                                "finetuned": held.finetuned.pass_at_1}} if held else {})}


def trained_examples(m: FinetuneMetrics) -> int | None:
    """Examples a run trained on (examples.train: its records less the eval-loss split and any dropped)."""
    return m.examples.train if m.examples is not None else None


def mean_over_seeds(per_seed: list[dict[str, float]]) -> dict[str, float]:
    ids = sorted(set.intersection(*(set(d) for d in per_seed)))
    return {i: sum(d[i] for d in per_seed) / len(per_seed) for i in ids}


def avg(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def compare(first: dict[str, float], second: dict[str, float], ids: list[str] | None = None) -> dict:
    """first - second on the same items (negative: the first is better)."""
    keys = [i for i in (ids if ids is not None else sorted(first)) if i in first and i in second]
    c = paired_comparison([second[k] for k in keys], [first[k] for k in keys])
    return {"delta_nll": round(c["delta"], 6), "ci95": [round(x, 6) for x in c["ci95"]],
            "p_value": round(c["p_value"], 6), "wilcoxon_p": None if c["wilcoxon_p"] is None else round(c["wilcoxon_p"], 6),
            "n": c["n"], "problems_lower": c["lower"], "problems_higher": c["higher"], "test": c["test"]}


def similarity_split(path: Path) -> dict[str, dict[str, list[str]]]:
    if not path.is_file():
        return {}
    levels = json.loads(path.read_text()).get("tau_levels") or {}
    return {lvl: {"similar": v["similar"], "non_similar": v["non_similar"]} for lvl, v in levels.items()}


def corpus_blocks(ab: Ablation) -> list:
    """The corpus arms' source, described as the report stage describes a run's corpus (sources, counts, the
    teacher's ratings and self-agreement, the classifier's held-out metrics, examples), its stats.json copied
    beside metrics.json as corpus_stats.json."""
    from pipeline.core.corpus_stats import read_corpus_stats
    from pipeline.stages.report.corpus import corpus_section

    cfg = ab.cfg([f"corpus.output_dir={ab.opts.data}/corpus/select"])
    stats = read_corpus_stats(cfg)
    if stats is not None:
        stats.write(ab.out / "corpus_stats.json")
    return corpus_section(cfg, stats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data", help="The run's data folder (dataset/, controls/, decontaminate/, and corpus/ for "
                    "the corpus arms).")
    ap.add_argument("--out", default="eval/ablation", help="Where metrics.json, report.md and plots go.")
    ap.add_argument("--work", default="data/ablation", help="Adapters and checkpoints of every run.")
    ap.add_argument("--arms", nargs="+", default=["curated", "rejected", "natural"], choices=ARMS,
                    help="finetune.source values to train; corpus and corpus_filtered need the corpus built under "
                    "--data (dvc.yaml's corpus stages with corpus.enabled=true; docs/corpus.md).")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--dose", nargs="*", type=int, default=[12, 24], help="Curated sample sizes (seed 0).")
    ap.add_argument("--phase1", action="store_true", help="Also the arm phase 1 (textbooks) then curated, seed 0.")
    ap.add_argument("--pass-problems", type=int, default=-1, help="Greedy pass@1 of seed 0 of each arm on the first "
                    "N HumanEval problems (0 = all 164; -1 = skip).")
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--set", action="append", default=[], help="A config override for every run (key=value).")
    ap.add_argument("-q", "--quiet", action="store_true")
    opts = ap.parse_args(argv)
    ab = Ablation(opts)
    for arm in [a for a in opts.arms if a in CORPUS_SOURCES]:  # a corpus not built fails now, before any training
        from pipeline.core.config import ConfigError
        from pipeline.stages.finetune import corpus_records

        try:
            corpus_records(ab.cfg(ab.arm_sets(arm, opts.seeds[0])).finetune)
        except ConfigError as exc:
            ap.error(str(exc))
    t0 = time.monotonic()

    arms: dict[str, dict] = {}
    per_item: dict[str, dict[str, dict[str, float]]] = {}  # arm -> set -> mean-over-seeds per item
    curated_exercises = curated_records = None
    first_sets: list[str] | None = None  # the base is scored on the held-out set the runs wrote
    steps: list[str] = []  # every run after the first (curated, first seed) takes its optimizer steps
    for arm in sorted(opts.arms, key=lambda a: a != "curated"):
        seeds = {}
        runs = []
        for seed in opts.seeds:
            name = f"{arm}-s{seed}"
            # Every run after the first takes its optimizer steps: a seed's data order changes the
            # packing, hence the steps an epoch gives, and the arms compare at equal steps.
            sets, m = ab.finetune(name, [*ab.arm_sets(arm, seed), *steps],
                                  gguf=seed == opts.seeds[0] and opts.pass_problems >= 0)
            if not steps:
                steps = [f"finetune.max_steps={m.steps}"]
            scores = ab.nll(name, "finetuned", sets)
            runs.append(scores)
            first_sets = first_sets or sets
            seeds[str(seed)] = {"humaneval_nll": avg(scores["humaneval"].values()),
                                **({"heldout_nll": avg(scores["heldout"].values())} if scores.get("heldout") else {}),
                                "records": m.records_used, "steps": m.steps,
                                "train_loss": m.train_loss, "eval_loss": m.eval_loss,
                                "target_tokens": (m.matched_target_tokens or {}).get(arm)
                                or (m.examples.target_tokens if m.examples else None)}
            if arm == "curated" and curated_records is None:
                curated_exercises, curated_records = trained_examples(m), m.records_used
        hs = [s["humaneval_nll"] for s in seeds.values()]
        mean = {s: mean_over_seeds([r[s] for r in runs]) for s in runs[0] if all(s in r for r in runs)}
        per_item[arm] = mean
        sd = math.sqrt(sum((h - avg(hs)) ** 2 for h in hs) / (len(hs) - 1)) if len(hs) > 1 else 0.0
        arms[arm] = {"per_seed": seeds, "humaneval_nll": avg(hs), "humaneval_nll_sd_over_seeds": sd,
                     **({"heldout_nll": avg(mean["heldout"].values())} if mean.get("heldout") else {})}
        if opts.pass_problems >= 0:
            arms[arm]["pass_at_1"] = ab.pass_at_1(f"{arm}-s{opts.seeds[0]}", ab.finetune(
                f"{arm}-s{opts.seeds[0]}", [*ab.arm_sets(arm, opts.seeds[0]),
                                             *(steps if arm != "curated" else [])], gguf=True)[0])

    base = ab.nll("base", "base", first_sets or [])
    arms["base"] = {"humaneval_nll": avg(base["humaneval"].values()),
                    **({"heldout_nll": avg(base["heldout"].values())} if base.get("heldout") else {})}
    per_item["base"] = base

    split = similarity_split(Path(opts.data) / "decontaminate" / "humaneval_similarity.json")
    comparisons = {}
    for first, second in COMPARISONS:
        a, b = per_item.get(first), per_item.get(second)
        if a is None or b is None:
            continue
        entry = compare(a["humaneval"], b["humaneval"])
        if a.get("heldout") and b.get("heldout"):
            entry["heldout"] = compare(a["heldout"], b["heldout"])
        entry["table3"] = {lvl: {k: compare(a["humaneval"], b["humaneval"], ids)
                                 for k, ids in groups.items() if len(ids) >= 3}
                           for lvl, groups in split.items()}
        comparisons[f"{first}_vs_{second}"] = entry

    dose = {}
    if opts.dose and "curated" in opts.arms:
        points = [(0, arms["base"]["humaneval_nll"])]
        for n in sorted(opts.dose):  # n records given (finetune.max_records); the point is the examples trained
            if curated_records and n >= curated_records:
                continue
            name = f"curated-n{n}-s{opts.seeds[0]}"
            sets, dm = ab.finetune(name, ["finetune.source=curated", f"finetune.seed={opts.seeds[0]}",
                                          f"finetune.max_records={n}"], gguf=False)
            points.append((trained_examples(dm) or n, avg(ab.nll(name, "finetuned", sets)["humaneval"].values())))
        points.append((curated_exercises or 0, arms["curated"]["per_seed"][str(opts.seeds[0])]["humaneval_nll"]))
        trend = trend_test([math.log1p(n) for n, _ in points], [v for _, v in points]) if len(points) >= 3 else None
        dose = {"seed": opts.seeds[0], "points": [{"exercises": n, "humaneval_nll": v} for n, v in points],
                "trend_on_log1p_n": trend}

    phase1 = None
    if opts.phase1:
        pre = ["pretrain.enabled=true", f"pretrain.output_dir={ab.work / 'pretrain'}"]
        run(["textbook", "pretrain", "-q", *[a for s in ab.base_sets + pre for a in ("--set", s)]])
        name = f"phase1-curated-s{opts.seeds[0]}"
        sets, _ = ab.finetune(name, [*pre, "finetune.source=curated", f"finetune.seed={opts.seeds[0]}"], gguf=False)
        with_p1 = ab.nll(name, "finetuned", sets)
        without = ab.nll(f"curated-s{opts.seeds[0]}", "finetuned", ab.finetune(
            f"curated-s{opts.seeds[0]}", ["finetune.source=curated", f"finetune.seed={opts.seeds[0]}"], gguf=False)[0])
        phase1 = {"seed": opts.seeds[0], "with_phase1_nll": avg(with_p1["humaneval"].values()),
                  "without_phase1_nll": avg(without["humaneval"].values()),
                  "with_vs_without": compare(with_p1["humaneval"], without["humaneval"])}

    metrics = {"endpoint": "mean per-problem NLL (nats/token) of HumanEval's canonical solutions given the "
                           "evaluator's prompt; per-problem values averaged over seeds",
               "primary": {"comparison": PRIMARY, "test": "sign-flip permutation, two-sided", "alpha": 0.05},
               "seeds": opts.seeds, "curated_exercises": curated_exercises, "curated_records": curated_records,
               "arms": arms,
               "steps": steps[0].split("=")[1] if steps else None,
               "comparisons": comparisons, "dose_response": dose, "phase1": phase1,
               "overrides": ab.sets, "data": opts.data, "wall_s": round(time.monotonic() - t0, 1)}
    ab.out.mkdir(parents=True, exist_ok=True)
    # Through their models: a key the readers (the report, tests/test_artifacts.py) do not know fails here.
    model = AblationMetrics.parse(metrics, ab.out / "metrics.json")
    per_problem = AblationPerProblem.parse({arm: per_item[arm] for arm in per_item}, ab.out / "per_problem.json")
    model.write(ab.out / "metrics.json")
    per_problem.write(ab.out / "per_problem.json")
    from pipeline.stages.report.likelihood import write_ablation_report

    write_ablation_report(model.dump(), ab.out, corpus_blocks(ab) if any(a in CORPUS_SOURCES for a in opts.arms) else [])
    log(f"done in {metrics['wall_s']} s: {ab.out}/metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
