"""Configuration machinery: each knob is declared once, as a dataclass field with help text.

From those dataclasses come the CLI flags, the YAML keys, the validation and the resolved config
saved with every checkpoint and report:

* ``knob(default, help, choices=...)`` declares a field; ``section(cls, flat=...)`` nests a
  dataclass (e.g. the runtime settings, or the demo's distillation recipe).
* ``add_arguments(parser, cls)`` adds one ``--flag`` per field. Fields of a nested section get a
  dotted prefix (``--distill.lr``) unless the section is ``flat`` (the runtime: ``--device``).
* ``build(cls, recipe, namespace)`` merges defaults < YAML recipe < explicit flags and returns
  the dataclass. Every value goes through ``coerce`` against its field's annotation first, so a
  bad value fails with the field's name before any model loads: ``"1e-3"`` becomes a float,
  ``2.5`` is not an int, ``'false'`` is False and ``'maybe'`` is refused, ``inf`` is refused.
* ``to_dict`` / ``changed_flags`` give the resolved config and the flags that differ from the
  defaults (for reports).

This module imports nothing heavy: ``distillspec --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from typing import Any

_INT = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def knob(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help text (and allowed values) in its metadata.

    Mutable defaults (lists) are copied per instance.
    """
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def section(cls: type, help: str = "", flat: bool = False, **defaults: Any) -> Any:
    """A nested config dataclass; ``defaults`` override the section's own defaults."""
    return field(
        default_factory=lambda: cls(**defaults),
        metadata={"help": help or (cls.__doc__ or "").strip(), "section": cls, "flat": flat},
    )


def require_at_least(config: Any, minimum: float, *names: str) -> None:
    """Raise a ValueError naming the first field of ``names`` below ``minimum`` (or NaN, which
    compares false with everything: a config built in Python skips the CLI's finite check)."""
    for name in names:
        if not getattr(config, name) >= minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(config, name)}.")


def require_at_most(config: Any, maximum: float, *names: str, why: str = "") -> None:
    """Raise a ValueError naming the first field of ``names`` above ``maximum`` (or NaN)."""
    for name in names:
        if not getattr(config, name) <= maximum:
            raise ValueError(
                f"{name} must be <= {maximum}, got {getattr(config, name)}.{' ' + why if why else ''}"
            )


# -- types ---------------------------------------------------------------------------------------


