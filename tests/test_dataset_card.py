"""The generated dataset card: Hub metadata that parses, a funnel that matches the stats it
was given (each stage's stats built from its artifact model), "not run" for missing stages, and the same bytes
twice."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.core.artifacts import ArtifactError
from pipeline.core.config import load_config
from pipeline.core.records import RecordError
from pipeline.core.stats import funnel_row, read_stage_stats
from pipeline.stages.decontaminate.card import (
    GENERATED_NOTE,
    prompts_hash,
    render_card,
    size_category,
    write_card,
)

from .artifacts import decontaminate_stats as decontaminate_model
from .artifacts import dedupe_kind, dedupe_stats, filter_kind, filter_stats, generate_stats
from .conftest import make_project

# Each stage's stats as its producer writes them (built from the models: tests/artifacts.py), as dicts the card
# is handed (decontaminate hands on its own dict) and the tests change.
GENERATE = generate_stats(requested=1200, completed=1200, kept={"exercise": 900, "textbook": 250}, rejected=50,
                          rejected_by_reason={"finish_reason=length": 20, "parse:no_assert_tests": 30},
                          tokens={"prompt": 200_000, "completion": 480_000}, cost_usd=0.0,
                          ledger_this_run={"cache_hits": 3}, timing={"wall_s": 282.15}).dump()
FILTER = filter_stats(filter_kind(900, 700, {"tests_failed:failed": 150, "timeout": 50}),
                      filter_kind(250, 240, {"code_syntax_error": 10}), timing={"wall_s": 31.7}).dump()
DEDUPE = dedupe_stats(dedupe_kind(700, 650, exact=20, near=30, clusters=12),
                      dedupe_kind(240, 239, near=1, clusters=1), timing={"wall_s": 4.4}).dump()


def decontaminate_stats(kept_ex: int = 640, kept_tb: int = 238) -> dict:
    return decontaminate_model({"exercise": 650, "textbook": 239}, {"exercise": kept_ex, "textbook": kept_tb},
                               removed_by_signal={"ngram": 6, "difflib": 4, "ast": 9},
                               removed_task_ids=["HumanEval/0", "HumanEval/12"],
                               humaneval={"problems": 164, "max_ast_tau": 0.97, "similar_at_tau": {"0.8": 20, "0.9": 5}},
                               tokens={"completion_tokens": 123_456, "text_words": 98_765},
                               timing={"wall_s": 12.5}).dump()


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_project(tmp_path, {"profile": "ci", "seed": 7, "generate": {"teacher": "smollm2-135m-instruct"}})
    return root, load_config(root / "params.yaml")


def all_stats() -> dict:
    return {"generate": copy.deepcopy(GENERATE), "filter": copy.deepcopy(FILTER), "dedupe": copy.deepcopy(DEDUPE),
            "decontaminate": decontaminate_stats()}


def header(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def funnel(card: str) -> dict[str, list[str]]:
    section = card.split("## Funnel", 1)[1].split("\n## ", 1)[0]
    rows = [ln.strip("|").split(" | ") for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_header_is_hub_metadata_with_the_size_category(project):
    root, cfg = project
    card = render_card(cfg, root / "params.yaml", all_stats())
    meta = header(card)
    assert meta["license"] and meta["language"] == ["en", "code"] and meta["task_categories"] == ["text-generation"]
    assert meta["tags"] == ["synthetic", "code", "phi-1", "textbooks"] and meta["pretty_name"]
    assert meta["size_categories"] == ["n<1K"]  # 640 + 238 rows
    assert meta["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert meta["dataset_info"]["splits"][0]["num_examples"] == 878
    assert card.startswith(f"---\n# {GENERATED_NOTE}\n") and "do not edit by hand" in GENERATED_NOTE
    stats = all_stats()
    stats["decontaminate"] = decontaminate_stats(kept_ex=4000, kept_tb=1500)
    assert header(render_card(cfg, root / "params.yaml", stats))["size_categories"] == ["1K<n<10K"]


@pytest.mark.parametrize("n,label", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (10_000, "10K<n<100K"),
                                     (250_000, "100K<n<1M"), (5_000_000, "1M<n<10M")])
def test_size_categories(n, label):
    assert size_category(n) == label


def test_funnel_matches_the_stats_of_every_stage(project):
    root, cfg = project
    rows = funnel(render_card(cfg, root / "params.yaml", all_stats()))
    assert rows["generate"][:3] == ["1,200", "1,150", "50"]
    assert "finish_reason=length: 20" in rows["generate"][3] and "parse:no_assert_tests: 30" in rows["generate"][3]
    assert rows["filter"][:3] == ["1,150", "940", "210"]
    assert "tests_failed:failed: 150" in rows["filter"][3] and "code_syntax_error: 10" in rows["filter"][3]
    assert rows["dedupe"][:3] == ["940", "889", "51"]
    assert "exact: 20" in rows["dedupe"][3] and "near: 31" in rows["dedupe"][3]
    assert rows["decontaminate"][:3] == ["889", "878", "11"]
    assert rows["decontaminate"][3] == "ast: 9; difflib: 4; ngram: 6"


def test_funnel_row_of_each_stage():
    assert funnel_row("dedupe", DEDUPE)["reasons"] == {"exact": 20, "near": 31}
    assert funnel_row("filter", FILTER)["kept_by_kind"] == {"exercise": 700, "textbook": 240}
    assert funnel_row("filter", None) == {"stage": "filter", "status": "not run"}
    assert funnel_row("decontaminate", decontaminate_stats())["removed"] == 11
    with pytest.raises(ArtifactError, match=r"filter stats: .*missing key `textbook`"):  # no layout is guessed
        funnel_row("filter", {k: v for k, v in FILTER.items() if k != "textbook"})


def test_sections_hold_tokens_teacher_and_decontamination(project):
    root, cfg = project
    card = render_card(cfg, root / "params.yaml", all_stats())
    assert "| teacher completion tokens (all requests) | 480,000 |" in card
    assert "| teacher completion tokens of the released records | 123,456 |" in card
    assert "`smollm2-135m-instruct`" in card and f"`{prompts_hash(root / 'prompts')}`" in card
    assert "| temperature | 0.7 |" in card  # the ci profile's sampling defaults
    assert "HumanEval/0, HumanEval/12" in card and "| 0.9 | 5 | 159 |" in card
    assert "Removed: 51 of 940 (exact: 20; near: 31)." in card
    assert 'load_dataset("data/dataset", split="train")' in card
    assert "## Known limitations" in card
    for volatile in ("282.15", "31.7", "12.5", "cache_hits"):  # timings and ledgers differ between runs
        assert volatile not in card


def test_missing_stages_are_named_not_run(project):
    root, cfg = project
    card = render_card(cfg, root / "params.yaml", {"decontaminate": decontaminate_stats()})
    rows = funnel(card)
    for stage in ("generate", "filter", "dedupe"):
        assert rows[stage][0] == "not run"
    assert "Stage(s) not run for this release: generate, filter, dedupe." in card
    assert "generate not run" in card and "Not run: the released records were not deduplicated." in card


def test_card_is_deterministic_and_tracks_the_prompts(project):
    root, cfg = project
    out = root / "card" / "README.md"
    text = write_card(cfg, root / "params.yaml", all_stats(), out)
    assert out.read_text() == text == render_card(cfg, root / "params.yaml", all_stats())
    before = prompts_hash(root / "prompts")
    (root / "prompts" / "exercise.j2").write_text((root / "prompts" / "exercise.j2").read_text() + "\n# changed\n")
    assert prompts_hash(root / "prompts") != before
    assert render_card(cfg, root / "params.yaml", all_stats()) != text
    assert prompts_hash(root / "nowhere") == "missing"


def test_read_stage_stats(project):
    root, cfg = project
    assert read_stage_stats(cfg) == {"generate": None, "filter": None, "dedupe": None}
    (root / "data/generate").mkdir(parents=True)
    (root / "data/generate/stats.json").write_text(json.dumps(GENERATE))
    (root / "data/dedupe").mkdir(parents=True)
    (root / "data/dedupe/stats.json").write_text("{not json")
    with pytest.raises(RecordError, match=r"data/dedupe/stats\.json"):
        read_stage_stats(cfg)
    (root / "data/dedupe/stats.json").write_text(json.dumps(DEDUPE))
    stats = read_stage_stats(cfg)
    assert {k: v.dump() if v else v for k, v in stats.items()} == {"generate": GENERATE, "filter": None, "dedupe": DEDUPE}


def test_curation_policies_are_named_with_what_they_did(project):
    root, cfg = project
    stats = all_stats()
    card = render_card(cfg, root / "params.yaml", stats)
    assert "| `generate.repair_rounds` | 0 | off |" in card and "| `filter.assert_policy` | all | every assert" in card
    assert "From a cold cache too" in card  # smollm2 on llama-cpp-python: each request decoded alone
    stats["generate"]["repair"] = {"rounds": 1, "requests": 40, "by_outcome": {"accepted": 12}, "exercises_repaired": 12}
    stats["filter"]["exercise"].update(kept_with_dropped_asserts=9, asserts_dropped=11)
    cfg = load_config(root / "params.yaml", ["generate.repair_rounds=1", "filter.assert_policy=drop_failing",
                                             "generate.teacher=qwen2.5-coder-0.5b-instruct"])
    card = render_card(cfg, root / "params.yaml", stats)
    assert "40 repair request(s), 12 exercise(s) improved" in card
    assert "9 exercise(s) kept with 11 assert(s) dropped" in card and ">= 3 remain that a `pass` body fails" in card
    stats["filter"]["exercise"].update(kept_with_rewritten_asserts=7, asserts_rewritten=10)
    cfg = load_config(root / "params.yaml", ["filter.assert_policy=observed", "filter.min_agreeing_asserts=2"])
    card = render_card(cfg, root / "params.yaml", stats)
    assert "| `filter.assert_policy` | observed | a failing `assert f(x) == y` got the value the solution returned" in card
    assert ">= 2 of the teacher's expected values matched as written" in card
    assert "7 exercise(s) kept with 10 expected value(s) rewritten" in card and "not an independent check" in card


def test_diversity_line_reports_coverage_and_duplicate_rate(project):
    root, cfg = project
    stats = all_stats()
    stats["generate"]["coverage"].update(distinct_topic_subtopic_pairs=140, topic_subtopic_pairs_available=152)
    stats["dedupe"]["exercise"]["duplicate_rate_per_1000"] = [0.01, 0.035]
    card = render_card(cfg, root / "params.yaml", stats)
    assert ("Diversity: the prompts used 140 of the 152 topic x subtopic pairs of `topics.yaml`; share of "
            "exercises removed as duplicates per 1,000 in generation order: 1.0%, 3.5%.") in card


# The corpus stage's stats.json from a real run: the ci profile's sources (stdlib json, collections, email),
# 24 ratings by the offline teacher (qwen2.5-coder-0.5b-instruct), of which 6 twice.
CORPUS = json.loads((Path(__file__).parent / "data" / "corpus_stats.json").read_text())


def corpus_card(project, corpus) -> str:
    root, cfg = project
    return render_card(cfg, root / "params.yaml", {**all_stats(), "corpus": corpus})


def test_corpus_section_says_when_the_filter_is_close_to_random(project):
    """A teacher that barely agrees with itself and a classifier near chance: the card says the kept share is
    close to a random one, and why; the selection rule's own held-out metrics are shown."""
    weak = copy.deepcopy(CORPUS)
    weak["self_agreement"].update(kappa_quadratic=0.0841, kappa_label=0.1201, positive_once=13, positive_twice=1)
    weak["classifier"].update(roc_auc=0.5132, heldout=300, heldout_positive=19, heldout_kept=60,
                              precision_at_keep=0.0667, recall_at_keep=0.2632, lift_at_keep=1.053, scored_out_of_bag=1200)
    section = corpus_card(project, weak).split("## Natural code corpus (phi-1's filtered half)", 1)[1]
    assert ("| the selection rule (the top 20.0% by score) on the held-out ratings: kept, precision, recall, lift "
            "(1.0: a random selection) | 60, 0.067, 0.263, 1.05 |") in section
    assert "| training ratings scored out-of-bag | 1,200 |" in section
    assert "| kappa of the label | 0.120 |" in section and "| rated educational once / both times | 13 / 1 |" in section
    assert ("| note | the teacher barely agrees with itself (quadratic kappa 0.084); the classifier ranks held-out "
            "snippets little better than chance (ROC AUC 0.513): the kept share is close to a random one; a "
            "stronger teacher (`corpus.teacher`) is the remedy |") in section
    weak["self_agreement"]["kappa_quadratic"] = 0.6  # a consistent teacher, a classifier that cannot follow it
    section = corpus_card(project, weak).split("## Natural code corpus (phi-1's filtered half)", 1)[1]
    assert "teacher barely" not in section and ("little better than chance (ROC AUC 0.513): the kept share is close "
                                                "to a random one; more ratings (`corpus.annotate`)") in section


