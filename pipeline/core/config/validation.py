"""How a config section is declared and validated: pydantic dataclasses, one error type.

Every section is a pydantic dataclass made with :func:`section`: field types (strict scalars, so
``true`` is not an int and ``"3"`` not a number), ``Field(default, ge=..., description=help)`` for
bounds and help, and one ``@model_validator(mode="after")`` per section for the checks that
involve several fields, which fail through :func:`require`. Sections stay real dataclasses, so
``dataclasses.replace`` (which validates again), ``asdict`` and ``fields`` work as before.

Whatever the way in (:func:`build` from YAML data, a constructor, ``dataclasses.replace``), a bad
value raises :class:`ConfigError` naming the dotted key:

    finetune.lora_r: must be >= 1, got 0
    unknown key 'finetune.lora'; allowed keys in finetune: batch_size, ...; did you mean lora_r?
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from pipeline.core.fields import ConfigError

#: Every section: unknown keys are errors. Not frozen: the sections never were.
SECTION_CONFIG = ConfigDict(extra="forbid")


def section(label: str | Callable[[dict], str]):
    """Class decorator: a pydantic dataclass whose constructor raises ConfigError.

    ``label`` (or ``label(keyword arguments)``) names the section in errors of a direct construction
    (``ServerConfig(n_ctx=0)`` -> ``server.n_ctx: ...``); built with :func:`build` from YAML data the
    key is the full dotted path instead.
    """

    def make(cls: type) -> type:
        cls = pydantic_dataclass(cls, config=SECTION_CONFIG)
        if not cls.__pydantic_complete__:  # a later rebuild would replace the __init__ below
            raise TypeError(f"{cls.__name__}: a field type is not defined yet")
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise config_error(exc, cls, label(kwargs) if callable(label) else label) from None

        cls.__init__ = __init__
        # The help text as stdlib field metadata too, for code that reads dataclasses.fields().
        for f in dataclasses.fields(cls):
            f.metadata = types.MappingProxyType({"help": cls.__pydantic_fields__[f.name].description or ""})
        return cls

    return make


def require(ok: bool, field: str | None, reason: str) -> None:
    """In a section's model validator: fail with ``<section>.<field>: <reason>`` unless ``ok``
    (``field`` None: the section itself)."""
    if not ok:
        raise PydanticCustomError("config", "{reason}", {"field": field, "reason": reason})


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

_EXPECTED = {"int": "int", "float": "float", "string": "str", "bool": "bool", "list": "a list",
             "tuple": "a list", "dataclass": "a mapping", "dict": "a mapping"}


def _unwrap(tp: Any) -> tuple[Any, list]:
    """(type, constraint metadata): Annotated and Optional stripped."""
    metadata: list = []
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extra = typing.get_args(tp)
            for m in extra:
                metadata.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        elif typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp, metadata
            tp = args[0]
        else:
            return tp, metadata


class _Target(NamedTuple):
    """What an error's location points at: its type, constraints and (a field's) FieldInfo."""

    type: Any
    constraints: list
    info: FieldInfo | None


def _target(cls: type, loc: tuple) -> _Target | None:
    """Follow ``loc`` (field names, list indexes) from section ``cls``; None if it leaves the fields."""
    found = _Target(cls, [], None)
    for part in loc:
        tp, _ = _unwrap(found.type)
        if isinstance(part, int) and typing.get_origin(tp) in (list, tuple):
            found = _Target(*_unwrap(typing.get_args(tp)[0]), None)
        elif isinstance(part, str) and is_pydantic_dataclass(tp) and part in tp.__pydantic_fields__:
            info = tp.__pydantic_fields__[part]
            inner, constraints = _unwrap(info.annotation)
            found = _Target(inner, [*info.metadata, *constraints], info)
        else:
            return None
    return found


def bounds(metadata: list) -> str:
    """'>= 1', '(0, 1]' ...: the numeric bounds among a field's constraints; '' if none."""
    b = {k: getattr(m, k) for m in metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    lo = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    hi = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f"{'<' if hi[0] == ')' else '<='} {hi[1]}"
    return ""


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict, cls: type, label: str) -> str:
    loc, kind, value, ctx = tuple(err["loc"]), err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "config":  # require() in a model validator: the location is the section's
        loc += (ctx["field"],) if ctx.get("field") else ()
    key = ".".join(p for p in (label, _dotted(loc)) if p)
    where = _target(cls, loc)
    if kind == "config":
        return f"{key}: {ctx['reason']}"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _target(cls, loc[:-1])
        allowed = sorted(owner.type.__pydantic_fields__) if owner and is_pydantic_dataclass(owner.type) else []
        parent = ".".join(p for p in (label, _dotted(loc[:-1])) if p) or "the top level"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown key '{key}'; allowed keys in {parent}: {', '.join(allowed)}{hint}"
    if kind in ("missing_argument", "missing"):
        help_text = where.info.description if where and where.info else ""
        return f"missing required key '{key}'" + (f" ({help_text})" if help_text else "")
    if kind == "literal_error":
        allowed = typing.get_args(where.type) if where and typing.get_origin(where.type) is Literal else ()
        listed = ", ".join(map(repr, allowed)) if allowed else ctx.get("expected", "")
        return f"{key}: {value!r} is not allowed; allowed: {listed}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        allowed = (bounds(where.constraints) if where else "") or err["msg"].removeprefix("Input should be ")
        return f"{key}: must be {allowed}, got {value!r}"
    if kind == "too_short":
        return f"{key}: must have at least {ctx.get('min_length')} item(s), got {value!r}"
    if kind == "string_pattern_mismatch":
        return f"{key}: must match {ctx.get('pattern')}, got {value!r}"
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"{key}: expected {expected}, got {type(value).__name__} {value!r}"
    return f"{key}: {err['msg']}"


