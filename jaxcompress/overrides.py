"""YAML config files and `--set key.sub=value` overrides."""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from jaxcompress.errors import ConfigError, UserError


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    return key.split("."), yaml.safe_load(value)


def apply_overrides(config: dict, overrides: list[str], strict: bool = True, name: str = "config") -> dict:
    """A copy of `config` with each `key.sub=value` set (values parsed as YAML scalars).

    With `strict`, the key must already exist (a typo is an error naming the key) unless its
    parent is a mapping that is explicitly open (an empty dict).
    """
    config = copy.deepcopy(config)
    for text in overrides or ():
        keys, value = parse_override(text)
        node = config
        for i, key in enumerate(keys[:-1]):
            if key not in node or node[key] is None:
                if strict:
                    raise ConfigError(f"--set {text}: {name} has no key {'.'.join(keys[:i + 1])!r}")
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {'.'.join(keys[:i + 1])} is not a section")
        if strict and keys[-1] not in node and node:
            raise ConfigError(f"--set {text}: {name} has no key {'.'.join(keys)!r}; "
                              f"known keys there: {', '.join(sorted(node))}")
        node[keys[-1]] = value
    return config


def check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
