"""The typed artifacts between stages (pipeline.core.artifacts): every committed artifact parses with its model
and is written back byte for byte; a key its producer does not write is an error naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.artifacts import (
    AblationMetrics,
    AblationPerProblem,
    ArtifactError,
    ControlsStats,
    CorpusPoolStats,
    CorpusSelectStats,
    DecontaminateStats,
    DedupeStats,
    EvalMetrics,
    FilterStats,
    FinetuneMetrics,
    GenerateStats,
    HumanEvalSimilarity,
    PerProblem,
    PretrainMetrics,
)
from pipeline.core.records import RecordError, write_json
from pipeline.core.stats import funnel_row

from .artifacts import finetune_metrics, generate_stats

REPO = Path(__file__).resolve().parents[1]

# Every committed (git-tracked) artifact, by model. The evaluate runs under eval/ (the showcase and the validation
# included) are the same artifacts as eval/metrics.json and eval/per_problem.json.
# An ablation's folder (eval/ablation, eval/showcase/ablation) holds the ablation's own two files.
ABLATIONS = [REPO / "eval/ablation", REPO / "eval/showcase/ablation"]
EVAL_RUNS = sorted(p.parent for p in REPO.glob("eval/**/per_problem.json") if p.parent not in ABLATIONS)
COMMITTED = [
    *[(EvalMetrics, d / "metrics.json") for d in EVAL_RUNS],
    *[(PerProblem, d / "per_problem.json") for d in EVAL_RUNS],
    *[(AblationMetrics, d / "metrics.json") for d in ABLATIONS],
    *[(AblationPerProblem, d / "per_problem.json") for d in ABLATIONS],
    (GenerateStats, REPO / "data/generate/stats.json"),
    (FilterStats, REPO / "data/filter/stats.json"),
    (DedupeStats, REPO / "data/dedupe/stats.json"),
    (DecontaminateStats, REPO / "data/decontaminate/stats.json"),
    (FinetuneMetrics, REPO / "data/finetune/metrics.json"),
    (PretrainMetrics, REPO / "data/pretrain/metrics.json"),
    (CorpusSelectStats, REPO / "data/corpus/select/stats.json"),
    (CorpusSelectStats, REPO / "tests/data/corpus_stats.json"),  # a corpus that ran
]
# Run outputs DVC keeps out of git: checked where this checkout has them.
LOCAL = [*[(FinetuneMetrics, p) for p in REPO.glob("data/ablation/*/metrics.json") if p.parent.name != "pretrain"],
         (PretrainMetrics, REPO / "data/ablation/pretrain/metrics.json"),
         *[(HumanEvalSimilarity, p) for p in REPO.glob("data/**/humaneval_similarity.json")],
         *[(DedupeStats, p) for p in REPO.glob("data/*/*/dedupe/stats.json")],
         *[(DecontaminateStats, p) for p in REPO.glob("data/*/*/decontaminate/stats.json")],
         (DedupeStats, REPO / "data/corpus/dedupe/stats.json"), (DecontaminateStats, REPO / "data/corpus/decontaminate/stats.json"),
         (CorpusPoolStats, REPO / "data/corpus/pool/stats.json"), (ControlsStats, REPO / "data/controls/rejected/pool/stats.json")]


def _id(case) -> str:
    return f"{case[0].__name__}:{case[1].relative_to(REPO)}"


def test_the_committed_evaluations_are_all_here():
    names = {str(d.relative_to(REPO)) for d in EVAL_RUNS}
    assert {"eval", "eval/showcase", "eval/validation", "eval/ablation/runs/curated-s0"} <= names


@pytest.mark.parametrize("case", COMMITTED, ids=_id)
def test_every_committed_artifact_parses_and_is_written_back_byte_for_byte(case, tmp_path):
    model, path = case
    parsed = model.read(path)
    parsed.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("case", [c for c in LOCAL if c[1].is_file()], ids=_id)
def test_every_local_run_output_parses_and_is_written_back_byte_for_byte(case, tmp_path):
    model, path = case
    model.read(path).write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_a_misspelled_key_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "eval" / "metrics.json"
    path.parent.mkdir()
    metrics = json.loads((REPO / "eval/metrics.json").read_text())
    metrics["humaneval"]["base"]["pass@l"] = metrics["humaneval"]["base"].pop("pass@1")
    write_json(path, metrics)
    with pytest.raises(ArtifactError, match=r"eval/metrics\.json: .*unexpected key `humaneval\.base\.pass@l`"):
        EvalMetrics.read(path)
    finetune = finetune_metrics(30, 3).dump()
    finetune["examples"]["trian"] = finetune["examples"].pop("train")
    write_json(tmp_path / "metrics.json", finetune)
    with pytest.raises(RecordError, match=r"metrics\.json: .*missing key `examples\.train`.*unexpected key "
                                          r"`examples\.trian`"):
        FinetuneMetrics.read(tmp_path / "metrics.json")


def test_a_stage_that_ran_has_every_key_and_one_that_did_not_only_enabled(tmp_path):
    assert PretrainMetrics.parse({"enabled": False}).dump() == {"enabled": False}
    with pytest.raises(ArtifactError, match=r"missing key `examples` \(the stage ran\)"):
        FinetuneMetrics.parse({k: v for k, v in finetune_metrics(3, 1).dump().items() if k != "examples"})
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"x\.json: not valid JSON"):
        GenerateStats.read(tmp_path / "x.json")
    with pytest.raises(ArtifactError, match=r"y\.json: not found"):
        GenerateStats.read(tmp_path / "y.json")


def test_keys_the_producer_left_out_stay_out_and_its_nulls_stay_in():
    textbook = FilterStats.read(REPO / "data/filter/stats.json").dump()["textbook"]
    assert "assert_policy" not in textbook  # an exercise-only key
    metrics = finetune_metrics(3, 1).dump()
    assert metrics["init_adapter"] is None and "gguf_adapter" not in metrics


def test_pass_at_k_beside_pass_at_1_and_nothing_else():
    base = json.loads((REPO / "eval/metrics.json").read_text())
    base["humaneval"]["base"].update({"pass@10": 0.5, "pass@10_ci95_low": 0.4, "pass@10_ci95_high": 0.6})
    he = EvalMetrics.parse(base).humaneval
    assert he.ks() == ["pass@1", "pass@10"] and he.base.pass_at_k()["pass@10"] == 0.5
    base["humaneval"]["base"]["pass@10_ci99_low"] = 0.3
    with pytest.raises(ArtifactError, match=r"unexpected key `humaneval\.base\.pass@10_ci99_low`"):
        EvalMetrics.parse(base, "m.json")


def test_funnel_rows_come_from_each_stages_own_keys():
    dedupe = funnel_row("dedupe", DedupeStats.read(REPO / "data/dedupe/stats.json"))
    raw = json.loads((REPO / "data/dedupe/stats.json").read_text())
    assert dedupe["in"] == raw["exercise"]["in"] + raw["textbook"]["in"]
    assert dedupe["reasons"] == {"exact": raw["exercise"]["removed_exact"] + raw["textbook"]["removed_exact"],
                                 "near": raw["exercise"]["removed_near"] + raw["textbook"]["removed_near"]}
    assert funnel_row("generate", generate_stats(not_attempted=2, lost=1).dump())["reasons"] == {
        "lost (request failed, accepted by client.max_failed_fraction)": 1, "not_attempted (budget)": 2,
        "parse:no_assert_tests": 1}
    with pytest.raises(ArtifactError, match=r"generate stats: .*unexpected key `rejected_by_reasons`"):
        funnel_row("generate", {**generate_stats().dump(), "rejected_by_reasons": {}})
