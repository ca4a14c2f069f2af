"""The report: sections and numbers from fixture metrics and stats, deterministic bytes, embedded PNGs,
and "not available" (not a crash) for every missing input."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from pipeline.core.artifacts import ArtifactError, FinetuneMetrics
from pipeline.core.config import load_config
from pipeline.stages.report import run_report
from pipeline.stages.report.references import REFERENCES, OurRun, differences, params_from_name

from .artifacts import (
    decontaminate_stats,
    dedupe_kind,
    dedupe_stats,
    delta,
    describe,
    eval_metrics,
    filter_kind,
    filter_stats,
    finetune_metrics,
    generate_stats,
    model_score,
    per_problem,
    similarity,
)
from .conftest import make_project

TASKS = [f"HumanEval/{i}" for i in range(10)]
BASE_PASS = {0: 1, 3: 1}  # 2 of 10
FINE_PASS = {0: 1, 1: 1, 5: 1}  # 3 of 10: improved 1 and 5, regressed 3


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def fixture_run(root: Path, finetune: FinetuneMetrics | None = None) -> Path:
    """Every input of the report, each built from its artifact model (the keys its producer writes)."""
    project = make_project(root, {"profile": "ci", "seed": 7, "finetune": {"student": "smollm2-135m-instruct"},
                                  "evaluate": {"problems": 10}})
    eval_metrics(10, {"base": model_score(0.2, 2), "finetuned": model_score(0.3, 3), "delta": delta(0.1, p_value=1.0)},
                 humaneval={"sanity": {"flags": ["teacher: 3 of 4 completions hit max_tokens"]}}
                 ).write(root / "eval/metrics.json")
    per_problem(TASKS, {"base": BASE_PASS, "finetuned": FINE_PASS},
                {"base": describe("smol"), "finetuned": describe("smol-lora-0123456789ab", "0123456789abcdef")}
                ).write(root / "eval/per_problem.json")
    all_ids = [f"HumanEval/{i}" for i in range(164)]
    similar = {"0.95": ["HumanEval/0"], "0.9": ["HumanEval/0", "HumanEval/1"],
               "0.85": ["HumanEval/0", "HumanEval/1", "HumanEval/3", "HumanEval/100"], "0.8": all_ids[:10]}
    (root / "data/decontaminate").mkdir(parents=True)
    similarity(all_ids, similar, {"HumanEval/0": 0.97}).write(root / "data/decontaminate/humaneval_similarity.json")
    for folder in ("generate", "filter", "dedupe", "finetune"):
        (root / "data" / folder).mkdir(parents=True, exist_ok=True)
    generate_stats(teacher="qwen", requested=28, completed=28, kept={"exercise": 21, "textbook": 4}, rejected=3,
                   rejected_by_reason={"parse:no_assert_tests": 3}, tokens={"prompt": 4950, "completion": 6740},
                   cost_usd=0.0123, timing={"wall_s": 282.1},
                   ledger_this_run={"cache_hits": 10, "requests_sent": 18}).write(root / "data/generate/stats.json")
    filter_stats(filter_kind(21, 5, {"tests_failed:failed": 16}), filter_kind(4, 3, {"code_syntax_error": 1})
                 ).write(root / "data/filter/stats.json")
    dedupe_stats(dedupe_kind(5, 5), dedupe_kind(3, 2, near=1)).write(root / "data/dedupe/stats.json")
    decontaminate_stats({"exercise": 5, "textbook": 2}, {"exercise": 4, "textbook": 2},
                        removed_by_signal={"ngram": 1}, tokens={"completion_tokens": 1500}
                        ).write(root / "data/decontaminate/stats.json")
    (finetune or finetune_metrics(4, 1, train_loss=1.25, wall_s=45.5, train_tokens=3000, steps=12,
                                  resumed_from_step=8)).write(root / "data/finetune/metrics.json")
    tsv = root / "data/finetune/dvclive/plots/metrics/train/loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("timestamp\tstep\tloss\n" + "".join(f"{1000 + s}\t{s}\t{2.5 / (s + 1):.4f}\n" for s in range(12)))
    return project


def report(project: Path) -> dict:
    return run_report(load_config(project / "params.yaml"), project / "params.yaml")


def outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "eval").rglob("*"))
            if p.is_file() and (p.suffix in (".md", ".html", ".png", ".csv"))}


def _row(md: str, first_cell: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_each_phase_gets_its_row_and_its_paired_test(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    he = metrics["humaneval"]
    he["pretrained"] = {**he["base"], "pass@1": 0.25, "problems_solved": 2}
    step = {"pass@1_ci95_low": -0.1, "pass@1_ci95_high": 0.2, "test": "mcnemar_exact", "within_noise": True,
            "improved_problems": 1, "regressed_problems": 0}
    he["phases"] = {"pretrain": {**step, "pass@1": 0.05, "p_value": 1.0},
                    "finetune": {**step, "pass@1": 0.05, "p_value": 0.5}}
    _write(tmp_path / "eval/metrics.json", metrics)
    report(project)
    md = (tmp_path / "eval/report.md").read_text()
    assert [r[0] for r in (_row(md, x) for x in ("base", "after pretrain (phase 1)", "fine-tuned (last phase)"))]
    assert _row(md, "after pretrain (phase 1)")[1] == "25.0"
    assert _row(md, "pretrain step (after pretrain - base)")[1:3] == ["+5.0", "-10.0 - +20.0"]
    assert _row(md, "finetune step (fine-tuned - after pretrain)")[1] == "+5.0"
    assert "The finetune step of +5.0 points of pass@1 is **within noise** (McNemar's exact test" in md
    assert "p = 0.5;" in md and "| **ours: after pretrain (phase 1)** |" in md


def test_mbpp_fills_its_column_and_benchmarks_not_run_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    report(project)
    md = (tmp_path / "eval/report.md").read_text()
    assert "Not run here: HumanEval+, MBPP, MBPP+" in md and "| not run |" in md
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    he = metrics["humaneval"]
    protocol = {k: he[k] for k in ("harness", "problems_total", "samples_per_problem", "temperature", "top_p",
                                    "max_tokens")}
    metrics["mbpp"] = {**protocol, "benchmark": "MBPP", "problems": 378, "problems_total": 378, "subset": "all 378",
                       **{m: {**he[m], "pass@1": 0.125, "problems_solved": 47} for m in ("base", "finetuned")},
                       "delta": {**he["delta"], "pass@1": 0.0, "p_value": 1.0}}
    _write(tmp_path / "eval/metrics.json", metrics)
    report(project)
    md = (tmp_path / "eval/report.md").read_text()
    assert "Not run here: HumanEval+, MBPP+" in md and "### Other benchmarks" in md
    assert _row(md, "**ours: base**")[3] == "12.5"  # the MBPP column of the comparison
    assert "| MBPP | base | 12.5 |" in md and "47 of 378" in md


def test_report_sections_numbers_and_determinism(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    result = report(project)
    md = (tmp_path / "eval/report.md").read_text()
    assert md.startswith("<!-- Generated by `textbook report`") and "do not edit by hand" in md.splitlines()[2 + 2]
    for heading in ("## pass@k: base, each phase, fine-tuned", "## Against published numbers", "## Problems similar / non-similar",
                    "## Data funnel", "## Cost ledger", "## Training", "## Evaluation run and sanity checks",
                    "## Limitations"):
        assert heading in md
    assert "**first 10 of 164**" in md
    assert _row(md, "base")[:3] == ["base", "20.0", "5.7 - 51.0"]
    assert _row(md, "fine-tuned (last phase)")[1] == "30.0"
    assert _row(md, "**delta (fine-tuned - base)**")[1:3] == ["+10.0", "-20.0 - +40.0"]
    assert "is **within noise** (McNemar's exact test" in md
    phi1 = _row(md, "phi-1")
    assert phi1[1:4] == ["1.3B", "50.6", "55.5"] and "9.6x our parameters" in phi1[5] and "first 10" in phi1[5]
    assert "arxiv.org/abs/2306.11644" in phi1[6]
    assert _row(md, "StarCoderBase-1B + textbook exercises")[2] == "27.0"
    # Table 3 split on the 10 evaluated problems: tau 0.9 similar = {0, 1}: base 1/2, fine 2/2.
    assert _row(md, "0.9") == ["0.9", "2", "50.0", "100.0", "8", "12.5", "12.5"]
    assert _row(md, "0.85")[1:4] == ["3", "66.7", "66.7"]  # HumanEval/100 is not evaluated: not counted
    assert _row(md, "0.8")[1:5] == ["10", "20.0", "30.0", "0"]
    assert _row(md, "generate")[1:4] == ["28", "25", "3"] and _row(md, "decontaminate")[1:4] == ["7", "6", "1"]
    assert "0.0123" in _row(md, "teacher generation (`qwen`)")[3]
    # Work reused from the caches or a checkpoint is said, so a cached re-run's near-zero times are not misread.
    assert _row(md, "teacher generation (`qwen`)")[5] == "10 of 28 responses"
    assert _row(md, "fine-tuning")[4:6] == ["45.5", "checkpoint at step 8 of 12"]
    assert _row(md, "evaluation: base")[5] == "0 of 10 completions"
    assert "`train_loss` | 1.25" in md and "teacher: 3 of 4 completions hit max_tokens" in md
    assert "trained on 4 exercises (~3k tokens), 1 more held out for the eval loss" in md
    assert "Only the first 10 of 164" in md
    assert result["plots"] == ["funnel.png", "loss.png", "pass_at_1.png"] and result["missing"] == []

    html_text = (tmp_path / "eval/report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    files = {name: (tmp_path / "eval/plots" / name).read_bytes() for name in result["plots"]}
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(files.values())
    assert "<th>pass@1 (%)</th>" in html_text and "<strong>first 10 of 164</strong>" in html_text
    assert all(png.startswith(b"\x89PNG") and b"matplotlib" not in png for png in files.values())
    csv_text = (tmp_path / "eval/plots/pass_at_1.csv").read_text()
    assert csv_text.splitlines()[:3] == ["model,pass_at_1,source", "ours: base,20.0,ours",
                                          "ours: fine-tuned (last phase),30.0,ours"]
    assert "prompts,28" in (tmp_path / "eval/plots/funnel.csv").read_text()

    first = outputs(tmp_path)
    report(project)
    assert outputs(tmp_path) == first


def test_report_with_nothing_available_names_the_gaps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = make_project(tmp_path, {"profile": "ci"})
    result = report(project)
    md = (tmp_path / "eval/report.md").read_text()
    assert "HumanEval metrics (run `textbook evaluate`): not available." in md
    assert "training curves (dvclive tsv): not available." in md and "| generate | not available |" in md
    assert any("eval/metrics.json" in m for m in result["missing"]) and "Not available for this report" in md
    (tmp_path / "eval/metrics.json").write_text("{not json")
    assert any("not valid JSON" in m for m in report(project)["missing"])


def test_references_and_differences():
    assert all(r.url.startswith("https://") and r.source and 0 < r.humaneval < 100 for r in REFERENCES)
    phi1 = next(r for r in REFERENCES if r.name == "phi-1")
    assert (phi1.humaneval, phi1.mbpp, phi1.params) == (50.6, 55.5, 1.3e9)
    assert params_from_name("gemma-3-270m") == 270e6 and params_from_name("qwen2.5-coder-0.5b") == 0.5e9
    assert params_from_name("gpt-4o-mini") is None
    text = differences(phi1, OurRun(270e6, 100, 20000, 20))
    assert "4.8x our parameters" in text and "100 exercises" in text and "first 20" in text
    assert "first" not in differences(phi1, OurRun(None, None, None, 164))


@pytest.mark.parametrize("missing", ["data/finetune/metrics.json", "data/decontaminate/humaneval_similarity.json"])
def test_report_survives_each_missing_input(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    (tmp_path / missing).unlink()
    result = report(project)
    assert any(missing in m for m in result["missing"])
    assert "not available" in (tmp_path / "eval/report.md").read_text()


def test_report_html_escapes_run_data_markdown_keeps_it(tmp_path, monkeypatch):
    """A model name from per_problem.json reaches both reports: verbatim in Markdown, escaped in HTML (the
    autoescaped template), while the report's own Markdown around it still becomes HTML."""
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    hostile = "<script>alert('x')</script>"
    per_problem = json.loads((tmp_path / "eval/per_problem.json").read_text())
    per_problem["models"]["base"]["model"] = hostile
    _write(tmp_path / "eval/per_problem.json", per_problem)
    report(project)
    md = (tmp_path / "eval/report.md").read_text()
    html_text = (tmp_path / "eval/report.html").read_text()
    assert f"| base | llamacpp | `{hostile}` |" in md
    assert "<script>" not in html_text
    assert "<td><code>&lt;script&gt;alert('x')&lt;/script&gt;</code></td>" in html_text


