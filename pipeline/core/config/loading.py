"""The run's config (:class:`RunConfig`) and how it is resolved from files: params, profiles,
presets, ``--set`` overrides; and the resolved config written beside every stage's outputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, StrictInt, StrictStr

from pipeline.core.config.curation import (
    ControlsConfig,
    CorpusConfig,
    DecontaminateConfig,
    DedupeConfig,
    FilterConfig,
)
from pipeline.core.config.evaluation import EvaluateConfig
from pipeline.core.config.generation import GenerateConfig, TopicsConfig
from pipeline.core.config.presets import ModelPreset
from pipeline.core.config.training import FinetuneConfig, PretrainConfig
from pipeline.core.config.validation import build, section, to_dict
from pipeline.core.fields import ConfigError

log = logging.getLogger("pipeline.core.config")

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_PROFILE = "cpu-offline"


@section("")
class RunConfig:
    profile: StrictStr = Field(DEFAULT_PROFILE, description="Run profile (configs/profiles/<name>.yaml).")
    seed: StrictInt = Field(
        1234, description="The run's seed: every sampling choice and shuffle derives from it.")
    topics: TopicsConfig = Field(
        default_factory=TopicsConfig, description="Growing the topic tree (`textbook topics`, run on "
        "demand).")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="The generate stage.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="The filter stage.")
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig, description="The dedupe stage.")
    decontaminate: DecontaminateConfig = Field(
        default_factory=DecontaminateConfig, description="The decontaminate stage.")
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="The pretrain stage (phase 1).")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="The finetune stage (phase 2).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="The evaluate stage.")
    controls: ControlsConfig = Field(
        default_factory=ControlsConfig, description="The control arms' pools (`textbook controls`).")
    corpus: CorpusConfig = Field(
        default_factory=CorpusConfig, description="Natural code filtered by an educational-value classifier "
        "(`textbook corpus`).")


def read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping at the top level")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}, value parsed as YAML (so 3 is int, [a] a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    cur = out
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return out


def configs_dir(config_path: Path) -> Path:
    """The `configs/` folder beside the params file, else the repository's own."""
    local = config_path.resolve().parent / "configs"
    return local if local.is_dir() else REPO_ROOT / "configs"


def _available(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "(none)"


def load_preset(name: str, root: Path) -> ModelPreset:
    folder = root / "models"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset '{name}' (no {path}); available: {_available(folder)}")
    data = read_yaml(path, "model preset")
    data.setdefault("name", name)
    return build(ModelPreset, data, f"preset '{name}'")


def shadowed(profile: dict, params: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, params value, profile value) for every leaf both set to different values."""
    out = []
    for key, theirs in profile.items():
        if key not in params:
            continue
        ours, name = params[key], f"{prefix}{key}"
        if isinstance(theirs, dict) and isinstance(ours, dict):
            out += shadowed(theirs, ours, f"{name}.")
        elif ours != theirs:
            out.append((name, ours, theirs))
    return out


def load_config(config_path: str | Path = "params.yaml", overrides: list[str] | None = None) -> RunConfig:
    """Resolve defaults < profile < params file < --set overrides into a validated RunConfig."""
    path = Path(config_path)
    params = read_yaml(path, "config file")
    cli: dict = {}
    for text in overrides or []:
        cli = deep_merge(cli, parse_override(text))
    profile = cli.get("profile", params.get("profile", DEFAULT_PROFILE))
    root = configs_dir(path)
    prof_path = root / "profiles" / f"{profile}.yaml"
    if not prof_path.is_file():
        raise ConfigError(f"profile: unknown profile '{profile}'; available: {_available(root / 'profiles')}")
    prof = read_yaml(prof_path, "profile")
    for key, ours, theirs in shadowed(prof, params):
        log.warning("%s sets %s=%r over profile '%s' (%r): the profile's value is not used", path.name, key,
                    ours, profile, theirs)
    merged = deep_merge(deep_merge(prof, params), cli)
    merged["profile"] = profile
    cfg = build(RunConfig, merged)
    for name in RunConfig.__pydantic_fields__:  # unknown presets fail now, not mid-run
        for attr in ("teacher", "student"):
            preset = getattr(getattr(cfg, name), attr, None)
            if isinstance(preset, str):
                try:
                    load_preset(preset, root)
                except ConfigError as exc:
                    raise ConfigError(f"{name}.{attr}: {exc}") from None
    return cfg


def resolved_dict(cfg: RunConfig, root: Path, stage: str) -> dict:
    """The config a stage ran with, presets inlined; holds env var *names*, never secrets."""
    out = {"profile": cfg.profile, "seed": cfg.seed, stage: to_dict(getattr(cfg, stage))}
    for attr in ("teacher", "student"):
        name = getattr(getattr(cfg, stage), attr, None)
        if isinstance(name, str):
            out.setdefault("presets", {})[name] = to_dict(load_preset(name, root))
    return out
