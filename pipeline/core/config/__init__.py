"""Typed, validated configuration for every stage.

The run's config is `params.yaml` (DVC's params file). Resolution order, each layer
overriding the one before:

1. the sections' defaults (pydantic dataclasses, one module per group of stages);
2. the run profile named by `profile:` (``configs/profiles/<name>.yaml``): the scale and
   the engines of a run (teacher preset, counts, concurrency, rate limits);
3. the sections of `params.yaml` (or the file given with ``--config``);
4. ``--set key=value`` overrides from the command line (values parsed as YAML).

Unknown keys and bad values fail before any work, with the dotted key and what is
allowed. Model presets (``configs/models/<name>.yaml``) are referred to by name.

    python -m pipeline generate --set generate.n_exercises=8 --set profile=cpu-offline

Modules: :mod:`.validation` (how a section is declared, errors, ``describe`` for
``textbook config --keys``), :mod:`.presets`, :mod:`.shared` (sandbox, sampling, client),
:mod:`.generation`, :mod:`.curation`, :mod:`.training`, :mod:`.evaluation`, :mod:`.loading`.
The installed engine versions in a preset's identity come from ``pipeline.engines.versions``.
"""

from pipeline.core.config.curation import (
    CORPUS_UNITS,
    DEFAULT_ALLOWED_IMPORTS,
    ControlsConfig,
    CorpusConfig,
    DecontaminateConfig,
    DedupeConfig,
    FilterConfig,
)
from pipeline.core.config.evaluation import EvaluateConfig
from pipeline.core.config.generation import GenerateConfig, TopicsConfig
from pipeline.core.config.loading import (
    DEFAULT_PROFILE,
    REPO_ROOT,
    RunConfig,
    configs_dir,
    deep_merge,
    load_config,
    load_preset,
    parse_override,
    read_yaml,
    resolved_dict,
    shadowed,
)
from pipeline.core.config.presets import (
    GGUFPart,
    GGUFSpec,
    ModelPreset,
    Price,
    ServerConfig,
    installed_engine_version,
    register_engine_versions,
)
from pipeline.core.config.shared import ClientConfig, SamplingConfig, SandboxConfig
from pipeline.core.config.training import (
    CORPUS_SOURCES,
    DEFAULT_SAMPLE_PROMPTS,
    FINETUNE_SOURCES,
    RECORD_KINDS,
    FinetuneConfig,
    FinetuneSource,
    PretrainConfig,
    ScratchModelConfig,
)
from pipeline.core.config.validation import KeyDoc, build, config_error, describe, require, section, to_dict
from pipeline.core.fields import ConfigError

__all__ = [
    "CORPUS_SOURCES", "CORPUS_UNITS", "DEFAULT_ALLOWED_IMPORTS", "DEFAULT_PROFILE", "DEFAULT_SAMPLE_PROMPTS", "RECORD_KINDS",
    "REPO_ROOT", "ClientConfig", "ConfigError", "ControlsConfig", "CorpusConfig", "DecontaminateConfig",
    "DedupeConfig", "EvaluateConfig", "FINETUNE_SOURCES", "FilterConfig", "FinetuneConfig", "FinetuneSource", "GGUFPart", "GGUFSpec", "GenerateConfig",
    "KeyDoc", "ModelPreset", "PretrainConfig", "Price", "RunConfig", "SamplingConfig", "SandboxConfig",
    "ScratchModelConfig", "ServerConfig", "TopicsConfig", "build", "config_error", "configs_dir",
    "deep_merge", "describe", "installed_engine_version", "load_config", "load_preset", "parse_override",
    "read_yaml", "register_engine_versions", "require", "resolved_dict", "section", "shadowed", "to_dict",
]