def test_reproducibility_note_follows_the_teachers_server():
    from pipeline.core.config import REPO_ROOT, load_config
    from pipeline.stages.report import reproducibility_note

    params = REPO_ROOT / "params.yaml"
    batched = reproducibility_note(load_config(params), params)  # the default teacher: llama-server, 8 slots
    assert "byte for byte" in batched and "from cold caches the teacher's answers are not" in batched
    alone = reproducibility_note(load_config(params, ["generate.teacher=smollm2-135m-instruct"]), params)
    assert "from cold caches too" in alone


# The corpus stage's stats.json from a real run (tests/test_dataset_card.py says which).
CORPUS = json.loads((Path(__file__).parent / "data" / "corpus_stats.json").read_text())
CORPUS_HEADING = "## Natural code corpus (phi-1's filtered half)"


def test_report_says_what_the_corpus_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    stats = json.loads(json.dumps(CORPUS))
    stats["examples"]["bottom"][0]["text"] = "def shout():\n    return '<script>alert(1)</script>'\n"
    _write(tmp_path / "data/corpus/select/stats.json", stats)
    result = report(project)
    md = (tmp_path / "eval/report.md").read_text()
    section = md.split(CORPUS_HEADING, 1)[1].split("\n## ", 1)[0]
    assert md.index("## Data funnel") < md.index(CORPUS_HEADING) < md.index("## Cost ledger")
    assert "`stdlib/collections` (`" in section and "teacher `qwen2.5-coder-0.5b-instruct`" in section
    assert "**25 of 123** (20.3%, 27,593 characters)" in section
    assert _row(md, "files read") == ["files read", "36"] and _row(md, "after decontamination") == [
        "after decontamination", "123"]
    assert _row(md, "kept") == ["kept", "25 (20.3%)"] and _row(md, "rated by the teacher")[1] == "24"
    assert _row(md, "same rating / within one point")[1] == "50.0% / 66.7%"
    assert _row(md, "quadratic-weighted kappa")[1] == "0.491"
    assert _row(md, "precision, recall, F1, accuracy at P >= 0.5")[1] == "0.000, 0.000, 0.000, 1.000"
    assert _row(md, "ROC AUC")[1] == "-"
    assert "the held-out ratings are all of one label" in _row(md, "note")[1]
    assert "Highest, score 1.0000, `_header_value_parser.py` (function):" in section
    assert "```python\nfrom email import errors\n\ndef get_group_list(value):" in section
    assert "Lowest, score 0.0600" in section and "```python\ndef shout():\n    return '<script>alert(1)</script>'\n```" in section
    assert result["missing"] == []
    html_text = (tmp_path / "eval/report.html").read_text()
    assert "<pre><code>from email import errors\n\ndef get_group_list(value):" in html_text
    assert "<script>" not in html_text and "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    first = outputs(tmp_path)
    report(project)
    assert outputs(tmp_path) == first


