"""YAML run configurations with command-line overrides.

A run is described by a YAML mapping whose keys are the keyword arguments of the API function
it drives (``pcfm.pretrain`` for ``pcfm pretrain``). Overrides on the command line are
``key=value`` pairs; dotted keys reach into nested mappings (``model.width=256``) and values are
parsed as YAML (``max_steps=100`` is an int, ``geometry=[a, b]`` a list, ``data=null`` None).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from pcfm.errors import PcfmError


class ConfigError(PcfmError, ValueError):
    """A configuration file or override that cannot be used."""


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        with open(path) as stream:
            config = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a configuration must be a mapping of options, got {type(config).__name__}")
    return config


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``config`` with each ``key=value`` (dotted keys for nested mappings) applied."""
    result = _deep_copy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            node = child
        node[leaf] = value
    return result


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