def test_corpus_section_says_what_the_corpus_holds(project):
    card = corpus_card(project, copy.deepcopy(CORPUS))
    section = card.split("## Natural code corpus (phi-1's filtered half)", 1)[1].split("\n## ", 1)[0]
    assert "`stdlib/json` (`" in section and "`stdlib/email` (`" in section  # sources, with their folders
    assert "teacher `qwen2.5-coder-0.5b-instruct`" in section
    assert "**25 of 123** (20.3%, 27,593 characters) in `data/corpus/select/kept.jsonl`" in section
    for row in ("| files read | 36 |", "| snippets extracted (class 13, file 9, function 101) | 123 |",
                "| after dedupe | 123 |", "| after decontamination | 123 |", "| rated by the teacher | 24 |",
                "| scored by the classifier | 123 |", "| kept | 25 (20.3%) |",
                "| ratings 1-5 | 1: 18, 2: 3, 3: 2, 4: 1, 5: 0 |",
                "| self-agreement: snippets rated twice | 6 |", "| same rating / within one point | 50.0% / 66.7% |",
                "| quadratic-weighted kappa | 0.491 |",
                "| precision, recall, F1, accuracy at P >= 0.5 | 0.000, 0.000, 0.000, 1.000 |",
                "| ROC AUC | - |", "| lowest kept score | 0.2600 |"):
        assert row in section, row
    # The highest- and lowest-scored snippets, their first lines in fences.
    assert section.count("- highest, score") == 3 and section.count("- lowest, score") == 3
    assert "- highest, score 1.0000, `_header_value_parser.py` (function):" in section
    assert "```python\nfrom email import errors\n\ndef get_group_list(value):" in section
    assert "class JSONDecodeError(ValueError):" in section
    assert section.count("\n# ...\n```") == 6  # cut: no whole 1,200-character snippet
    for volatile in ("170.44", "203.12", "prompt_tokens", "server_start"):
        assert volatile not in card
    assert card == corpus_card(project, copy.deepcopy(CORPUS))
    assert "| note | the held-out ratings are all of one label: precision, recall" in section  # 0 of 5 positive
    for newer in ("the selection rule", "out-of-bag", "kappa of the label"):  # stats written before them
        assert newer not in section
    # The card does not claim that a phase trained on the corpus when none did.
    assert "`pretrain.extra_corpus` does not list `data/corpus/select/kept.jsonl`: no phase trained" in section
    root, _ = project
    cfg = load_config(root / "params.yaml", ["pretrain.extra_corpus=[data/corpus/select/kept.jsonl]"])
    card = render_card(cfg, root / "params.yaml", {**all_stats(), "corpus": CORPUS})
    assert "Phase 1 (`pretrain.enabled: false`) did not run: no phase trained on it." in card


@pytest.mark.parametrize(("corpus", "line"), [
    ({"enabled": False}, "Not built in this run (`corpus.enabled: false`): no natural code was collected"),
    (None, "Not run: no `data/corpus/select/stats.json`"),
])
def test_corpus_section_is_one_line_when_the_corpus_did_not_run(project, corpus, line):
    card = corpus_card(project, corpus)
    section = card.split("## Natural code corpus (phi-1's filtered half)\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert section.startswith(line) and "\n" not in section.strip()


def test_no_corpus_section_without_corpus_stats(project):
    root, cfg = project  # decontaminate.card_corpus=false (dvc.yaml's decontaminate_corpus) passes none
    assert "Natural code corpus" not in render_card(cfg, root / "params.yaml", all_stats())


def test_decontaminate_reads_the_corpus_stats_for_the_card(project):
    from pipeline.core.corpus_stats import read_corpus_stats

    root, cfg = project
    assert read_corpus_stats(cfg) is None
    path = root / "data/corpus/select/stats.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(CORPUS))
    assert read_corpus_stats(cfg).dump() == CORPUS
    path.write_text("{not json")
    with pytest.raises(RecordError, match=r"data/corpus/select/stats\.json"):
        read_corpus_stats(cfg)