@pytest.mark.parametrize(("stats", "line"), [
    ({"enabled": False}, "Not built in this run (`corpus.enabled: false`): no natural code was collected, rated or kept."),
    (None, "Not run: no `data/corpus/select/stats.json` (dvc.yaml's corpus_extract, dedupe_corpus, "),
])
def test_report_says_in_one_line_that_the_corpus_did_not_run(tmp_path, monkeypatch, stats, line):
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    if stats is not None:
        _write(tmp_path / "data/corpus/select/stats.json", stats)
    result = report(project)
    section = (tmp_path / "eval/report.md").read_text().split(CORPUS_HEADING + "\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert section.startswith(line) and "\n" not in section.strip() and result["missing"] == []


def test_the_stated_training_examples_are_finetunes_train_and_eval_counts(tmp_path, monkeypatch):
    """The report once said "LoRA on 33 examples" where 30 trained and 3 were held out for the eval loss (it took
    the dataset's size): the counts it states are finetune's own examples.train and examples.eval."""
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path, finetune_metrics(30, 3, records_used=33))
    _write(tmp_path / "data/decontaminate/stats.json", decontaminate_stats(
        {"exercise": 40, "textbook": 2}, {"exercise": 36, "textbook": 2}).dump())  # the dataset: 36 exercises
    report(project)
    md = (tmp_path / "eval/report.md").read_text()
    examples = FinetuneMetrics.read(tmp_path / "data/finetune/metrics.json").examples
    trained = _row(md, "**ours: fine-tuned (last phase)**")[4]
    assert trained == f"LoRA on {examples.train} examples ({examples.eval} held out for the eval loss)"
    assert (examples.train, examples.eval) == (30, 3)
    stated = re.findall(r"LoRA on (\d+) exercises", md)
    assert stated and set(stated) == {"30"}  # the published rows' "how it differs" column
    assert f"trained on {examples.train} exercises (~1k tokens), {examples.eval} more held out for the eval loss" in md
    assert "36" not in trained and "33" not in trained


def test_an_input_with_a_key_its_producer_does_not_write_is_named_with_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = fixture_run(tmp_path)
    path = tmp_path / "data/finetune/metrics.json"
    metrics = json.loads(path.read_text())
    metrics["examples"]["train_examples"] = metrics["examples"].pop("train")
    _write(path, metrics)
    with pytest.raises(ArtifactError, match=r"data/finetune/metrics\.json.*`examples\.train_examples`"):
        FinetuneMetrics.read(path)
    result = report(project)
    assert any("data/finetune/metrics.json" in m and "examples.train_examples" in m for m in result["missing"])
    assert "LoRA on not available examples" in (tmp_path / "eval/report.md").read_text()


def test_main_prints_the_summary_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    fixture_run(tmp_path)
    assert main(["report", "-q"]) == 0
    assert capsys.readouterr().out == '{"missing":0,"plots":["funnel.png","loss.png","pass_at_1.png"]}\n'
