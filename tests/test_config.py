"""Config resolution: defaults < profile < params file < --set, strict validation, presets."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pipeline.core.config import (
    ConfigError,
    FinetuneConfig,
    ModelPreset,
    RunConfig,
    ServerConfig,
    build,
    describe,
    load_config,
    load_preset,
    parse_override,
)
from pipeline.core.stage import write_resolved_config

from .conftest import REPO, make_project


def write(project, params: dict):
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project / "params.yaml"


def test_repo_params_resolve_to_the_cpu_offline_default():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.profile == "cpu-offline" and cfg.generate.teacher == "qwen2.5-coder-0.5b-instruct"
    assert load_preset(cfg.generate.teacher, REPO / "configs").engine == "llamacpp"


def test_layers_override_in_order(tmp_path):
    project = make_project(tmp_path, {})
    # profile ci sets n_exercises=6 and finetune.max_steps=3; params overrides n_exercises; --set overrides again
    path = write(project, {"profile": "ci", "generate": {"n_exercises": 9, "sampling": {"temperature": 0.3}}})
    cfg = load_config(path)
    assert cfg.finetune.max_steps == 3 and cfg.evaluate.problems == 4  # from the profile
    assert cfg.generate.n_exercises == 9  # params beat the profile
    assert cfg.generate.sampling.temperature == 0.3 and cfg.generate.sampling.top_p == 0.95  # default kept
    cfg = load_config(path, ["generate.n_exercises=11", "generate.sampling.stop=[\"\\n\\n\"]", "profile=a100"])
    assert cfg.generate.n_exercises == 11 and cfg.generate.sampling.stop == ["\n\n"]
    assert cfg.profile == "a100" and cfg.generate.teacher == "gpt-4o-mini" and cfg.generate.client.budget_usd == 25.0


@pytest.mark.parametrize(
    "params, message",
    [
        ({"generate": {"n_exercise": 3}}, "unknown key 'generate.n_exercise'; allowed keys in generate:"),
        ({"genrate": {}}, "unknown key 'genrate'"),
        ({"generate": {"n_exercises": "many"}}, "generate.n_exercises: expected int, got str"),
        ({"generate": {"n_exercises": -1}}, "generate.n_exercises: must be >= 0"),
        ({"generate": {"sampling": {"top_p": 1.5}}}, "generate.sampling.top_p: must be in (0, 1]"),
        ({"generate": {"client": {"concurrency": 0}}}, "generate.client.concurrency: must be >= 1"),
        ({"generate": {"sampling": {"stop": "x"}}}, "generate.sampling.stop: expected a list"),
        ({"generate": {"client": {"concurrency": True}}}, "expected int, got bool"),
        ({"profile": "gpu-cluster"}, "unknown profile 'gpu-cluster'; available: a100, ci, cpu-offline"),
        ({"generate": {"teacher": "gpt-9"}}, "generate.teacher: unknown model preset 'gpt-9'"),
        ({"dedupe": {"threshold": 1.5}}, "dedupe.threshold: must be in (0, 1]"),
        ({"decontaminate": {"ast_threshold": -0.1}}, "decontaminate.ast_threshold: must be in [0, 1]"),
    ],
)
def test_bad_values_name_the_key(tmp_path, params, message):
    project = make_project(tmp_path, {})
    with pytest.raises(ConfigError) as exc:
        load_config(write(project, params))
    assert message in str(exc.value)


def test_missing_or_broken_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("generate.n_exercises")


def test_preset_validation(tmp_path):
    project = make_project(tmp_path, {})
    models = project / "configs" / "models"
    (models / "bad-remote.yaml").write_text("engine: remote\nmodel: m\n")
    (models / "bad-engine.yaml").write_text("engine: tpu\nmodel: m\n")
    with pytest.raises(ConfigError, match="engine 'remote' needs base_url"):
        load_preset("bad-remote", project / "configs")
    with pytest.raises(ConfigError, match="'tpu' is not allowed; allowed: 'llamacpp', 'vllm', 'remote'"):
        load_preset("bad-engine", project / "configs")


def test_every_shipped_preset_and_profile_is_valid():
    presets = sorted((REPO / "configs" / "models").glob("*.yaml"))
    profiles = sorted((REPO / "configs" / "profiles").glob("*.yaml"))
    # The globs find the shipped files (an empty list would check nothing): the default profile among them.
    default_profile = load_config(REPO / "params.yaml").profile
    assert len(presets) >= 10 and default_profile in {p.stem for p in profiles}
    for path in presets:
        load_preset(path.stem, REPO / "configs")
    for path in profiles:
        assert load_config(REPO / "params.yaml", [f"profile={path.stem}"]).profile == path.stem


def test_showcase_script_resolves_and_keeps_its_outputs_apart():
    """tools/showcase.sh runs every stage with one --set list: a valid config, nothing written over the
    default run's outputs, every stage reading what the one before wrote."""
    import re
    import shlex

    assert "source tools/showcase_env.sh" in (REPO / "tools/showcase.sh").read_text()
    assert "source tools/showcase_env.sh" in (REPO / "tools/curve.sh").read_text()
    text = (REPO / "tools/showcase_env.sh").read_text()
    words = shlex.split(re.search(r"SET=\((.*?)\)", text, re.S).group(1).replace("$D", "data/showcase"))
    sets = [w for w in words if w != "--set"]
    cfg = load_config(REPO / "params.yaml", sets)
    assert cfg.profile == "cpu-showcase" and cfg.evaluate.problems == 0 and cfg.pretrain.enabled
    assert cfg.finetune.student == "gemma-3-270m" and cfg.generate.teacher == "qwen2.5-coder-0.5b-instruct"
    outs = [cfg.generate.output_dir, cfg.filter.output_dir, cfg.dedupe.output_dir, cfg.decontaminate.output_dir,
            cfg.decontaminate.dataset_dir, cfg.pretrain.output_dir, cfg.finetune.output_dir, cfg.evaluate.output_dir,
            cfg.decontaminate.card_path]
    assert all(o.startswith(("data/showcase/", "eval/showcase")) for o in outs), outs
    chain = [(cfg.filter.input_dir, cfg.generate.output_dir), (cfg.dedupe.input_dir, cfg.filter.output_dir),
             (cfg.decontaminate.input_dir, cfg.dedupe.output_dir), (cfg.finetune.dataset_dir, cfg.decontaminate.dataset_dir)]
    assert all(a == b for a, b in chain)
    stages = re.search(r"STAGES=\((.*?)\)", (REPO / "tools/showcase.sh").read_text()).group(1).split()
    assert stages == ["generate", "filter", "dedupe", "decontaminate", "controls", "corpus", "pretrain", "finetune",
                      "evaluate", "report"]
    # The rejected arm's pool, dedupe and decontaminate write under data/showcase/ and read the showcase's filter.
    assert cfg.controls.output_dir == "data/showcase/controls"
    assert cfg.controls.rejected_input == "data/showcase/filter/rejected.jsonl"
    assert cfg.finetune.rejected_dir == "data/showcase/controls/rejected/dataset"
    controls = re.search(r"CONTROLS=\((.*?)\)\n", text, re.S).group(1).replace("$R", "data/showcase/controls/rejected")
    assert "data/showcase/controls/rejected/dataset" in controls and "data/dataset" not in controls.replace(
        "controls/rejected/dataset", "")


