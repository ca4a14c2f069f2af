"""Building blocks of the typed configs, shared by every module that declares a config
section (kept free of other pipeline imports so any module can use them).

    from pipeline.core.fields import ConfigError, check, opt

    @dataclass
    class MyConfig:
        size: int = opt(3, help="How many.")
        def __post_init__(self):
            check(self.size > 0, "my.size", f"must be > 0, got {self.size}")
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def opt(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with help text (TRL style); list/dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError('key: msg') unless cond holds."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")