def config_error(exc: ValidationError, cls: type, label: str = "") -> ConfigError:
    """The first of pydantic's errors as one ConfigError naming the dotted key."""
    errors = exc.errors(include_url=False)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(_message(errors[0], cls, label) + more)


# ---------------------------------------------------------------------------------------
# Plain data in and out
# ---------------------------------------------------------------------------------------


def _none_sections(cls: type, data: dict) -> dict:
    """An empty YAML section (``generate:``) is None: read it as {} (its defaults), at any depth."""
    out = dict(data)
    for name, info in cls.__pydantic_fields__.items():
        if is_pydantic_dataclass(info.annotation):
            if out.get(name, {}) is None:
                out[name] = {}
            if isinstance(out.get(name), dict):
                out[name] = _none_sections(info.annotation, out[name])
    return out


def build(cls: type, data: Any, key: str = "") -> Any:
    """Section ``cls`` from plain data (a mapping, as YAML gives it); errors name ``key.<field>``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    try:
        return cls.__pydantic_validator__.validate_python(_none_sections(cls, data))
    except ValidationError as exc:
        raise config_error(exc, cls, key) from None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


class KeyDoc(NamedTuple):
    """One row of `textbook config --keys`."""

    key: str
    type: str
    default: str
    help: str
    bounds: str


def type_name(tp: Any) -> str:
    """A field's type as a reader writes it: int, list[str], 'lora' | 'full', float | None."""
    tp, _ = _unwrap(tp) if typing.get_origin(tp) is typing.Annotated else (tp, [])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[KeyDoc]:
    """Every key of section ``cls``, recursively, with its type, default, help and bounds, read from
    the pydantic fields; a nested section's defaults are those of its default instance."""
    rows = []
    for name, info in cls.__pydantic_fields__.items():
        key = f"{prefix}{name}"
        if defaults is not None:
            default: Any = getattr(defaults, name)
        elif info.is_required():
            default = dataclasses.MISSING
        else:
            default = info.get_default(call_default_factory=True)
        if is_pydantic_dataclass(info.annotation):
            rows.extend(describe(info.annotation, key + ".", default))
            continue
        shown = "(required)" if default is dataclasses.MISSING else repr(default)
        tp, metadata = _unwrap(info.annotation)
        limits = bounds([*info.metadata, *metadata])
        if not limits and typing.get_origin(tp) in (list, tuple):  # bounds on each item
            limits = bounds(_unwrap(typing.get_args(tp)[0])[1])
            limits = f"each {limits}" if limits else ""
        rows.append(KeyDoc(key, type_name(info.annotation), shown, info.description or "", limits))
    return rows