def test_repo_params_shadow_no_profile_key(caplog):
    # params.yaml beats the profile, so a key in both would silently void the profile's scale.
    for path in (REPO / "configs" / "profiles").glob("*.yaml"):
        caplog.clear()
        cfg = load_config(REPO / "params.yaml", [f"profile={path.stem}"])
        assert not [r for r in caplog.records if "over profile" in r.message], path.stem
        profile = yaml.safe_load(path.read_text())
        for section, values in profile.items():  # and each profile value is the one in effect
            for key, value in values.items():
                if not isinstance(value, dict):
                    assert getattr(getattr(cfg, section), key) == value, f"{path.stem}: {section}.{key}"


def test_a_params_key_that_shadows_the_profile_is_logged(tmp_path, caplog):
    project = make_project(tmp_path, {})
    path = write(project, {"profile": "ci", "finetune": {"max_steps": 50, "lora_r": 8}})
    cfg = load_config(path)
    assert cfg.finetune.max_steps == 50
    shadow = [r.message for r in caplog.records if "over profile" in r.message]
    assert shadow == ["params.yaml sets finetune.max_steps=50 over profile 'ci' (3): the profile's value is not used"]


def test_every_key_has_help():
    rows = describe(RunConfig)
    assert len(rows) > 30
    assert all(row.help for row in rows), [row.key for row in rows if not row.help]


def test_unknown_keys_name_the_dotted_key_and_suggest_close_ones(tmp_path):
    params = write(make_project(tmp_path, {}), {})
    with pytest.raises(ConfigError) as exc:
        load_config(params, ["finetune.lora.r=8"])
    assert str(exc.value).startswith("unknown key 'finetune.lora'; allowed keys in finetune: batch_size, ")
    assert str(exc.value).endswith("; did you mean lora_r?")
    with pytest.raises(ConfigError, match=r"unknown key 'generate\.sampling\.temprature'; allowed keys in "
                                          r"generate\.sampling: .*did you mean temperature\?"):
        load_config(params, ["generate.sampling.temprature=0.5"])
    with pytest.raises(ConfigError, match="unknown key 'preset 'm'.server.n_slots'; allowed keys in preset 'm'.server"):
        build(ModelPreset, {"name": "m", "engine": "remote", "model": "m", "base_url": "http://x/v1",
                            "server": {"n_slots": 2}}, "preset 'm'")


