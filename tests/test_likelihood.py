"""The likelihood endpoint: paired tests, the scorer's token boundary, training lowers the NLL of what it
saw, the evaluate stage's NLL outputs, and the ablation's control arms (held-out split, token matching,
the natural arm's pool and decontamination)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import EvaluateConfig, load_config, load_preset
from pipeline.core.humaneval import load_problems
from pipeline.core.records import read_jsonl, write_jsonl
from pipeline.core.significance import paired_comparison, sign_flip_test, trend_test, wilcoxon
from pipeline.stages.controls import natural_pool
from pipeline.stages.finetune import heldout_split, match_tokens, run_finetune

from .conftest import REPO, add_preset, make_project
from .test_evaluate import _tiny_hf_model, eval_project, read

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


# ---------------------------------------------------------------------------------------
# Paired tests
# ---------------------------------------------------------------------------------------


def test_sign_flip_is_exact_for_few_problems_and_seeded_for_many():
    # All 5 differences of one sign: 2 of the 32 sign assignments are as extreme (all + and all -).
    assert sign_flip_test([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    assert sign_flip_test([0.1, -0.1, 0.2, -0.2]) == 1.0
    import numpy as np

    rng = np.random.default_rng(1)
    shifted = rng.normal(-0.05, 0.05, 164)
    null = rng.normal(0.0, 0.05, 164)
    assert sign_flip_test(shifted) < 0.001 < 0.05 < sign_flip_test(null)
    assert sign_flip_test(null, seed=3) == sign_flip_test(null, seed=3)
    assert wilcoxon([0.0, 0.0]) is None and wilcoxon(shifted) < 0.001


def test_paired_comparison_is_other_minus_reference_with_an_interval():
    a = [1.0, 0.9, 0.8, 1.1, 0.7, 1.2]
    b = [x - 0.1 for x in a]
    c = paired_comparison(a, b)
    assert c["delta"] == pytest.approx(-0.1) and c["lower"] == 6 and c["higher"] == 0
    assert c["ci95"][0] <= -0.1 <= c["ci95"][1]
    with pytest.raises(ValueError, match="6 values against 5"):
        paired_comparison(a, b[:5])


def test_trend_test_sees_a_monotone_dose_response():
    assert trend_test([0, 1, 2, 3, 4, 5], [1.0, 0.97, 0.95, 0.92, 0.9, 0.88])["p_value"] < 0.01
    flat = trend_test([0, 1, 2, 3, 4, 5], [1.0, 0.9, 1.0, 0.9, 1.0, 0.9])
    assert flat["p_value"] > 0.2


# ---------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-nll")
    _tiny_hf_model(folder / "model", folder / "random-adapter")
    return folder


def test_scored_context_ids_are_the_ids_evaluate_sends(tiny):
    from pipeline.core.config import ModelPreset
    from pipeline.engines.likelihood import encode_items
    from pipeline.engines.student import encode_context, load_tokenizer
    from pipeline.stages.evaluate import Target, build_requests, load_benches
    from pipeline.stages.evaluate.likelihood import benchmark_items

    ev = EvaluateConfig(problems=6)
    bench = load_benches(ev)[0]
    preset = ModelPreset(name="tiny", engine="vllm", model="tiny", api="completions", hf_id=str(tiny / "model"))
    requests = build_requests(Target("base", preset, "transformers"), bench, ev, 7)
    tok = load_tokenizer(str(tiny / "model"))
    encoded = encode_items(benchmark_items(bench), tok, chat=False)
    for req, (ids, first) in zip(requests, encoded, strict=True):
        assert ids[:first] == encode_context(tok, prompt=req.prompt)
        assert tok.decode(ids[first:-1]) == bench.by_id[req.id.split("#")[0]]["canonical_solution"]
        assert ids[-1] == tok.eos_token_id  # the stop is scored, as training teaches it


def test_batched_scores_equal_one_at_a_time(tiny):
    from pipeline.engines.likelihood import Item, Scorer
    from pipeline.stages.evaluate.likelihood import summary

    items = [Item(p["task_id"], p["prompt"], p["canonical_solution"]) for p in load_problems(7)]
    one = Scorer(str(tiny / "model"), tiny / "random-adapter", batch_size=1).score(items)
    many = Scorer(str(tiny / "model"), tiny / "random-adapter", batch_size=4).score(items)
    assert [s.tokens for s in one] == [s.tokens for s in many]
    assert all(abs(a.nll - b.nll) < 1e-3 * a.tokens for a, b in zip(one, many, strict=True))
    base = Scorer(str(tiny / "model")).score(items)
    assert [round(s.nll, 3) for s in base] != [round(s.nll, 3) for s in one]  # the adapter is applied
    s = summary([{"id": x.id, **x.as_dict()} for x in one], seed=0)
    assert s["items"] == 7 and s["bits_per_byte"] > 0 and s["ci95"][0] <= s["nll_per_token"] <= s["ci95"][1]
    assert s["nll_per_token_pooled"] == round(sum(x.nll for x in one) / sum(x.tokens for x in one), 6)


@pytest.mark.slow
def test_training_on_some_solutions_lowers_their_nll_more_than_the_others(tmp_path, monkeypatch, tiny):
    from pipeline.engines.likelihood import Item, Scorer
    from pipeline.stages.evaluate.harness import Convention

    monkeypatch.chdir(tmp_path)
    conv = Convention("evalplus", "humaneval")
    problems = load_problems(8)
    trained, held = problems[:4], problems[4:]
    rows = [{"id": p["task_id"], "kind": "exercise", "prompt": conv.base_prompt(p["prompt"]),
             "text": conv.base_prompt(p["prompt"]) + p["canonical_solution"]} for p in trained]
    params = {"profile": "ci", "seed": 7, "finetune": {
        "student": "tiny-hf", "max_steps": 40, "save_steps": 40, "max_length": 512, "batch_size": 4,
        "learning_rate": 1e-2, "eval_fraction": 0.0, "quantization": "none", "compute_dtype": "float32",
        "export_gguf": False, "packing": False, "output_dir": str(tmp_path / "out"), "dataset_dir": str(tmp_path / "d"),
        "kinds": ["exercise"]}}
    project = make_project(tmp_path, params)
    add_preset(project, "tiny-hf", engine="vllm", model="tiny-hf", api="completions", hf_id=str(tiny / "model"))
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    run_finetune(load_config(project / "params.yaml"), project / "params.yaml", progress=False)
    items = [Item(p["task_id"], conv.base_prompt(p["prompt"]), p["canonical_solution"]) for p in problems]
    before = {s.id: s.per_token for s in Scorer(str(tiny / "model")).score(items)}
    after = {s.id: s.per_token for s in Scorer(str(tiny / "model"), tmp_path / "out" / "adapter").score(items)}
    gain = {i: before[i] - after[i] for i in before}
    assert all(gain[p["task_id"]] > 0 for p in trained)
    assert min(gain[p["task_id"]] for p in trained) > max(gain[p["task_id"]] for p in held)


def test_evaluate_writes_nll_per_problem_and_paired_tests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_hf_model(tmp_path / "tiny-hf", tmp_path / "data/finetune/adapter")
    rows = [{"id": "ex-1", "kind": "exercise", "prompt": 'def inc(x):\n    """Add one."""',
             "text": 'def inc(x):\n    """Add one."""\n    return x + 1\n', "tests": "assert inc(1) == 2\nassert inc(2) == 3"},
            {"id": "ex-2", "kind": "exercise", "prompt": 'def dec(x):\n    """Subtract one."""',
             "text": 'def dec(x):\n    """Subtract one."""\n    return x + 1\n', "tests": "assert dec(1) == 0"}]
    write_jsonl(tmp_path / "data/finetune/heldout.jsonl", rows)
    project = eval_project(tmp_path, "tiny-hf", problems=4, max_tokens=4, likelihood=True)
    add_preset(project, "tiny-hf", engine="vllm", model="tiny-hf", api="completions", hf_id=str(tmp_path / "tiny-hf"))
    he = run_eval(project)["humaneval"]
    lk = he["likelihood"]
    assert lk["humaneval"]["base"]["items"] == 164 and lk["heldout"]["finetuned"]["items"] == 1
    c = lk["humaneval"]["comparisons"]["finetuned_vs_base"]
    assert c["n"] == 164 and c["ci95"][0] <= c["delta"] <= c["ci95"][1] and 0 < c["p_value"] <= 1
    per = read(project, "per_problem.json")
    first = per["results"][0]
    assert first["base"]["likelihood"]["tokens"] == first["finetuned"]["likelihood"]["tokens"] > 1
    assert per["likelihood"]["heldout"]["results"][0]["id"] == "ex-1"
    # pass@1 on the held-out exercises too; ex-2's own solution fails its test: left out, not a broken harness.
    held = json.loads((project / "eval" / "metrics.json").read_text())["heldout"]
    assert held["problems"] == 1 and set(held) >= {"base", "finetuned"} and 0 <= held["finetuned"]["pass@1"] <= 1
    assert per["likelihood"]["humaneval"]["items"] == 164  # the endpoint scores the whole benchmark by default
    from pipeline.stages.report.blocks import render
    from pipeline.stages.report.likelihood import likelihood_section

    md = render("report.md.j2", {"title": "t", "note": "n", "blocks": likelihood_section(he, per, None)})
    assert "| humaneval | base | 164 |" in md and "fine-tuned (last phase) - base" in md
    assert "held-out curated exercises" in md
    cached = sorted((tmp_path / "data/eval_cache/likelihood").glob("*.json"))
    assert len(cached) == 4  # two models x two item sets
    import pipeline.engines.likelihood as lk_engine

    class NoScorer:
        def __init__(self, *a, **k):
            raise AssertionError("cached scores must not load a model")

    monkeypatch.setattr(lk_engine, "Scorer", NoScorer)
    assert run_eval(project)["humaneval"]["likelihood"] == lk


def run_eval(project: Path) -> dict:
    from pipeline.stages.evaluate import run_evaluate

    return run_evaluate(load_config(project / "params.yaml", ["evaluate.engine=transformers"]),
                        project / "params.yaml", progress=False)


# ---------------------------------------------------------------------------------------
# Control arms
# ---------------------------------------------------------------------------------------


def _ex(i: int, n: int = 1) -> dict:
    prompt = f'def f{i}(x):\n    """Return x plus {i}."""'
    return {"id": f"e{i:03d}", "kind": "exercise", "prompt": prompt, "text": prompt + "\n" + "    y = x\n" * n
            + f"    return x + {i}\n"}


def test_heldout_split_is_seeded_disjoint_and_independent_of_order():
    recs = [_ex(i) for i in range(30)]
    kept, held = heldout_split(recs, 0.1, seed=5)
    assert len(held) == 3 and not {r["id"] for r in kept} & {r["id"] for r in held}
    assert heldout_split(recs[::-1], 0.1, seed=5) == (kept, held)
    assert heldout_split(recs, 0.1, seed=6)[1] != held
    assert heldout_split(recs, 0.0, seed=5) == (recs, [])


def test_match_tokens_comes_closest_to_the_target_and_is_seeded():
    recs = [_ex(i) for i in range(50)]
    counts = {r["id"]: 10 + (i % 7) for i, r in enumerate(recs)}
    chosen = match_tokens(recs, counts, 200, seed=1)
    total = sum(counts[r["id"]] for r in chosen)
    assert abs(total - 200) <= 8 and chosen == sorted(chosen, key=lambda r: r["id"])
    assert match_tokens(recs, counts, 200, seed=1) == chosen and match_tokens(recs, counts, 200, seed=2) != chosen
    assert sum(counts[r["id"]] for r in match_tokens(recs, counts, 10_000, seed=1)) == sum(counts.values())


def test_control_arm_trains_on_as_many_target_tokens_as_the_curated_records(tmp_path, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)
    curated = [_ex(i, n=1) for i in range(10)]
    arm = [{**_ex(100 + i, n=3), "id": f"r{i:03d}"} for i in range(40)]
    params = {"profile": "ci", "seed": 7, "finetune": {
        "student": "tiny-hf", "max_steps": 1, "save_steps": 1, "max_length": 128, "batch_size": 2,
        "quantization": "none", "compute_dtype": "float32", "export_gguf": False, "kinds": ["exercise"],
        "output_dir": "out", "dataset_dir": "cur", "rejected_dir": "rej", "heldout_fraction": 0.2}}
    project = make_project(tmp_path, params)
    add_preset(project, "tiny-hf", engine="vllm", model="tiny-hf", api="completions", hf_id=str(tiny / "model"))
    for folder, rows in (("cur", curated), ("rej", arm)):
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "train.jsonl", rows)
    m = run_finetune(load_config(project / "params.yaml", ["finetune.source=rejected"]), project / "params.yaml",
                     progress=False)
    tokens = m["matched_target_tokens"]
    assert m["source"] == "rejected" and m["heldout_records"] == 2 and m["source_records"] == 40
    # Whole records: within half a record (about 26 target tokens each here) of the curated total.
    assert abs(tokens["rejected"] - tokens["curated"]) <= 15 and m["records_used"] < 40
    held = read_jsonl(tmp_path / "out" / "heldout.jsonl")
    assert [r["id"] for r in held] == [r["id"] for r in heldout_split(curated, 0.2, 7)[1]]
    m2 = run_finetune(load_config(project / "params.yaml", ["finetune.seed=1"]), project / "params.yaml",
                      progress=False)
    assert m2["source"] == "curated" and m2["records_used"] == 8 and m2["training_seed"] == 8
    assert read_jsonl(tmp_path / "out" / "heldout.jsonl") == held  # the same held-out set for every arm and seed


def test_natural_pool_skips_tests_and_vendored_code(tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "tests").mkdir()
    (lib / "pkg" / "_vendor").mkdir()
    fn = 'import math\n\ndef area(r):\n    """Area of a circle."""\n    r2 = r * r\n    return math.pi * r2\n'
    (lib / "pkg" / "geometry.py").write_text(fn + '\ndef _short():\n    """Too short."""\n    return 1\n')
    (lib / "tests" / "test_geo.py").write_text(fn)
    (lib / "pkg" / "_vendor" / "copy.py").write_text(fn)
    (lib / "pkg" / "gen.py").write_text("# Automatically generated. Do not edit.\n" + fn)
    records, info = natural_pool([lib], 0, seed=1)
    assert [r["parsed"]["function_name"] for r in records] == ["area"]
    assert records[0]["parsed"]["imports"] == "import math" and records[0]["source"]["path"] == "pkg/geometry.py"
    assert info["skipped_files"] == {"test_or_vendored_dir": 2} and info["files"] == 2


@pytest.mark.slow
def test_natural_arm_is_decontaminated_by_behaviour_by_the_same_stages(tmp_path):
    """A stdlib-like function that behaves as a HumanEval problem is removed by decontaminate, run on the
    natural pool with the same CLI as the curated data."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "ops.py").write_text(
        'def add_numbers(x, y):\n    """Add two numbers."""\n    total = x + y\n    return total\n\n\n'
        'def describe(values):\n    """Describe a list in words."""\n    n = len(values)\n    return f"{n} values"\n')
    make_project(tmp_path, {"profile": "ci", "seed": 7})
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, check=True,
                       capture_output=True)

    cli("controls", "-q", "--set", "controls.arm=natural", "--set", f"controls.natural_roots=[{lib}]",
        "--set", "controls.output_dir=c")
    cli("dedupe", "-q", "--set", "dedupe.input_dir=c/natural/pool", "--set", "dedupe.output_dir=c/dd")
    cli("decontaminate", "-q", "--set", "decontaminate.input_dir=c/dd", "--set", "decontaminate.output_dir=c/dc",
        "--set", "decontaminate.dataset_dir=c/ds", "--set", "decontaminate.card_path=c/card.md",
        "--set", "dedupe.output_dir=c/dd")
    removed = read_jsonl(tmp_path / "c/dc/removed.jsonl")
    assert [r["parsed"]["function_name"] for r in removed] == ["add_numbers"]
    assert removed[0]["decontamination"]["task_id"] == "HumanEval/53"
    assert [r["id"] for r in read_jsonl(tmp_path / "c/ds/train.jsonl")] == [
        r["id"] for r in read_jsonl(tmp_path / "c/natural/pool/exercises.jsonl") if r["parsed"]["function_name"] == "describe"]


