"""The ablation's natural-code arms from the corpus stage (`finetune.source`: corpus, corpus_filtered): which
records each takes, the equal-token sample, the errors when the corpus was not built, and how the ablation,
its report and the showcase wire them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.core.artifacts import AblationMetrics, FinetuneMetrics
from pipeline.core.config import (
    CORPUS_SOURCES,
    FINETUNE_SOURCES,
    ConfigError,
    ModelPreset,
    load_config,
    load_preset,
)
from pipeline.core.records import write_jsonl
from pipeline.stages.finetune import run_finetune, source_records, target_token_counts

from .conftest import REPO, add_preset, make_project

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def exercise(rid: str, i: int, body_lines: int) -> dict:
    prompt = f'def f{i}(x):\n    """Return x plus {i}."""'
    completion = "".join(f"    y{j} = x + {j}\n" for j in range(body_lines)) + f"    return x + {i}\n"
    return {"id": rid, "kind": "exercise", "prompt": prompt, "completion": completion,
            "text": prompt + "\n" + completion}


def snippet_class(rid: str, i: int) -> dict:
    return {"id": rid, "kind": "textbook", "prompt": "", "completion": "",
            "text": f"class C{i}:\n    \"\"\"A class.\"\"\"\n\n    def get(self):\n        return {i}\n"}


CURATED = [exercise(f"ex-{i:03d}", i, 1) for i in range(6)]
# The corpus's curated dataset: 40 documented functions (exercise kind) and 6 classes / files (textbook kind).
CORPUS = [exercise(f"corpus-{i:03d}", 100 + i, 1 + i % 3) for i in range(40)] + \
         [snippet_class(f"corpus-c{i:02d}", i) for i in range(6)]
KEPT_EXERCISES = {f"corpus-{i:03d}" for i in range(0, 40, 2)}  # the classifier kept every other function


def kept_rows(ids=KEPT_EXERCISES) -> list[dict]:
    """kept.jsonl as the corpus stage's select step writes it (kept classes too: the arm ignores them)."""
    rows = [{"id": r["id"], "text": r["text"], "score": 0.9, "kind": r["kind"], "unit": "function",
             "source": "stdlib", "path": "pkg/mod.py"} for r in CORPUS if r["id"] in ids]
    return rows + [{"id": "corpus-c00", "text": CORPUS[-6]["text"], "score": 0.8, "kind": "textbook",
                    "unit": "class", "source": "stdlib", "path": "pkg/mod.py"}]


