"""What every artifact model shares: strict keys, reading a file with errors that name it and the bad key,
and the dict to write back (the keys the producer set, and only those: a key it left out stays out).

    python -c "from pipeline.core.artifacts import FilterStats; print(FilterStats.read('data/filter/stats.json').funnel())"
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.records import RecordError, write_json

# A measured quantity: a producer may write 0 (an int) where it usually writes 0.0; each is written back as read.
Num = Union[int, float]  # noqa: UP007 (a runtime union pydantic validates in smart mode: the type is kept)

MAX_ERRORS = 5  # errors named per invalid file


class ArtifactError(RecordError):
    """An artifact file is missing, not JSON, or not what its producer writes; the message names the file and key."""


def F(description: str, default: Any = ..., **kwargs: Any) -> Any:
    """A field with its short description (required unless a default is given)."""
    return Field(default, description=description, **kwargs)


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def describe_errors(exc: ValidationError, source: str, model: str) -> str:
    """One line: the file, the model, and each bad key by its dotted path."""
    parts = []
    for err in exc.errors()[:MAX_ERRORS]:
        where, kind = _where(err["loc"]), err["type"]
        if kind == "extra_forbidden":
            parts.append(f"unexpected key `{where}`")
        elif kind == "unexpected_key":
            parts.append(f"unexpected key `{_where((*err['loc'], err['ctx']['key']))}`")
        elif kind == "missing":
            parts.append(f"missing key `{where}`")
        elif kind == "missing_when_enabled":
            parts.append(f"missing key `{_where((*err['loc'], err['ctx']['key']))}` (the stage ran)")
        else:
            parts.append(f"key `{where}`: {err['msg']}")
    more = exc.error_count() - MAX_ERRORS
    return f"{source}: not a valid {model}: {'; '.join(parts)}" + (f" (and {more} more)" if more > 0 else "")


class Section(BaseModel):
    """A part of an artifact: its keys are the producer's, no other."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


class PatternSection(Section):
    """A section whose keys are fixed fields plus keys of one pattern (pass@10, pass@10_ci95_low, ...), numbers."""

    model_config = ConfigDict(extra="allow")
    EXTRA_KEYS: ClassVar[str] = r"pass@\d+(_ci95_(low|high))?"

    @model_validator(mode="before")
    @classmethod
    def _extra_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = {name for name in cls.model_fields} | {f.alias for f in cls.model_fields.values() if f.alias}
        for key, value in data.items():
            if key in known:
                continue
            if not re.fullmatch(cls.EXTRA_KEYS, key):
                raise PydanticCustomError("unexpected_key", "unexpected key `{key}`", {"key": key})
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PydanticCustomError("not_a_number", "`{key}` is not a number", {"key": key})
        return data

    def pass_at_k(self) -> dict[str, Any]:
        """{"pass@1": ..., "pass@10": ...} in k order: the pass@1 field and every other k beside it."""
        extra = {k: v for k, v in (self.model_extra or {}).items() if re.fullmatch(r"pass@\d+", k)}
        ks = {"pass@1": getattr(self, "pass_at_1", None), **extra}
        return dict(sorted(ks.items(), key=lambda kv: int(kv[0].split("@")[1])))


class ArtifactIO:
    """read / parse / dump / write, for a model (Artifact) or a root model (a JSON object of open keys)."""

    @classmethod
    def parse(cls, data: Any, source: str | Path = "<data>"):
        """The model of `data` (a producer's dict); ArtifactError naming `source` and the bad key otherwise."""
        try:
            return cls.model_validate(data)  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise ArtifactError(describe_errors(exc, str(source), cls.__name__)) from None

    @classmethod
    def read(cls, path: str | Path):
        """The artifact in `path`; ArtifactError (a RecordError) naming the file when it is missing, not JSON,
        or holds a key its producer does not write."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
        return cls.parse(data, path)

    @classmethod
    def read_optional(cls, path: str | Path):
        """As read, None when the file does not exist (a stage not run)."""
        return cls.read(path) if Path(path).is_file() else None

    def dump(self) -> Any:
        """The dict to write: the keys that were set (read, or given to the constructor), by their file names."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)  # type: ignore[attr-defined]

    def write(self, path: str | Path) -> None:
        """`dump()` to `path`, as every stage writes JSON (sorted keys, indent 2)."""
        write_json(path, self.dump())


class Artifact(ArtifactIO, Section):
    """One file a stage writes and another reads."""


class Toggled(Artifact):
    """An artifact whose stage can be off: `{"enabled": false}` alone, or every key of REQUIRED when it ran."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()
    enabled: bool = F("Whether the stage ran (false: the stage's other keys are absent).")

    @model_validator(mode="after")
    def _complete_when_enabled(self):
        if self.enabled:
            for name in self.REQUIRED:
                if name not in self.model_fields_set:
                    alias = type(self).model_fields[name].alias or name
                    raise PydanticCustomError("missing_when_enabled", "missing key `{key}` (the stage ran)",
                                              {"key": alias})
        return self


class PerKind(Section):
    """A count per record kind."""

    exercise: int = F("Exercises.")
    textbook: int = F("Textbook sections.")

    @property
    def total(self) -> int:
        return self.exercise + self.textbook

    def items(self) -> list[tuple[str, int]]:
        return [("exercise", self.exercise), ("textbook", self.textbook)]
