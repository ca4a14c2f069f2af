"""The likelihood endpoint of the evaluate stage (`evaluate.likelihood`).

For every evaluated student target (base, after phase 1, fine-tuned) and every benchmark problem
with a canonical solution: the NLL of that solution given exactly the prompt the evaluator sends
(:mod:`pipeline.engines.likelihood`), and the same for the held-out curated exercises that no
training step saw (`{finetune.output_dir}/heldout.jsonl`, phi-1's in-distribution check).

Per target: mean nats/token over problems with a problem-level bootstrap interval, pooled
nats/token and bits/byte. Between targets (each later phase against the one before, and the
fine-tuned model against the base): the mean paired difference with its bootstrap interval, a
sign-flip permutation p-value (the primary test) and Wilcoxon's beside it
(:mod:`pipeline.core.significance`). Scores are cached per (weights, adapter, items) in
`{evaluate.cache_path}`'s folder, so the base is scored once across every ablation arm.

    textbook evaluate --set evaluate.likelihood=true --set evaluate.problems=20
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import RunConfig
from pipeline.core.passk import bootstrap_interval
from pipeline.core.records import atomic_write_text, dumps, sha256_text, sha256_tree
from pipeline.core.significance import paired_comparison
from pipeline.engines.versions import engine_version

# The pairs compared, (reference, other): other - reference, negative = other is better.
COMPARISONS = (("base", "finetuned"), ("base", "pretrained"), ("pretrained", "finetuned"))


@dataclass
class ScoredTarget:
    """What the likelihood scorer needs of an evaluated model."""

    name: str
    source: str  # the folder from_pretrained loads (dequantized GGUF, phase-1 model, or hf_id)
    adapter: Path | None  # the peft adapter folder
    chat: bool
    identity: str  # weights + adapter: the score cache's key


def scored_target(cfg: RunConfig, target, student) -> ScoredTarget | None:
    """The weights of an evaluate Target as transformers loads them (`student`: the student's preset);
    None for the teacher, which is not a student."""
    if target.name == "teacher":
        return None
    from pipeline.engines.student import model_source  # torch: only when the endpoint is on

    phase_one = cfg.pretrain.trained_model(student)  # a model phase 1 trained whole (full, scratch), or None
    base = phase_one.hf_id if phase_one is not None else model_source(student)
    if target.name == "base":
        source, adapter = model_source(student), None  # the student's own base, even after phase 1
    elif target.name == "pretrained":
        source, adapter = (base, None) if phase_one is not None else (base, cfg.pretrain.weights_dir / "adapter")
    else:
        source, adapter = base, Path(cfg.finetune.output_dir) / "adapter"
    if student.gguf is not None and source == model_source(student):
        weights = student.gguf.sha256  # the dequantized folder is named and checked by it: no 1 GB re-hash
    else:
        weights = sha256_tree(Path(source)) if Path(source).is_dir() else source
    adapter_sha = sha256_tree(adapter) if adapter else None
    return ScoredTarget(target.name, source, adapter, target.preset.api == "chat",
                        sha256_text(f"{weights}|{adapter_sha}|{engine_version('transformers')}"))


def benchmark_items(bench, limit: int = -1) -> list:
    """The bench's problems as (context, target): the prompt the evaluator sends, the canonical solution.
    `limit`: the first N problems of the whole benchmark (0 = all of them; -1 = the evaluated subset)."""
    from pipeline.engines.likelihood import Item

    problems = bench.problems if limit < 0 else bench.every_problem[:limit or None]
    return [Item(p["task_id"], bench.conv.base_prompt(p["prompt"]), p["canonical_solution"])
            for p in problems if p.get("canonical_solution")]


def heldout_items(cfg: RunConfig) -> list:
    """The held-out curated exercises finetune set aside, as items (none when it wrote no file)."""
    from pipeline.engines.likelihood import Item
    from pipeline.stages.evaluate.benchmarks import heldout_problems

    return [Item(p["task_id"], p["prompt"], p["canonical_solution"])
            for p in heldout_problems(cfg.finetune.heldout_path)]


def _cache_file(cfg: RunConfig, key: str) -> Path:
    return Path(cfg.evaluate.cache_path).parent / "likelihood" / f"{key}.json"


def score_one(cfg: RunConfig, st: ScoredTarget, item_sets: dict[str, list], progress: bool) -> dict[str, list]:
    """{set name: [Scored as dict, by item]} of one model; each set cached under (weights, adapter, items)."""
    from pipeline.engines.likelihood import Scorer

    out: dict[str, list] = {}
    scorer = None
    for set_name, items in item_sets.items():
        if not items:
            continue
        key = sha256_text(dumps([st.identity, st.chat, [[i.id, i.context, i.target] for i in items]]))
        path = _cache_file(cfg, key)
        if path.is_file():
            out[set_name] = json.loads(path.read_text(encoding="utf-8"))
            continue
        if scorer is None:  # loaded only when something is not cached
            scorer = Scorer(st.source, st.adapter, chat=st.chat, batch_size=cfg.evaluate.likelihood_batch)
        rows = [{"id": s.id, **s.as_dict()} for s in scorer.score(items, progress, f"nll {st.name}/{set_name}")]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rows))
        out[set_name] = rows
    return out


def score_targets(cfg: RunConfig, targets: list, student, item_sets: dict[str, list], progress: bool
                  ) -> dict[str, dict]:
    """{target: {set name: rows}} for every student target (the teacher is skipped)."""
    out: dict[str, dict] = {}
    for t in targets:
        st = scored_target(cfg, t, student)
        if st is not None:
            out[t.name] = score_one(cfg, st, item_sets, progress)
    return out


def summary(rows: list[dict], seed: int) -> dict:
    """A target's figures on one item set."""
    import math

    per = [r["nll_per_token"] for r in rows]
    lo, hi = bootstrap_interval(per, seed=seed)
    nll, tokens, nbytes = (sum(r[f] for r in rows) for f in ("nll", "tokens", "bytes"))
    return {"items": len(rows), "nll_per_token": round(sum(per) / len(per), 6), "ci95": [round(lo, 6), round(hi, 6)],
            "nll_per_token_pooled": round(nll / tokens, 6), "bits_per_byte": round(nll / math.log(2) / nbytes, 6),
            "interval": "bootstrap over items (2000 resamples)"}


def compare(a: list[dict], b: list[dict], seed: int) -> dict:
    """b - a in nats/token on the items both scored, rounded for the metrics."""
    va = {r["id"]: r["nll_per_token"] for r in a}
    vb = {r["id"]: r["nll_per_token"] for r in b}
    keys = [i for i in va if i in vb]
    c = paired_comparison([va[k] for k in keys], [vb[k] for k in keys], seed=seed)
    return {**c, "delta": round(c["delta"], 6), "ci95": [round(x, 6) for x in c["ci95"]],
            "p_value": round(c["p_value"], 6), "wilcoxon_p": None if c["wilcoxon_p"] is None else round(c["wilcoxon_p"], 6)}


def likelihood_metrics(scores: dict[str, dict], seed: int) -> dict:
    """{set: {target: summary, comparisons: {"a_vs_b" -> b - a}}} for every scored item set."""
    out: dict[str, dict] = {}
    sets = sorted({s for per in scores.values() for s in per})
    for set_name in sets:
        got = {t: per[set_name] for t, per in scores.items() if set_name in per}
        entry: dict = {t: summary(rows, seed) for t, rows in got.items()}
        entry["comparisons"] = {f"{b}_vs_{a}": compare(got[a], got[b], seed)
                                for a, b in COMPARISONS if a in got and b in got}
        out[set_name] = entry
    return out
