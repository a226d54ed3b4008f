"""Serialisation helpers of the runner config (:mod:`fastsae.training.config`): the
nested, JSON/YAML-ready dict of a config, reading a YAML/JSON mapping from disk with
errors that name the file, and atomic writes."""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml


class _ConfigYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a number in exponent notation without a dot or
    without a signed exponent (``1e-4``, ``1.0e4``, ``3E5``) is a float, as in YAML 1.2,
    not a string (YAML 1.1): configs write learning rates that way."""


_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse a YAML config (safe loader; exponent-notation numbers are floats)."""
    return yaml.load(text, Loader=_ConfigYamlLoader)  # noqa: S506 - a SafeLoader subclass


def runner_config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested, JSON/YAML-ready dict (``sae`` holds the SAE config with its architecture)."""
    res: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "sae":
            value = value.to_dict()
            value["metadata"] = {
                k: v
                for k, v in value["metadata"].items()
                if k not in ("training_architecture", "training_architecture_details")
            }
        elif f.name == "logger":
            value = asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        res[f.name] = value
    return res


def read_mapping(path: Path, parse: Any) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = parse(path.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.')}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
