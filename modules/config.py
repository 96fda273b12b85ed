"""Selectors and scorers as plain configs ({"name": ..., **params}), so plans save to and load from YAML/JSON.

Every selector/scorer is a dataclass; its init fields are its parameters, calibrated values included (so a
calibrated plan reloads to identical selections). Tensor-valued fields are stored as nested lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def to_config(component: Any) -> dict[str, Any]:
    """{"name": registered name, **init fields}; nested components become nested configs.

    Components that are not dataclasses (learned heads) provide their own `to_config()`.
    """
    if hasattr(component, "to_config"):
        return component.to_config()
    if not dataclasses.is_dataclass(component):
        raise ValueError(f"{type(component).__name__} is not a dataclass, so it cannot be saved in a plan")
    config: dict[str, Any] = {"name": component.name}
    for f in dataclasses.fields(component):
        if f.init:
            config[f.name] = _plain(getattr(component, f.name))
    return config


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and hasattr(value, "name"):
        return to_config(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def as_tensor_or_none(value: Any) -> torch.Tensor | None:
    """Accept a tensor, a (nested) list from a saved config, or None."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=torch.float32)
