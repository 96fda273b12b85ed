"""Name registries, so configs and plans can name selectors and scorers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {self._entries[name]}")
            self._entries[name] = cls
            cls.name = name
            return cls

        return add

    def register_lazy(self, name: str, module: str) -> None:
        """Name a component whose `module` registers it on import, and import that module on first use by name.

        For components that sit above the package that holds the registry (the learned head imports the selector
        base): the package need not import them, so it does not depend on what depends on it.
        """
        self._lazy[name] = module

    def get(self, name: str) -> type:
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name]

    def build(self, name: str, **params: Any):
        """An instance from parameters; classes with a `from_config` classmethod (e.g. learned heads that load
        weights from a path) build through it."""
        cls = self.get(name)
        factory = getattr(cls, "from_config", None)
        return factory(**params) if factory is not None else cls(**params)

    def names(self, imported_only: bool = False) -> list[str]:
        """Every registered name; `imported_only`: without the lazy entries whose module is not imported yet."""
        return sorted(self._entries if imported_only else set(self._entries) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy
