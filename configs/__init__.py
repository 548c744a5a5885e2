"""Typed configs: dataclasses filled from a YAML file and `key=value` overrides.

An unknown key, a value of the wrong type, or a value its dataclass rejects is a ConfigError that names
the dotted key. The YAML files of the shipped recipes live beside this module.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError  # noqa: F401 (raised here; defined with the other user-facing errors)

CONFIG_DIR = Path(__file__).parent
# The bench tooling's configs (teacher and classifier training, the benchmark), apart from what users run.
BENCH_CONFIGS = sorted(f"bench/{p.stem}" for p in (CONFIG_DIR / "bench").glob("*.yaml"))
# Keys renamed so that every stage names the sampler alike: old dotted-key tail -> new one.
RENAMED_KEYS = {"num_steps": "steps", "measure.samples": "measure.num_samples", "recipe": "method",
                "keep_sensitive_rows": "with_keep_sensitive"}


def installed_configs() -> list[str]:
    """The names of the YAML configs qdistill ships (`qdistill configs`), the bench tooling's as `bench/NAME`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) + BENCH_CONFIGS


def resolve_config(name: str | Path) -> Path:
    """A config file: `name` when it is a file; else, for a bare name (`dilatequant`, `dilatequant.yaml`,
    `bench/benchmark`), the installed config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_absolute() and path.parent in (Path("."), Path("bench")):
        installed = CONFIG_DIR / path.parent / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if installed.is_file():
            return installed
        moved = f" (now bench/{path.stem})" if f"bench/{path.stem}" in BENCH_CONFIGS else ""
        raise ConfigError(f"config file not found: {name}{moved} (not a file here, nor an installed config: "
                          f"{', '.join(installed_configs())})")
    raise ConfigError(f"config file not found: {path}")


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Build `cls` from the YAML at `path` (if any; a bare name is an installed config), then apply
    `key=value` overrides (dotted keys)."""
    data: dict = {}
    if path is not None:
        path = resolve_config(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return _build(cls, data, "")


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a section (mapping)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        for old, new in RENAMED_KEYS.items():
            old_tail, new_tail = old.rsplit(".", 1)[-1], new.rsplit(".", 1)[-1]
            if key == old_tail and new_tail in fields and (prefix + key).endswith(old):
                raise ConfigError(f"config key '{prefix}{key}' was renamed '{prefix}{new_tail}'")
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known keys here: {', '.join(fields)})")
    values = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {e}") from None


def _coerce(value: Any, tp: Any, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not a {_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        key_tp, value_tp = args or (Any, Any)
        return {_coerce(k, key_tp, f"{key}[{k!r}]"): _coerce(v, value_tp, f"{key}[{k!r}]") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}': {value!r} is not a {_name(tp)}")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
