"""Stage-1 selectors (after the vision encoder), one file per method, registered by name.

Every module of this package is imported here, so a new selector file registers itself; `DEFAULT_SELECTORS`
holds one instance of each with default parameters and drives the generic selector tests.
"""

import importlib
import pkgutil

from modules.selectors.base import SELECTORS, Calibrated, ScoreSelector, Selector, get_selector

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# The learned head (modules/head.py) builds on this package, so this package does not import it: the registry
# imports it when "learned" is first asked for by name.
SELECTORS.register_lazy("learned", "modules.head")

# Heads need a model's dims and trained weights: they have no default instance and get their own tests.
DEFAULT_SELECTORS: list[Selector] = [
    SELECTORS.build(name) for name in SELECTORS.names(imported_only=True)
    if not getattr(SELECTORS.get(name), "needs_weights", False)
]

__all__ = ["DEFAULT_SELECTORS", "SELECTORS", "Calibrated", "ScoreSelector", "Selector", "get_selector"]