def test_committed_natural_arm_matches_its_manifest():
    from pipeline.core.records import sha256_file

    folder = REPO / "data" / "controls" / "natural"
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = read_jsonl(folder / "train.jsonl")
    assert sha256_file(folder / "train.jsonl") == manifest["train_jsonl_sha256"]
    assert len(rows) == manifest["after_decontaminate"]["exercise"] > 1000
    assert all(r["kind"] == "exercise" and r["text"].startswith(r["prompt"]) for r in rows)
    # Training can locate every solution (the completion-only loss needs the prompt boundary).
    from pipeline.engines.training import split_exercise

    assert all(split_exercise(r)[1].strip() for r in rows)
    load_preset("gemma-3-270m", REPO / "configs")  # the student the arm is matched with exists


def test_ablation_report_states_the_endpoint_and_every_comparison(tmp_path):
    import numpy as np

    from pipeline.stages.report.likelihood import write_ablation_report

    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.2, 30)
    arms = {name: base - shift + rng.normal(0, 0.02, 30) for name, shift in
            (("curated", 0.05), ("rejected", 0.03), ("natural", 0.0))}

    def cmp(other):
        c = paired_comparison(arms[other] if other != "base" else base, arms["curated"])
        return {"delta_nll": c["delta"], "ci95": c["ci95"], "p_value": c["p_value"], "wilcoxon_p": c["wilcoxon_p"],
                "n": c["n"], "problems_lower": c["lower"], "problems_higher": c["higher"], "test": c["test"],
                "table3": {"0.5": {"similar": {"delta_nll": -0.1, "p_value": 0.2, "n": 5}}}}

    metrics = {"endpoint": "mean NLL", "primary": {"comparison": "curated_vs_rejected", "test": "sign-flip", "alpha": 0.05},
               "seeds": [0, 1], "curated_exercises": 30,
               "arms": {"base": {"humaneval_nll": float(base.mean())},
                        **{a: {"humaneval_nll": float(v.mean()), "humaneval_nll_sd_over_seeds": 0.01,
                               "per_seed": {"0": {"humaneval_nll": float(v.mean()), "records": 30, "target_tokens": 900},
                                            "1": {"humaneval_nll": float(v.mean()) + 0.01, "records": 30,
                                                  "target_tokens": 900}}} for a, v in arms.items()}},
               "comparisons": {f"curated_vs_{o}": cmp(o) for o in ("base", "rejected", "natural")},
               "dose_response": {"seed": 0, "points": [{"exercises": n, "humaneval_nll": 1.0 - 0.01 * i}
                                                       for i, n in enumerate((0, 12, 24, 30))],
                                 "trend_on_log1p_n": trend_test([0, 1, 2, 3], [1.0, 0.99, 0.98, 0.97])},
               "phase1": None}
    write_ablation_report(metrics, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Primary: **curated vs rejected**" in md
    for other in ("base", "rejected", "natural"):
        assert f"| curated vs {other} | 30 |" in md
    assert "Dose-response" in md and (tmp_path / "plots" / "ablation_arms.png").stat().st_size > 1000
    assert (tmp_path / "report.html").is_file()
