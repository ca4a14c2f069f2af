"""The config error every layer raises for a wrong file, key or value (kept free of other pipeline
imports so the sandbox and engines can raise it without loading the config models).

    from pipeline.core.fields import ConfigError
    raise ConfigError("finetune.lora_r: must be >= 1, got 0")
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""