@pytest.mark.parametrize(("override", "message"), [
    ("finetune.lora_r=0", "finetune.lora_r: must be >= 1, got 0"),
    ("dedupe.threshold=1.5", "dedupe.threshold: must be in (0, 1], got 1.5"),
    ("filter.max_dropped_fraction=1", "filter.max_dropped_fraction: must be in [0, 1), got 1"),
    ("evaluate.likelihood_problems=-2", "evaluate.likelihood_problems: must be >= -1, got -2"),
    ("decontaminate.tau_levels=[0.9, 2]", "decontaminate.tau_levels[1]: must be in [0, 1], got 2"),
    ("corpus.sampling.temperature=3", "corpus.sampling.temperature: must be in [0, 2], got 3"),
    ("finetune.max_steps=2.5", "finetune.max_steps: expected int, got float 2.5"),
    ("filter.min_chars=7000", "filter.min_chars: must be <= filter.max_chars (6000), got 7000"),
])
def test_an_out_of_bound_value_names_the_key_and_the_bound(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(REPO / "params.yaml", [override])
    assert str(exc.value) == message


def test_sections_stay_dataclasses_that_validate_every_way_in():
    cfg = load_config(REPO / "params.yaml")
    assert dataclasses.asdict(cfg)["finetune"]["lora_r"] == cfg.finetune.lora_r
    assert dataclasses.replace(cfg.finetune, lora_r=8).lora_r == 8
    with pytest.raises(ConfigError, match=r"^finetune\.lora_r: must be >= 1, got 0$"):
        dataclasses.replace(cfg.finetune, lora_r=0)
    with pytest.raises(ConfigError, match=r"^server\.n_parallel: expected int, got bool True$"):
        ServerConfig(n_parallel=True)
    with pytest.raises(ConfigError, match=r"^preset 'f': engine 'vllm' needs hf_id$"):
        ModelPreset(name="f", engine="vllm", model="m")
    assert FinetuneConfig(learning_rate=1).learning_rate == 1.0  # an int where a float is wanted, as YAML gives it
    assert dataclasses.fields(FinetuneConfig)[0].metadata["help"].startswith("Student base model preset")


def test_config_keys_lists_each_field_with_type_default_bounds_and_help(capsys):
    from pipeline.cli import main

    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "finetune.lora_r: int = 16  (>= 1)\n    LoRA rank.\n" in out
    assert "dedupe.threshold: float = 0.8  (in (0, 1])\n    Jaccard similarity at or above which" in out
    assert "pretrain.mode: 'lora' | 'full' | 'scratch' = 'lora'\n" in out
    assert "corpus.sampling.temperature: float = 0.3  (in [0, 2])\n" in out  # the section's own default
    keys = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert keys == [row.key for row in describe(RunConfig)] and len(keys) == len(out.splitlines()) // 2


def test_model_identities_take_the_engine_version_from_the_engines_layer(monkeypatch):
    from pipeline.core.config import presets
    from pipeline.engines.versions import engine_version

    preset = load_preset("qwen2.5-coder-0.5b-instruct", REPO / "configs")
    assert f"|{engine_version('llama-server')}|" in preset.identity()
    monkeypatch.setattr(presets, "_engine_versions", lambda engine: f"{engine}==9.9")
    assert "|llama-server==9.9|settings:" in preset.identity()
    monkeypatch.setattr(presets, "_engine_versions", None)
    with pytest.raises(RuntimeError, match="import pipeline.engines.versions"):
        preset.identity()


def test_resolved_config_inlines_presets_and_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-never-be-written")
    cfg = load_config(REPO / "params.yaml", ["profile=a100"])
    write_resolved_config(cfg, REPO / "configs", "generate", tmp_path)
    text = (tmp_path / "resolved_config.yaml").read_text()
    resolved = yaml.safe_load(text)
    assert resolved["presets"]["gpt-4o-mini"]["api_key_env"] == "OPENAI_API_KEY"
    assert "sk-should-never-be-written" not in text
    assert build(RunConfig, {"generate": resolved["generate"]}).generate == cfg.generate  # round-trips


def test_stage_cli_prints_the_summary_or_one_clear_line_with_the_status(tmp_path, capsys, caplog):
    import argparse

    from pipeline.core.stage import add_common_arguments, stage_cli

    class Diverged(RuntimeError):
        pass

    params = write(make_project(tmp_path, {}), {"profile": "ci"})
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    args = parser.parse_args(["--config", str(params), "-q", "--set", "seed=5"])
    seen = {}

    def ok(cfg, path, progress):
        seen.update(seed=cfg.seed, progress=progress, path=path)
        return {"steps": 4, "loss": 0.5, "noise": "x"}

    assert stage_cli(ok, args, lambda m: {"steps": m["steps"]}) == 0
    assert capsys.readouterr().out == '{"steps":4}\n' and seen == {"seed": 5, "progress": False, "path": params}

    def boom(cfg, path, progress):
        raise Diverged("loss is nan at step 3")

    assert stage_cli(boom, args, dict, {Diverged: ("training diverged", 3)}) == 3
    assert "training diverged: loss is nan at step 3" in caplog.text and capsys.readouterr().out == ""
    with pytest.raises(ValueError):  # anything else is a bug: its traceback is wanted
        stage_cli(lambda *a, **k: (_ for _ in ()).throw(ValueError("bug")), args, dict, {Diverged: ("x", 3)})