@pytest.fixture
def corpus_project(tmp_path, monkeypatch) -> Path:
    """A project whose corpus was built: data/corpus/unfiltered/train.jsonl and data/corpus/select/kept.jsonl at
    the default keys' paths."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, {"profile": "ci", "seed": 7, "finetune": {"kinds": ["exercise"], "max_length": 128}})
    write_jsonl(tmp_path / "data/corpus/unfiltered/train.jsonl", CORPUS)
    write_jsonl(tmp_path / "data/corpus/select/kept.jsonl", kept_rows())
    return tmp_path


@pytest.fixture(scope="module")
def tok_preset(smol_folder) -> ModelPreset:
    """A student preset whose tokenizer (SmolLM2's) counts the target tokens; no weights are loaded."""
    return ModelPreset(name="smol-tok", engine="vllm", model="smol-tok", api="completions", hf_id=str(smol_folder))


def cfg_for(project: Path, *overrides: str):
    return load_config(project / "params.yaml", list(overrides))


def test_corpus_filtered_takes_only_kept_functions_at_the_curated_target_tokens(corpus_project, tok_preset):
    cfg = cfg_for(corpus_project, "finetune.source=corpus_filtered")
    chosen, info = source_records(cfg, tok_preset, CURATED)
    ids = {r["id"] for r in chosen}
    assert ids and ids <= KEPT_EXERCISES  # no unkept function, no kept class
    assert info["source"] == "corpus_filtered" and info["source_records"] == len(KEPT_EXERCISES)
    assert info["source_dir"] == "data/corpus/unfiltered" and info["source_kept"] == "data/corpus/select/kept.jsonl"
    # The same equal-token sample as rejected / natural: whole records within half a record of the curated total.
    counts = target_token_counts(CURATED + CORPUS, cfg.finetune, tok_preset)
    want = sum(counts[r["id"]] for r in CURATED)
    got = sum(counts[r["id"]] for r in chosen)
    assert info["matched_target_tokens"] == {"curated": want, "corpus_filtered": got}
    assert abs(got - want) <= max(counts[i] for i in KEPT_EXERCISES) / 2
    assert len(chosen) < len(KEPT_EXERCISES)  # a sample, not the whole arm
    assert source_records(cfg, tok_preset, CURATED) == (chosen, info)  # seeded


def test_corpus_takes_every_function_and_no_class(corpus_project, tok_preset):
    functions = [r for r in CORPUS if r["kind"] == "exercise"]
    cfg = cfg_for(corpus_project, "finetune.source=corpus", "finetune.match_tokens=false")
    chosen, info = source_records(cfg, tok_preset, CURATED)
    assert chosen == functions and info == {"source": "corpus", "source_dir": "data/corpus/unfiltered",
                                            "source_records": 40}
    matched, info = source_records(cfg_for(corpus_project, "finetune.source=corpus"), tok_preset, CURATED)
    assert {r["id"] for r in matched} < {r["id"] for r in functions}
    assert {r["id"] for r in matched} - KEPT_EXERCISES  # unfiltered: unkept functions can be drawn
    assert set(info["matched_target_tokens"]) == {"curated", "corpus"}


def test_a_missing_kept_file_names_the_key_and_the_path(corpus_project, tok_preset):
    (corpus_project / "data/corpus/select/kept.jsonl").unlink()
    cfg = cfg_for(corpus_project, "finetune.source=corpus_filtered")
    with pytest.raises(ConfigError, match=r"finetune\.corpus_kept: data/corpus/select/kept\.jsonl not found.*"
                                          r"`dvc repro corpus` with corpus\.enabled=true"):
        source_records(cfg, tok_preset, CURATED)
    # The unfiltered arm does not read it.
    assert source_records(cfg_for(corpus_project, "finetune.source=corpus"), tok_preset, CURATED)[0]


def test_a_corpus_that_was_not_built_or_is_stale_is_a_clear_error(corpus_project, tok_preset):
    filtered = cfg_for(corpus_project, "finetune.source=corpus_filtered")
    # The corpus stage with corpus.enabled=false writes kept.jsonl empty.
    write_jsonl(corpus_project / "data/corpus/select/kept.jsonl", [])
    with pytest.raises(ConfigError, match=r"finetune\.corpus_kept: data/corpus/select/kept\.jsonl holds no "
                                          r"exercise-kind snippets.*dvc repro corpus"):
        source_records(filtered, tok_preset, CURATED)
    # Kept ids the dataset does not hold: the two files come from different builds.
    write_jsonl(corpus_project / "data/corpus/select/kept.jsonl",
                kept_rows() + [{"id": "corpus-zzz", "text": "x", "score": 1.0, "kind": "exercise"}])
    with pytest.raises(ConfigError, match=r"finetune\.corpus_kept: 1 of the 21 kept exercise ids .*corpus-zzz.* "
                                          r"not in data/corpus/unfiltered/train\.jsonl"):
        source_records(filtered, tok_preset, CURATED)
    # An empty dataset (decontaminate_corpus on an empty pool) or none at all.
    for source in ("corpus", "corpus_filtered"):
        write_jsonl(corpus_project / "data/corpus/unfiltered/train.jsonl", [])
        with pytest.raises(ConfigError, match=rf"finetune\.corpus_dir: .*train\.jsonl holds no records.*"
                                              rf"finetune\.source={source}.*corpus\.enabled=true"):
            source_records(cfg_for(corpus_project, f"finetune.source={source}"), tok_preset, CURATED)
        (corpus_project / "data/corpus/unfiltered/train.jsonl").unlink()
        with pytest.raises(ConfigError, match=r"finetune\.corpus_dir: data/corpus/unfiltered/train\.jsonl not found"):
            source_records(cfg_for(corpus_project, f"finetune.source={source}"), tok_preset, CURATED)
    # Only classes: nothing the arm can train on.
    write_jsonl(corpus_project / "data/corpus/unfiltered/train.jsonl", CORPUS[-6:])
    with pytest.raises(ConfigError, match=r"finetune\.corpus_dir: .*holds no exercise-kind records \(6 of other kinds"):
        source_records(cfg_for(corpus_project, "finetune.source=corpus"), tok_preset, CURATED)
    with pytest.raises(ConfigError, match=r"finetune\.kinds=\['textbook'\] leaves out"):
        source_records(cfg_for(corpus_project, "finetune.source=corpus", "finetune.kinds=[textbook]"), tok_preset,
                       CURATED)


def test_the_source_key_lists_the_corpus_arms():
    with pytest.raises(ConfigError, match=r"finetune\.source: .*corpus_filtered"):
        load_config(REPO / "params.yaml", ["finetune.source=corpus_unfiltered"])
    cfg = load_config(REPO / "params.yaml", ["finetune.source=corpus_filtered"])
    assert cfg.finetune.corpus_dir == "data/corpus/unfiltered"
    assert cfg.finetune.corpus_kept == "data/corpus/select/kept.jsonl"


@pytest.mark.slow
def test_a_corpus_filtered_run_trains_and_writes_its_metrics(tmp_path, monkeypatch, tiny_dir):
    """The stage end to end (a 2-layer random Llama, one step): metrics.json says which arm and kept file."""
    monkeypatch.chdir(tmp_path)
    params = {"profile": "ci", "seed": 7, "finetune": {
        "student": "tiny", "max_steps": 1, "save_steps": 1, "max_length": 128, "batch_size": 2,
        "quantization": "none", "compute_dtype": "float32", "export_gguf": False, "kinds": ["exercise"],
        "output_dir": "out", "dataset_dir": "cur", "corpus_dir": "corpus/ds", "corpus_kept": "corpus/kept.jsonl"}}
    project = make_project(tmp_path, params)
    add_preset(project, "tiny", engine="vllm", model="tiny", api="completions", hf_id=str(tiny_dir))
    write_jsonl(tmp_path / "cur/train.jsonl", CURATED)
    write_jsonl(tmp_path / "corpus/ds/train.jsonl", CORPUS)
    write_jsonl(tmp_path / "corpus/kept.jsonl", kept_rows())
    m = run_finetune(load_config(project / "params.yaml", ["finetune.source=corpus_filtered"]), project / "params.yaml",
                     progress=False)
    assert m["source"] == "corpus_filtered" and m["source_kept"] == "corpus/kept.jsonl" and m["steps"] == 1
    assert m["source_records"] == len(KEPT_EXERCISES) and m["records_used"] < len(KEPT_EXERCISES)
    assert FinetuneMetrics.read(tmp_path / "out/metrics.json").source_kept == "corpus/kept.jsonl"
    tokens = m["matched_target_tokens"]
    assert abs(tokens["corpus_filtered"] - tokens["curated"]) <= 20


# ---------------------------------------------------------------------------------------
# The ablation, its report, the showcase
# ---------------------------------------------------------------------------------------


def load_ablation():
    spec = importlib.util.spec_from_file_location("ablation_tool", REPO / "tools/ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_runs_the_corpus_arms_from_its_data_folder_and_compares_them():
    ab_mod = load_ablation()
    opts = ab_mod.argparse.Namespace(set=[], data="data/showcase", heldout_fraction=0.1, work="w", out="o")
    ab = ab_mod.Ablation(opts)
    assert ab.arm_sets("corpus_filtered", 1) == [
        "finetune.source=corpus_filtered", "finetune.seed=1", "finetune.corpus_dir=data/showcase/corpus/unfiltered",
        "finetune.corpus_kept=data/showcase/corpus/select/kept.jsonl"]
    # The other arms' overrides are as before, so their finished runs are reused, not trained again.
    assert ab.arm_sets("rejected", 0) == ["finetune.source=rejected", "finetune.seed=0"]
    assert not any("corpus" in s for s in ab.base_sets)
    cfg = ab.cfg(ab.arm_sets("corpus", 0))
    assert cfg.finetune.source == "corpus" and cfg.finetune.corpus_dir == "data/showcase/corpus/unfiltered"
    names = [f"{a}_vs_{b}" for a, b in ab_mod.COMPARISONS]
    assert {"curated_vs_corpus", "curated_vs_corpus_filtered", "corpus_filtered_vs_corpus"} <= set(names)
    # first - second: negative when the first arm's NLL is lower.
    c = ab_mod.compare({"a": 0.5, "b": 0.6, "c": 0.7}, {"a": 0.6, "b": 0.7, "c": 0.8})
    assert c["delta_nll"] == pytest.approx(-0.1) and c["problems_lower"] == 3


def test_ablation_with_a_corpus_arm_and_no_corpus_stops_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load_ablation().main(["--arms", "curated", "corpus_filtered", "--data", str(tmp_path),
                              "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"finetune.corpus_dir: {tmp_path}/corpus/unfiltered/train.jsonl not found" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_ablation_metrics_with_the_corpus_arms_parse_and_the_report_shows_them(tmp_path):
    from pipeline.stages.report.likelihood import write_ablation_report

    metrics = json.loads((REPO / "eval/ablation/metrics.json").read_text())
    arm = metrics["arms"]["natural"]
    entry = metrics["comparisons"]["curated_vs_natural"]
    metrics["arms"].update(corpus=arm, corpus_filtered=arm)
    metrics["comparisons"].update(curated_vs_corpus=entry, curated_vs_corpus_filtered=entry,
                                  corpus_filtered_vs_corpus=entry)
    metrics["curated_exercises"], metrics["curated_records"] = 21, 23
    model = AblationMetrics.parse(metrics, "metrics.json")
    assert model.curated_records == 23 and "corpus_filtered_vs_corpus" in model.comparisons
    write_ablation_report(model.dump(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    n = entry["n"]
    for label in ("curated vs corpus", "curated vs corpus filtered", "corpus filtered vs corpus"):
        assert f"| {label} | {n} |" in md
    assert "21 curated exercises trained on, of 23 records" in md and "| corpus_filtered |" in md
    # A committed file (written before curated_records) still parses and is written back unchanged.
    committed = AblationMetrics.read(REPO / "eval/ablation/metrics.json")
    assert committed.curated_records is None and "curated_records" not in committed.dump()


def test_ablation_report_describes_the_corpus_its_corpus_arms_came_from(tmp_path):
    """The report ends with the corpus stage's own description of `{data}/corpus/select/stats.json` (the
    classifier's held-out metrics, the teacher's self-agreement), and that file is copied beside metrics.json."""
    from pipeline.core.artifacts import CorpusSelectStats
    from pipeline.stages.report.likelihood import write_ablation_report

    ab_mod = load_ablation()
    (tmp_path / "corpus/select").mkdir(parents=True)
    stats = CorpusSelectStats.read(REPO / "tests/data/corpus_stats.json")
    stats.write(tmp_path / "corpus/select/stats.json")
    out = tmp_path / "out"
    out.mkdir()
    ab = ab_mod.Ablation(ab_mod.argparse.Namespace(set=[], data=str(tmp_path), heldout_fraction=0.1, work="w",
                                                   out=str(out)))
    blocks = ab_mod.corpus_blocks(ab)
    assert CorpusSelectStats.read(out / "corpus_stats.json") == stats
    write_ablation_report(json.loads((REPO / "eval/ablation/metrics.json").read_text()), out, blocks)
    md = (out / "report.md").read_text()
    c = stats.classifier
    assert "## Natural code corpus" in md and (f"| precision, recall, F1, accuracy at P >= 0.5 | {c.precision:.3f}, "
                                               f"{c.recall:.3f}, {c.f1:.3f}, {c.accuracy:.3f} |") in md
    assert f"| quadratic-weighted kappa | {stats.self_agreement.kappa_quadratic:.3f} |" in md
    # No corpus built under --data: the section says so in one line, and nothing is copied.
    empty = ab_mod.Ablation(ab_mod.argparse.Namespace(set=[], data=str(tmp_path / "none"), heldout_fraction=0.1,
                                                      work="w", out=str(tmp_path / "out2")))
    assert "Not run" in json.dumps(ab_mod.corpus_blocks(empty)) and not (tmp_path / "out2").exists()


def _set_words(text: str) -> list[str]:
    """The key=value words of a command's arguments."""
    return [w for w in shlex.split(text) if w not in ("--set", "-q")]


def test_showcase_builds_the_corpus_under_its_data_folder_with_the_dvc_commands():
    """tools/showcase.sh's corpus step: dvc.yaml's four corpus commands, with the keys that place their outputs
    under data/showcase/corpus, each reading what the one before wrote; the ablation's corpus arms read them."""
    env = (REPO / "tools/showcase_env.sh").read_text().replace("$D", "data/showcase")
    sets = _set_words(re.search(r"SET=\((.*?)\)", env, re.S).group(1))
    base = load_config(REPO / "params.yaml", sets)
    cset = re.search(r'CSET="(.*?)"', env, re.S).group(1)
    entries = re.findall(r'"([^"]*)"', re.search(r"CORPUS=\((.*?)\)\n", env, re.S).group(1))
    entries = [e.replace("$CSET", cset).replace("$C", "data/showcase/corpus") for e in entries]
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stages = ("corpus_extract", "dedupe_corpus", "decontaminate_corpus", "corpus")
    cfgs = []
    for entry, stage in zip(entries, stages, strict=True):
        words = shlex.split(entry)
        theirs = shlex.split(dvc[stage]["cmd"])
        assert words[0] == theirs[1]  # the same stage
        ours = dict(w.split("=", 1) for w in _set_words(" ".join(words[1:])))
        expected = dict(w.split("=", 1) for w in _set_words(" ".join(theirs[2:])))
        # Every key dvc.yaml sets, with its data/corpus path under data/showcase/corpus.
        assert {k: ours.get(k) for k in expected} == {
            k: v.replace("data/corpus", "data/showcase/corpus") for k, v in expected.items()}, stage
        cfgs.append(load_config(REPO / "params.yaml", sets + _set_words(" ".join(words[1:]))))
    extract, dedupe, decon, select = cfgs
    assert extract.corpus.pool_dir == dedupe.dedupe.input_dir == select.corpus.pool_dir == "data/showcase/corpus/pool"
    assert decon.decontaminate.input_dir == dedupe.dedupe.output_dir
    assert select.corpus.input_dir == decon.decontaminate.output_dir
    assert extract.corpus.work_dir == select.corpus.work_dir == "data/showcase/corpus/work"
    written = [extract.corpus.pool_dir, dedupe.dedupe.output_dir, decon.decontaminate.output_dir,
               decon.decontaminate.dataset_dir, decon.decontaminate.card_path, select.corpus.output_dir]
    assert all(p.startswith("data/showcase/corpus/") for p in written), written
    assert base.finetune.corpus_dir == decon.decontaminate.dataset_dir
    assert base.finetune.corpus_kept == f"{select.corpus.output_dir}/kept.jsonl"
    assert select.corpus.enabled  # cpu-showcase builds it


def test_the_finetune_stage_depends_on_the_corpus_arms_data():
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["deps"]
    cfg = load_config(REPO / "params.yaml")
    assert cfg.finetune.corpus_dir in deps and cfg.finetune.corpus_kept in deps


def test_corpus_folders_decide_only_the_corpus_arms_fingerprint(tmp_path):
    """Where the corpus lives is a training key of the corpus arms only: moving it keeps every other arm's
    checkpoints (and the runs trained before the corpus keys existed resume)."""
    from pipeline.engines.training.checkpoints import run_fingerprint

    preset = load_preset("gemma-3-270m", REPO / "configs")
    moved = ["finetune.corpus_dir=elsewhere/unfiltered", "finetune.corpus_kept=elsewhere/kept.jsonl"]
    for source in FINETUNE_SOURCES:
        here, there = (load_config(REPO / "params.yaml", [f"finetune.source={source}", *extra]).finetune
                       for extra in ([], moved))
        same = run_fingerprint(here, 0, preset, "d") == run_fingerprint(there, 0, preset, "d")
        assert same is (source not in CORPUS_SOURCES), source
