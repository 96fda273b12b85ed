"""Stage-2 scorers (inside the language model), one file per method, registered by name.

Every module of this package is imported here, so a new scorer file registers itself; `DEFAULT_SCORERS` holds
one instance of each with default parameters and drives the generic stage-2 tests.
"""

import importlib
import pkgutil

from modules.scorers.base import QUERY_MODES, SCORERS, Scorer, Stage2Context, get_scorer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT_SCORERS: list[Scorer] = [SCORERS.build(name) for name in SCORERS.names()]

__all__ = ["DEFAULT_SCORERS", "QUERY_MODES", "SCORERS", "Scorer", "Stage2Context", "get_scorer"]
