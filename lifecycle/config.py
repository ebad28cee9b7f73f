"""Recipe configs: one dataclass per recipe, one set of defaults.

The same dataclass is the CLI (`add_config_arguments` turns each field into a `--flag`), the YAML
schema (`load_config` refuses unknown keys and names the file) and the Python API. Precedence:
dataclass defaults < YAML file (`--config`) < flags given on the command line.

Field help lives in `field(metadata={"help": ...})` so `--help` and the docs never drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lifecycle.errors import ConfigError

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per dataclass field. Defaults are SUPPRESSed so only given flags override."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (elem,) = typing.get_args(tp)[:1]
            kwargs.update(nargs="+", type=elem, metavar=f.name.upper())
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            kwargs.update(choices=choices, type=type(choices[0]))
        else:
            kwargs.update(type=tp, metavar=f.name.upper())
        parser.add_argument(flag_name(f.name), **kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a YAML value against the field type; ints are accepted for floats."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (elem,) = typing.get_args(tp)[:1]
        return [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of field: value")
    return data


def build_config(cls: type[T], *, file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults < YAML `file` < `overrides`; unknown keys raise ConfigError naming them and the file.

    Cross-field rules are checked by the dataclass's own `__post_init__`.
    """
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    if file is not None:
        for key, value in read_yaml_mapping(file).items():
            norm = str(key).replace("-", "_")
            if norm not in names:
                raise ConfigError(f"{file}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
            values[norm] = _coerce(value, hints[norm], f"{file}: {key}")
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"unknown option {flag_name(key)}")
        values[key] = value
    try:
        return cls(**values)
    except TypeError as err:  # a required field was not given
        raise ConfigError(f"{cls.__name__}: {err}") from None


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from `--config FILE` plus the flags present in `args`."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return build_config(cls, file=getattr(args, "config", None), overrides=overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