def _resolve(annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {"list": list})  # our own annotations only
    return annotation


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}s"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as the field type ``annotation``, or a ValueError that names ``name``.

    Strings (from the command line or quoted YAML) are parsed; numbers must be finite; an int
    field refuses 2.5 and True; a bool field takes true/false/yes/no/on/off/1/0; a list field
    takes a list or a comma-separated string.
    """
    annotation, optional = _split_optional(_resolve(annotation))
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {_type_name(annotation)}, got nothing (null).")
    if typing.get_origin(annotation) is list:
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, str):
            value = _split_list(value, name)
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(item, item_type, f"{name}[{i}]") for i, item in enumerate(value)]
    if annotation is bool:
        return _coerce_bool(value, name)
    if annotation is int:
        return _coerce_int(value, name)
    if annotation is float:
        return _coerce_float(value, name)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(
            f"{name} must be a string, got {type(value).__name__} {value!r}. Quote it in YAML."
        )
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return from_dict(annotation, value, prefix=name + ".")
        raise ValueError(f"{name} must be a mapping of its options, got {value!r}.")
    return value


def _split_list(text: str, name: str) -> list[str]:
    """A comma- or space-separated list; an empty entry ("3:1,,4:1", a trailing comma) is
    refused rather than dropped, since it is most often a value left out by mistake."""
    if not text.strip():
        return []
    entries = [entry.strip() for entry in text.split(",")]
    if "" in entries:
        raise ValueError(
            f"{name} has an empty entry in {text!r}: separate the values by single commas "
            "(e.g. 3:1,4:1), with no leading, doubled or trailing comma."
        )
    return [part for entry in entries for part in re.split(r"\s+", entry)]


def _coerce_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def _coerce_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got the boolean {value}.")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.match(value.strip()):
        return int(value.strip())
    number = _coerce_float(value, name, kind="an integer")
    if not number.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(number)


def _coerce_float(value: Any, name: str, kind: str = "a number") -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {kind}, got the boolean {value}.")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind}, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return number


# -- dict <-> dataclass ----------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (without building the whole, possibly invalid, default config)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build ``cls`` from a plain dict (YAML), coercing every value; unknown keys are refused."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or cls.__name__} must be a mapping of option: value.")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    fields = _fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} option(s): {', '.join(prefix + u for u in unknown)}. "
            f"Valid options are: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for key, value in values.items():
        f = fields[key]
        name = prefix + key
        if "section" in f.metadata:
            nested = f.metadata["section"]
            base = to_dict(f.default_factory()) if isinstance(value, dict) else {}
            kwargs[key] = (
                value if isinstance(value, nested) else from_dict(nested, {**base, **value}, name + ".")
            )
            continue
        kwargs[key] = coerce(value, f.type, name)
        choices = f.metadata.get("choices")
        if choices is not None and kwargs[key] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested option dicts (``overrides`` wins)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def replace(config: Any, **overrides: Any) -> Any:
    """A copy of ``config`` with (nested-dict) overrides, validated like any new config."""
    return from_dict(type(config), merge(to_dict(config), overrides))


def changed_flags(config: Any, prefix: str = "", defaults: Any = None) -> str:
    """The command-line flags that differ from the defaults (for reports)."""
    return " ".join(changed_args(config, prefix, defaults))


def changed_args(config: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    """The command-line arguments that differ from the defaults, one list item per argument
    (to run the command: ``[..., "serve", *changed_args(config)]``)."""
    args: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        base = getattr(defaults, f.name) if defaults is not None else field_default(f)
        if "section" in f.metadata:
            inner = "" if f.metadata["flat"] else f"{prefix}{f.name}."
            args += changed_args(value, inner, base)
        elif value != base:
            flag = "--" + prefix + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--" + prefix + "no-" + f.name.replace("_", "-"))
            elif isinstance(value, list):
                args += [flag, ",".join(map(str, value))]
            else:
                args += [flag, str(value)]
    return args


# -- argparse --------------------------------------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    dest_prefix: str = "",
    flag_prefix: str = "",
    defaults: Any = None,
) -> None:
    """One ``--flag`` per field of ``cls`` (recursing into sections); values are coerced later.

    A section's flags get its name as a prefix (``--distill.lr``); a ``flat`` section's flags
    have none at all (``--device``). ``defaults`` is the section's default instance (its shown
    defaults may differ from the class's).
    """
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        dest = dest_prefix + f.name
        value = getattr(defaults, f.name) if defaults is not None else field_default(f)
        if "section" in f.metadata:
            inner_flag = "" if f.metadata["flat"] else f"{flag_prefix}{f.name}."
            add_arguments(parser, f.metadata["section"], dest + ".", inner_flag, value)
            continue
        flag = "--" + flag_prefix + f.name.replace("_", "-")
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        help_text = f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")
        choices = f.metadata.get("choices")
        if choices:
            help_text = f"{{{','.join(map(str, choices))}}} " + help_text
        annotation, _ = _split_optional(_resolve(f.type))
        if annotation is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )
        else:
            metavar = f.name.upper() if typing.get_origin(annotation) is not list else "V[,V...]"
            group.add_argument(
                flag, dest=dest, default=argparse.SUPPRESS, help=help_text, metavar=metavar
            )


def namespace_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The explicit flags as a nested dict (``{"distill": {"lr": "1e-3"}}``)."""
    nested: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if dest in ("command", "config", "debug") or dest.endswith("_command"):
            continue
        *path, leaf = dest.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def build(cls: type, recipe: dict[str, Any] | None = None, namespace=None, **base: Any) -> Any:
    """defaults < ``base`` < YAML ``recipe`` < explicit flags in ``namespace``; coerced, validated."""
    values = merge(base, recipe or {})
    if namespace is not None:
        known = _fields(cls)
        flags = {k: v for k, v in namespace_overrides(namespace).items() if k in known}
        values = merge(values, flags)
    return from_dict(cls, values)
